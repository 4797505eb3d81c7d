//! The ingest role: one connection to the upstream stream, every event republished to the bus.
//!
//! The loop is: open the stream (resuming from the cursor), parse chunks into events, classify
//! each one (valid, repeat, canary, invalid), append the valid ones to the bus, and only then move
//! the cursor. Any interruption ends in a reconnect from the cursor, with a rewind whose overlap
//! the dedupe window drops.

pub mod backfill;
pub mod client;
pub mod cursor;
pub mod sse;
pub mod validation;

use crate::bus::handoff::{HandoffReceiver, Outcome, Submission};
use crate::bus::{BusError, Outgoing, Published, Publisher, QuarantineRecord, Trouble};
use crate::config::{self, BusSettings, IngestConfig};
use crate::event::RejectReason;
use crate::metrics::{Anomaly, Disconnect, IngestMetrics};
use crate::ComponentContext;
use client::{Backoff, ConnectError, Upstream};
use cursor::Cursor;
use futures_util::{FutureExt, StreamExt};
use sse::{SseEvent, SseParser, SseStats};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedMutexGuard};
use validation::{Prover, Validation, Verdict};

/// How long the ingester waits for the bus to make events posted to the intake safe (Kafka:
/// acknowledged) before answering that it could not.
const INTAKE_SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// What stops the ingester. Upstream trouble is not here: it is retried, never fatal; nor is a
/// full disk under the event files: the ingester waits for it.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("ingest configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Client(ConnectError),
    #[error(transparent)]
    Schema(#[from] crate::schema::CompileError),
}

/// The longest pause between two reads of upstream that still joins them in one group: a
/// backlog arrives faster than this, a live stream's events further apart.
const GROUP_GAP: Duration = Duration::from_millis(2);

/// The longest time a group gathers what arrives before it is published.
const GROUP_TIME: Duration = Duration::from_millis(50);

/// How long a paused ingester waits before it tries the bus again.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// A write to the bus that may have to wait for the disk.
enum Write<'a, 'b> {
    Publish(&'a [Outgoing<'b>]),
    Quarantine(&'a QuarantineRecord<'b>),
    Tick,
}

impl IngestError {
    /// True when another ingester owns the bus: running again cannot help.
    pub fn is_refusal(&self) -> bool {
        match self {
            IngestError::Bus(BusError::File(e)) => {
                matches!(e, crate::bus::file::FileBusError::Locked { .. })
            }
            IngestError::Bus(BusError::Kafka(e)) => e.is_fenced(),
            _ => false,
        }
    }
}

/// What the ingester is configured with: its section and the bus it publishes to.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestSettings {
    pub ingest: IngestConfig,
    pub bus: BusSettings,
}

/// How one connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The server closed the stream (normal about every 15 minutes upstream).
    Closed { delivered: u64 },
    /// No event and no heartbeat completed for `ingest.stall_timeout`.
    Stalled { delivered: u64, trickled: bool },
    /// The body failed mid-stream.
    Broken { delivered: u64 },
    /// Shutdown was requested.
    Shutdown,
}

/// The ingest role's state; built by [`Ingester::start`], driven by [`Ingester::run`].
pub struct Ingester {
    config: Arc<IngestConfig>,
    metrics: IngestMetrics,
    bus: Publisher,
    cursor: Cursor,
    upstream: Upstream,
    since_ms: Option<i64>,
    /// The reconnection time the server last asked for with `retry:`.
    server_retry: Option<Duration>,
    /// Set while the bus refuses writes (read by `/readyz`).
    write_blocked: Trouble,
    validation: Validation,
    /// Events posted to the intake of this host, published between upstream chunks.
    intake: Option<OwnedMutexGuard<mpsc::Receiver<Submission>>>,
    /// Shown while the stream is read from the past (a `since` start, a long resume).
    backfill: backfill::Backfill,
    /// The newest upstream offset of each topic-partition, to count holes as they happen.
    watermarks: crate::coverage::Watermarks,
}

