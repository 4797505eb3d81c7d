//! `pleiades replay`: serves recorded events as an EventStreams-compatible SSE endpoint.
//!
//! Ids are KafkaSSE-style (`[{"topic":…,"partition":0,"timestamp":…}]`) and resuming follows the
//! upstream rule: the stream restarts at the earliest event whose timestamp is at or after the
//! one asked for (inclusive, so an exact resume repeats the last event). It is the upstream for
//! tests, demos and offline backfills, and can inject the faults a real upstream shows: cut
//! connections, throttling with `Retry-After`, and silent stalls.
//!
//! It reads two formats, told apart by their first line: JSON lines (one event per line, ids
//! made up as above) and raw captures (`pleiades record`, or the `.sse.txt` captures of the
//! shared data), whose frames are served with their own ids and data, byte for byte, and whose
//! ids' timestamps are the ones a resume is matched against.

use futures_util::stream;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use warp::sse::Event;
use warp::Filter;

/// Options of `pleiades replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// File of events (repeat to concatenate files): JSON lines, one event per line, or a raw
    /// SSE capture (`pleiades record`, `.sse.txt`), whose frames keep their own ids. Lines of a
    /// JSON-lines file that are not JSON are served as they are, so clients can be tested
    /// against bad data.
    #[arg(long = "events", required = true)]
    pub events: Vec<PathBuf>,
    /// Address to listen on (port 0 picks a free port; the chosen address is logged).
    #[arg(long, default_value = "127.0.0.1:8092")]
    pub listen: SocketAddr,
    /// End each connection after this many events, as upstream does every ~15 minutes.
    #[arg(long)]
    pub cut_after: Option<u64>,
    /// Pace the stream at this many events per second (default: as fast as the client reads).
    #[arg(long)]
    pub rate: Option<f64>,
    /// With `--rate`: event `i` becomes available `i / rate` seconds after the server starts, as
    /// on a live stream, and a client that fell behind receives the backlog as fast as it reads.
    /// Without it, every connection is paced from where it starts.
    #[arg(long)]
    pub live: bool,
    /// Milliseconds between the timestamps of consecutive events (of JSON-lines files; a
    /// capture's timestamps are those of its ids).
    #[arg(long, default_value_t = 10)]
    pub step_ms: i64,
    /// Move every fifth event's timestamp back by this many milliseconds, as upstream's are not
    /// monotonic.
    #[arg(long, default_value_t = 0)]
    pub disorder_ms: i64,
    /// After the last event, send a comment this often so the connection is seen alive.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Answer the first N requests with 429 Too Many Requests.
    #[arg(long, default_value_t = 0)]
    pub throttle: u64,
    /// The Retry-After (seconds) sent with each 429.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
    /// On the first `stall-connections` connections, go silent (no byte, connection open) after
    /// this many events.
    #[arg(long)]
    pub stall_after: Option<u64>,
    /// How many connections stall (with `stall-after`).
    #[arg(long, default_value_t = 1)]
    pub stall_connections: u64,
    /// The topic named in the ids of JSON-lines events.
    #[arg(long, default_value = "replay.mediawiki.recentchange")]
    pub topic: String,
}

/// Why the replay server cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read events file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Every event as the frame it is served as, formatted once when the file is loaded: a stream
/// then sends runs of frames as slices of one buffer, without formatting or copying per event.
struct Recorded {
    /// Each event's timestamp (the one its id names), for resuming.
    timestamps: Vec<i64>,
    /// The SSE id of each captured frame, served as it is; JSON-lines events have none (they
    /// get one made up).
    captured: Vec<Option<String>>,
    /// The frames, back to back.
    frames: bytes::Bytes,
    /// Where frame `i` starts in `frames`; one more entry than frames, the last its length.
    starts: Vec<usize>,
}

impl Recorded {
    fn len(&self) -> usize {
        self.timestamps.len()
    }

    /// Frames `from..to`, in one slice.
    fn frames(&self, from: usize, to: usize) -> bytes::Bytes {
        self.frames.slice(self.starts[from]..self.starts[to])
    }
}

