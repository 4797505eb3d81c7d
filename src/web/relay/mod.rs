//! The relay: `GET /v2/stream/recentchange` on `web.listen` serves this deployment's bus as
//! EventStreams-compatible server-sent events (`event: message`, `id:`, `data:` with the event
//! exactly as received), so EventStreams clients work by changing only the base URL.
//!
//! One reader of the bus (the supervised `relay` component, [`hub::run`]) feeds every client
//! through the hub's ring; ids are positions on the bus ([`position`]), so `Last-Event-ID` and
//! `?since=` resume exactly, also under the filters of [`filter`]. A client resuming from
//! further back than the ring reads the bus on its own ([`feed`]) until it reaches the ring.
//! Each batch of events written to a client is preceded by an empty comment line (`:`), which
//! every event-stream reader ignores: it is how the web server frames a batch.

pub mod feed;
pub mod filter;
pub mod hub;
pub mod position;

pub use hub::{run, Hub};

use crate::health::json;
use crate::metrics::RelayDrop;
use bytes::Bytes;
use feed::{Feed, FRAME_HEAD};
use filter::Filter;
use hub::{Join, Slot};
use position::{parse_id, parse_since, Position, Start};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::sse::Event;
use warp::{Filter as _, Reply};

/// Entries a client takes from the ring, or its own reader, per write.
const BATCH: usize = 256;
/// How long a catching-up client's reader waits for more before looking at the ring again.
const CATCH_UP_WAIT: Duration = Duration::from_millis(20);

/// The relay's route.
pub fn route(
    hub: Arc<Hub>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) -> impl warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
       + Clone
       + Send
       + Sync
       + 'static {
    warp::path!("v2" / "stream" / "recentchange")
        .and(warp::header::optional::<String>("last-event-id"))
        .and(warp::query::<HashMap<String, String>>())
        .map(move |id: Option<String>, query: HashMap<String, String>| {
            respond(&hub, heartbeat, &shutdown, id, &query)
        })
}

fn bad_request(message: &str) -> warp::reply::Response {
    json(
        StatusCode::BAD_REQUEST,
        Bytes::from(serde_json::json!({ "error": message }).to_string()),
    )
}

fn respond(
    hub: &Arc<Hub>,
    heartbeat: Duration,
    shutdown: &CancellationToken,
    id: Option<String>,
    query: &HashMap<String, String>,
) -> warp::reply::Response {
    let filter = match Filter::from_query(query) {
        Ok(filter) => filter,
        Err(e) => return bad_request(&e.to_string()),
    };
    let kafka = matches!(hub.bus, crate::config::BusSettings::Kafka(_));
    let start = match (
        id.as_deref().filter(|id| !id.trim().is_empty()),
        query.get("since"),
    ) {
        (Some(id), _) => parse_id(id.trim(), kafka, &hub.topic),
        (None, Some(since)) => parse_since(since),
        (None, None) => Ok(Start::Live),
    };
    let start = match start {
        Ok(start) => start,
        Err(e) => return bad_request(&e.to_string()),
    };
    let Some(client) = Client::connect(hub, start, filter, heartbeat, shutdown) else {
        let mut response = json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from(
                serde_json::json!({ "error": "the relay serves as many clients as web.relay_max_clients allows; try again later" })
                    .to_string(),
            ),
        );
        response.headers_mut().insert(
            warp::http::header::RETRY_AFTER,
            warp::http::HeaderValue::from_static("10"),
        );
        return response;
    };
    let events = futures_util::stream::unfold(client, |mut client| async move {
        let event = client.next().await?;
        Some((Ok::<_, Infallible>(event), client))
    });
    let mut response = warp::sse::reply(SyncStream::new(events)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    // Proxies that buffer responses would hold events back.
    headers.insert(
        "x-accel-buffering",
        warp::http::HeaderValue::from_static("no"),
    );
    response
}

enum Phase {
    Starting(Start),
    /// Reading the bus on its own, from further back than the ring.
    CatchingUp(Box<Feed>),
    /// Reading the ring at this sequence number.
    InRing(u64),
    Done,
}

/// One connected client: where it stands on the bus, its filters and where it reads.
struct Client {
    hub: Arc<Hub>,
    id: u64,
    slot: Arc<Slot>,
    phase: Phase,
    /// Everything before it was sent or filtered out.
    position: Position,
    filter: Filter,
    /// True while `position` equals the position each entry's own frame carries, so that the
    /// frame is sent as it is instead of one with an id of this client's.
    lockstep: bool,
    head: tokio::sync::watch::Receiver<u64>,
    heartbeat: tokio::time::Interval,
    shutdown: CancellationToken,
}

fn comment(text: String) -> Event {
    Event::default().comment(text)
}

