//! Readers of the event files: one segment from a byte position ([`SegmentReader`]), the whole
//! bus in write order from a segment and position ([`BusReader`]), and the tail the ingester
//! resumes from ([`read_tail`]).

use super::{io_err, segment_number, segments, FileBusError, LineRecord};
use crate::bus::{BadRecord, Record, Source, Tail};
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Reads whole lines of one segment from a byte position.
pub struct SegmentReader {
    path: PathBuf,
    segment: u64,
    file: File,
    position: u64,
    buf: Vec<u8>,
}

impl SegmentReader {
    /// A reader of segment `path` starting at byte `position` (the start of a line).
    pub fn open(path: &Path, position: u64) -> Result<Self, FileBusError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        Ok(SegmentReader {
            path: path.to_owned(),
            segment: segment_number(path).unwrap_or(0),
            file,
            position,
            buf: Vec::new(),
        })
    }

    /// The position of the next unread line.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The segment's number.
    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// Bytes written after the position (a partial last line included).
    pub fn unread(&self) -> Result<u64, FileBusError> {
        let len = self
            .file
            .metadata()
            .map_err(io_err("inspect", &self.path))?
            .len();
        Ok(len.saturating_sub(self.position))
    }

    /// The complete lines available now, about `want` bytes of them (more when one line is
    /// longer), each ending in `\n`; empty when only a partial line (or nothing) follows.
    pub fn read_lines(&mut self, want: usize) -> Result<&[u8], FileBusError> {
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        let mut chunk = want.max(4096);
        loop {
            let start = self.buf.len();
            self.buf.resize(start + chunk, 0);
            let n = self
                .file
                .read_at(&mut self.buf[start..], self.position + start as u64)
                .map_err(io_err("read", &self.path))?;
            self.buf.truncate(start + n);
            if let Some(last) = self.buf.iter().rposition(|&b| b == b'\n') {
                self.buf.truncate(last + 1);
                self.position += self.buf.len() as u64;
                return Ok(&self.buf);
            }
            if n == 0 {
                // Only a partial line so far: it counts once its newline is written.
                self.buf.clear();
                return Ok(&self.buf);
            }
            chunk *= 2;
        }
    }

    /// The complete records available now (about `want` bytes of them), with their positions.
    pub fn read(&mut self, want: usize) -> Result<Records<'_>, FileBusError> {
        let start = self.position;
        let segment = self.segment;
        let lines = self.read_lines(want)?;
        Ok(Records {
            segment,
            offset: start,
            lines,
        })
    }
}

/// The records of a run of complete lines, in order.
pub struct Records<'a> {
    segment: u64,
    offset: u64,
    lines: &'a [u8],
}

impl Records<'_> {
    fn empty(segment: u64) -> Self {
        Records {
            segment,
            offset: 0,
            lines: &[],
        }
    }

    /// True when no record is left.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.lines.is_empty() {
            return None;
        }
        let len = self
            .lines
            .iter()
            .position(|&b| b == b'\n')
            .map_or(self.lines.len(), |i| i + 1);
        let (line, rest) = self.lines.split_at(len);
        self.lines = rest;
        let start = self.offset;
        self.offset += len as u64;
        Some(decode_line(self.segment, start, self.offset, line))
    }
}

/// One line as a record; a line that is not a bus record becomes a [`BadRecord`].
fn decode_line(segment: u64, start: u64, end: u64, line: &[u8]) -> Record<'_> {
    let source = Source::Segment(segment);
    let text = match std::str::from_utf8(line) {
        Ok(text) => text.trim_end(),
        Err(e) => {
            return Record {
                source,
                start,
                end,
                sse_id: Cow::Borrowed(""),
                data: Err(BadRecord {
                    error: format!("line is not UTF-8: {e}"),
                    raw: String::from_utf8_lossy(line).trim_end().to_owned().into(),
                }),
            }
        }
    };
    match serde_json::from_str::<LineRecord<'_>>(text) {
        Ok(record) => Record {
            source,
            start,
            end,
            sse_id: record.id,
            data: Ok(record.data.get()),
        },
        Err(e) => Record {
            source,
            start,
            end,
            sse_id: Cow::Borrowed(""),
            data: Err(BadRecord {
                error: e.to_string(),
                raw: Cow::Borrowed(text),
            }),
        },
    }
}

