//! A streaming `text/event-stream` parser following the WHATWG rules; pure: bytes in, events out.
//!
//! The parser never looks at a byte twice: each chunk is scanned once for line ends and each
//! complete line is interpreted once, so its cost is linear in the input however it is chunked.
//! Lines longer than the cap are dropped while they stream in, so memory stays bounded too.
//! The last event id is shared, not copied, by the events that carry it, and an id longer than
//! [`MAX_ID_BYTES`] is ignored, so a hostile `id:` line costs its own bytes once, not once per
//! event.

use std::sync::Arc;

/// The longest `id:` value kept. EventStreams ids are a JSON array of a few Kafka positions,
/// a few hundred bytes; a longer one is ignored (as an id holding NULL is) and counted.
pub const MAX_ID_BYTES: usize = 4096;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` type; `message` when the stream gave none.
    pub event_type: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id at dispatch time (it persists across events, as in a browser); shared
    /// by every event dispatched under it.
    pub id: Arc<str>,
}

/// Running totals a caller turns into metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SseStats {
    /// Every line read, blank lines and comments included.
    pub lines: u64,
    /// Events dispatched to the caller.
    pub events: u64,
    /// Events dropped because a line or the event's data exceeded the cap.
    pub oversize_events: u64,
    /// Comment lines (`:ok` heartbeats among them).
    pub comments: u64,
    /// `id:` values ignored because they were longer than [`MAX_ID_BYTES`].
    pub long_ids: u64,
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Incremental parser state for one connection.
#[derive(Debug)]
pub struct SseParser {
    max_bytes: usize,
    line: Vec<u8>,
    /// The current line outgrew the cap: its remaining bytes are skipped up to its end.
    line_over: bool,
    /// The previous chunk ended in CR, so a leading LF completes that line end.
    skip_lf: bool,
    /// No line has been completed yet, so a leading byte order mark is still to be removed.
    first_line: bool,
    data: String,
    event_type: String,
    id_buffer: String,
    last_event_id: Arc<str>,
    /// The event being built lost data to the cap and is dropped at dispatch.
    event_over: bool,
    retry_ms: Option<u64>,
    stats: SseStats,
}

impl SseParser {
    /// A parser that drops any line, or any event's data, longer than `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        SseParser {
            max_bytes,
            line: Vec::new(),
            line_over: false,
            skip_lf: false,
            first_line: true,
            data: String::new(),
            event_type: String::new(),
            id_buffer: String::new(),
            last_event_id: Arc::from(""),
            event_over: false,
            retry_ms: None,
            stats: SseStats::default(),
        }
    }

    /// Feeds the next bytes of the stream and appends every event they complete to `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut Vec<SseEvent>) {
        while !input.is_empty() {
            if self.skip_lf {
                self.skip_lf = false;
                if input[0] == b'\n' {
                    input = &input[1..];
                    continue;
                }
            }
            match memchr::memchr2(b'\n', b'\r', input) {
                Some(end) => {
                    self.skip_lf = input[end] == b'\r';
                    self.end_line(&input[..end], out);
                    input = &input[end + 1..];
                }
                None => {
                    self.extend_line(input);
                    break;
                }
            }
        }
    }

    /// The id a reconnect should send as `Last-Event-ID` (empty when the stream sent none).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// The reconnection time the server asked for with `retry:`, in milliseconds.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Totals since this parser was created.
    pub fn stats(&self) -> SseStats {
        self.stats
    }

    fn extend_line(&mut self, bytes: &[u8]) {
        if self.line_over || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > self.max_bytes {
            self.line_over = true;
            self.line = Vec::new();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    /// Completes the current line with `tail`, its last bytes in this chunk. A line that began
    /// in this chunk (nearly every line) is interpreted where it lies, never copied.
    fn end_line(&mut self, tail: &[u8], out: &mut Vec<SseEvent>) {
        self.stats.lines += 1;
        let first = std::mem::replace(&mut self.first_line, false);
        if !self.line.is_empty() || self.line_over {
            self.extend_line(tail);
            if std::mem::replace(&mut self.line_over, false) {
                self.event_over = true;
                return;
            }
            let line = std::mem::take(&mut self.line);
            self.interpret_bytes(&line, first, out);
            // Keep a modest buffer for the next line, but give back what one huge line took.
            self.line = if line.capacity() <= 64 * 1024 {
                let mut reused = line;
                reused.clear();
                reused
            } else {
                Vec::new()
            };
        } else if tail.len() > self.max_bytes {
            self.event_over = true;
        } else {
            self.interpret_bytes(tail, first, out);
        }
    }

    /// Interprets one complete line, without its line end.
    fn interpret_bytes(&mut self, bytes: &[u8], first: bool, out: &mut Vec<SseEvent>) {
        let bytes = if first {
            bytes.strip_prefix(BOM).unwrap_or(bytes)
        } else {
            bytes
        };
        // Invalid UTF-8 is replaced rather than fatal; valid lines are borrowed, not copied.
        let text = String::from_utf8_lossy(bytes);
        self.interpret(&text, out);
    }

    fn interpret(&mut self, line: &str, out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            self.stats.comments += 1;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => {
                self.event_type.clear();
                self.event_type.push_str(value);
            }
            "data" => {
                if self.event_over {
                    return;
                }
                if self.data.len() + value.len() + 1 > self.max_bytes {
                    self.event_over = true;
                    self.data = String::new();
                } else {
                    // One allocation for the usual single-line data, the line end included.
                    self.data.reserve(value.len() + 1);
                    self.data.push_str(value);
                    self.data.push('\n');
                }
            }
            // An id holding NULL is ignored, as the standard says; so is one too long to be an
            // EventStreams position list.
            "id" if value.len() > MAX_ID_BYTES => self.stats.long_ids += 1,
            "id" if !value.contains('\0') => {
                self.id_buffer.clear();
                self.id_buffer.push_str(value);
            }
            // Digits beyond what fits are still a (very long) time: they saturate, and the
            // caller decides how long it is willing to wait.
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = Some(value.parse().unwrap_or(u64::MAX));
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        if *self.last_event_id != *self.id_buffer {
            self.last_event_id = Arc::from(self.id_buffer.as_str());
        }
        let event_type = std::mem::take(&mut self.event_type);
        if std::mem::replace(&mut self.event_over, false) {
            self.stats.oversize_events += 1;
            self.data.clear();
            return;
        }
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the trailing LF every data line added
        self.stats.events += 1;
        out.push(SseEvent {
            event_type: if event_type.is_empty() {
                "message".to_owned()
            } else {
                event_type
            },
            data,
            id: self.last_event_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_chunks(chunks: &[&[u8]], max: usize) -> (Vec<SseEvent>, SseParser) {
        let mut parser = SseParser::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            parser.push(chunk, &mut out);
        }
        (out, parser)
    }

    fn parse(input: &str) -> Vec<SseEvent> {
        parse_chunks(&[input.as_bytes()], 1 << 20).0
    }

    fn ev(event_type: &str, data: &str, id: &str) -> SseEvent {
        SseEvent {
            event_type: event_type.into(),
            data: data.into(),
            id: Arc::from(id),
        }
    }

    #[test]
    fn lf_cr_and_crlf_line_ends_are_equivalent() {
        let expected = vec![ev("message", "a", "1"), ev("message", "b", "2")];
        assert_eq!(parse("id: 1\ndata: a\n\nid: 2\ndata: b\n\n"), expected);
        assert_eq!(parse("id: 1\rdata: a\r\rid: 2\rdata: b\r\r"), expected);
        assert_eq!(
            parse("id: 1\r\ndata: a\r\n\r\nid: 2\r\ndata: b\r\n\r\n"),
            expected
        );
        assert_eq!(parse("id: 1\r\ndata: a\n\rid: 2\rdata: b\r\n\n"), expected);
    }

    #[test]
    fn crlf_split_across_reads_is_one_line_end() {
        let (out, parser) = parse_chunks(
            &[b"data: a\r", b"\n", b"\r", b"\ndata: b\r", b"\n\r\n"],
            1024,
        );
        assert_eq!(out, vec![ev("message", "a", ""), ev("message", "b", "")]);
        assert_eq!(parser.stats().lines, 4);
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_eq!(
            parse("data: {\ndata:  \"a\": 1\ndata: }\n\n"),
            vec![ev("message", "{\n \"a\": 1\n}", "")]
        );
        assert_eq!(parse("data\ndata\n\n"), vec![ev("message", "\n", "")]);
    }

    #[test]
    fn comments_are_ignored_and_counted() {
        let (out, parser) = parse_chunks(&[b":ok\n: heartbeat\ndata: x\n\n"], 1024);
        assert_eq!(out, vec![ev("message", "x", "")]);
        assert_eq!(parser.stats().comments, 2);
    }

    #[test]
    fn event_type_and_id_rules() {
        let out = parse("event: error\ndata: e\n\ndata: m\n\nid: 7\n\ndata: n\n\nid\ndata: o\n\nid: a\0b\ndata: p\n\n");
        assert_eq!(
            out,
            vec![
                ev("error", "e", ""),
                ev("message", "m", ""),
                ev("message", "n", "7"),
                ev("message", "o", ""),
                ev("message", "p", ""),
            ]
        );
    }

    #[test]
    fn id_only_frame_moves_the_resume_point() {
        let (out, parser) = parse_chunks(&[b"data: a\nid: 1\n\nid: 2\n\n"], 1024);
        assert_eq!(out, vec![ev("message", "a", "1")]);
        assert_eq!(parser.last_event_id(), "2");
    }

    #[test]
    fn a_long_id_is_ignored_and_a_kept_one_is_shared() {
        let long = "9".repeat(MAX_ID_BYTES + 1);
        let input = format!("id: 1\ndata: a\n\nid: {long}\ndata: b\n\ndata: c\n\n");
        let (out, parser) = parse_chunks(&[input.as_bytes()], 1 << 20);
        assert_eq!(
            out,
            vec![
                ev("message", "a", "1"),
                ev("message", "b", "1"),
                ev("message", "c", "1")
            ]
        );
        assert_eq!(parser.stats().long_ids, 1);
        // One allocation for the id, however many events carry it.
        assert!(Arc::ptr_eq(&out[1].id, &out[2].id));
        let exact = "7".repeat(MAX_ID_BYTES);
        let (out, _) = parse_chunks(&[format!("id: {exact}\ndata: d\n\n").as_bytes()], 1 << 20);
        assert_eq!(&*out[0].id, exact.as_str());
    }

    #[test]
    fn a_retry_beyond_u64_saturates() {
        let (_, parser) = parse_chunks(&[b"retry: 18446744073709551615999\n"], 1024);
        assert_eq!(parser.retry_ms(), Some(u64::MAX));
    }

    #[test]
    fn retry_accepts_only_digits() {
        let (_, parser) = parse_chunks(&[b"retry: 1500\n"], 1024);
        assert_eq!(parser.retry_ms(), Some(1500));
        let (_, parser) = parse_chunks(&[b"retry: 15x\nretry: -1\nretry:\n"], 1024);
        assert_eq!(parser.retry_ms(), None);
    }

    #[test]
    fn field_without_colon_and_without_space() {
        assert_eq!(parse("data:x\n\n"), vec![ev("message", "x", "")]);
        assert_eq!(parse("data:  x\n\n"), vec![ev("message", " x", "")]);
        assert_eq!(
            parse("unknown: y\ndata: x\n\n"),
            vec![ev("message", "x", "")]
        );
    }

    #[test]
    fn leading_bom_is_removed_once_even_when_split() {
        let (out, _) = parse_chunks(&[b"\xEF", b"\xBB", b"\xBFdata: a\n\n"], 1024);
        assert_eq!(out, vec![ev("message", "a", "")]);
        // A second BOM is data of the field name, so that line is an unknown field.
        let (out, _) = parse_chunks(&[b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\ndata: b\n\n"], 1024);
        assert_eq!(out, vec![ev("message", "b", "")]);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let (out, _) = parse_chunks(&[b"data: a\xFF", b"\xC3", b"\xA9b\n\n"], 1024);
        assert_eq!(out, vec![ev("message", "a\u{FFFD}\u{e9}b", "")]);
    }

    #[test]
    fn oversize_line_drops_the_event_and_keeps_going() {
        let long = "x".repeat(100);
        let input = format!("id: 1\ndata: {long}\n\nid: 2\ndata: ok\n\n");
        let (out, parser) = parse_chunks(&[input.as_bytes()], 64);
        assert_eq!(out, vec![ev("message", "ok", "2")]);
        assert_eq!(parser.stats().oversize_events, 1);
        assert_eq!(parser.stats().events, 1);
    }

    #[test]
    fn oversize_data_across_many_lines_is_dropped() {
        let line = format!("data: {}\n", "y".repeat(30));
        let input = format!("{}\ndata: ok\n\n", line.repeat(5));
        let (out, parser) = parse_chunks(&[input.as_bytes()], 100);
        assert_eq!(out, vec![ev("message", "ok", "")]);
        assert_eq!(parser.stats().oversize_events, 1);
    }

    #[test]
    fn incomplete_last_event_is_not_dispatched() {
        let path = format!(
            "{}/../shared/data/sse/dlw-github_wiki_visualizer_example.events_2022-12-11.sse.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(path).unwrap();
        let (out, _) = parse_chunks(&[&bytes], 1 << 20);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn recorded_firehose_yields_every_frame() {
        let path = format!(
            "{}/../shared/data/sse/pdm-g10_wikimedia-recentchange-sample_2026-06-20.sse.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut bytes = std::fs::read(path).unwrap();
        // The capture stops right after its last data line: strictly, that frame is incomplete.
        assert_eq!(parse_chunks(&[&bytes], 1 << 22).0.len(), 383);
        bytes.extend_from_slice(b"\n\n");
        let (whole, _) = parse_chunks(&[&bytes], 1 << 22);
        assert_eq!(whole.len(), 384);
        assert!(whole
            .iter()
            .all(|e| e.event_type == "message" && e.id.starts_with("[{")));
        assert!(whole.iter().all(|e| crate::event::inspect(&e.data).is_ok()));
        let pieces: Vec<&[u8]> = bytes.chunks(1460).collect();
        let (chunked, _) = parse_chunks(&pieces, 1 << 22);
        assert_eq!(whole, chunked);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes at all, cut anywhere, never panic and never yield more data than the cap.
        #[test]
        fn never_panics(input in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(0usize..2048, 0..16), max in 1usize..256) {
            let mut parser = SseParser::new(max);
            let mut out = Vec::new();
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut start = 0;
            for cut in cuts.into_iter().chain(std::iter::once(input.len())) {
                let cut = cut.min(input.len()).max(start);
                parser.push(&input[start..cut], &mut out);
                start = cut;
            }
            for event in &out {
                prop_assert!(event.data.len() <= max);
            }
        }

        /// However a well-formed stream is chunked, it yields the same events.
        #[test]
        fn chunking_does_not_matter(
            frames in proptest::collection::vec(("[a-z]{0,3}", "[ -~]{0,40}", prop_oneof![Just("\n"), Just("\r"), Just("\r\n")]), 0..12),
            chunk in 1usize..64,
        ) {
            let mut text = String::new();
            for (id, data, eol) in &frames {
                text.push_str(&format!("id: {id}{eol}data: {data}{eol}{eol}"));
            }
            let bytes = text.as_bytes();
            let (whole, _) = parse_chunks(&[bytes], 4096);
            let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
            let (chunked, _) = parse_chunks(&pieces, 4096);
            prop_assert_eq!(&whole, &chunked);
            prop_assert_eq!(whole.len(), frames.len());
        }
    }
}