impl Client {
    /// A client of `hub` starting at `start`; `None` when every place is taken.
    fn connect(
        hub: &Arc<Hub>,
        start: Start,
        filter: Filter,
        heartbeat: Duration,
        shutdown: &CancellationToken,
    ) -> Option<Client> {
        let (id, slot) = hub.admit()?;
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Some(Client {
            hub: hub.clone(),
            id,
            slot,
            phase: Phase::Starting(start),
            position: Position::File {
                segment: 0,
                offset: 0,
            },
            filter,
            lockstep: false,
            head: hub.subscribe(),
            heartbeat: ticker,
            shutdown: shutdown.clone(),
        })
    }

    /// The next thing to write: a batch of events, a heartbeat, or a last word.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.slot.is_dropped() && !matches!(self.phase, Phase::Done) {
                self.finish();
                return Some(comment(format!(
                    " disconnected: this client fell {} events behind; reconnect with Last-Event-ID to resume",
                    self.hub_capacity()
                )));
            }
            match &mut self.phase {
                Phase::Done => return None,
                Phase::Starting(start) => {
                    let start = std::mem::replace(start, Start::Live);
                    if let Err(message) = self.begin(start).await {
                        self.finish();
                        return Some(comment(format!(" {message}")));
                    }
                }
                Phase::CatchingUp(feed) => {
                    if let Join::At(seq) = self.hub.join(&self.position) {
                        self.enter(seq);
                        continue;
                    }
                    let read = tokio::select! {
                        _ = self.shutdown.cancelled() => return Some(self.shutting_down()),
                        read = feed.next(BATCH, CATCH_UP_WAIT) => read,
                    };
                    let entries = match read {
                        Ok(entries) => entries,
                        Err(e) => {
                            self.hub.metrics.dropped.inc(RelayDrop::Bus);
                            self.finish();
                            return Some(comment(format!(" the bus cannot be read: {e}")));
                        }
                    };
                    let reached = feed.position().clone();
                    let chunk = self.render(entries.iter());
                    if self.position.at_or_before(&reached) {
                        self.position = reached;
                    }
                    if let Some(event) = chunk {
                        return Some(event);
                    }
                }
                Phase::InRing(seq) => {
                    let Ok(batch) = self.hub.take(*seq, BATCH) else {
                        // Left behind between two of the hub's checks.
                        self.slot_dropped();
                        continue;
                    };
                    if !batch.is_empty() {
                        *seq += batch.len() as u64;
                        let next = *seq;
                        self.slot.set_cursor(next);
                        self.hub.moved();
                        if let Some(event) = self.render(batch.iter().map(|e| &**e)) {
                            return Some(event);
                        }
                        continue;
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Some(self.shutting_down()),
                        changed = self.head.changed() => if changed.is_err() {
                            self.finish();
                            return None;
                        },
                        _ = self.slot.wake.notified() => {}
                        _ = self.heartbeat.tick() => return Some(comment(String::new())),
                    }
                }
            }
        }
    }

    fn hub_capacity(&self) -> usize {
        self.hub.capacity()
    }

    fn slot_dropped(&mut self) {
        self.hub.metrics.dropped.inc(RelayDrop::Slow);
        self.hub.release(self.id, &self.slot);
        self.finish();
    }

    fn shutting_down(&mut self) -> Event {
        self.hub.metrics.dropped.inc(RelayDrop::Shutdown);
        self.finish();
        comment(" the server is shutting down; reconnect with Last-Event-ID to resume".into())
    }

    fn finish(&mut self) {
        if matches!(self.phase, Phase::CatchingUp(_)) {
            self.hub.metrics.catching_up.dec();
        }
        self.phase = Phase::Done;
    }

    /// Resolves where the client starts and where it reads from.
    async fn begin(&mut self, start: Start) -> Result<(), String> {
        if !self.hub.wait_ready(&self.shutdown).await {
            self.hub.metrics.dropped.inc(RelayDrop::Shutdown);
            return Err("the server is shutting down".into());
        }
        let position = match start {
            Start::Live => {
                let Some((position, seq)) = self.hub.now() else {
                    return Err("the relay has not started reading the bus".into());
                };
                self.position = position;
                self.enter(seq);
                self.lockstep = true;
                return Ok(());
            }
            Start::At(position) => position,
            Start::Since(time_ms) => {
                feed::position_at(&self.hub.bus, time_ms)
                    .await
                    .map_err(|e| {
                        self.hub.metrics.dropped.inc(RelayDrop::Bus);
                        format!("the bus cannot be read: {e}")
                    })?
            }
        };
        self.position = position;
        match self.hub.join(&self.position) {
            Join::At(seq) => self.enter(seq),
            Join::Behind => {
                let feed = Feed::open(&self.hub.bus, &self.position)
                    .await
                    .map_err(|e| {
                        self.hub.metrics.dropped.inc(RelayDrop::Bus);
                        format!("the bus cannot be read: {e}")
                    })?;
                self.hub.metrics.catching_up.inc();
                self.lockstep = true;
                self.phase = Phase::CatchingUp(Box::new(feed));
            }
        }
        Ok(())
    }

    fn enter(&mut self, seq: u64) {
        if matches!(self.phase, Phase::CatchingUp(_)) {
            self.hub.metrics.catching_up.dec();
        }
        self.phase = Phase::InRing(seq);
        self.lockstep = false;
        self.slot.set_cursor(seq);
    }

    /// The events of `entries` this client has not passed and its filters select, as one
    /// batch; `None` when there is none.
    fn render<'a>(&mut self, entries: impl Iterator<Item = &'a feed::Entry>) -> Option<Event> {
        // The batch goes out as the text of a comment whose first line is empty: ":\n" and
        // then the events, each ending in its blank line (see the module's documentation).
        let mut chunk = String::new();
        let mut events = 0u64;
        for entry in entries {
            if self.position.covers(entry.source, entry.start, entry.end) {
                continue;
            }
            self.position.advance(entry.source, entry.start, entry.end);
            if !self.lockstep && self.position == entry.after {
                self.lockstep = true;
            }
            if !self.filter.matches(&entry.fields) {
                continue;
            }
            if chunk.is_empty() {
                chunk.push('\n');
            }
            if self.lockstep && self.position == entry.after {
                chunk.push_str(&entry.frame);
            } else {
                chunk.push_str(FRAME_HEAD);
                self.position.render(&self.hub.topic, &mut chunk);
                chunk.push_str(&entry.frame[entry.data_at..]);
            }
            events += 1;
        }
        if events == 0 {
            return None;
        }
        self.hub.metrics.events_sent.inc_by(events);
        self.hub.metrics.bytes_sent.inc_by(chunk.len() as u64 + 1);
        self.heartbeat.reset();
        // The comment's writer ends it with the blank line the last event already has.
        chunk.truncate(chunk.len() - 2);
        Some(comment(chunk))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.finish();
        self.hub.release(self.id, &self.slot);
    }
}

