//! Readers of the event files: one segment from a byte position ([`SegmentReader`]), the whole
//! bus in write order from a segment and position ([`BusReader`]), and the tail the ingester
//! resumes from ([`read_tail`]).

use super::compressed::{self, SeekTable};
use super::{io_err, is_compressed, segment_number, segments, FileBusError, LineRecord};
use crate::bus::{BadRecord, Record, Source, Tail};
use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

/// A segment's bytes: the open file as written, or a compressed closed segment.
enum Body {
    Plain(File),
    Compressed {
        file: File,
        table: SeekTable,
        /// The frame decompressed last, by index: readers move forward through a frame.
        frame: Option<(usize, Vec<u8>)>,
    },
}

/// The content length of segment file `path` (for a compressed one, what it decompresses to).
pub fn segment_len(path: &Path) -> Result<u64, FileBusError> {
    if is_compressed(path) {
        let file = File::open(path).map_err(io_err("open", path))?;
        return Ok(SeekTable::read(&file, path)?.content_len());
    }
    match std::fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        // Compressed since it was listed.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            segment_len(&compressed::compressed_path(path))
        }
        Err(e) => Err(io_err("inspect", path)(e)),
    }
}

/// Reads whole lines of one segment, plain or compressed, from a byte position of its content.
pub struct SegmentReader {
    path: PathBuf,
    segment: u64,
    body: Body,
    position: u64,
    buf: Vec<u8>,
}

impl SegmentReader {
    /// A reader of segment `path` starting at byte `position` (the start of a line). A plain
    /// segment compressed since it was listed is read in its compressed form; one opened before
    /// is read to its end from the file already open.
    pub fn open(path: &Path, position: u64) -> Result<Self, FileBusError> {
        let (path, body) = if is_compressed(path) {
            (path.to_owned(), Self::compressed(path)?)
        } else {
            match File::open(path) {
                Ok(file) => (path.to_owned(), Body::Plain(file)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let packed = compressed::compressed_path(path);
                    let body = Self::compressed(&packed).map_err(|_| io_err("open", path)(e))?;
                    (packed, body)
                }
                Err(e) => return Err(io_err("open", path)(e)),
            }
        };
        Ok(SegmentReader {
            segment: segment_number(&path).unwrap_or(0),
            path,
            body,
            position,
            buf: Vec::new(),
        })
    }

