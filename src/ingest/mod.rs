//! The ingest role: one connection to the upstream stream, every event republished to the bus.
//!
//! The loop is: open the stream (resuming from the cursor), parse chunks into events, classify
//! each one (valid, repeat, canary, invalid), append the valid ones to the bus, and only then move
//! the cursor. Any interruption ends in a reconnect from the cursor, with a rewind whose overlap
//! the dedupe window drops.

pub mod client;
pub mod cursor;
pub mod sse;

use crate::bus::file::{encode_record, read_tail, FileBusError, QuarantineRecord, SegmentWriter};
use crate::bus::kafka::{KafkaBusError, KafkaPublisher, Refused};
use crate::config::{self, BusKind, Config};
use crate::metrics::IngestMetrics;
use crate::ComponentContext;
use client::{Backoff, ConnectError, Upstream};
use cursor::Cursor;
use futures_util::StreamExt;
use sse::{SseEvent, SseParser, SseStats};
use std::sync::Arc;
use std::time::Duration;

/// What stops the ingester. Upstream trouble is not here: it is retried, never fatal.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Bus(#[from] FileBusError),
    #[error(transparent)]
    Kafka(#[from] KafkaBusError),
    #[error("ingest configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Client(ConnectError),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How one connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The server closed the stream (normal about every 15 minutes upstream).
    Closed { delivered: u64 },
    /// No byte arrived for `ingest.stall_timeout`.
    Stalled { delivered: u64 },
    /// The body failed mid-stream.
    Broken { delivered: u64 },
    /// Shutdown was requested.
    Shutdown,
}

/// Where the ingester publishes.
enum Bus {
    /// Appended and synced before the cursor moves: accepted means durable.
    File(SegmentWriter),
    /// Handed to the producer; acknowledged later, in any order across partitions.
    Kafka(KafkaPublisher),
}

/// The ingest role's state; built by [`Ingester::start`], driven by [`Ingester::run`].
pub struct Ingester {
    config: Arc<Config>,
    metrics: IngestMetrics,
    bus: Bus,
    cursor: Cursor,
    upstream: Upstream,
    since_ms: Option<i64>,
    batch: Vec<u8>,
    /// The reconnection time the server last asked for with `retry:`.
    server_retry: Option<Duration>,
}

impl Ingester {
    /// Opens the bus and rebuilds the cursor from its tail.
    pub async fn start(ctx: &ComponentContext) -> Result<Self, IngestError> {
        let config = ctx.config.clone();
        let window = config.ingest.dedupe_window;
        let (bus, tail) = match config.ingest.publisher {
            BusKind::File => {
                let file_config = config.file.clone();
                let bus_metrics = ctx.metrics.file_bus.clone();
                let (writer, tail) = tokio::task::spawn_blocking(move || {
                    let writer = SegmentWriter::open(&file_config, bus_metrics)?;
                    let tail = read_tail(&file_config.dir, window)?;
                    Ok::<_, FileBusError>((writer, tail))
                })
                .await??;
                (Bus::File(writer), tail)
            }
            BusKind::Kafka => {
                let (mut publisher, tail) =
                    KafkaPublisher::open(&config.kafka, ctx.metrics.kafka.clone(), window).await?;
                if !config.ingest.resume {
                    publisher.forget_cursor();
                }
                (Bus::Kafka(publisher), tail)
            }
        };
        if tail.unreadable_lines > 0 {
            tracing::warn!(
                records = tail.unreadable_lines,
                "unreadable records at the bus tail were skipped"
            );
        }
        let cursor = Cursor::from_tail(tail, window, config.ingest.resume);
        tracing::info!(
            resume_from = cursor.last_id.as_deref().unwrap_or("(now)"),
            remembered_ids = cursor.window.len(),
            bus = ?config.ingest.publisher,
            "ingester starting"
        );
        let url = reqwest::Url::parse(&config.ingest.url)
            .map_err(|e| IngestError::Config(format!("ingest.url: {e}")))?;
        let upstream = Upstream::new(
            url,
            &config.ingest.user_agent,
            config.ingest.connect_timeout,
        )
        .map_err(IngestError::Client)?;
        let since_ms = Some(config.ingest.since.as_str())
            .filter(|s| !s.is_empty())
            .and_then(config::parse_since);
        let metrics = ctx.metrics.ingest.clone();
        metrics.dedupe_window.set(cursor.window.len() as i64);
        Ok(Ingester {
            config,
            metrics,
            bus,
            cursor,
            upstream,
            since_ms,
            batch: Vec::new(),
            server_retry: None,
        })
    }