/// A stream that can be shared between threads, as the event-stream reply requires, by
/// polling it under a lock (only ever taken by the one task that writes the response).
struct SyncStream<S> {
    inner: std::sync::Mutex<std::pin::Pin<Box<S>>>,
}

impl<S> SyncStream<S> {
    fn new(stream: S) -> Self {
        SyncStream {
            inner: std::sync::Mutex::new(Box::pin(stream)),
        }
    }
}

impl<S: futures_util::Stream> futures_util::Stream for SyncStream<S> {
    type Item = S::Item;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        match self.get_mut().inner.get_mut() {
            Ok(stream) => stream.as_mut().poll_next(cx),
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::file::SegmentWriter;
    use crate::bus::Outgoing;
    use crate::config::{BusSettings, FileConfig};
    use crate::metrics::Metrics;

    fn publish(writer: &mut SegmentWriter, from: usize, to: usize) {
        let events: Vec<(String, String)> = (from..to)
            .map(|n| {
                let data = format!(
                    r#"{{"meta":{{"id":"e{n}","dt":"2024-01-01T00:00:00Z"}},"wiki":"w{}"}}"#,
                    n % 2
                );
                (format!("[{n}]"), data)
            })
            .collect();
        let outgoing: Vec<Outgoing<'_>> = events
            .iter()
            .map(|(id, data)| Outgoing {
                sse_id: id,
                data,
                key: None,
                time_ms: 0,
            })
            .collect();
        writer.publish(&outgoing).unwrap();
    }

    /// Event files in a fresh directory holding events `0..count`, their writer and metrics.
    fn bus_of(count: usize) -> (tempfile::TempDir, FileConfig, Metrics, SegmentWriter) {
        let dir = tempfile::tempdir().unwrap();
        let config = FileConfig {
            dir: dir.path().to_owned(),
            ..FileConfig::default()
        };
        let metrics = Metrics::new(1).unwrap();
        let mut writer = SegmentWriter::open(&config, metrics.file_bus.clone()).unwrap();
        publish(&mut writer, 0, count);
        (dir, config, metrics, writer)
    }

    fn text(event: Event) -> String {
        event.to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_left_behind_hears_why_and_its_stream_ends() {
        let (_dir, config, metrics, mut writer) = bus_of(4);
        let hub = Hub::new(BusSettings::File(config), 16, 3, metrics.relay.clone());
        let shutdown = CancellationToken::new();
        // Connected from the start, the third client makes the reader keep what it reads: with
        // nobody connected it keeps nothing.
        let _third = Client::connect(
            &hub,
            Start::Live,
            Filter::default(),
            Duration::from_secs(60),
            &shutdown,
        )
        .unwrap();
        tokio::spawn(run(hub.clone(), Duration::from_millis(5), shutdown.clone()));
        assert!(hub.wait_ready(&shutdown).await);

        // A filtered client from the start of the history, and a live one.
        let query = HashMap::from([("wiki".to_owned(), "w1".to_owned())]);
        let filter = Filter::from_query(&query).unwrap();
        let start = Start::At(Position::File {
            segment: 1,
            offset: 0,
        });
        let mut history =
            Client::connect(&hub, start, filter, Duration::from_secs(60), &shutdown).unwrap();
        let first = text(history.next().await.unwrap());
        assert!(
            first.starts_with(":\nevent: message\nid: [{\"segment\":1,"),
            "{first}"
        );
        assert_eq!(first.matches("event: message").count(), 2, "{first}");
        assert!(
            first.contains(r#""id":"e1""#) && first.contains(r#""id":"e3""#),
            "{first}"
        );
        assert!(first.ends_with("}\n\n"), "{first}");

        let mut live = Client::connect(
            &hub,
            Start::Live,
            Filter::default(),
            Duration::from_secs(60),
            &shutdown,
        )
        .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), live.next())
                .await
                .is_err(),
            "nothing new yet"
        );
        // The third place is the last; a fourth client is refused.
        assert!(Client::connect(
            &hub,
            Start::Live,
            Filter::default(),
            Duration::from_secs(60),
            &shutdown
        )
        .is_none());

        // Forty events while `live` reads nothing: it falls out of the 16 kept.
        publish(&mut writer, 4, 44);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metrics.relay.dropped.get(RelayDrop::Slow) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "nobody was dropped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let last = text(live.next().await.unwrap());
        assert!(
            last.starts_with(": disconnected: this client fell 16 events behind"),
            "{last}"
        );
        assert!(live.next().await.is_none(), "the stream ends");
        assert_eq!(
            metrics.relay.clients.get(),
            1,
            "the places of the dropped are free"
        );
        // Its last id resumes exactly, through a reader of its own: e1, e3 were sent; the
        // history client, dropped too, resumes after e3.
        let last_id = first
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .next_back()
            .unwrap()
            .to_owned();
        let start = position::parse_id(&last_id, false, "").unwrap();
        let mut resumed = Client::connect(
            &hub,
            start,
            Filter::from_query(&query).unwrap(),
            Duration::from_secs(60),
            &shutdown,
        )
        .unwrap();
        let ids = ids_from(&mut resumed, 20).await;
        let want: Vec<String> = (5..44).step_by(2).map(|n| format!("e{n}")).collect();
        assert_eq!(ids, want);
        shutdown.cancel();
    }
    /// Reads `client` until it has sent `count` events; returns their `meta.id`s.
    async fn ids_from(client: &mut Client, count: usize) -> Vec<String> {
        let mut ids = Vec::new();
        while ids.len() < count {
            let batch = text(client.next().await.unwrap());
            ids.extend(
                batch
                    .lines()
                    .filter_map(|l| l.split(r#""id":""#).nth(1))
                    .map(|r| r.split('"').next().unwrap().to_owned()),
            );
        }
        ids
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_nobody_connected_the_reader_keeps_nothing_and_resumes_stay_exact() {
        let (_dir, config, metrics, mut writer) = bus_of(10);
        let hub = Hub::new(BusSettings::File(config), 64, 4, metrics.relay.clone());
        let shutdown = CancellationToken::new();
        tokio::spawn(run(hub.clone(), Duration::from_millis(5), shutdown.clone()));
        assert!(hub.wait_ready(&shutdown).await);
        // Read past, counted, but not kept: the ring is empty at the end of the bus.
        let (head, seq) = hub.now().unwrap();
        assert_eq!(hub.take(seq, 100).unwrap().len(), 0);
        assert!(matches!(hub.join(&head), Join::At(s) if s == seq));
        let start = Position::File {
            segment: 1,
            offset: 0,
        };
        assert!(matches!(hub.join(&start), Join::Behind));
        assert_eq!(metrics.relay.bus_events.get(), 10);

        // A client from the start reads the bus on its own, then what comes next.
        let mut client = Client::connect(
            &hub,
            Start::At(start),
            Filter::default(),
            Duration::from_secs(60),
            &shutdown,
        )
        .unwrap();
        let want: Vec<String> = (0..10).map(|n| format!("e{n}")).collect();
        assert_eq!(ids_from(&mut client, 10).await, want);
        publish(&mut writer, 10, 15);
        let want: Vec<String> = (10..15).map(|n| format!("e{n}")).collect();
        assert_eq!(ids_from(&mut client, 5).await, want);
        // With a client connected, what the reader reads is kept again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while hub.take(seq, 100).unwrap().len() < 5 {
            assert!(tokio::time::Instant::now() < deadline, "nothing was kept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
    }
}