    fn compressed(path: &Path) -> Result<Body, FileBusError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let table = SeekTable::read(&file, path)?;
        Ok(Body::Compressed {
            file,
            table,
            frame: None,
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

    /// True when the segment is read in its compressed form.
    pub fn is_compressed(&self) -> bool {
        matches!(self.body, Body::Compressed { .. })
    }

    /// The content's length now (a partial last line included).
    pub fn len(&self) -> Result<u64, FileBusError> {
        match &self.body {
            Body::Plain(file) => Ok(file
                .metadata()
                .map_err(io_err("inspect", &self.path))?
                .len()),
            Body::Compressed { table, .. } => Ok(table.content_len()),
        }
    }

    /// True when the segment has no content at all.
    pub fn is_empty(&self) -> Result<bool, FileBusError> {
        Ok(self.len()? == 0)
    }

    /// Bytes written after the position (a partial last line included).
    pub fn unread(&self) -> Result<u64, FileBusError> {
        Ok(self.len()?.saturating_sub(self.position))
    }

    /// The complete lines available now, about `want` bytes of them (more when one line is
    /// longer), each ending in `\n`; empty when only a partial line (or nothing) follows.
    pub fn read_lines(&mut self, want: usize) -> Result<&[u8], FileBusError> {
        self.buf.clear();
        match &mut self.body {
            Body::Plain(file) => read_plain(file, &self.path, self.position, want, &mut self.buf)?,
            Body::Compressed { file, table, frame } => read_compressed(
                file,
                &self.path,
                table,
                frame,
                self.position,
                want,
                &mut self.buf,
            )?,
        }
        self.position += self.buf.len() as u64;
        Ok(&self.buf)
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

/// `meta.dt` (ms) of the first and the last complete line of segment file `path`, each `None`
/// when there is no such line or it holds no event time.
pub fn event_times(path: &Path) -> Result<(Option<i64>, Option<i64>), FileBusError> {
    let mut reader = SegmentReader::open(path, 0)?;
    let first = reader
        .read_lines(64 * 1024)?
        .split_inclusive(|&b| b == b'\n')
        .next()
        .and_then(line_time);
    let last = reader.last_line()?.and_then(|line| line_time(&line));
    Ok((first, last))
}

fn line_time(line: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(line).ok()?;
    let record: LineRecord<'_> = serde_json::from_str(text.trim_end()).ok()?;
    crate::event::inspect(record.data.get())
        .ok()
        .map(|head| head.time_ms)
}

impl SegmentReader {
    /// The last complete line of the segment, if any.
    pub fn last_line(&mut self) -> Result<Option<Vec<u8>>, FileBusError> {
        let mut text = Vec::new();
        match &mut self.body {
            Body::Compressed { file, table, .. } => {
                let Some(frame) = table.frames.last() else {
                    return Ok(None);
                };
                compressed::read_frame(file, &self.path, frame, &mut text)?;
            }
            Body::Plain(file) => {
                use std::os::unix::fs::FileExt;
                let len = file
                    .metadata()
                    .map_err(io_err("inspect", &self.path))?
                    .len();
                let mut window = 64 * 1024u64;
                loop {
                    let from = len.saturating_sub(window);
                    text.resize((len - from) as usize, 0);
                    file.read_exact_at(&mut text, from)
                        .map_err(io_err("read", &self.path))?;
                    let Some(end) = text.iter().rposition(|&b| b == b'\n') else {
                        if from == 0 {
                            return Ok(None);
                        }
                        window *= 2;
                        continue;
                    };
                    text.truncate(end + 1);
                    // A whole line needs the newline before it too, or the file's start.
                    if from == 0 || text[..end].contains(&b'\n') {
                        break;
                    }
                    window *= 2;
                }
            }
        }
        let end = text.len().saturating_sub(1);
        let start = text[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        Ok((end > start).then(|| text[start..].to_vec()))
    }
}

/// Whole lines of an open segment from `position`: about `want` bytes, cut after a newline.
fn read_plain(
    file: &File,
    path: &Path,
    position: u64,
    want: usize,
    buf: &mut Vec<u8>,
) -> Result<(), FileBusError> {
    use std::os::unix::fs::FileExt;
    let mut chunk = want.max(4096);
    loop {
        let start = buf.len();
        buf.resize(start + chunk, 0);
        let n = file
            .read_at(&mut buf[start..], position + start as u64)
            .map_err(io_err("read", path))?;
        buf.truncate(start + n);
        if let Some(last) = buf.iter().rposition(|&b| b == b'\n') {
            buf.truncate(last + 1);
            return Ok(());
        }
        if n == 0 {
            // Only a partial line so far: it counts once its newline is written.
            buf.clear();
            return Ok(());
        }
        chunk *= 2;
    }
}

/// Whole lines of a compressed segment from `position`: frames end at line ends, so the lines
/// run from the position to the first line end at or past `want` bytes, or to a frame's end.
fn read_compressed(
    file: &File,
    path: &Path,
    table: &SeekTable,
    cached: &mut Option<(usize, Vec<u8>)>,
    mut position: u64,
    want: usize,
    buf: &mut Vec<u8>,
) -> Result<(), FileBusError> {
    while buf.len() < want.max(1) {
        let Some(index) = table.frame_at(position) else {
            return Ok(());
        };
        let frame = table.frames[index];
        if cached.as_ref().is_none_or(|(at, _)| *at != index) {
            let mut content = cached.take().map(|(_, c)| c).unwrap_or_default();
            compressed::read_frame(file, path, &frame, &mut content)?;
            *cached = Some((index, content));
        }
        let Some((_, content)) = cached.as_ref() else {
            return Ok(());
        };
        let from = (position - frame.content_offset) as usize;
        let rest = &content[from..];
        let room = want.saturating_sub(buf.len());
        let take = if rest.len() <= room {
            rest.len()
        } else {
            rest[room..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |at| room + at + 1)
        };
        buf.extend_from_slice(&rest[..take]);
        position += take as u64;
    }
    Ok(())
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

    /// How many records are left, counted without decoding them: for a reader that only
    /// passes over them.
    pub fn lines_left(&self) -> usize {
        let unterminated = self.lines.last().is_some_and(|&b| b != b'\n');
        memchr::memchr_iter(b'\n', self.lines).count() + usize::from(unterminated)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        if self.lines.is_empty() {
            return None;
        }
        let len = memchr::memchr(b'\n', self.lines).map_or(self.lines.len(), |i| i + 1);
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
    if let Some((sse_id, data)) = super::split_line(text) {
        return Record {
            source,
            start,
            end,
            sse_id,
            data: Ok(data),
        };
    }
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
                match SegmentReader::open(&path, at) {
                    Ok(reader) => return Ok(Some(reader)),
                    // Deleted by retention since the listing: the next one follows.
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e),
                }
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
        let mut reader = match SegmentReader::open(path, 0) {
            Ok(reader) => reader,
            // Deleted by retention since the listing: older than anything still needed.
            Err(e) if e.is_not_found() => break,
            Err(e) => return Err(e),
        };
        let mut ring: std::collections::VecDeque<String> = std::collections::VecDeque::new();
        let mut segment_last_id = None;
        loop {
            // Only complete lines come back: a torn last line does not count.
            let lines = reader.read_lines(1 << 20)?;
            if lines.is_empty() {
                break;
            }
            for line in lines.split_inclusive(|&b| b == b'\n') {
                let record = std::str::from_utf8(line)
                    .ok()
                    .and_then(|text| serde_json::from_str::<LineRecord<'_>>(text).ok());
                let Some(record) = record else {
                    tail.unreadable_lines += 1;
                    continue;
                };
                segment_last_id = Some(record.id.clone().into_owned());
                if let Ok(head) = crate::event::inspect(record.data.get()) {
                    tail.saw(head.position.as_ref());
                    if let Some(id) = head.id {
                        ring.push_back(id.into_owned());
                        if ring.len() > window - found {
                            ring.pop_front();
                        }
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
