//! Capture files: an upstream stream kept as the raw `text/event-stream` text it arrived in.
//!
//! A capture is a sequence of frames, each `event:`, `id:` and `data:` lines and a blank line,
//! exactly as a server sends them and as the recorded captures of the shared data are: a file
//! written by `pleiades record` can be read by any SSE tool, and `pleiades replay` serves both
//! back with their ids and data unchanged. Frames are read with the ingester's own parser, so a
//! capture means what the stream meant.

use crate::ingest::sse::SseParser;

/// One event of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The `event:` type (`message` when the frame names none).
    pub event_type: String,
    /// The SSE id in force for this event, as the server sent it.
    pub id: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

/// What a file of events holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw server-sent events (a capture).
    Sse,
    /// One JSON event per line.
    Jsonl,
}

/// Tells a capture from a JSON-lines file by its first line that is not blank: a capture starts
/// with an SSE field or comment, a JSON-lines file with an event (or, for test data, any text
/// that is none of those).
pub fn detect(text: &str) -> Format {
    let first = text
        .trim_start_matches('\u{feff}')
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let field = first.split_once(':').map(|(f, _)| f);
    if first.starts_with(':') || matches!(field, Some("event" | "id" | "data" | "retry")) {
        Format::Sse
    } else {
        Format::Jsonl
    }
}

/// The frames of a capture. A last frame without its closing blank line still counts (some
/// published captures end that way); a frame cut inside a line is what [`complete_len`] is for.
pub fn parse(text: &str) -> Vec<Frame> {
    // Captures hold events of any size the stream sent: no cap beyond the file itself.
    let mut parser = SseParser::new(text.len() + 2);
    let mut events = Vec::new();
    parser.push(text.as_bytes(), &mut events);
    parser.push(b"\n\n", &mut events);
    events
        .into_iter()
        .map(|e| Frame {
            event_type: e.event_type,
            id: e.id.to_string(),
            data: e.data,
        })
        .collect()
}

/// Appends one frame as a server sends it: `event:`, `id:`, one `data:` line per line of data,
/// and the blank line that ends it.
pub fn write_frame(out: &mut Vec<u8>, event_type: &str, id: &str, data: &str) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(b"\nid: ");
    out.extend_from_slice(id.as_bytes());
    out.push(b'\n');
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
}

/// How many leading bytes of `bytes` are whole frames: up to the end of the last blank line.
/// What follows is a frame cut short (a crash while it was written); an empty capture is 0.
pub fn complete_len(bytes: &[u8]) -> usize {
    bytes
        .windows(2)
        .rposition(|w| w == b"\n\n")
        .map_or(0, |at| at + 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_captures_from_json_lines() {
        assert_eq!(detect("event: message\nid: x\ndata: {}\n\n"), Format::Sse);
        assert_eq!(detect("\n:ok\n\ndata: {}\n\n"), Format::Sse);
        assert_eq!(detect("{\"meta\":{}}\n"), Format::Jsonl);
        assert_eq!(detect("not json at all\n"), Format::Jsonl);
        assert_eq!(detect(""), Format::Jsonl);
    }

    #[test]
    fn frames_round_trip_through_the_text() {
        let mut text = Vec::new();
        write_frame(&mut text, "message", "[{\"t\":1}]", "{\"a\":1}");
        write_frame(&mut text, "message", "[{\"t\":2}]", "line one\nline two");
        let text = String::from_utf8(text).unwrap();
        assert_eq!(detect(&text), Format::Sse);
        let frames = parse(&text);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].id, "[{\"t\":1}]");
        assert_eq!(frames[1].data, "line one\nline two");
        assert_eq!(complete_len(text.as_bytes()), text.len());
    }

    #[test]
    fn a_frame_cut_short_is_not_whole() {
        let mut text = Vec::new();
        write_frame(&mut text, "message", "1", "{}");
        let whole = text.len();
        text.extend_from_slice(b"event: message\nid: 2\ndata: {\"cut");
        assert_eq!(complete_len(&text), whole);
        text.extend_from_slice(b"\"}\n");
        assert_eq!(complete_len(&text), whole, "the blank line is missing");
        assert_eq!(complete_len(b"event: message\n"), 0);
    }

    #[test]
    fn reads_the_shared_captures_including_an_unterminated_last_frame() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/sse");
        let mut counts = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let frames = parse(&text);
            assert!(frames
                .iter()
                .all(|f| crate::event::inspect(&f.data).is_ok()));
            assert!(frames.iter().all(|f| f.id.starts_with("[{\"topic\"")));
            counts.push(frames.len());
        }
        counts.sort();
        assert_eq!(counts, vec![3, 384]);
    }
}
