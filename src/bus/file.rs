//! The event-file bus: append-only `.jsonl` segments whose name order is write order (SPEC §4).
//!
//! Each line is `{"id": "<SSE id>", "data": <event object as received>}` and counts only once it
//! ends in `\n`. The writer is the only process that appends; after a crash it cuts a torn last
//! line before appending again, so readers never see a line that was not written whole. Invalid
//! events go to `quarantine/quarantine.jsonl`, outside the segment namespace.

use crate::config::{FileConfig, FsyncPolicy};
use crate::metrics::FileBusMetrics;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// A failed file operation, naming the file and what was being done.
#[derive(Debug, thiserror::Error)]
#[error("event files: cannot {op} {path}: {source}")]
pub struct FileBusError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FileBusError + 'a {
    move |source| FileBusError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One bus line, borrowed from its text.
#[derive(Debug, Deserialize)]
pub struct BusRecord<'a> {
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// Appends the bus line for one event to `out`. `data` must be valid JSON; line breaks in it can
/// only be whitespace between tokens (JSON strings cannot hold raw control characters), so they
/// become spaces and the line stays one line without changing what the event says.
pub fn encode_record(id: &str, data: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"id\":");
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, id);
    out.extend_from_slice(b",\"data\":");
    if data.contains(['\n', '\r']) {
        out.extend(
            data.bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    } else {
        out.extend_from_slice(data.as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

/// The segment files in `dir`, in write order.
pub fn segments(dir: &Path) -> Result<Vec<PathBuf>, FileBusError> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        if let Some(seq) = segment_seq(&name.to_string_lossy()) {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

fn segment_name(seq: u64) -> String {
    // Twenty digits hold any u64, so name order is numeric order.
    format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}")
}

/// What the bus remembers of its own tail: where to resume and which ids were delivered last.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tail {
    /// The SSE id of the last complete line.
    pub last_id: Option<String>,
    /// `meta.id`s of the newest lines, oldest first, at most the requested number.
    pub recent_ids: Vec<String>,
    /// Lines that could not be read back (reported, skipped).
    pub unreadable_lines: u64,
}

/// Reads the newest `window` lines, walking segments backwards until enough are found.
pub fn read_tail(dir: &Path, window: usize) -> Result<Tail, FileBusError> {
    let mut tail = Tail::default();
    let mut newest_first: Vec<Vec<String>> = Vec::new();
    let mut found = 0usize;
    for path in segments(dir)?.iter().rev() {
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
                .and_then(|text| serde_json::from_str::<BusRecord<'_>>(text).ok());
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

/// One invalid event kept with the reason it was refused.
#[derive(Debug, Serialize)]
pub struct QuarantineRecord<'a> {
    /// When it was quarantined (RFC 3339, UTC).
    pub time: String,
    /// Short, stable reason (a metric label value too).
    pub reason: &'a str,
    /// The detailed error.
    pub error: String,
    /// The SSE id it came with.
    pub id: &'a str,
    /// The data exactly as received, as a string.
    pub data: &'a str,
}

/// An append-only quarantine file under `<file.dir>/quarantine/`.
pub struct Quarantine {
    path: PathBuf,
    file: Option<File>,
}

impl Quarantine {
    /// The quarantine file `name` in the bus directory `dir`; created on first use.
    pub fn new(dir: &Path, name: &str) -> Self {
        Quarantine {
            path: dir.join("quarantine").join(name),
            file: None,
        }
    }

    /// Appends one record and syncs it; returns the bytes written.
    pub fn write(&mut self, record: &QuarantineRecord<'_>) -> Result<u64, FileBusError> {
        let path = &self.path;
        if self.file.is_none() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            }
            let file = open_append(path)?;
            cut_torn_line(&file, path)?;
            self.file = Some(file);
        }
        let mut line = serde_json::to_vec(record).map_err(|e| io_err("encode", path)(e.into()))?;
        line.push(b'\n');
        if let Some(file) = self.file.as_mut() {
            file.write_all(&line).map_err(io_err("append to", path))?;
            file.sync_data().map_err(io_err("sync", path))?;
        }
        Ok(line.len() as u64)
    }
}

/// The single writer of a bus directory.
pub struct SegmentWriter {
    dir: PathBuf,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    fsync_interval: std::time::Duration,
    file: File,
    path: PathBuf,
    seq: u64,
    len: u64,
    dirty: bool,
    last_sync: Instant,
    quarantine: Quarantine,
    metrics: FileBusMetrics,
}

impl SegmentWriter {
    /// Opens the newest segment for appending (creating the directory and a first segment if
    /// needed) and cuts a torn last line left by a crash.
    pub fn open(config: &FileConfig, metrics: FileBusMetrics) -> Result<Self, FileBusError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        let existing = segments(&dir)?;
        let (seq, path) = match existing.last() {
            Some(path) => (
                path.file_name()
                    .and_then(|n| segment_seq(&n.to_string_lossy()))
                    .unwrap_or(1),
                path.clone(),
            ),
            None => (1, dir.join(segment_name(1))),
        };
        let file = open_append(&path)?;
        let len = cut_torn_line(&file, &path)?;
        if existing.is_empty() {
            metrics.segments.inc();
            sync_dir(&dir)?;
        }
        Ok(SegmentWriter {
            dir,
            segment_bytes: config.segment_bytes,
            fsync: config.fsync,
            fsync_interval: config.fsync_interval,
            file,
            path,
            seq,
            len,
            dirty: false,
            last_sync: Instant::now(),
            quarantine: Quarantine::new(&config.dir, "quarantine.jsonl"),
            metrics,
        })
    }

    /// Appends complete lines (each ending in `\n`) and syncs them as the policy says. Lines are
    /// never split across segments.
    pub fn append(&mut self, lines: &[u8], count: u64) -> Result<(), FileBusError> {
        if lines.is_empty() {
            return Ok(());
        }
        if self.len > 0 && self.len + lines.len() as u64 > self.segment_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(lines) {
            self.metrics.errors.inc();
            return Err(io_err("append to", &self.path)(e));
        }
        self.len += lines.len() as u64;
        self.dirty = true;
        self.metrics.events.inc_by(count);
        self.metrics.bytes.inc_by(lines.len() as u64);
        match self.fsync {
            FsyncPolicy::Batch => self.sync()?,
            FsyncPolicy::Interval if self.last_sync.elapsed() >= self.fsync_interval => {
                self.sync()?
            }
            FsyncPolicy::Interval | FsyncPolicy::Never => {}
        }
        Ok(())
    }

    /// Forces written data to disk now (policy `never` included: this is what shutdown calls).
    pub fn sync(&mut self) -> Result<(), FileBusError> {
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        if let Err(e) = self.file.sync_data() {
            self.metrics.errors.inc();
            return Err(io_err("sync", &self.path)(e));
        }
        self.metrics
            .fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// With `fsync = "interval"`, syncs data that has waited long enough; called on a timer.
    pub fn sync_if_due(&mut self) -> Result<(), FileBusError> {
        if self.fsync == FsyncPolicy::Interval && self.last_sync.elapsed() >= self.fsync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Keeps an invalid event, with its reason, in the quarantine file.
    pub fn quarantine(&mut self, record: &QuarantineRecord<'_>) -> Result<(), FileBusError> {
        let bytes = self.quarantine.write(record)?;
        self.metrics.quarantine_bytes.inc_by(bytes);
        Ok(())
    }

    /// The segment being written.
    pub fn current_segment(&self) -> &Path {
        &self.path
    }

    fn rotate(&mut self) -> Result<(), FileBusError> {
        // The old segment is complete: make it durable before anything lands in the next one.
        self.dirty = true;
        self.sync()?;
        let seq = self.seq + 1;
        let path = self.dir.join(segment_name(seq));
        let file = open_append(&path)?;
        sync_dir(&self.dir)?;
        self.metrics.segments.inc();
        tracing::info!(segment = %path.display(), "started a new event segment");
        self.file = file;
        self.path = path;
        self.seq = seq;
        self.len = 0;
        Ok(())
    }
}

/// Reads whole lines of one segment from a byte position, for aggregators and other readers.
pub struct SegmentReader {
    path: PathBuf,
    file: File,
    position: u64,
    buf: Vec<u8>,
}

impl SegmentReader {
    /// A reader of `path` starting at byte `position` (the start of a line).
    pub fn open(path: &Path, position: u64) -> Result<Self, FileBusError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        Ok(SegmentReader {
            path: path.to_owned(),
            file,
            position,
            buf: Vec::new(),
        })
    }

    /// The position of the next unread line.
    pub fn position(&self) -> u64 {
        self.position
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
}

/// The sequence number in a segment file's name.
pub fn segment_number(path: &Path) -> Option<u64> {
    segment_seq(&path.file_name()?.to_string_lossy())
}

/// Opens (creating if needed) a file for appending; readable too, for torn-line repair.
fn open_append(path: &Path) -> Result<File, FileBusError> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Truncates bytes after the last `\n` (a line torn by a crash) and returns the resulting length.
fn cut_torn_line(file: &File, path: &Path) -> Result<u64, FileBusError> {
    let len = file.metadata().map_err(io_err("inspect", path))?.len();
    if len == 0 {
        return Ok(0);
    }
    // Read backwards in blocks until a newline is found.
    let mut reader = file;
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let keep = loop {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        reader
            .seek(SeekFrom::Start(start))
            .map_err(io_err("seek", path))?;
        std::io::Read::read_exact(&mut reader, &mut block[..n]).map_err(io_err("read", path))?;
        if let Some(pos) = block[..n].iter().rposition(|&b| b == b'\n') {
            break start + pos as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    if keep < len {
        tracing::warn!(file = %path.display(), torn_bytes = len - keep, "cut a torn last line left by a crash");
        file.set_len(keep).map_err(io_err("truncate", path))?;
        file.sync_all().map_err(io_err("sync", path))?;
    }
    Ok(keep)
}

fn sync_dir(dir: &Path) -> Result<(), FileBusError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn config(dir: &Path, segment_bytes: u64) -> FileConfig {
        FileConfig {
            dir: dir.to_owned(),
            segment_bytes,
            ..FileConfig::default()
        }
    }

    fn event(n: usize) -> String {
        format!(r#"{{"meta":{{"id":"id-{n}","dt":"2024-01-01T00:00:00Z"}},"n":{n}}}"#)
    }

    #[test]
    fn records_round_trip_and_stay_one_line() {
        let mut out = Vec::new();
        encode_record("[{\"t\":1}]", "{\"a\":\n1}", &mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(text.matches('\n').count(), 1);
        let record: BusRecord<'_> = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(record.id, "[{\"t\":1}]");
        assert_eq!(record.data.get(), "{\"a\": 1}");
    }

    #[test]
    fn rotates_by_size_and_tail_spans_segments() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new().unwrap();
        let mut writer =
            SegmentWriter::open(&config(dir.path(), 4096), metrics.file_bus.clone()).unwrap();
        for n in 0..200 {
            let mut line = Vec::new();
            encode_record(&format!("id{n}"), &event(n), &mut line);
            writer.append(&line, 1).unwrap();
        }
        let segs = segments(dir.path()).unwrap();
        assert!(segs.len() > 2, "{segs:?}");
        for seg in &segs {
            assert!(std::fs::metadata(seg).unwrap().len() <= 4096);
        }
        let tail = read_tail(dir.path(), 150).unwrap();
        assert_eq!(tail.last_id.as_deref(), Some("id199"));
        let expected: Vec<String> = (50..200).map(|n| format!("id-{n}")).collect();
        assert_eq!(tail.recent_ids, expected);
        assert_eq!(metrics.file_bus.events.get(), 200);
    }

    #[test]
    fn a_torn_last_line_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new().unwrap();
        {
            let mut writer =
                SegmentWriter::open(&config(dir.path(), 1 << 20), metrics.file_bus.clone())
                    .unwrap();
            let mut line = Vec::new();
            encode_record("a", &event(1), &mut line);
            writer.append(&line, 1).unwrap();
        }
        let seg = segments(dir.path()).unwrap().pop().unwrap();
        let before = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(b"{\"id\":\"b\",\"da")
            .unwrap();
        assert_eq!(
            read_tail(dir.path(), 10).unwrap().last_id.as_deref(),
            Some("a")
        );
        let mut writer =
            SegmentWriter::open(&config(dir.path(), 1 << 20), metrics.file_bus.clone()).unwrap();
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), before);
        let mut line = Vec::new();
        encode_record("c", &event(2), &mut line);
        writer.append(&line, 1).unwrap();
        let text = std::fs::read_to_string(&seg).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<BusRecord<'_>>(l).is_ok()));
    }

    #[test]
    fn quarantine_is_outside_the_segment_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new().unwrap();
        let mut writer =
            SegmentWriter::open(&config(dir.path(), 1 << 20), metrics.file_bus.clone()).unwrap();
        writer
            .quarantine(&QuarantineRecord {
                time: "t".into(),
                reason: "not_json",
                error: "e".into(),
                id: "i",
                data: "garbage",
            })
            .unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        let q = std::fs::read_to_string(dir.path().join("quarantine/quarantine.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(q.trim()).unwrap();
        assert_eq!(v["data"], "garbage");
        assert_eq!(v["reason"], "not_json");
    }
}
