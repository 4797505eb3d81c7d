//! The event-file bus: append-only `.jsonl` segments whose name order is write order (SPEC §4).
//!
//! Each line is `{"id": "<SSE id>", "data": <event object as received>}` and counts only once it
//! ends in `\n`. The writer ([`SegmentWriter`]) is the only process that appends; after a crash
//! it cuts a torn last line before appending again, so readers ([`SegmentReader`] for one
//! segment, [`BusReader`] across segments) never see a line that was not written whole. Invalid
//! events go to files under `quarantine/`, outside the segment namespace.
//!
//! A closed segment (a newer one exists) is compressed in the background into
//! `segment-<20 digits>.jsonl.zst` ([`compressed`]: the zstd seekable layout); its content, and
//! so every store position in it, stays the same, and every reader reads both forms. The writer
//! holds an exclusive lock on the directory ([`lock`]), and [`retention`] decides which counted
//! segments may go.

pub mod compressed;
pub mod lock;
mod reader;
pub mod retention;
mod writer;

pub use reader::{event_times, read_tail, segment_len, BusReader, Records, SegmentReader};
pub use writer::{QuarantineFile, QuarantinePolicy, SegmentWriter};

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
    #[error("event files: {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "event files: {dir} is written by another ingester ({holder}); run one ingester per bus"
    )]
    Locked { dir: PathBuf, holder: String },
}

impl FileBusError {
    /// True when the file was not there: a segment deleted by retention since it was listed.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileBusError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// True when writing failed on the way to the disk (a full or failing file system), as
    /// opposed to a bus that cannot be opened: the writer pauses and tries again.
    pub fn is_write_failure(&self) -> bool {
        matches!(self, FileBusError::Io { op, .. } if WRITE_OPS.contains(op))
    }
}

