//! The event-file bus: append-only `.jsonl` segments whose name order is write order (SPEC §4).
//!
//! Each line is `{"id": "<SSE id>", "data": <event object as received>}` and counts only once it
//! ends in `\n`. The writer ([`SegmentWriter`]) is the only process that appends; after a crash
//! it cuts a torn last line before appending again, so readers ([`SegmentReader`] for one
//! segment, [`BusReader`] across segments) never see a line that was not written whole. Invalid
//! events go to files under `quarantine/`, outside the segment namespace.

mod reader;
mod writer;

pub use reader::{read_tail, BusReader, Records, SegmentReader};
pub use writer::{QuarantineFile, SegmentWriter};

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".jsonl";

/// A failed file operation, naming the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum FileBusError {
    #[error("event files: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("event files: a blocking task failed: {0}")]
    Task(String),
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FileBusError + 'a {
    move |source| FileBusError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// One bus line, borrowed from its text.
#[derive(Debug, Deserialize)]
pub struct LineRecord<'a> {
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

/// The segment files in `dir`, in write order, with their numbers.
pub fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, FileBusError> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(seq) = segment_number(&entry.path()) {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// The sequence number in a segment file's name.
pub fn segment_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

/// The file name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    // Twenty digits hold any u64, so name order is numeric order.
    format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}")
}

