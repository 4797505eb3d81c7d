//! `pleiades replay`: serves recorded events as an EventStreams-compatible SSE endpoint.
//!
//! Ids are KafkaSSE-style (`[{"topic":…,"partition":0,"timestamp":…}]`) and resuming follows the
//! upstream rule: the stream restarts at the earliest event whose timestamp is at or after the
//! one asked for (inclusive, so an exact resume repeats the last event). It is the upstream for
//! tests, demos and offline backfills, and can inject the faults a real upstream shows: cut
//! connections, throttling with `Retry-After`, and silent stalls.

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
    /// JSONL file of events, one per line (repeat to concatenate files). Lines that are not JSON
    /// are served as they are, so clients can be tested against bad data.
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
    /// Milliseconds between the timestamps of consecutive events.
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
    /// The topic named in ids.
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

struct Recorded {
    timestamp: i64,
    data: String,
}

struct State {
    started: tokio::time::Instant,
    events: Vec<Recorded>,
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

fn load(options: &ReplayOptions) -> Result<Vec<Recorded>, ReplayError> {
    let mut lines = Vec::new();
    for path in &options.events {
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
            path: path.clone(),
            source,
        })?;
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.replace('\r', " ")),
        );
    }
    let base = lines
        .iter()
        .find_map(|l| crate::event::inspect(l).ok().map(|h| h.time_ms))
        .unwrap_or(0);
    Ok(lines
        .into_iter()
        .enumerate()
        .map(|(i, data)| {
            let i = i as i64;
            let back = if options.disorder_ms > 0 && i % 5 == 3 {
                options.disorder_ms
            } else {
                0
            };
            Recorded {
                timestamp: base + i * options.step_ms - back,
                data,
            }
        })
        .collect())
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
        },
        next_event,
    );
    warp::sse::reply(stream).into_response()
}

fn start_index(
    state: &State,
    last_event_id: Option<&str>,
    since: Option<&str>,
) -> Result<usize, String> {
    let first_at = |t: i64| {
        state
            .events
            .iter()
            .position(|e| e.timestamp >= t)
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
            return Ok((offset as usize + 1).min(state.events.len()));
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

struct Cursor {
    state: Arc<State>,
    index: usize,
    sent: u64,
    connection: u64,
    next_at: tokio::time::Instant,
}

async fn next_event(mut c: Cursor) -> Option<(Result<Event, Infallible>, Cursor)> {
    let o = &c.state.options;
    if c.state.shutdown.is_cancelled() || o.cut_after.is_some_and(|n| c.sent >= n) {
        return None;
    }
    if c.connection < o.stall_connections && o.stall_after.is_some_and(|n| c.sent >= n) {
        // Silent but open: only the client's stall watchdog can get it out of here.
        c.state.shutdown.cancelled().await;
        return None;
    }
    let Some(event) = c.state.events.get(c.index) else {
        tokio::select! {
            _ = c.state.shutdown.cancelled() => return None,
            _ = tokio::time::sleep(o.heartbeat) => {}
        }
        return Some((Ok(Event::default().comment("")), c));
    };
    if let Some(rate) = o.rate.filter(|r| *r > 0.0 && o.live) {
        let due = c.state.started + Duration::from_secs_f64(c.index as f64 / rate);
        tokio::select! {
            _ = c.state.shutdown.cancelled() => return None,
            _ = tokio::time::sleep_until(due) => {}
        }
    } else if let Some(rate) = o.rate.filter(|r| *r > 0.0) {
        tokio::time::sleep_until(c.next_at).await;
        c.next_at = c
            .next_at
            .max(tokio::time::Instant::now() - Duration::from_secs(1))
            + Duration::from_secs_f64(1.0 / rate);
    }
    let id =
        serde_json::json!([{ "topic": o.topic, "partition": 0, "timestamp": event.timestamp }])
            .to_string();
    let frame = Event::default()
        .event("message")
        .id(id)
        .data(event.data.clone());
    c.index += 1;
    c.sent += 1;
    Some((Ok(frame), c))
}
