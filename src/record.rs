//! `pleiades record`: keeps the upstream stream, with its real ids, as a capture file.
//!
//! It treats Wikimedia as the ingester does (the configured User-Agent, backoff with jitter,
//! `Retry-After` and `retry:` honoured up to `ingest.max_retry_after`, the stall watchdog, a
//! rewound resume whose overlap is dropped by `meta.id`), and the file is its own cursor: run
//! again on the same file after an interruption, it drops a frame cut short by a crash, resumes
//! from the id of the last whole frame and appends without writing any event twice. The file is
//! a raw SSE capture ([`crate::capture`]) that `pleiades replay` serves back with the same ids.

use crate::capture;
use crate::config::IngestConfig;
use crate::ingest::client::{self, Backoff, ConnectError, Upstream};
use crate::ingest::cursor::DedupeWindow;
use crate::ingest::sse::{SseEvent, SseParser};
use crate::progress::Progress;
use futures_util::StreamExt;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// At most this much of the end of an existing capture is read back to rebuild the resume
/// point and the window of recent `meta.id`s: a resume overlap at peak rate (10 s of a few
/// hundred events of about 1 KiB each) is far smaller.
const TAIL_BYTES: u64 = 32 << 20;

/// Options of `pleiades record`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordOptions {
    /// The capture file, raw server-sent events as received (created if missing). An existing
    /// capture is continued: its last whole frame is the resume point.
    #[arg(long)]
    pub out: PathBuf,
    /// The upstream stream (default: ingest.url of the configuration).
    #[arg(long)]
    pub url: Option<String>,
    /// Stop once the file holds this many events (counting those of earlier runs, so the same
    /// command finishes an interrupted capture).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Stop after recording for this long (e.g. "15m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Where a new capture starts: an RFC 3339 time or epoch milliseconds (default:
    /// ingest.since, else "now"). Ignored when the file already holds events.
    #[arg(long)]
    pub since: Option<String>,
}

/// Why a recording cannot go on. Upstream trouble is not here: it is retried.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("capture file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {message}")]
    Option { key: &'static str, message: String },
    #[error(transparent)]
    Client(ConnectError),
}

/// What a finished recording did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Events in the file now.
    pub events: u64,
    /// Events this run appended.
    pub appended: u64,
    /// The id of the last frame in the file.
    pub last_id: Option<String>,
}

/// The capture being written, and where it stands.
struct Capture {
    path: PathBuf,
    file: std::fs::File,
    events: u64,
    last_id: Option<String>,
    window: DedupeWindow,
}

impl Capture {
    /// Opens (or creates) the file, cuts off a frame left half-written, and rebuilds the resume
    /// point, the event count and the window of recent `meta.id`s from what it holds.
    fn open(path: PathBuf, window: usize) -> Result<Capture, RecordError> {
        let io = |source| RecordError::File {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let from = len.saturating_sub(TAIL_BYTES);
        file.seek(SeekFrom::Start(from)).map_err(io)?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).map_err(io)?;
        // A tail read from the middle starts inside a frame: from the first frame boundary on.
        let start = if from == 0 {
            0
        } else {
            tail.windows(2)
                .position(|w| w == b"\n\n")
                .map_or(tail.len(), |at| at + 2)
        };
        let whole = capture::complete_len(&tail).max(start);
        if whole < tail.len() {
            let cut = from + whole as u64;
            tracing::warn!(path = %path.display(), bytes = tail.len() - whole, "the capture ends in a frame cut short; it is dropped and fetched again");
            file.set_len(cut).map_err(io)?;
        }
        let frames = capture::parse(&String::from_utf8_lossy(&tail[start..whole]));
        let mut recent = DedupeWindow::new(window);
        for frame in &frames {
            if let Some(id) = crate::event::inspect(&frame.data).ok().and_then(|h| h.id) {
                recent.insert(&id);
            }
        }
        // The count covers the whole file; only its tail was parsed.
        let events = if from == 0 {
            frames.len() as u64
        } else {
            count_frames(&mut file).map_err(io)?
        };
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(Capture {
            path,
            file,
            events,
            last_id: frames.last().map(|f| f.id.clone()),
            window: recent,
        })
    }

    /// Appends the events not seen yet, up to `room` of them, in one write; returns how many.
    fn append(&mut self, events: &[SseEvent], room: u64) -> Result<u64, RecordError> {
        let mut out = Vec::new();
        let mut appended = 0;
        let mut last_id = None;
        for event in events {
            if appended == room {
                break;
            }
            if let Some(id) = crate::event::inspect(&event.data).ok().and_then(|h| h.id) {
                if !self.window.insert(&id) {
                    continue;
                }
            }
            capture::write_frame(&mut out, &event.event_type, &event.id, &event.data);
            last_id = Some(&event.id);
            appended += 1;
        }
        if appended > 0 {
            self.file
                .write_all(&out)
                .map_err(|source| RecordError::File {
                    path: self.path.clone(),
                    source,
                })?;
            self.events += appended;
            self.last_id = last_id.map(|id| id.to_string());
        }
        Ok(appended)
    }