/// The store's key for the position reached in segment `seq`.
pub fn source_key(seq: u64) -> String {
    format!("file:{}", segment_name(seq))
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
    use crate::bus::{Outgoing, QuarantineRecord, Source};
    use crate::config::FileConfig;
    use crate::event::RejectReason;
    use crate::metrics::Metrics;
    use std::io::Write;

    fn config(dir: &Path, segment_bytes: u64) -> FileConfig {
        FileConfig {
            dir: dir.to_owned(),
            segment_bytes,
            ..FileConfig::default()
        }
    }

    /// A fresh bus directory and its writer, rotating at `segment_bytes`.
    fn bus(segment_bytes: u64) -> (tempfile::TempDir, Metrics, SegmentWriter) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new(1).unwrap();
        let writer =
            SegmentWriter::open(&config(dir.path(), segment_bytes), metrics.file_bus.clone())
                .unwrap();
        (dir, metrics, writer)
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
        let record: LineRecord<'_> = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(record.id, "[{\"t\":1}]");
        assert_eq!(record.data.get(), "{\"a\": 1}");
    }

    #[test]
    fn rotates_by_size_and_tail_spans_segments() {
        let (dir, metrics, mut writer) = bus(4096);
        for n in 0..200 {
            let mut line = Vec::new();
            encode_record(&format!("id{n}"), &event(n), &mut line);
            writer.append(&line, 1).unwrap();
        }
        let segs: Vec<PathBuf> = segments(dir.path())
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
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
        let metrics = Metrics::new(1).unwrap();
        {
            let mut writer =
                SegmentWriter::open(&config(dir.path(), 1 << 20), metrics.file_bus.clone())
                    .unwrap();
            let mut line = Vec::new();
            encode_record("a", &event(1), &mut line);
            writer.append(&line, 1).unwrap();
        }
        let (_, seg) = segments(dir.path()).unwrap().pop().unwrap();
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
            .all(|l| serde_json::from_str::<LineRecord<'_>>(l).is_ok()));
    }

    #[test]
    fn quarantine_is_outside_the_segment_namespace() {
        let (dir, _metrics, mut writer) = bus(1 << 20);
        writer
            .quarantine(&QuarantineRecord::new(
                RejectReason::NotJson,
                "e",
                "i",
                "garbage",
            ))
            .unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        let q = std::fs::read_to_string(dir.path().join("quarantine/quarantine.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(q.trim()).unwrap();
        assert_eq!(v["data"], "garbage");
        assert_eq!(v["reason"], "not_json");
    }

    /// Publishes events `from..to`, `per_batch` at a time (rotation happens between batches).
    fn publish_in(writer: &mut SegmentWriter, from: usize, to: usize, per_batch: usize) {
        let mut n = from;
        while n < to {
            let end = (n + per_batch).min(to);
            publish(writer, n, end);
            n = end;
        }
    }

    fn publish(writer: &mut SegmentWriter, from: usize, to: usize) {
        let events: Vec<(String, String)> =
            (from..to).map(|n| (format!("id{n}"), event(n))).collect();
        let outgoing: Vec<Outgoing<'_>> = events
            .iter()
            .map(|(id, data)| Outgoing {
                sse_id: id,
                data,
                key: None,
                time_ms: 0,
            })
            .collect();
        assert_eq!(
            writer.publish(&outgoing).unwrap().events,
            (to - from) as u64
        );
    }

    #[test]
    fn segment_records_carry_their_positions_and_bad_lines_are_named() {
        let (dir, _metrics, mut writer) = bus(1 << 20);
        publish(&mut writer, 0, 3);
        writer.append(b"not a record\n", 1).unwrap();
        let (seq, path) = segments(dir.path()).unwrap().pop().unwrap();
        let mut reader = SegmentReader::open(&path, 0).unwrap();
        let records: Vec<_> = reader
            .read(1 << 20)
            .unwrap()
            .map(|r| {
                (
                    r.source,
                    r.start,
                    r.end,
                    r.sse_id.into_owned(),
                    r.data.map(str::to_owned).map_err(|b| b.raw.into_owned()),
                )
            })
            .collect();
        assert_eq!(records.len(), 4);
        assert_eq!(records[0].0, Source::Segment(seq));
        assert_eq!(records[0].1, 0);
        for pair in records.windows(2) {
            assert_eq!(pair[0].2, pair[1].1, "records are contiguous");
        }
        assert_eq!(records[3].2, std::fs::metadata(&path).unwrap().len());
        assert_eq!(records[1].3, "id1");
        assert_eq!(records[1].4.as_deref(), Ok(event(1).as_str()));
        assert_eq!(records[3].4, Err("not a record".to_owned()));
        // Reading again from the middle starts at the next record.
        let mut reader = SegmentReader::open(&path, records[2].1).unwrap();
        assert_eq!(reader.read(1 << 20).unwrap().count(), 2);
        assert!(reader.read(1 << 20).unwrap().is_empty());
    }

    #[test]
    fn the_bus_reader_follows_segments_in_write_order_and_waits_on_the_newest() {
        let (dir, _metrics, mut writer) = bus(1024);
        publish_in(&mut writer, 0, 60, 3);
        assert!(segments(dir.path()).unwrap().len() > 2);
        let mut reader = BusReader::open(dir.path(), 0, 0).unwrap();
        let mut ids = Vec::new();
        let read_all = |reader: &mut BusReader, ids: &mut Vec<String>| loop {
            let records: Vec<String> = reader
                .read(1000)
                .unwrap()
                .map(|r| r.sse_id.into_owned())
                .collect();
            if records.is_empty() {
                break;
            }
            ids.extend(records);
        };
        read_all(&mut reader, &mut ids);
        assert_eq!(ids, (0..60).map(|n| format!("id{n}")).collect::<Vec<_>>());
        // More lines in the newest segment and in new ones are read as they come.
        publish_in(&mut writer, 60, 90, 3);
        read_all(&mut reader, &mut ids);
        assert_eq!(ids.len(), 90);
        assert_eq!(ids[89], "id89");
        // Resuming from a position reads exactly what follows it.
        let (segment, position) = reader.position();
        publish(&mut writer, 90, 91);
        let mut resumed = BusReader::open(dir.path(), segment, position).unwrap();
        let next: Vec<String> = resumed
            .read(1000)
            .unwrap()
            .map(|r| r.sse_id.into_owned())
            .collect();
        assert_eq!(next, vec!["id90".to_owned()]);
    }
}