/// The most bytes of frames sent in one piece of the body when the client reads as fast as it
/// can: large enough that a backlog costs few writes here and few reads at the client.
const CHUNK_BYTES: usize = 256 * 1024;

struct State {
    started: tokio::time::Instant,
    events: Recorded,
    options: ReplayOptions,
    stats: Arc<ReplayStats>,
    shutdown: CancellationToken,
}

/// What the server has seen of its clients, for tests and logs.
#[derive(Debug, Default)]
pub struct ReplayStats {
    requests: AtomicU64,
    connections: AtomicU64,
    last_request: std::sync::Mutex<(Option<String>, Option<String>)>,
}

impl ReplayStats {
    /// Requests received, throttled ones included.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Streams opened.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// The `User-Agent` of the latest request.
    pub fn user_agent(&self) -> Option<String> {
        self.last_request.lock().ok().and_then(|r| r.1.clone())
    }

    /// The `Last-Event-ID` of the latest request.
    pub fn last_event_id(&self) -> Option<String> {
        self.last_request.lock().ok().and_then(|r| r.0.clone())
    }
}

/// A running replay server.
pub struct ReplayServer {
    pub addr: SocketAddr,
    /// How many events it serves.
    pub events: usize,
    pub stats: Arc<ReplayStats>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Loads the events and starts serving them until `shutdown` is cancelled.
pub async fn serve(
    options: ReplayOptions,
    shutdown: CancellationToken,
) -> Result<ReplayServer, ReplayError> {
    let events = load(&options)?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ReplayError::Bind {
            addr: options.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ReplayError::Bind {
        addr: options.listen,
        source,
    })?;
    let count = events.len();
    let stats = Arc::new(ReplayStats::default());
    let state = Arc::new(State {
        started: tokio::time::Instant::now(),
        events,
        options,
        stats: stats.clone(),
        shutdown: shutdown.clone(),
    });
    let route = warp::path!("v2" / "stream" / "recentchange")
        .and(warp::get())
        .and(warp::header::optional::<String>("last-event-id"))
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("user-agent"))
        .map(
            move |last_event_id: Option<String>,
                  query: HashMap<String, String>,
                  agent: Option<String>| {
                respond(&state, last_event_id, query.get("since").cloned(), agent)
            },
        );
    let server = warp::serve(route)
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run();
    tracing::info!(%addr, events = count, "replay serving /v2/stream/recentchange");
    Ok(ReplayServer {
        addr,
        events: count,
        stats,
        task: tokio::spawn(server),
    })
}

fn load(options: &ReplayOptions) -> Result<Recorded, ReplayError> {
    // Each entry is a JSON line (no id yet) or a captured frame (with its id).
    let mut entries: Vec<(String, Option<String>)> = Vec::new();
    for path in &options.events {
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
            path: path.clone(),
            source,
        })?;
        match crate::capture::detect(&text) {
            crate::capture::Format::Sse => {
                let frames = crate::capture::parse(&text);
                tracing::info!(path = %path.display(), frames = frames.len(), "replay: read a capture; serving its own ids");
                entries.extend(frames.into_iter().map(|f| (f.data, Some(f.id))));
            }
            crate::capture::Format::Jsonl => entries.extend(
                text.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| (l.replace('\r', " "), None)),
            ),
        }
    }
    let base = entries
        .iter()
        .find_map(|(l, _)| crate::event::inspect(l).ok().map(|h| h.time_ms))
        .unwrap_or(0);
    let mut recorded = Recorded {
        timestamps: Vec::with_capacity(entries.len()),
        captured: Vec::with_capacity(entries.len()),
        frames: bytes::Bytes::new(),
        starts: Vec::with_capacity(entries.len() + 1),
    };
    let mut frames = String::with_capacity(entries.iter().map(|(l, _)| l.len() + 100).sum());
    // A captured frame's timestamp is its id's; one without (an id of another shape) keeps the
    // one before it, so that resuming stays in file order. Every frame is formatted once, here.
    let mut previous = base;
    for (i, (data, id)) in entries.into_iter().enumerate() {
        let i = i as i64;
        let timestamp = match &id {
            Some(id) => crate::event::stream_id_timestamp_ms(id).unwrap_or(previous),
            None => {
                let back = if options.disorder_ms > 0 && i % 5 == 3 {
                    options.disorder_ms
                } else {
                    0
                };
                base + i * options.step_ms - back
            }
        };
        previous = timestamp;
        recorded.captured.push(id.clone());
        let id = id.unwrap_or_else(|| {
            serde_json::json!([{ "topic": options.topic, "partition": 0, "timestamp": timestamp }])
                .to_string()
        });
        recorded.starts.push(frames.len());
        recorded.timestamps.push(timestamp);
        frames.push_str(
            &Event::default()
                .event("message")
                .id(id)
                .data(data)
                .to_string(),
        );
    }
    recorded.starts.push(frames.len());
    recorded.frames = bytes::Bytes::from(frames);
    Ok(recorded)
}