/// The operations whose failure means the disk refuses data, not that the bus is unusable.
const WRITE_OPS: &[&str] = &[
    "append to",
    "sync",
    "truncate",
    "open",
    "sync directory",
    "create directory",
];

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
    if memchr::memchr2(b'\n', b'\r', data.as_bytes()).is_some() {
        out.extend(
            data.bytes()
                .map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    } else {
        out.extend_from_slice(data.as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

/// Splits a bus line laid out as [`encode_record`] writes it into its id and its data, without
/// parsing the data: a reader that counts or relays an event parses it anyway, and parsing it
/// here first as well was a quarter of a rebuild's time. The data is what the line holds
/// between `"data":` and the closing brace, without the whitespace around it, as the full
/// parse would find it; whether it is valid JSON is for the event's own parse to say, as it is
/// for a Kafka message's value. `None` when the line is laid out any other way: the caller
/// then parses it whole ([`LineRecord`]).
pub fn split_line(text: &str) -> Option<(Cow<'_, str>, &str)> {
    let bytes = text.as_bytes();
    let open = b"{\"id\":\"".len();
    if !bytes.starts_with(b"{\"id\":\"") {
        return None;
    }
    // The id's closing quote: the first one no backslash escapes.
    let mut at = open;
    let mut escaped = false;
    let close = loop {
        let found = at + memchr::memchr2(b'"', b'\\', &bytes[at..])?;
        if bytes[found] == b'"' {
            break found;
        }
        escaped = true;
        // The escaped character is never the closing quote.
        at = found + 2;
        if at > bytes.len() {
            return None;
        }
    };
    let id = match escaped {
        // Raw control characters are not allowed in a JSON string.
        false if bytes[open..close].iter().all(|&b| b >= 0x20) => Cow::Borrowed(&text[open..close]),
        false => return None,
        true => Cow::Owned(serde_json::from_str::<String>(&text[open - 1..=close]).ok()?),
    };
    let data = text[close + 1..]
        .strip_prefix(",\"data\":")?
        .strip_suffix('}')?
        .trim_matches([' ', '\t', '\n', '\r']);
    // An event is an object: a line cut short of its closing brace is not taken for one
    // whose data lost its own.
    (data.len() >= 2 && data.starts_with('{') && data.ends_with('}')).then_some((id, data))
}

/// The segment files in `dir`, in write order, with their numbers: one path per number, the
/// compressed one when a compression has just finished and the plain copy is not gone yet.
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
    // Name order puts `….jsonl` before `….jsonl.zst`: keep the later of a pair.
    found.reverse();
    found.dedup_by_key(|(seq, _)| *seq);
    found.reverse();
    Ok(found)
}

/// The sequence number in a segment file's name (plain or compressed).
pub fn segment_number(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let name = name
        .strip_suffix(compressed::COMPRESSED_SUFFIX)
        .unwrap_or(name);
    name.strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?
        .parse()
        .ok()
}

/// True for a compressed segment's path.
pub fn is_compressed(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "zst")
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
    use reader::segment_len;
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

    /// What the full parse finds in a line, for comparison with [`split_line`].
    fn parsed(text: &str) -> Option<(String, String)> {
        let record: LineRecord<'_> = serde_json::from_str(text).ok()?;
        Some((record.id.into_owned(), record.data.get().to_owned()))
    }

    #[test]
    fn a_line_is_split_as_the_full_parse_reads_it() {
        // Every recorded event, with ids as upstream sends them (escaped quotes) and others.
        let ids = [
            r#"[{"topic":"eqiad.mediawiki.recentchange","partition":0,"offset":5}]"#,
            "plain",
            "",
            "tab\there \\ \u{00e9} \u{1} \" end",
            "é ü \u{1F600}",
        ];
        let mut lines = 0;
        for file in crate::event::recorded::FILES {
            for (n, data) in crate::event::recorded::lines(file).iter().enumerate() {
                let mut out = Vec::new();
                encode_record(ids[n % ids.len()], data, &mut out);
                let text = std::str::from_utf8(&out).unwrap().trim_end();
                let (id, split) = split_line(text).expect("our own layout");
                assert_eq!(
                    Some((id.into_owned(), split.to_owned())),
                    parsed(text),
                    "{text}"
                );
                lines += 1;
            }
        }
        assert!(lines > 1000);
        // Whitespace around the data is not part of it.
        let (_, data) = split_line(r#"{"id":"x","data": {"a":1} }"#).unwrap();
        assert_eq!(data, r#"{"a":1}"#);
        // Laid out another way, or not a record at all: left to the full parse.
        for other in [
            r#"{"data":{"a":1},"id":"x"}"#,
            r#"{ "id":"x","data":{"a":1}}"#,
            r#"{"id":"x" ,"data":{"a":1}}"#,
            r#"{"id":"x","data":}"#,
            r#"{"id":"x","data":{"a":1}"#,
            r#"{"id":"x","data":[1]}"#,
            r#"{"id":"x\"#,
            r#"{"id":"x\q","data":{"a":1}}"#,
            "{\"id\":\"a\tb\",\"data\":{}}",
            r#"{"id":"x"#,
            "not a record",
        ] {
            assert!(split_line(other).is_none(), "{other}");
        }
        // A line of our layout whose data is not JSON keeps its text: the event's own parse
        // says what is wrong with it, as for a Kafka message.
        assert_eq!(
            split_line(r#"{"id":"x","data":{"a":}}"#).map(|(_, d)| d),
            Some(r#"{"a":}"#)
        );
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

    /// Every record of the bus from the start, read with [`BusReader`].
    fn read_everything(dir: &Path) -> Vec<(u64, u64, u64, String)> {
        let mut reader = BusReader::open(dir, 0, 0).unwrap();
        let mut all = Vec::new();
        loop {
            let records: Vec<_> = reader
                .read(700)
                .unwrap()
                .map(|r| {
                    let Source::Segment(n) = r.source else {
                        panic!("a segment")
                    };
                    (n, r.start, r.end, r.sse_id.into_owned())
                })
                .collect();
            if records.is_empty() {
                return all;
            }
            all.extend(records);
        }
    }

    /// Waits (bounded) until every closed segment of `dir` is compressed.
    fn wait_for_compression(dir: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let all = segments(dir).unwrap();
            if all[..all.len() - 1].iter().all(|(_, p)| is_compressed(p)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "closed segments were not compressed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn compressed_segments_read_like_plain_ones_with_the_same_positions() {
        let (dir, metrics, mut writer) = bus(16 * 1024);
        publish_in(&mut writer, 0, 3000, 7);
        wait_for_compression(dir.path());
        let listed = segments(dir.path()).unwrap();
        assert!(listed.len() > 5, "{listed:?}");
        assert!(
            !is_compressed(&listed.last().unwrap().1),
            "the newest stays plain"
        );
        let read = read_everything(dir.path());
        assert_eq!(read.len(), 3000);
        let ids: Vec<String> = read.iter().map(|r| r.3.clone()).collect();
        assert_eq!(ids, (0..3000).map(|n| format!("id{n}")).collect::<Vec<_>>());
        // Positions are offsets into each segment's content: contiguous from 0 to its length.
        for (number, path) in &listed {
            let mine: Vec<_> = read.iter().filter(|r| r.0 == *number).collect();
            assert_eq!(mine[0].1, 0);
            for pair in mine.windows(2) {
                assert_eq!(pair[0].2, pair[1].1);
            }
            assert_eq!(mine.last().unwrap().2, segment_len(path).unwrap());
        }
        // Reading a compressed segment from a position in its middle starts at that record.
        let (number, path) = &listed[1];
        let mine: Vec<_> = read.iter().filter(|r| r.0 == *number).collect();
        let middle = mine[mine.len() / 2];
        let mut reader = SegmentReader::open(path, middle.1).unwrap();
        assert!(reader.is_compressed());
        let first = reader.read(10).unwrap().next().unwrap();
        assert_eq!(
            (first.start, first.sse_id.as_ref()),
            (middle.1, middle.3.as_str())
        );
        let ratio = metrics.file_bus.compressed_content_bytes.get() as f64
            / metrics.file_bus.compressed_bytes.get() as f64;
        assert!(ratio > 3.0, "compression ratio {ratio}");
        // The tail, and so the resume point, reads through compressed segments.
        let tail = read_tail(dir.path(), 2500).unwrap();
        assert_eq!(tail.recent_ids.len(), 2500);
        assert_eq!(tail.last_id.as_deref(), Some("id2999"));
    }

    #[test]
    fn a_reader_inside_a_segment_that_gets_compressed_reads_on() {
        let (dir, _metrics, mut writer) = bus(1 << 20);
        publish(&mut writer, 0, 200);
        let (_, path) = segments(dir.path()).unwrap().pop().unwrap();
        let mut open_before = SegmentReader::open(&path, 0).unwrap();
        let half: Vec<u64> = open_before.read(4000).unwrap().map(|r| r.end).collect();
        drop(writer);
        compressed::compress_segment(&path, compressed::LEVEL).unwrap();
        assert!(!path.exists());
        // The reader that had the plain file open reads it to its end.
        let mut rest = 0;
        loop {
            let n = open_before.read(1 << 20).unwrap().count();
            if n == 0 {
                break;
            }
            rest += n;
        }
        assert_eq!(half.len() + rest, 200);
        // One that was given the plain name after the compression reads the compressed copy.
        let mut late = SegmentReader::open(&path, *half.last().unwrap()).unwrap();
        assert!(late.is_compressed());
        assert_eq!(late.read(1 << 20).unwrap().count(), 200 - half.len());
    }

    #[test]
    fn numbering_never_restarts_after_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new(1).unwrap();
        let newest = {
            let mut writer =
                SegmentWriter::open(&config(dir.path(), 4096), metrics.file_bus.clone()).unwrap();
            publish_in(&mut writer, 0, 200, 5);
            segment_number(writer.current_segment()).unwrap()
        };
        assert!(newest > 3);
        // The compressor may still be replacing a closed segment by its compressed form: delete
        // until no segment of either form is left, whichever form each one is in.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let left = segments(dir.path()).unwrap();
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "segments left: {left:?}"
            );
            for (_, path) in left {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{path:?}: {e}"),
                    _ => {}
                }
            }
        }
        let writer =
            SegmentWriter::open(&config(dir.path(), 4096), metrics.file_bus.clone()).unwrap();
        assert_eq!(segment_number(writer.current_segment()), Some(newest + 1));
    }

    #[test]
    fn quarantine_is_bounded_and_keeps_each_record_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let policy = QuarantinePolicy {
            max_bytes: 1024 * 1024,
            fsync: crate::config::FsyncPolicy::Batch,
            fsync_interval: std::time::Duration::from_secs(1),
        };
        let data = "x".repeat(900);
        fn record<'a>(n: usize, id: &'a str, data: &'a str) -> QuarantineRecord<'a> {
            QuarantineRecord::new(RejectReason::NotJson, format!("e{n}"), id, data)
        }
        let ids: Vec<String> = (0..5000).map(|n| format!("[{n}]")).collect();
        {
            let mut file = QuarantineFile::new(dir.path(), "quarantine.jsonl", policy);
            for (n, id) in ids.iter().enumerate() {
                assert!(file.write(&record(n, id, &data)).unwrap() > 0);
            }
            // A resume overlap delivers the newest ones again.
            for (n, id) in ids.iter().enumerate().skip(4990) {
                assert_eq!(file.write(&record(n, id, &data)).unwrap(), 0);
            }
            file.sync().unwrap();
        }
        let total: u64 = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= policy.max_bytes, "{total} bytes of quarantine");
        let pieces = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .count();
        assert!(pieces > 2, "rotated into {pieces} files");
        // After a restart the memory is rebuilt from the file: the overlap is still dropped.
        let mut file = QuarantineFile::new(dir.path(), "quarantine.jsonl", policy);
        assert_eq!(file.write(&record(4999, &ids[4999], &data)).unwrap(), 0);
        assert!(file.write(&record(5000, "[5000]", &data)).unwrap() > 0);
    }
}