/// Reads the whole bus in write order, from a segment and a byte position in it, moving on to
/// the next segment once the current one is complete (a newer segment exists) and read.
pub struct BusReader {
    dir: PathBuf,
    current: Option<SegmentReader>,
    /// The first segment to look for when `current` is done or absent.
    next_segment: u64,
}

impl BusReader {
    /// A reader of `dir` from byte `position` of segment `segment`. A segment that no longer
    /// exists (or not yet) is passed over for the next one that does.
    pub fn open(dir: &Path, segment: u64, position: u64) -> Result<Self, FileBusError> {
        let mut reader = BusReader {
            dir: dir.to_owned(),
            current: None,
            next_segment: segment,
        };
        reader.current = reader.find(segment, position)?;
        Ok(reader)
    }

    /// The segment and position of the next unread record.
    pub fn position(&self) -> (u64, u64) {
        match &self.current {
            Some(reader) => (reader.segment(), reader.position()),
            None => (self.next_segment, 0),
        }
    }

    fn find(&mut self, from: u64, position: u64) -> Result<Option<SegmentReader>, FileBusError> {
        for (seq, path) in segments(&self.dir)? {
            if seq >= from {
                let at = if seq == from { position } else { 0 };
                self.next_segment = seq;
                return Ok(Some(SegmentReader::open(&path, at)?));
            }
        }
        Ok(None)
    }

    /// The complete records available now, about `want` bytes of them; empty when the reader
    /// has reached the end of what is written.
    pub fn read(&mut self, want: usize) -> Result<Records<'_>, FileBusError> {
        loop {
            let Some(reader) = &self.current else {
                self.current = self.find(self.next_segment, 0)?;
                if self.current.is_none() {
                    return Ok(Records::empty(self.next_segment));
                }
                continue;
            };
            let segment = reader.segment();
            if reader.unread()? > 0 {
                break;
            }
            // Nothing more in this segment: move on only when a newer one exists, since the
            // newest segment is still being written. The writer never appends to a segment once
            // a newer one exists, so this one is then complete.
            let newer = segments(&self.dir)?
                .into_iter()
                .find(|(seq, _)| *seq > segment);
            match newer {
                Some((seq, path)) if self.current_is_done()? => {
                    self.next_segment = seq;
                    self.current = Some(SegmentReader::open(&path, 0)?);
                }
                _ => return Ok(Records::empty(segment)),
            }
        }
        match self.current.as_mut() {
            Some(reader) => reader.read(want),
            None => Ok(Records::empty(self.next_segment)),
        }
    }

    /// True when the current segment has nothing left after its position.
    fn current_is_done(&self) -> Result<bool, FileBusError> {
        match &self.current {
            Some(reader) => Ok(reader.unread()? == 0),
            None => Ok(true),
        }
    }
}

/// Reads the newest `window` lines, walking segments backwards until enough are found.
pub fn read_tail(dir: &Path, window: usize) -> Result<Tail, FileBusError> {
    let mut tail = Tail::default();
    let mut newest_first: Vec<Vec<String>> = Vec::new();
    let mut found = 0usize;
    for (_, path) in segments(dir)?.iter().rev() {
        let file = File::open(path).map_err(io_err("open", path))?;
        let mut ring: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut segment_last_id = None;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(io_err("read", path))?;
            if n == 0 || line.last() != Some(&b'\n') {
                break; // end, or a torn line that does not count
            }
            let record = std::str::from_utf8(&line)
                .ok()
                .and_then(|text| serde_json::from_str::<LineRecord<'_>>(text).ok());
            let Some(record) = record else {
                tail.unreadable_lines += 1;
                continue;
            };
            segment_last_id = Some(record.id.clone().into_owned());
            if let Ok(head) = crate::event::inspect(record.data.get()) {
                if let Some(id) = head.id {
                    ring.push_back(id.into_owned());
                    if ring.len() > window - found {
                        ring.pop_front();
                    }
                }
            }
        }
        if tail.last_id.is_none() {
            // The newest segment with a readable line holds the resume point.
            tail.last_id = segment_last_id;
        }
        found += ring.len();
        newest_first.push(ring.into_iter().collect());
        if found >= window {
            break;
        }
    }
    for ids in newest_first.into_iter().rev() {
        tail.recent_ids.extend(ids);
    }
    Ok(tail)
}