    fn sync(&self) -> Result<(), RecordError> {
        self.file.sync_data().map_err(|source| RecordError::File {
            path: self.path.clone(),
            source,
        })
    }
}

/// Frames in the whole file (a blank line ends each): for captures longer than the tail read.
fn count_frames(file: &mut std::fs::File) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let (mut frames, mut previous) = (0u64, b'\n');
    loop {
        let buf = std::io::BufRead::fill_buf(&mut reader)?;
        if buf.is_empty() {
            return Ok(frames);
        }
        for &b in buf {
            if b == b'\n' && previous == b'\n' {
                frames += 1;
            }
            previous = b;
        }
        let n = buf.len();
        std::io::BufRead::consume(&mut reader, n);
    }
}

/// How one connection ended.
enum Ended {
    /// The server closed, the body broke or went silent: reconnect.
    Again { delivered: u64 },
    /// The limit or the duration was reached, or shutdown was asked for.
    Done,
}

/// Records until the limit, the duration or `shutdown`, reconnecting as the ingester does.
pub async fn run(
    options: RecordOptions,
    ingest: &IngestConfig,
    shutdown: CancellationToken,
) -> Result<Recorded, RecordError> {
    let url = options.url.clone().unwrap_or_else(|| ingest.url.clone());
    let url = reqwest::Url::parse(&url).map_err(|e| RecordError::Option {
        key: "--url",
        message: format!("{url:?}: {e}"),
    })?;
    let since = options
        .since
        .clone()
        .unwrap_or_else(|| ingest.since.clone());
    let since_ms = match since.as_str() {
        "" => None,
        text => Some(
            crate::config::parse_since(text).ok_or_else(|| RecordError::Option {
                key: "--since",
                message: format!("{text:?} is neither an RFC 3339 time nor epoch milliseconds"),
            })?,
        ),
    };
    let upstream = Upstream::new(url, &ingest.user_agent, ingest.connect_timeout)
        .map_err(RecordError::Client)?;
    let mut capture = Capture::open(options.out.clone(), ingest.dedupe_window)?;
    let before = capture.events;
    tracing::info!(path = %options.out.display(), events = before, resume_from = capture.last_id.as_deref().unwrap_or("(none)"), peer = %upstream.peer(), "recording");
    let progress = Progress::events("record", options.limit.map(|l| l.saturating_sub(before)));
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let stop = shutdown.child_token();
    if let Some(deadline) = deadline {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }
    let mut backoff = Backoff::new(ingest.backoff_initial, ingest.backoff_max);
    let mut server_retry = None;
    while options.limit.is_none_or(|l| capture.events < l) {
        let resume = capture.last_id.as_deref().map(|id| {
            crate::event::rewind_stream_id(id, ingest.resume_rewind.as_millis() as i64)
                .unwrap_or_else(|_| id.to_owned())
        });
        let open = upstream.open(
            resume.as_deref(),
            since_ms.filter(|_| resume.is_none()),
            ingest.connect_timeout,
        );
        let response = tokio::select! {
            _ = stop.cancelled() => break,
            r = open => r,
        };
        let delay = match response {
            Ok(response) => {
                tracing::info!(peer = %upstream.peer(), last_event_id = resume.as_deref().unwrap_or("(none)"), "connected to upstream");
                let ended = stream(
                    response,
                    &mut capture,
                    options.limit,
                    ingest,
                    &progress,
                    &stop,
                    &mut server_retry,
                )
                .await?;
                match ended {
                    Ended::Done => break,
                    Ended::Again { delivered } => {
                        if delivered > 0 {
                            backoff.reset();
                        }
                        let retry: Option<Duration> = server_retry;
                        backoff.next_delay().max(retry.unwrap_or(Duration::ZERO))
                    }
                }
            }
            Err(error) => {
                let delay = match &error {
                    ConnectError::Throttled {
                        retry_after: Some(asked),
                        ..
                    } => client::throttled_delay(clamped(*asked, ingest.max_retry_after)),
                    _ => backoff.next_delay(),
                };
                tracing::warn!(%error, retry_in = ?delay, "connection to upstream failed");
                delay
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    stop.cancel();
    capture.sync()?;
    progress.finish();
    let recorded = Recorded {
        events: capture.events,
        appended: capture.events - before,
        last_id: capture.last_id.clone(),
    };
    tracing::info!(path = %options.out.display(), events = recorded.events, appended = recorded.appended, last_id = recorded.last_id.as_deref().unwrap_or("(none)"), "recording stopped; the capture is synced");
    Ok(recorded)
}

/// A wait the server asked for, cut to `max` (and logged when cut).
fn clamped(asked: Duration, max: Duration) -> Duration {
    let (delay, cut) = client::clamp_server_delay(asked, max);
    if cut {
        tracing::warn!(asked = ?asked, waiting = ?delay, "upstream asked for a longer wait than ingest.max_retry_after");
    }
    delay
}

/// Writes one connection's events to the capture until it ends.
async fn stream(
    response: reqwest::Response,
    capture: &mut Capture,
    limit: Option<u64>,
    ingest: &IngestConfig,
    progress: &Progress,
    stop: &CancellationToken,
    server_retry: &mut Option<Duration>,
) -> Result<Ended, RecordError> {
    let mut parser = SseParser::new(ingest.max_event_bytes);
    let mut body = response.bytes_stream();
    let mut events = Vec::new();
    let mut delivered = 0;
    let mut seen = (0, 0);
    let mut last_progress = tokio::time::Instant::now();
    loop {
        let chunk = tokio::select! {
            _ = stop.cancelled() => return Ok(Ended::Done),
            _ = tokio::time::sleep_until(last_progress + ingest.stall_timeout) => {
                tracing::warn!(timeout = ?ingest.stall_timeout, "no event or heartbeat within the stall timeout; reconnecting");
                return Ok(Ended::Again { delivered });
            }
            next = body.next() => next,
        };
        let bytes = match chunk {
            Some(Ok(bytes)) => bytes,
            Some(Err(error)) => {
                tracing::warn!(%error, "upstream stream broke; reconnecting");
                return Ok(Ended::Again { delivered });
            }
            None => {
                tracing::info!(delivered, "upstream closed the stream; reconnecting");
                return Ok(Ended::Again { delivered });
            }
        };
        parser.push(&bytes, &mut events);
        if let Some(ms) = parser.retry_ms() {
            *server_retry = Some(clamped(Duration::from_millis(ms), ingest.max_retry_after));
        }
        let stats = parser.stats();
        if (stats.events, stats.comments) != seen {
            seen = (stats.events, stats.comments);
            last_progress = tokio::time::Instant::now();
        }
        let room = limit.map_or(u64::MAX, |l| l.saturating_sub(capture.events));
        let appended = capture.append(&events, room)?;
        events.clear();
        delivered += appended;
        progress.inc(appended);
        if limit.is_some_and(|l| capture.events >= l) {
            return Ok(Ended::Done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, meta_id: &str) -> SseEvent {
        SseEvent {
            event_type: "message".into(),
            data: format!(
                r#"{{"meta":{{"id":"{meta_id}","dt":"2026-06-20T15:49:48Z","domain":"x.org"}}}}"#
            ),
            id: id.into(),
        }
    }

    #[test]
    fn a_capture_continues_without_repeats_and_drops_a_torn_frame() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sse.txt");
        let mut capture = Capture::open(path.clone(), 100).unwrap();
        assert_eq!(capture.events, 0);
        let first = [event("[1]", "a"), event("[2]", "b"), event("[2]", "c")];
        assert_eq!(capture.append(&first, u64::MAX).unwrap(), 3);
        drop(capture);
        // A crash in the middle of the next frame.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(b"event: message\nid: [3]\ndata: {\"me")
            .unwrap();
        drop(file);
        let mut capture = Capture::open(path.clone(), 100).unwrap();
        assert_eq!(capture.events, 3);
        assert_eq!(capture.last_id.as_deref(), Some("[2]"));
        // The rewound resume delivers c again, then d; the limit leaves room for one.
        let again = [event("[2]", "c"), event("[3]", "d"), event("[4]", "e")];
        assert_eq!(capture.append(&again, 1).unwrap(), 1);
        let text = std::fs::read_to_string(&path).unwrap();
        let frames = capture::parse(&text);
        let ids: Vec<&str> = frames.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["[1]", "[2]", "[2]", "[3]"]);
        assert_eq!(capture::complete_len(text.as_bytes()), text.len());
    }

    #[test]
    fn frames_are_counted_in_a_long_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sse.txt");
        let mut text = Vec::new();
        for i in 0..10 {
            capture::write_frame(&mut text, "message", &i.to_string(), "{}");
        }
        std::fs::write(&path, &text).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        assert_eq!(count_frames(&mut file).unwrap(), 10);
    }
}