fn respond(
    state: &Arc<State>,
    last_event_id: Option<String>,
    since: Option<String>,
    agent: Option<String>,
) -> warp::reply::Response {
    use warp::Reply;
    let request = state.stats.requests.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut last) = state.stats.last_request.lock() {
        *last = (last_event_id.clone(), agent.clone());
    }
    if request < state.options.throttle {
        tracing::info!(request, "replay: answering 429");
        return warp::reply::with_header(
            warp::reply::with_status("slow down\n", warp::http::StatusCode::TOO_MANY_REQUESTS),
            "retry-after",
            state.options.retry_after.to_string(),
        )
        .into_response();
    }
    let start = match start_index(state, last_event_id.as_deref(), since.as_deref()) {
        Ok(start) => start,
        Err(message) => {
            return warp::reply::with_status(
                warp::reply::json(&serde_json::json!({ "error": message })),
                warp::http::StatusCode::BAD_REQUEST,
            )
            .into_response()
        }
    };
    let connection = state.stats.connections.fetch_add(1, Ordering::SeqCst);
    tracing::info!(connection, start, last_event_id = ?last_event_id, user_agent = ?agent, "replay: client connected");
    let stream = stream::unfold(
        Cursor {
            state: state.clone(),
            index: start,
            sent: 0,
            connection,
            next_at: tokio::time::Instant::now(),
            progress: crate::progress::Progress::events(
                &format!("replay connection {connection}"),
                Some(state.events.len().saturating_sub(start) as u64),
            ),
        },
        next_chunk,
    );
    let mut response = warp::reply::stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-cache"),
    );
    response
}

fn start_index(
    state: &State,
    last_event_id: Option<&str>,
    since: Option<&str>,
) -> Result<usize, String> {
    let first_at = |t: i64| {
        state
            .events
            .timestamps
            .iter()
            .position(|e| *e >= t)
            .unwrap_or(state.events.len())
    };
    if let Some(id) = last_event_id.filter(|id| !id.is_empty()) {
        let positions: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(id)
                .map_err(|e| format!("Last-Event-ID is not a JSON array of positions: {e}"))?;
        let ours = positions
            .iter()
            .find(|p| p.get("topic").and_then(|t| t.as_str()) == Some(state.options.topic.as_str()))
            .or(positions.first())
            .ok_or("Last-Event-ID holds no position")?;
        if let Some(offset) = ours
            .get("offset")
            .and_then(|o| o.as_i64())
            .filter(|o| *o >= 0)
        {
            let topic = ours.get("topic").and_then(|t| t.as_str()).unwrap_or("");
            match captured_offset(state, topic, offset) {
                // The frame after the one whose id names this position.
                Some(at) => return Ok((at + 1).min(state.events.len())),
                // Made-up ids count offsets from the first event served.
                None if state.events.captured.iter().all(Option::is_none) => {
                    return Ok((offset as usize + 1).min(state.events.len()))
                }
                None => {}
            }
        }
        if let Some(ts) = ours.get("timestamp").and_then(|t| t.as_i64()) {
            return Ok(first_at(ts));
        }
        return Err("Last-Event-ID position has neither offset nor timestamp".into());
    }
    if let Some(since) = since {
        let ms = crate::config::parse_since(since)
            .ok_or_else(|| format!("since={since:?} is not a time"))?;
        return Ok(first_at(ms));
    }
    Ok(0)
}