impl Ingester {
    /// Opens the bus and rebuilds the cursor from its tail.
    pub async fn start(
        ctx: &ComponentContext<IngestSettings>,
        write_blocked: Trouble,
    ) -> Result<Self, IngestError> {
        let config = Arc::new(ctx.config.ingest.clone());
        let window = config.dedupe_window;
        let (bus, tail) =
            Publisher::open(&ctx.config.bus, &ctx.metrics, window, config.resume).await?;
        if tail.unreadable_lines > 0 {
            tracing::warn!(
                records = tail.unreadable_lines,
                "unreadable records at the bus tail were skipped"
            );
        }
        let watermarks = crate::coverage::Watermarks::from_newest(&tail.upstream);
        let cursor = Cursor::from_tail(tail, window, config.resume);
        tracing::info!(
            resume_from = cursor.last_id.as_deref().unwrap_or("(now)"),
            remembered_ids = cursor.window.len(),
            bus = ?ctx.config.bus.kind(),
            "ingester starting"
        );
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| IngestError::Config(format!("ingest.url: {e}")))?;
        let upstream = Upstream::new(url, &config.user_agent, config.connect_timeout)
            .map_err(IngestError::Client)?;
        let since_ms = Some(config.since.as_str())
            .filter(|s| !s.is_empty())
            .and_then(config::parse_since);
        let metrics = ctx.metrics.ingest.clone();
        metrics.dedupe_window.set(cursor.window.len() as i64);
        let validation = Validation::new(config.validate, metrics.clone())?;
        Ok(Ingester {
            config,
            metrics,
            bus,
            cursor,
            upstream,
            since_ms,
            server_retry: None,
            write_blocked,
            validation,
            intake: None,
            backfill: backfill::Backfill::default(),
            watermarks,
        })
    }

    /// Streams until shutdown, reconnecting as Wikimedia asks. A disk that refuses the bus's
    /// writes pauses it (see [`Ingester::write`]); it returns only on shutdown or on another bus
    /// failure (then the supervisor restarts it, or stops the process when another ingester
    /// owns the bus).
    pub async fn run(mut self, ctx: ComponentContext<IngestSettings>) -> Result<(), IngestError> {
        let c = self.config.clone();
        let mut backoff = Backoff::new(c.backoff_initial, c.backoff_max);
        loop {
            let last_id = self.resume_id(c.resume_rewind);
            let result = self.stream_once(last_id.as_deref(), &ctx).await;
            self.metrics.connected.set(0);
            let delay = match result {
                Ok(Ended::Shutdown) => break,
                Ok(Ended::Closed { delivered }) => {
                    self.metrics.disconnects.inc(Disconnect::Closed);
                    tracing::info!(peer = %self.upstream.peer(), delivered, "upstream closed the stream; reconnecting");
                    self.after_connection(&mut backoff, delivered)
                }
                Ok(Ended::Stalled {
                    delivered,
                    trickled,
                }) => {
                    self.metrics.errors.inc();
                    self.metrics.disconnects.inc(Disconnect::Stalled);
                    if trickled {
                        self.metrics.anomalies.inc(Anomaly::SlowStream);
                    }
                    tracing::warn!(peer = %self.upstream.peer(), delivered, trickled, timeout = ?c.stall_timeout, "no event or heartbeat within the stall timeout; reconnecting");
                    self.after_connection(&mut backoff, delivered)
                }
                Ok(Ended::Broken { delivered }) => {
                    self.metrics.errors.inc();
                    self.metrics.disconnects.inc(Disconnect::Broken);
                    self.after_connection(&mut backoff, delivered)
                }
                Err(StreamError::Bus(e)) => return Err(e),
                Err(StreamError::Connect(e)) => {
                    self.metrics.errors.inc();
                    let backoff_delay = backoff.next_delay();
                    let (reason, delay) = match &e {
                        // Retry-After is a floor set by the server, up to the longest wait we
                        // accept; a little jitter on top keeps a fleet of clients from
                        // returning in the same instant.
                        ConnectError::Throttled { retry_after, .. } => (
                            Disconnect::Throttled,
                            retry_after.map_or(backoff_delay, |asked| {
                                client::throttled_delay(self.server_delay(asked))
                            }),
                        ),
                        ConnectError::Status { .. } => (Disconnect::Status, backoff_delay),
                        ConnectError::Transport { .. } | ConnectError::Client(_) => {
                            (Disconnect::Transport, backoff_delay)
                        }
                    };
                    self.metrics.disconnects.inc(reason);
                    tracing::warn!(error = %e, retry_in = ?delay, "connection to upstream failed");
                    delay
                }
            };
            if !self.wait_serving_intake(delay, &ctx).await? {
                break;
            }
        }
        self.bus.close().await?;
        tracing::info!(
            resume_from = self.cursor.last_id.as_deref().unwrap_or("(none)"),
            "ingester stopped; events synced"
        );
        Ok(())
    }

    /// A wait the server asked for, cut to `ingest.max_retry_after` (and counted when cut).
    fn server_delay(&self, asked: Duration) -> Duration {
        let (delay, clamped) = client::clamp_server_delay(asked, self.config.max_retry_after);
        if clamped {
            self.metrics.anomalies.inc(Anomaly::RetryClamped);
            tracing::warn!(peer = %self.upstream.peer(), asked = ?asked, waiting = ?delay, "upstream asked for a longer wait than ingest.max_retry_after");
        }
        delay
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

    /// Waits `delay` (a backoff) while publishing what the intake hands over; false when
    /// shutdown came first.
    async fn wait_serving_intake(
        &mut self,
        delay: Duration,
        ctx: &ComponentContext<IngestSettings>,
    ) -> Result<bool, IngestError> {
        let wake = tokio::time::sleep(delay);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(false),
                _ = &mut wake => return Ok(true),
                Some(submission) = next_submission(&mut self.intake) => {
                    self.accept(submission, &ctx.shutdown).await?;
                }
            }
        }
    }

    /// Publishes events posted to the intake: the same dedupe by `meta.id` as upstream events,
    /// then the answer once the bus holds them safely. They carry the cursor's SSE id, so that
    /// the tail of the bus still names where upstream resumes, and they never move the cursor.
    async fn accept(
        &mut self,
        submission: Submission,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<(), IngestError> {
        let events = &submission.events;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; events.len()];
        let mut fresh = Vec::new();
        let mut in_batch = std::collections::HashSet::new();
        for (index, event) in events.iter().enumerate() {
            if self.cursor.window.contains(&event.id) || !in_batch.insert(event.id.as_str()) {
                outcomes[index] = Some(Outcome::Repeat);
            } else {
                fresh.push(index);
            }
        }
        let sse_id = self.cursor.last_id.clone().unwrap_or_default();
        let outgoing: Vec<Outgoing<'_>> = fresh
            .iter()
            .map(|&index| Outgoing {
                sse_id: &sse_id,
                data: &events[index].data,
                key: Some(&events[index].id),
                time_ms: events[index].time_ms,
            })
            .collect();
        // Through `write`, like upstream events: a disk that refuses them pauses the ingester
        // (and this answer) instead of failing it.
        let published = match self.write(Write::Publish(&outgoing), shutdown).await {
            Ok(Some(published)) => published,
            Ok(None) => {
                submission.answer(Err(
                    "shutting down; send them again (repeats are dropped by meta.id)".into(),
                ));
                return Ok(());
            }
            Err(error) => {
                submission.answer(Err(error.to_string()));
                return Err(error);
            }
        };
        drop(outgoing);
        for (at, reason) in &published.too_large {
            outcomes[fresh[*at]] = Some(Outcome::Refused(reason.clone()));
        }
        // Everything before the first event not handed over was either published or refused.
        let handed = published.events as usize + published.too_large.len();
        let settled = match self.bus.settle(INTAKE_SETTLE_LIMIT).await {
            Ok(settled) => settled,
            Err(error) => {
                submission.answer(Err(error.to_string()));
                return Err(error.into());
            }
        };
        if published.interrupted || !settled {
            // Whatever was handed over may still reach the bus: it is remembered, so that a
            // re-sent copy is dropped as a repeat rather than published twice.
            for &index in fresh.iter().take(handed) {
                self.cursor.window.insert(&events[index].id);
            }
            let why = if settled {
                "shutting down"
            } else {
                "the bus did not acknowledge the events in time"
            };
            submission.answer(Err(format!(
                "{why}; send them again (repeats are dropped by meta.id)"
            )));
            return Ok(());
        }
        for &index in fresh.iter().take(handed) {
            if outcomes[index].is_none() {
                self.cursor.window.insert(&events[index].id);
                outcomes[index] = Some(Outcome::Published);
            }
        }
        self.metrics
            .dedupe_window
            .set(self.cursor.window.len() as i64);
        let outcomes = outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Refused("not handed to the bus".into())))
            .collect();
        submission.answer(Ok(outcomes));
        Ok(())
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
        ctx: &ComponentContext<IngestSettings>,
    ) -> Result<Ended, StreamError> {
        let c = self.config.clone();
        let since = if last_id.is_none() {
            self.since_ms
        } else {
            None
        };
        // The intake is served while connecting too: the attempt is kept across its wake-ups.
        let upstream = self.upstream.clone();
        let open = upstream.open(last_id, since, c.connect_timeout);
        tokio::pin!(open);
        let response = loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(Ended::Shutdown),
                r = &mut open => break r.map_err(StreamError::Connect)?,
                Some(submission) = next_submission(&mut self.intake) => {
                    self.accept(submission, &ctx.shutdown).await.map_err(StreamError::Bus)?;
                }
            }
        };
        tracing::info!(peer = %self.upstream.peer(), last_event_id = last_id.unwrap_or("(none)"), since = ?since, "connected to upstream");
        self.metrics.connects.inc();
        self.metrics.connected.set(1);
        let stall = c.stall_timeout;
        let mut seen = SseStats::default();
        let mut delivered = 0u64;
        // The stream is read, parsed and checked on a task of its own, a group ahead of the one
        // being published: reading and checking no longer wait for the disk, nor the disk for
        // them. It stops when this connection ends, whichever way (the guard aborts it).
        let (group_tx, mut groups) = mpsc::channel(1);
        let reader = Reader {
            parser: SseParser::new(c.max_event_bytes),
            group_bytes: self.bus.group_bytes(),
            prover: self.validation.prover(),
            max_future_ms: i64::try_from(c.max_future_skew.as_millis()).unwrap_or(i64::MAX),
            bytes_read: self.metrics.bytes.clone(),
            peer: self.upstream.peer(),
        };
        let _reader = AbortOnDrop(tokio::spawn(reader.run(response.bytes_stream(), group_tx)));
        // Some buses have timed work while upstream is quiet (a sync at most every interval,
        // taking acknowledgements).
        let tick = self.bus.tick_interval();
        let mut bus_timer = tokio::time::interval(tick.unwrap_or(Duration::from_secs(3600)));
        // The watchdog measures the time since the stream last made progress: a completed event
        // or heartbeat. Bytes that complete nothing do not count, so a server trickling one
        // byte at a time cannot keep a dead connection open, and other wake-ups in this loop
        // (the sync timer) cannot postpone it either.
        let mut last_progress = tokio::time::Instant::now();
        let mut trickled = false;
        // The `retry:` value last seen, so that a clamped one is counted once.
        let mut retry_seen = None;
        loop {
            let group = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => return Ok(Ended::Shutdown),
                _ = tokio::time::sleep_until(last_progress + stall) => return Ok(Ended::Stalled { delivered, trickled }),
                _ = bus_timer.tick(), if tick.is_some() => {
                    if self.write(Write::Tick, &ctx.shutdown).await.map_err(StreamError::Bus)?.is_none() {
                        return Ok(Ended::Shutdown);
                    }
                    continue;
                }
                Some(submission) = next_submission(&mut self.intake) => {
                    // Time spent publishing for the intake is ours, not upstream's silence.
                    let started = tokio::time::Instant::now();
                    self.accept(submission, &ctx.shutdown).await.map_err(StreamError::Bus)?;
                    last_progress += started.elapsed();
                    continue;
                }
                next = groups.recv() => next,
            };
            // The reader ends only after handing over a group that says how the stream ended.
            let Some(mut group) = group else {
                return Ok(Ended::Broken { delivered });
            };
            let ending = group.ending;
            match ending {
                Some(false) if group.bytes == 0 => return Ok(Ended::Closed { delivered }),
                Some(true) if group.bytes == 0 => return Ok(Ended::Broken { delivered }),
                _ => {}
            }
            if group.retry_ms != retry_seen {
                retry_seen = group.retry_ms;
                self.server_retry =
                    retry_seen.map(|ms| self.server_delay(Duration::from_millis(ms)));
            }
            let stats = group.stats;
            let progressed = stats.events > seen.events || stats.comments > seen.comments;
            trickled = !progressed;
            if stats.long_ids > seen.long_ids {
                self.metrics
                    .anomalies
                    .series(Anomaly::LongId)
                    .inc_by(stats.long_ids - seen.long_ids);
                tracing::warn!(
                    limit = sse::MAX_ID_BYTES,
                    "ignored an SSE id longer than the limit"
                );
            }
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
            let checks = std::mem::take(&mut group.checks);
            match self.deliver(&mut group.events, checks, &ctx.shutdown).await {
                Ok(Some(n)) => delivered += n,
                Ok(None) => return Ok(Ended::Shutdown),
                Err(e) => return Err(StreamError::Bus(e)),
            }
            // Everything parsed so far is on the bus (or deliberately dropped): the cursor moves.
            // On Kafka "on the bus" means queued; the resume point written into the topic moves
            // only once the brokers acknowledge (see `bus::kafka`).
            if !group.last_event_id.is_empty() {
                self.bus.mark(&group.last_event_id);
                self.cursor.last_id = Some(group.last_event_id);
            }
            // Silence is measured from here: time spent waiting for room on the bus (Kafka's
            // backpressure) is ours, not upstream's.
            if progressed {
                last_progress = tokio::time::Instant::now();
            }
            // The stream ended behind the group: what it brought is published, now it ends.
            match ending {
                Some(false) => return Ok(Ended::Closed { delivered }),
                Some(true) => return Ok(Ended::Broken { delivered }),
                None => {}
            }
        }
    }

    /// Notes an upstream position: a hole is counted and logged once, a new topic logged.
    fn watch(&mut self, topic: &str, partition: i32, offset: u64) {
        use crate::coverage::Seen;
        match self.watermarks.observe(topic, partition, offset) {
            Seen::InOrder => {}
            Seen::Missed(missed) => {
                self.metrics.missed.inc_by(missed);
                tracing::warn!(topic, partition, offset, missed, "upstream offsets were skipped: those events are not on the bus, and their days are marked partial");
            }
            Seen::First {
                switched_from: Some(from),
            } => {
                tracing::info!(from = %from, to = topic, partition, offset, "upstream switched topic (a datacentre switch)");
            }
            Seen::First {
                switched_from: None,
            } => {}
        }
    }

    /// Classifies and publishes parsed events; returns how many reached the bus, or `None` when
    /// shutdown interrupted a wait for room on the bus.
    async fn deliver(
        &mut self,
        events: &mut Vec<SseEvent>,
        checks: Vec<Check>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<u64>, IngestError> {
        if events.is_empty() {
            return Ok(Some(0));
        }
        let mut accepted = Vec::with_capacity(events.len());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (event, check) in events.drain(..).zip(checks) {
            self.metrics.events.inc();
            if event.event_type != "message" {
                self.metrics.errors.inc();
                tracing::warn!(event_type = ?shown(&event.event_type), id = ?shown(&event.id), data = ?shown(&event.data), "upstream sent a non-message event");
                continue;
            }
            let (
                Head {
                    time_ms,
                    key,
                    canary,
                    position,
                },
                proof,
            ) = match check {
                Some(Ok(checked)) => checked,
                // Not a message: answered above.
                None => continue,
                Some(Err(invalid)) => {
                    if !self
                        .quarantine(invalid.reason(), invalid.to_string(), &event, shutdown)
                        .await?
                    {
                        return Ok(None);
                    }
                    continue;
                }
            };
            if let Some(id) = key.as_deref() {
                if !self.cursor.window.insert(id) {
                    self.metrics.duplicates.inc();
                    continue;
                }
            }
            if let Verdict::Quarantine(error) = self.validation.judge(&event.id, proof) {
                self.quarantine(RejectReason::Schema, error.to_string(), &event, shutdown)
                    .await?;
                continue;
            }
            if canary {
                self.metrics.canaries.inc();
            }
            // Only what reaches the bus is covered, so the metric counts the offsets the stores'
            // verdicts will call missed (quarantined events included); an event the bus then
            // refuses as too large is the one it does not count.
            if let Some((topic, partition, offset)) = &position {
                self.watch(topic, *partition, *offset);
            }
            accepted.push((event, time_ms, key));
        }
        let outgoing: Vec<Outgoing<'_>> = accepted
            .iter()
            .map(|(event, time_ms, key)| Outgoing {
                sse_id: &event.id,
                data: &event.data,
                key: key.as_deref(),
                time_ms: *time_ms,
            })
            .collect();
        let Some(published) = self.write(Write::Publish(&outgoing), shutdown).await? else {
            return Ok(None);
        };
        drop(outgoing);
        for (index, error) in &published.too_large {
            if let Some((event, _, _)) = accepted.get(*index) {
                if !self
                    .quarantine(RejectReason::TooLarge, error.clone(), event, shutdown)
                    .await?
                {
                    return Ok(None);
                }
            }
        }
        let refused: std::collections::HashSet<usize> =
            published.too_large.iter().map(|(i, _)| *i).collect();
        let newest_ms = accepted
            .iter()
            .enumerate()
            .take(published.events as usize + refused.len())
            .filter(|(i, _)| !refused.contains(i))
            .map(|(_, (_, time_ms, _))| *time_ms)
            .max();
        if let Some(newest_ms) = newest_ms {
            self.metrics.delivered_event_time(newest_ms.min(now_ms));
            self.backfill.advance(published.events, newest_ms, now_ms);
        }
        self.metrics
            .dedupe_window
            .set(self.cursor.window.len() as i64);
        if published.interrupted {
            return Ok(None);
        }
        Ok(Some(published.events))
    }

    /// Keeps an event that cannot be published, with the reason, and counts it; false when
    /// shutdown came while the bus refused writes.
    async fn quarantine(
        &mut self,
        reason: RejectReason,
        error: String,
        event: &SseEvent,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, IngestError> {
        self.metrics.quarantined(reason);
        let record = QuarantineRecord::new(reason, error, &event.id, &event.data);
        tracing::warn!(%reason, error = ?shown(&record.error), id = ?shown(record.id), "quarantined an event");
        Ok(self
            .write(Write::Quarantine(&record), shutdown)
            .await?
            .is_some())
    }

    /// Performs one bus write. While the disk refuses it (full, failing), reading from upstream
    /// pauses: the same write is tried again every [`WRITE_RETRY`], nothing moves the cursor,
    /// and the state is reported (gauge, `/readyz`, one log line per change). `None` when
    /// shutdown came during a pause.
    async fn write(
        &mut self,
        write: Write<'_, '_>,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Published>, IngestError> {
        loop {
            let result = match &write {
                Write::Publish(events) => self.bus.publish(events, shutdown).await,
                Write::Quarantine(record) => self
                    .bus
                    .quarantine(record, shutdown)
                    .await
                    .map(|()| Published::default()),
                Write::Tick => self.bus.tick().await.map(|()| Published::default()),
            };
            match result {
                Ok(published) => {
                    if self.write_blocked.clear() {
                        self.metrics.write_blocked.set(0);
                        tracing::info!("the bus takes writes again; reading from upstream resumes");
                    }
                    return Ok(Some(published));
                }
                Err(e) if e.is_write_failure() => {
                    if self.write_blocked.set(e.to_string()) {
                        self.metrics.write_blocked.set(1);
                        self.metrics.write_pauses.inc();
                        tracing::error!(error = %e, "the bus refuses writes; reading from upstream is paused until it takes them");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(WRITE_RETRY) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// What the ingester needs of a valid event's head, owned, to classify it after the check.
#[derive(Debug, PartialEq)]
struct Head {
    time_ms: i64,
    /// `meta.id`: the dedupe key, and the message key on Kafka.
    key: Option<String>,
    canary: bool,
    /// Where upstream held it: topic, partition, offset.
    position: Option<(String, i32, u64)>,
}

/// What checking one event found: `None` for an event that is not a message, the reason it is
/// invalid, or its head and the schema's answer (`None` when validation is off). An event
/// whose id repeats one already delivered is checked against its schema all the same; repeats
/// are rare, and the check reads nothing but the event.
type Check = Option<Result<(Head, Option<validation::Proof>), crate::event::Invalid>>;

/// The fewest events a thread of [`check_all`] checks: below this, starting a thread costs more
/// than it saves.
const MIN_CHECKS_PER_THREAD: usize = 256;

/// Checks one event: its head and whether it is in the future, then its schema. Reads nothing
/// but the event, so that a group's events can be checked on several threads at once.
fn check(event: &SseEvent, validation: &Prover, now_ms: i64, max_future_ms: i64) -> Check {
    if event.event_type != "message" {
        return None;
    }
    let checked = crate::event::inspect(&event.data).and_then(|head| {
        crate::event::check_not_future(head.time_ms, now_ms, max_future_ms)?;
        Ok(head)
    });
    Some(checked.map(|head| {
        let head = Head {
            time_ms: head.time_ms,
            key: head.id.map(|id| id.into_owned()),
            canary: head.canary,
            position: head
                .position
                .map(|at| (at.topic.into_owned(), at.partition, at.offset)),
        };
        (head, validation.prove(&event.data))
    }))
}

/// Checks every event of a group, in order. A group of a backlog holds thousands, and checking
/// them (two reads of each event's JSON) was the larger half of the ingester's work: they are
/// checked in parts on every core, while what depends on the order (the dedupe window, the
/// watermarks, publishing) stays with the ingester. A live stream's groups of a few events are
/// checked here, on no other thread.
fn check_all(
    events: &[SseEvent],
    validation: &Prover,
    now_ms: i64,
    max_future_ms: i64,
) -> Vec<Check> {
    crate::parts::in_parts(events, MIN_CHECKS_PER_THREAD, |part| {
        part.iter()
            .map(|event| check(event, validation, now_ms, max_future_ms))
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// What the reader of one connection hands over: the events a group of reads completed, and
/// the parser's state once they were parsed.
struct Group {
    events: Vec<SseEvent>,
    /// What checking each event found, in the events' order.
    checks: Vec<Check>,
    /// The parser's totals after this group.
    stats: SseStats,
    /// The last `retry:` the server sent.
    retry_ms: Option<u64>,
    /// The id a reconnect sends once this group is on the bus.
    last_event_id: String,
    /// Bytes read for this group.
    bytes: usize,
    /// The stream ended behind this group: `Some(true)` when it broke, `Some(false)` when the
    /// server closed it.
    ending: Option<bool>,
}

/// Aborts a task when dropped: a connection's reader ends with the connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads one connection's stream, parses it into groups and checks their events, until the
/// stream ends or the ingester stops taking them.
struct Reader {
    parser: SseParser,
    group_bytes: usize,
    prover: Prover,
    max_future_ms: i64,
    bytes_read: prometheus::IntCounter,
    peer: String,
}

impl Reader {
    /// Group commit: what has already arrived behind a read joins it, so that a backlog (a
    /// backfill, a reconnect catching up) costs one sync of the bus per group instead of one per
    /// network read. Nothing waits long for more: a live stream, whose reads come one at a
    /// time, is handed over a gap later at most.
    async fn run<S, E>(mut self, mut body: S, groups: mpsc::Sender<Group>)
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut capacity = 0;
        loop {
            let mut chunk = body.next().await;
            let mut group = Group {
                events: Vec::with_capacity(capacity),
                checks: Vec::new(),
                stats: SseStats::default(),
                retry_ms: None,
                last_event_id: String::new(),
                bytes: 0,
                ending: None,
            };
            let group_started = tokio::time::Instant::now();
            loop {
                match chunk {
                    None => group.ending = Some(false),
                    Some(Err(e)) => {
                        tracing::warn!(peer = %self.peer, error = %e, "upstream stream broke");
                        group.ending = Some(true);
                    }
                    Some(Ok(bytes)) => {
                        self.bytes_read.inc_by(bytes.len() as u64);
                        self.parser.push(&bytes, &mut group.events);
                        group.bytes += bytes.len();
                    }
                }
                if group.ending.is_some() || group.bytes >= self.group_bytes {
                    break;
                }
                chunk = match body.next().now_or_never() {
                    Some(next) => next,
                    // Nothing more has arrived yet. A backlog keeps arriving within a moment,
                    // faster than a sync: wait that long for it, up to `GROUP_TIME` after the
                    // group began, so that its groups grow to `group_bytes` while a live
                    // stream, whose events come one at a time, is handed over no more than a
                    // gap later.
                    None => {
                        let left = GROUP_TIME.saturating_sub(group_started.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        // A read that completes is kept; one cut short by the gap lost nothing
                        // (the stream is read again from where it was).
                        match tokio::time::timeout(GROUP_GAP.min(left), body.next()).await {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                };
            }
            capacity = group.events.len();
            let now_ms = chrono::Utc::now().timestamp_millis();
            group.checks = check_all(&group.events, &self.prover, now_ms, self.max_future_ms);
            group.stats = self.parser.stats();
            group.retry_ms = self.parser.retry_ms();
            group.last_event_id = self.parser.last_event_id().to_owned();
            let ending = group.ending.is_some();
            if groups.send(group).await.is_err() || ending {
                return;
            }
        }
    }
}

/// Upstream text as a log field: at most 200 characters, and (logged with `?`) every control
/// character escaped, so that nothing upstream sends can start a line of its own or colour a
/// terminal.
fn shown(text: &str) -> &str {
    match text.char_indices().nth(200) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[derive(Debug)]
enum StreamError {
    Connect(ConnectError),
    Bus(IngestError),
}

/// The next event batch the intake handed over; pending forever when this host has no intake
/// (or it has gone).
async fn next_submission(
    intake: &mut Option<OwnedMutexGuard<mpsc::Receiver<Submission>>>,
) -> Option<Submission> {
    match intake {
        Some(rx) => {
            let next = rx.recv().await;
            if next.is_none() {
                *intake = None;
            }
            next
        }
        None => std::future::pending().await,
    }
}

/// Builds and runs the ingester: the supervised unit of the ingest role. `write_blocked` is set
/// while the bus refuses writes; `intake` is what this host's intake hands over, if it runs.
pub async fn run(
    ctx: ComponentContext<IngestSettings>,
    write_blocked: Trouble,
    intake: Option<HandoffReceiver>,
) -> Result<(), IngestError> {
    let mut ingester = Ingester::start(&ctx, write_blocked).await?;
    if let Some(intake) = intake {
        ingester.intake = Some(intake.take().await);
    }
    ingester.run(ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ValidateMode;
    use crate::metrics::Metrics;

    /// The recorded events, with non-messages, text that is not JSON and schema failures
    /// among them.
    fn group() -> Vec<SseEvent> {
        let id: Arc<str> = Arc::from("[]");
        crate::event::recorded::FILES
            .iter()
            .flat_map(|file| crate::event::recorded::lines(file))
            .enumerate()
            .map(|(n, data)| SseEvent {
                event_type: if n % 97 == 5 { "error" } else { "message" }.into(),
                data: match n % 13 {
                    7 => "{not json".into(),
                    3 => data.replacen("\"bot\":", "\"bot\":\"no\",\"was\":", 1),
                    _ => data,
                },
                id: id.clone(),
            })
            .collect()
    }

    fn checked_in_parts_as_one_by_one() {
        let metrics = Metrics::new(1).unwrap();
        let validation = Validation::new(ValidateMode::Quarantine, metrics.ingest.clone()).unwrap();
        let events = group();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let one_by_one: Vec<Check> = events
            .iter()
            .map(|e| check(e, &validation.prover(), now_ms, 60_000))
            .collect();
        assert_eq!(
            check_all(&events, &validation.prover(), now_ms, 60_000),
            one_by_one
        );
        let count = |f: &dyn Fn(&Check) -> bool| one_by_one.iter().filter(|c| f(c)).count();
        assert!(count(&|c| c.is_none()) > 10);
        assert!(count(&|c| matches!(c, Some(Err(_)))) > 100);
        assert!(count(&|c| matches!(c, Some(Ok((_, Some(Err(_))))))) > 100);
        assert!(count(&|c| matches!(c, Some(Ok((_, Some(Ok(_))))))) > 1000);
    }

    #[test]
    fn a_group_is_checked_in_parts_as_one_by_one_off_a_runtime() {
        checked_in_parts_as_one_by_one();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_is_checked_in_parts_as_one_by_one_on_a_runtime_of_threads() {
        checked_in_parts_as_one_by_one();
    }

    #[tokio::test]
    async fn a_group_is_checked_in_parts_as_one_by_one_on_a_runtime_of_one_thread() {
        checked_in_parts_as_one_by_one();
    }
}