    /// Streams until shutdown, reconnecting as Wikimedia asks. Returns only on shutdown or when
    /// the bus cannot be written (then the supervisor restarts it).
    pub async fn run(mut self, ctx: ComponentContext) -> Result<(), IngestError> {
        let c = self.config.ingest.clone();
        let mut backoff = Backoff::new(c.backoff_initial, c.backoff_max);
        loop {
            let last_id = self.resume_id(c.resume_rewind);
            let result = self.stream_once(last_id.as_deref(), &ctx).await;
            self.metrics.connected.set(0);
            let delay = match result {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::Closed { delivered }) => {
                    self.metrics
                        .disconnects
                        .with_label_values(&["closed"])
                        .inc();
                    tracing::info!(peer = %self.upstream.peer(), delivered, "upstream closed the stream; reconnecting");
                    self.after_connection(&mut backoff, delivered)
                }
                Ok(Ended::Stalled { delivered }) => {
                    self.metrics.errors.inc();
                    self.metrics
                        .disconnects
                        .with_label_values(&["stalled"])
                        .inc();
                    tracing::warn!(peer = %self.upstream.peer(), delivered, timeout = ?c.stall_timeout, "no byte received within the stall timeout; reconnecting");
                    self.after_connection(&mut backoff, delivered)
                }
                Ok(Ended::Broken { delivered }) => {
                    self.metrics.errors.inc();
                    self.metrics
                        .disconnects
                        .with_label_values(&["broken"])
                        .inc();
                    self.after_connection(&mut backoff, delivered)
                }
                Err(StreamError::Bus(e)) => return Err(e),
                Err(StreamError::Connect(e)) => {
                    self.metrics.errors.inc();
                    let backoff_delay = backoff.next_delay();
                    let (reason, delay) = match &e {
                        // Retry-After is a floor set by the server; a little jitter on top
                        // keeps a fleet of clients from returning in the same instant.
                        ConnectError::Throttled { retry_after, .. } => (
                            "throttled",
                            retry_after.map_or(backoff_delay, |r| r + r / 10),
                        ),
                        ConnectError::Status { .. } => ("status", backoff_delay),
                        ConnectError::Transport { .. } | ConnectError::Client(_) => {
                            ("transport", backoff_delay)
                        }
                    };
                    self.metrics.disconnects.with_label_values(&[reason]).inc();
                    tracing::warn!(error = %e, retry_in = ?delay, "connection to upstream failed");
                    delay
                }
            };
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        match &mut self.bus {
            Bus::File(writer) => tokio::task::block_in_place(|| writer.sync())?,
            Bus::Kafka(publisher) => publisher.flush(KAFKA_FLUSH_LIMIT).await?,
        }
        tracing::info!(
            resume_from = self.cursor.last_id.as_deref().unwrap_or("(none)"),
            "ingester stopped; events synced"
        );
        Ok(())
    }

    /// A connection that delivered events proves upstream healthy: reconnect soon, but not
    /// sooner than the server's `retry:`. One that delivered nothing counts as a failure, so a
    /// server that keeps cutting us off is not hammered.
    fn after_connection(&self, backoff: &mut Backoff, delivered: u64) -> Duration {
        if delivered > 0 {
            backoff.reset();
        }
        backoff
            .next_delay()
            .max(self.server_retry.unwrap_or(Duration::ZERO))
    }

    /// The `Last-Event-ID` to send: the cursor with its timestamps rewound (SPEC §8).
    fn resume_id(&self, rewind: Duration) -> Option<String> {
        let last = self.cursor.last_id.as_deref().filter(|id| !id.is_empty())?;
        match crate::event::rewind_stream_id(last, rewind.as_millis() as i64) {
            Ok(id) => Some(id),
            Err(e) => {
                // An id we cannot rewind is still the best resume point we have.
                tracing::warn!(error = %e, "resuming without rewind");
                Some(last.to_owned())
            }
        }
    }