/// The index of the captured frame whose id holds `offset` for `topic`.
fn captured_offset(state: &State, topic: &str, offset: i64) -> Option<usize> {
    state.events.captured.iter().rposition(|id| {
        let Some(id) = id else { return false };
        serde_json::from_str::<Vec<serde_json::Value>>(id).is_ok_and(|positions| {
            positions.iter().any(|p| {
                p.get("topic").and_then(|t| t.as_str()) == Some(topic)
                    && p.get("offset").and_then(|o| o.as_i64()) == Some(offset)
            })
        })
    })
}

struct Cursor {
    state: Arc<State>,
    index: usize,
    sent: u64,
    connection: u64,
    next_at: tokio::time::Instant,
    /// Events sent on this connection, out of those it has to send.
    progress: crate::progress::Progress,
}

/// The next piece of the body: a heartbeat once every event is sent, one frame when the
/// stream is paced, otherwise as many frames as fit in [`CHUNK_BYTES`] (never past a cut or a
/// stall).
async fn next_chunk(mut c: Cursor) -> Option<(Result<bytes::Bytes, Infallible>, Cursor)> {
    let o = &c.state.options;
    if c.state.shutdown.is_cancelled() || o.cut_after.is_some_and(|n| c.sent >= n) {
        return None;
    }
    let stalls = c.connection < o.stall_connections;
    if stalls && o.stall_after.is_some_and(|n| c.sent >= n) {
        // Silent but open: only the client's stall watchdog can get it out of here.
        c.state.shutdown.cancelled().await;
        return None;
    }
    let events = &c.state.events;
    if c.index >= events.len() {
        // Everything was sent: what follows is heartbeats until the client goes.
        c.progress.finish();
        tokio::select! {
            _ = c.state.shutdown.cancelled() => return None,
            _ = tokio::time::sleep(o.heartbeat) => {}
        }
        return Some((Ok(bytes::Bytes::from_static(b":\n\n")), c));
    }
    let paced = o.rate.filter(|r| *r > 0.0);
    if let Some(rate) = paced.filter(|_| o.live) {
        let due = c.state.started + Duration::from_secs_f64(c.index as f64 / rate);
        tokio::select! {
            _ = c.state.shutdown.cancelled() => return None,
            _ = tokio::time::sleep_until(due) => {}
        }
    } else if let Some(rate) = paced {
        tokio::time::sleep_until(c.next_at).await;
        c.next_at = c
            .next_at
            .max(tokio::time::Instant::now() - Duration::from_secs(1))
            + Duration::from_secs_f64(1.0 / rate);
    }
    // How many frames this piece may hold: one when paced, and never past the cut or the
    // stall of this connection.
    let mut most = if paced.is_some() { 1 } else { u64::MAX };
    if let Some(n) = o.cut_after {
        most = most.min(n - c.sent);
    }
    if let Some(n) = o.stall_after.filter(|_| stalls) {
        most = most.min(n - c.sent);
    }
    let last = events.len().min(
        c.index
            .saturating_add(usize::try_from(most).unwrap_or(usize::MAX)),
    );
    let from = c.index;
    let mut to = from + 1;
    while to < last && events.starts[to + 1] - events.starts[from] <= CHUNK_BYTES {
        to += 1;
    }
    let chunk = events.frames(from, to);
    c.index = to;
    c.sent += (to - from) as u64;
    c.progress.inc((to - from) as u64);
    Some((Ok(chunk), c))
}