    async fn stream_once(
        &mut self,
        last_id: Option<&str>,
        ctx: &ComponentContext,
    ) -> Result<Ended, StreamError> {
        let config = self.config.clone();
        let c = &config.ingest;
        let since = if last_id.is_none() {
            self.since_ms
        } else {
            None
        };
        let response = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(Ended::Shutdown),
            r = self.upstream.open(last_id, since, c.connect_timeout) => r.map_err(StreamError::Connect)?,
        };
        tracing::info!(peer = %self.upstream.peer(), last_event_id = last_id.unwrap_or("(none)"), since = ?since, "connected to upstream");
        self.metrics.connects.inc();
        self.metrics.connected.set(1);
        let stall = c.stall_timeout;
        let mut parser = SseParser::new(c.max_event_bytes);
        let mut seen = SseStats::default();
        let mut events = Vec::new();
        let mut delivered = 0u64;
        let mut body = response.bytes_stream();
        let kafka = matches!(self.bus, Bus::Kafka(_));
        // Files synced "at most every interval" need a timer; so does taking Kafka's
        // acknowledgements while upstream is quiet.
        let mut sync_timer = tokio::time::interval(if kafka {
            KAFKA_ACK_INTERVAL
        } else {
            self.config.file.fsync_interval
        });
        let timed = kafka || self.config.file.fsync == crate::config::FsyncPolicy::Interval;
        // The watchdog measures silence from the last byte received, so other wake-ups in this
        // loop (the sync timer) cannot postpone it.
        let mut last_byte = tokio::time::Instant::now();
        loop {
            let chunk = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Ok(Ended::Shutdown),
                _ = tokio::time::sleep_until(last_byte + stall) => return Ok(Ended::Stalled { delivered }),
                _ = sync_timer.tick(), if timed => {
                    match &mut self.bus {
                        Bus::File(writer) => tokio::task::block_in_place(|| writer.sync_if_due())
                            .map_err(|e| StreamError::Bus(e.into()))?,
                        Bus::Kafka(publisher) => publisher
                            .collect_acks()
                            .map_err(|e| StreamError::Bus(e.into()))?,
                    }
                    continue;
                }
                next = body.next() => next,
            };
            let bytes = match chunk {
                None => return Ok(Ended::Closed { delivered }),
                Some(Err(e)) => {
                    tracing::warn!(peer = %self.upstream.peer(), error = %e, "upstream stream broke");
                    return Ok(Ended::Broken { delivered });
                }
                Some(Ok(bytes)) => bytes,
            };
            self.metrics.bytes.inc_by(bytes.len() as u64);
            parser.push(&bytes, &mut events);
            self.server_retry = parser.retry_ms().map(Duration::from_millis);
            let stats = parser.stats();
            self.metrics.lines.inc_by(stats.lines - seen.lines);
            self.metrics
                .oversize
                .inc_by(stats.oversize_events - seen.oversize_events);
            if stats.oversize_events > seen.oversize_events {
                tracing::warn!(
                    limit = c.max_event_bytes,
                    "dropped an event longer than ingest.max_event_bytes"
                );
            }
            seen = stats;
            match self.deliver(&mut events, &ctx.shutdown).await {
                Ok(Some(n)) => delivered += n,
                Ok(None) => return Ok(Ended::Shutdown),
                Err(e) => return Err(StreamError::Bus(e)),
            }
            // Everything parsed so far is on the bus (or deliberately dropped): the cursor moves.
            // On Kafka "on the bus" means queued; the resume point written into the topic moves
            // only once the brokers acknowledge (see `bus::kafka`).
            if !parser.last_event_id().is_empty() {
                self.cursor.last_id = Some(parser.last_event_id().to_owned());
                if let Bus::Kafka(publisher) = &mut self.bus {
                    publisher.mark(parser.last_event_id());
                }
            }
            // Silence is measured from here: time spent waiting for room on the bus (Kafka's
            // backpressure) is ours, not upstream's.
            last_byte = tokio::time::Instant::now();
        }
    }

    /// Classifies and publishes parsed events; returns how many reached the bus, or `None` when
    /// shutdown interrupted a wait for room on the bus.
    async fn deliver(
        &mut self,
        events: &mut Vec<SseEvent>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<u64>, IngestError> {
        if events.is_empty() {
            return Ok(Some(0));
        }
        let mut accepted = Vec::with_capacity(events.len());
        for event in events.drain(..) {
            self.metrics.events.inc();
            if event.event_type != "message" {
                self.metrics.errors.inc();
                tracing::warn!(event_type = %event.event_type, id = %event.id, data = %event.data, "upstream sent a non-message event");
                continue;
            }
            let (time_ms, key, canary) = match crate::event::inspect(&event.data) {
                Ok(head) => (head.time_ms, head.id.map(|id| id.into_owned()), head.canary),
                Err(invalid) => {
                    let (reason, error) = (invalid.reason(), invalid.to_string());
                    self.quarantine(reason, error, &event, shutdown).await?;
                    continue;
                }
            };
            if let Some(id) = key.as_deref() {
                if !self.cursor.window.insert(id) {
                    self.metrics.duplicates.inc();
                    continue;
                }
            }
            if canary {
                self.metrics.canaries.inc();
            }
            accepted.push((event, time_ms, key));
        }
        let mut published = 0u64;
        let mut newest_ms = i64::MIN;
        match &mut self.bus {
            Bus::File(writer) => {
                self.batch.clear();
                for (event, time_ms, _) in &accepted {
                    newest_ms = newest_ms.max(*time_ms);
                    encode_record(&event.id, &event.data, &mut self.batch);
                    published += 1;
                }
                tokio::task::block_in_place(|| writer.append(&self.batch, published))?;
            }
            Bus::Kafka(publisher) => {
                let mut too_large = Vec::new();
                for (event, time_ms, key) in &accepted {
                    match publisher
                        .publish(&event.id, &event.data, key.as_deref(), *time_ms, shutdown)
                        .await
                    {
                        Ok(true) => {
                            newest_ms = newest_ms.max(*time_ms);
                            published += 1;
                        }
                        Ok(false) => return Ok(None),
                        Err(Refused::TooLarge(error)) => too_large.push((event, error)),
                        Err(Refused::Failed(e)) => return Err(e.into()),
                    }
                }
                for (event, error) in too_large {
                    self.quarantine("too_large", error, event, shutdown).await?;
                }
            }
        }
        if published > 0 {
            self.metrics.delivered_event_time(newest_ms);
        }
        self.metrics
            .dedupe_window
            .set(self.cursor.window.len() as i64);
        Ok(Some(published))
    }

    /// Keeps an event that cannot be published, with the reason, and counts it.
    async fn quarantine(
        &mut self,
        reason: &str,
        error: String,
        event: &SseEvent,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), IngestError> {
        self.metrics
            .quarantined
            .with_label_values(&["ingest", reason])
            .inc();
        tracing::warn!(reason, error = %error, id = %event.id, "quarantined an event");
        let record = QuarantineRecord {
            time: chrono::Utc::now().to_rfc3339(),
            reason,
            error,
            id: &event.id,
            data: &event.data,
        };
        match &mut self.bus {
            Bus::File(writer) => tokio::task::block_in_place(|| writer.quarantine(&record))?,
            Bus::Kafka(publisher) => publisher.quarantine(&record, shutdown).await?,
        }
        Ok(())
    }
}

/// How often the ingester takes Kafka's acknowledgements when nothing else wakes it.
const KAFKA_ACK_INTERVAL: Duration = Duration::from_millis(200);
/// How long a stopping ingester waits for Kafka to acknowledge what it has sent.
const KAFKA_FLUSH_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum StreamError {
    Connect(ConnectError),
    Bus(IngestError),
}

/// Builds and runs the ingester: the supervised unit of the ingest role.
pub async fn run(ctx: ComponentContext) -> Result<(), IngestError> {
    let ingester = Ingester::start(&ctx).await?;
    ingester.run(ctx).await
}
