//! The ingester's writer on Kafka: an idempotent producer whose in-flight messages are held in
//! send order ([`AckQueue`]) so that the resume point written into later messages moves only
//! when everything before it is acknowledged, and whose memory is capped by `kafka.buffer_bytes`.

use super::settings::producer_config;
use super::{
    client_err, ensure_topics, read_tail, ClientLog, KafkaBusError, CURSOR_HEADER, REASON_HEADER,
    SSE_ID_HEADER,
};
use crate::bus::{Outgoing, Published, QuarantineRecord, Tail};
use crate::config::KafkaConfig;
use crate::metrics::KafkaMetrics;
use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What the publisher remembers of one message it handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Bytes it holds against `kafka.buffer_bytes`.
    pub bytes: u64,
    /// When it was handed over.
    pub at: Instant,
    /// `meta.dt` of the event; `None` for quarantine records.
    pub event_ms: Option<i64>,
}

enum Entry<D> {
    Delivery(D, Sent),
    /// Everything before this entry, once acknowledged, makes this SSE id a safe resume point.
    Mark(String),
}

/// The in-flight messages in send order, with the resume marks between them. Pure: it holds
/// whatever stands for a delivery (`D`) and is told when the oldest one is settled, so the
/// cursor rule can be tested without a broker.
pub struct AckQueue<D> {
    entries: VecDeque<Entry<D>>,
    buffered: u64,
    /// The newest SSE id before which every message was acknowledged.
    acked: Option<String>,
}

impl<D> AckQueue<D> {
    /// An empty queue whose resume point is `acked` (read back from the topic).
    pub fn new(acked: Option<String>) -> Self {
        AckQueue {
            entries: VecDeque::new(),
            buffered: 0,
            acked,
        }
    }

    /// Holds one handed-over message.
    pub fn push(&mut self, delivery: D, sent: Sent) {
        self.buffered += sent.bytes;
        self.entries.push_back(Entry::Delivery(delivery, sent));
    }

    /// Records that every message pushed so far is covered by `sse_id`: once they are all
    /// acknowledged, it becomes the resume point.
    pub fn mark(&mut self, sse_id: &str) {
        match self.entries.back_mut() {
            Some(Entry::Mark(last)) => {
                last.clear();
                last.push_str(sse_id);
            }
            Some(Entry::Delivery(..)) => self.entries.push_back(Entry::Mark(sse_id.to_owned())),
            None => self.acked = Some(sse_id.to_owned()),
        }
    }

    /// The oldest message not yet settled.
    pub fn front_mut(&mut self) -> Option<&mut D> {
        self.pass_marks();
        match self.entries.front_mut() {
            Some(Entry::Delivery(delivery, _)) => Some(delivery),
            _ => None,
        }
    }

    /// Settles the oldest message (its acknowledgement arrived) and moves the resume point
    /// past the marks that follow it.
    pub fn settle_front(&mut self) -> Option<Sent> {
        self.pass_marks();
        let sent = match self.entries.pop_front() {
            Some(Entry::Delivery(_, sent)) => sent,
            Some(Entry::Mark(id)) => {
                self.acked = Some(id);
                return None;
            }
            None => return None,
        };
        self.buffered = self.buffered.saturating_sub(sent.bytes);
        self.pass_marks();
        Some(sent)
    }

    fn pass_marks(&mut self) {
        while let Some(Entry::Mark(_)) = self.entries.front() {
            if let Some(Entry::Mark(id)) = self.entries.pop_front() {
                self.acked = Some(id);
            }
        }
    }

    /// The resume point every acknowledgement so far proves.
    pub fn acked(&self) -> Option<&str> {
        self.acked.as_deref()
    }

    /// Forgets the resume point (a fresh start): until the next mark is passed, messages carry
    /// their own id instead.
    pub fn forget(&mut self) {
        self.acked = None;
    }

    /// Bytes held by messages not yet acknowledged.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }

    /// Messages not yet settled.
    pub fn in_flight(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, Entry::Delivery(..)))
            .count()
    }

    /// True when no message is waiting.
    pub fn is_empty(&self) -> bool {
        !self
            .entries
            .iter()
            .any(|e| matches!(e, Entry::Delivery(..)))
    }
}

/// What an event could not be published as.
#[derive(Debug)]
pub enum Refused {
    /// Larger than the producer's `message.max.bytes`: it goes to quarantine instead.
    TooLarge(String),
    Failed(KafkaBusError),
}

/// A quarantine record as a message for `kafka.quarantine_topic`: keyed by its reason, with
/// the reason in a header too.
fn quarantine_message(record: &QuarantineRecord<'_>) -> (Vec<u8>, OwnedHeaders) {
    let headers = OwnedHeaders::new().insert(Header {
        key: REASON_HEADER,
        value: Some(record.reason.as_str()),
    });
    (record.to_json(), headers)
}

/// How often the open transaction is committed: readers see events this much later at most.
const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// How long a commit on the timer may block the ingester before it is finished later.
const COMMIT_WAIT: Duration = Duration::from_millis(100);
/// How long a start may wait for the coordinator to fence an older producer.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused producer may take to say why (see `why_refused`).
const WHY_REFUSED_WAIT: Duration = Duration::from_secs(15);

/// Where the producer's transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Txn {
    /// `kafka.transactional_id` is empty: messages are not grouped in transactions.
    Off,
    /// None open: the next message begins one.
    Idle,
    /// Open, with messages since `since`.
    Open { messages: u64, since: Instant },
    /// A commit began and has not finished: nothing is produced until it has.
    Committing,
}

/// The ingester's side of the Kafka bus: an idempotent producer, transactional when
/// `kafka.transactional_id` is set. Then messages are committed in a transaction every
/// [`COMMIT_INTERVAL`]; readers (`read_committed`) see only committed ones, so an ingester that
/// another one fenced leaves nothing behind.
pub struct KafkaPublisher {
    producer: FutureProducer<ClientLog>,
    config: KafkaConfig,
    queue: AckQueue<DeliveryFuture>,
    metrics: KafkaMetrics,
    txn: Txn,
}

impl KafkaPublisher {
    /// Creates missing topics, connects, and reads the cursor and the newest `window` ids back
    /// from the topic.
    pub async fn open(
        config: &KafkaConfig,
        metrics: KafkaMetrics,
        window: usize,
    ) -> Result<(Self, Tail), KafkaBusError> {
        ensure_topics(config).await?;
        let producer: FutureProducer<ClientLog> = producer_config(config)
            .create_with_context(ClientLog::new(&config.brokers))
            .map_err(client_err(&config.brokers, "create a producer"))?;
        let transactional = !config.transactional_id.is_empty();
        if transactional {
            // This fences any older producer with the same transactional.id and aborts what
            // it left open, so the tail read next is final.
            let starting = producer.clone();
            tokio::task::spawn_blocking(move || starting.init_transactions(INIT_TIMEOUT))
                .await
                .map_err(|e| KafkaBusError::Broker {
                    brokers: config.brokers.clone(),
                    message: format!("starting transactions failed: {e}"),
                })?
                .map_err(client_err(&config.brokers, "start transactions"))?;
            tracing::info!(brokers = %config.brokers, transactional_id = %config.transactional_id, "transactional producer ready; any older ingester with this id is fenced");
        }
        let owned = config.clone();
        let tail = tokio::task::spawn_blocking(move || read_tail(&owned, window))
            .await
            .map_err(|e| KafkaBusError::Broker {
                brokers: config.brokers.clone(),
                message: format!("reading the topic tail failed: {e}"),
            })??;
        metrics.buffer_limit.set(config.buffer_bytes as i64);
        metrics.buffered.set(0);
        Ok((
            KafkaPublisher {
                producer,
                config: config.clone(),
                queue: AckQueue::new(tail.last_id.clone()),
                metrics,
                txn: if transactional { Txn::Idle } else { Txn::Off },
            },
            tail,
        ))
    }

    /// Publishes `events` in order; the ones too large for the producer are reported, not sent.
    pub async fn publish_all(
        &mut self,
        events: &[Outgoing<'_>],
        shutdown: &CancellationToken,
    ) -> Result<Published, KafkaBusError> {
        let mut published = Published::default();
        for (index, event) in events.iter().enumerate() {
            match self.publish(event, shutdown).await {
                Ok(true) => published.events += 1,
                Ok(false) => {
                    published.interrupted = true;
                    break;
                }
                Err(Refused::TooLarge(reason)) => published.too_large.push((index, reason)),
                Err(Refused::Failed(e)) => return Err(self.named(e)),
            }
        }
        Ok(published)
    }

    /// `kafka.buffer_bytes`: the most event bytes this publisher holds for the brokers.
    pub fn buffer_bytes(&self) -> u64 {
        self.config.buffer_bytes
    }

    /// Hands one event to the producer, waiting for room when `kafka.buffer_bytes` are in flight.
    /// Returns `Ok(false)` when shutdown interrupted the wait.
    pub async fn publish(
        &mut self,
        event: &Outgoing<'_>,
        shutdown: &CancellationToken,
    ) -> Result<bool, Refused> {
        let (sse_id, data, key) = (event.sse_id, event.data, event.key);
        // Before any acknowledgement in this run, the first event's own id is a safe resume
        // point: nothing before it is this run's responsibility.
        let cursor = self
            .queue
            .acked()
            .map_or_else(|| sse_id.to_owned(), str::to_owned);
        let mut headers = OwnedHeaders::new_with_capacity(2)
            .insert(Header {
                key: SSE_ID_HEADER,
                value: Some(sse_id),
            })
            .insert(Header {
                key: CURSOR_HEADER,
                value: Some(cursor.as_str()),
            });
        let bytes = (data.len() + key.map_or(0, str::len) + sse_id.len() + cursor.len()) as u64;
        let topic = self.config.topic.clone();
        loop {
            if self.queue.buffered() + bytes > self.config.buffer_bytes
                && !self.queue.is_empty()
                && !self
                    .wait_for_room(bytes, shutdown)
                    .await
                    .map_err(Refused::Failed)?
            {
                return Ok(false);
            }
            if !self
                .open_transaction(shutdown)
                .await
                .map_err(Refused::Failed)?
            {
                return Ok(false);
            }
            let mut record = FutureRecord::to(&topic).payload(data).headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            match self.producer.send_result(record) {
                Ok(future) => {
                    self.track(future, bytes, Some(event.time_ms));
                    self.metrics.writes.inc();
                    self.sent_in_transaction();
                    return Ok(true);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    // librdkafka's own limits (message count, its bookkeeping) bind before
                    // ours: wait for one delivery, never spin.
                    headers = record.headers.unwrap_or_default();
                    let started = Instant::now();
                    if self.queue.is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } else if !self
                        .complete_front(shutdown)
                        .await
                        .map_err(Refused::Failed)?
                    {
                        return Ok(false);
                    }
                    self.metrics
                        .wait_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    self.metrics.errors.inc();
                    return Err(Refused::TooLarge(format!(
                        "{} bytes is more than the producer's message.max.bytes",
                        data.len()
                    )));
                }
                Err((source, _)) => {
                    self.metrics.errors.inc();
                    let source = self.why_refused(source);
                    return Err(Refused::Failed(KafkaBusError::Client {
                        brokers: self.config.brokers.clone(),
                        op: "queue an event",
                        source: Box::new(source),
                    }));
                }
            }
        }
    }

    /// Sends an invalid event with its reason to `kafka.quarantine_topic`.
    pub async fn quarantine(
        &mut self,
        record: &QuarantineRecord<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), KafkaBusError> {
        let sent = self.send_quarantine(record, shutdown).await;
        sent.map_err(|e| self.named(e))
    }

    async fn send_quarantine(
        &mut self,
        record: &QuarantineRecord<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), KafkaBusError> {
        let (body, headers) = quarantine_message(record);
        let topic = self.config.quarantine_topic.clone();
        let bytes = body.len() as u64;
        loop {
            if !self
                .open_transaction(shutdown)
                .await
                .map_err(|e| self.named(e))?
            {
                return Ok(());
            }
            let sent = self.producer.send_result(
                FutureRecord::to(&topic)
                    .key(record.reason.as_str())
                    .payload(&body)
                    .headers(headers.clone()),
            );
            match sent {
                Ok(future) => {
                    self.track(future, bytes, None);
                    self.sent_in_transaction();
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if !self.queue.is_empty() =>
                {
                    if !self.complete_front(shutdown).await? {
                        return Ok(());
                    }
                }
                Err((source, _)) => {
                    self.metrics.errors.inc();
                    let source = self.why_refused(source);
                    return Err(KafkaBusError::Client {
                        brokers: self.config.brokers.clone(),
                        op: "queue a quarantine record",
                        source: Box::new(source),
                    });
                }
            }
        }
    }

    fn track(&mut self, future: DeliveryFuture, bytes: u64, event_ms: Option<i64>) {
        self.queue.push(
            future,
            Sent {
                bytes,
                at: Instant::now(),
                event_ms,
            },
        );
        self.metrics.buffered.set(self.queue.buffered() as i64);
    }

    /// Records that every event handed over so far is covered by `sse_id`: once they are all
    /// acknowledged, it becomes the resume point written into later messages.
    pub fn mark(&mut self, sse_id: &str) {
        self.queue.mark(sse_id);
    }

    /// Takes every acknowledgement that has already arrived, without waiting, and commits the
    /// open transaction once it is [`COMMIT_INTERVAL`] old (waiting at most [`COMMIT_WAIT`]; a
    /// commit that takes longer is finished before anything else is produced).
    pub fn collect_acks(&mut self) -> Result<(), KafkaBusError> {
        self.take_acks().map_err(|e| self.named(e))?;
        // A commit waits for every delivery of the transaction: it is cheap once they are all
        // in, so it waits for that, unless the transaction grows old (brokers abort one that
        // stays open past transaction.timeout.ms).
        let wait = match self.txn {
            Txn::Open { messages, since } if messages > 0 => {
                if self.queue.is_empty() && since.elapsed() >= COMMIT_INTERVAL {
                    Some(COMMIT_WAIT)
                } else if since.elapsed() >= COMMIT_INTERVAL * 10 {
                    Some(COMMIT_WAIT * 10)
                } else {
                    None
                }
            }
            Txn::Committing => Some(COMMIT_WAIT),
            Txn::Open { .. } | Txn::Idle | Txn::Off => None,
        };
        if let Some(wait) = wait {
            self.commit(wait).map_err(|e| self.named(e))?;
        }
        Ok(())
    }

    fn take_acks(&mut self) -> Result<(), KafkaBusError> {
        while let Some(future) = self.queue.front_mut() {
            match future.now_or_never() {
                None => return Ok(()),
                Some(result) => self.settle(result)?,
            }
        }
        Ok(())
    }

    /// Counts a message into the open transaction.
    fn sent_in_transaction(&mut self) {
        if let Txn::Open { messages, .. } = &mut self.txn {
            *messages += 1;
        }
    }

    /// Makes sure a transaction is open for the next message: finishes a commit still under
    /// way (waiting for the brokers, as backpressure does), then begins one. False when
    /// shutdown came first.
    async fn open_transaction(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<bool, KafkaBusError> {
        if self.txn == Txn::Committing {
            let started = Instant::now();
            while self.txn == Txn::Committing {
                if shutdown.is_cancelled() {
                    return Ok(false);
                }
                self.commit(COMMIT_WAIT)?;
            }
            self.metrics
                .wait_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if self.txn == Txn::Idle {
            self.producer
                .begin_transaction()
                .map_err(client_err(&self.config.brokers, "begin a transaction"))?;
            self.txn = Txn::Open {
                messages: 0,
                since: Instant::now(),
            };
        }
        Ok(true)
    }

    /// Commits the open transaction, waiting at most `wait`. A commit that times out stays
    /// under way (`Committing`) and is tried again; one the brokers refuse is aborted and
    /// reported, and the ingester starts over from what the topic holds.
    fn commit(&mut self, wait: Duration) -> Result<(), KafkaBusError> {
        let producer = self.producer.clone();
        let result = tokio::task::block_in_place(|| producer.commit_transaction(wait));
        match result {
            Ok(()) => {
                self.txn = Txn::Idle;
                // Committing waits for every delivery: their acknowledgements are all in.
                self.take_acks()
            }
            // Deliveries still outstanding (the flush before the commit timed out), or the
            // commit itself still under way: finished on the next try.
            Err(KafkaError::Flush(_)) => {
                self.txn = Txn::Committing;
                Ok(())
            }
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.is_fatal() => {
                self.txn = Txn::Committing;
                Ok(())
            }
            Err(e) => {
                let requires_abort =
                    matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort());
                if requires_abort {
                    let _ = tokio::task::block_in_place(|| producer.abort_transaction(wait));
                }
                self.txn = Txn::Idle;
                self.metrics.errors.inc();
                Err(KafkaBusError::Client {
                    brokers: self.config.brokers.clone(),
                    op: "commit a transaction",
                    source: Box::new(e),
                })
            }
        }
    }

    /// The cause behind a message the producer refused. Once a transaction has failed, every
    /// message is refused with a plain state error; the transaction's own error says why (most
    /// often: a newer ingester with the same id fenced this one).
    fn why_refused(&mut self, refused: KafkaError) -> KafkaError {
        if self.txn == Txn::Off
            || !matches!(
                refused,
                KafkaError::MessageProduction(RDKafkaErrorCode::State)
            )
        {
            return refused;
        }
        // The commit flushes first: given time, the failed deliveries settle and the
        // transaction's error comes back instead of a flush timeout. Taking a timeout for the
        // answer would restart this ingester, and the restart would fence the one in charge,
        // so it gets the time a loaded broker needs.
        let producer = self.producer.clone();
        match tokio::task::block_in_place(|| producer.commit_transaction(WHY_REFUSED_WAIT)) {
            Err(cause) => cause,
            Ok(()) => {
                self.txn = Txn::Idle;
                refused
            }
        }
    }

    /// `error`, named as fencing when a newer ingester took the transactional id over. A fenced
    /// producer refuses everything with a plain state error; its fatal error says why.
    fn named(&self, error: KafkaBusError) -> KafkaBusError {
        use rdkafka::error::RDKafkaErrorCode::{InvalidProducerEpoch, ProducerFenced};
        let fatal = self.producer.client().fatal_error().map(|(code, _)| code);
        let fenced =
            error.is_fenced() || matches!(fatal, Some(ProducerFenced | InvalidProducerEpoch));
        if fenced && !matches!(error, KafkaBusError::Fenced { .. }) {
            tracing::debug!(%error, "fenced");
            return KafkaBusError::Fenced {
                brokers: self.config.brokers.clone(),
                id: self.config.transactional_id.clone(),
            };
        }
        error
    }

    /// Waits for the oldest delivery; false when shutdown came first.
    async fn complete_front(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<bool, KafkaBusError> {
        self.take_acks()?;
        let Some(future) = self.queue.front_mut() else {
            return Ok(true);
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            result = future => result,
        };
        self.settle(result)?;
        self.take_acks()?;
        Ok(true)
    }

    /// Backpressure: waits until `bytes` more fit under the cap; false when shutdown came first.
    async fn wait_for_room(
        &mut self,
        bytes: u64,
        shutdown: &CancellationToken,
    ) -> Result<bool, KafkaBusError> {
        let started = Instant::now();
        let mut logged = false;
        while self.queue.buffered() + bytes > self.config.buffer_bytes && !self.queue.is_empty() {
            if !logged && started.elapsed() > Duration::from_secs(5) {
                tracing::warn!(brokers = %self.config.brokers, buffered = self.queue.buffered(), limit = self.config.buffer_bytes, "Kafka buffer full; reading from upstream is paused until the brokers acknowledge");
                logged = true;
            }
            if !self.complete_front(shutdown).await? {
                return Ok(false);
            }
        }
        self.metrics
            .wait_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(true)
    }

    /// Takes the oldest delivery's outcome off the queue.
    fn settle<E>(
        &mut self,
        result: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
    ) -> Result<(), KafkaBusError> {
        let sent = self.queue.settle_front();
        self.metrics.buffered.set(self.queue.buffered() as i64);
        match result {
            Ok(Ok(_)) => {
                if let Some(sent) = sent {
                    self.metrics
                        .write_seconds
                        .observe(sent.at.elapsed().as_secs_f64());
                    if let Some(ms) = sent.event_ms {
                        self.metrics.events.inc();
                        let now = chrono::Utc::now().timestamp_millis();
                        self.metrics.lag_ms.observe((now - ms).max(0) as f64);
                    }
                }
                Ok(())
            }
            Ok(Err((source, message))) => {
                self.metrics.errors.inc();
                Err(KafkaBusError::Delivery {
                    brokers: self.config.brokers.clone(),
                    topic: message.topic().to_owned(),
                    source: Box::new(source),
                })
            }
            Err(_) => {
                self.metrics.errors.inc();
                Err(KafkaBusError::Broker {
                    brokers: self.config.brokers.clone(),
                    message: "the producer stopped before acknowledging a delivery".into(),
                })
            }
        }
    }

    /// Waits until every event handed over is acknowledged (and, with a transactional
    /// producer, committed), or `limit` passes.
    pub async fn flush(&mut self, limit: Duration) -> Result<(), KafkaBusError> {
        if !self.settle_all(limit).await? {
            tracing::warn!(unacknowledged = self.queue.in_flight(), "shutting down before the brokers acknowledged and committed every event; they will be fetched again from upstream");
        }
        Ok(())
    }

    /// Waits until every message handed over is acknowledged and, with a transactional
    /// producer, committed, so that readers see it: true when they all are, false when `limit`
    /// passed first.
    pub async fn settle_all(&mut self, limit: Duration) -> Result<bool, KafkaBusError> {
        let deadline = Instant::now() + limit;
        let never = CancellationToken::new();
        let drained = tokio::time::timeout(limit, async {
            while !self.queue.is_empty() {
                self.complete_front(&never).await?;
            }
            Ok::<_, KafkaBusError>(())
        })
        .await;
        match drained {
            Ok(result) => result.map_err(|e| self.named(e))?,
            Err(_) => return Ok(false),
        }
        // Everything is acknowledged: committing makes it visible to readers.
        if matches!(self.txn, Txn::Open { messages, .. } if messages > 0)
            || self.txn == Txn::Committing
        {
            loop {
                self.commit(COMMIT_WAIT).map_err(|e| self.named(e))?;
                if self.txn != Txn::Committing {
                    break;
                }
                if Instant::now() >= deadline {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Starts afresh (`ingest.resume = false`): until the first acknowledgement, messages carry
    /// this run's first event as their resume point instead of the one read from the topic.
    pub fn forget_cursor(&mut self) {
        self.queue.forget();
    }

    /// The resume point proven by acknowledgements.
    pub fn acked(&self) -> Option<&str> {
        self.queue.acked()
    }

    /// Bytes of event data waiting for the brokers.
    pub fn buffered(&self) -> u64 {
        self.queue.buffered()
    }
}

/// A reader's way to the quarantine topic: a producer created on first use.
pub struct QuarantineProducer {
    config: KafkaConfig,
    producer: Option<FutureProducer<ClientLog>>,
}

impl QuarantineProducer {
    pub fn new(config: KafkaConfig) -> Self {
        QuarantineProducer {
            config,
            producer: None,
        }
    }

    /// Sends one record and waits for its acknowledgement.
    pub async fn write(&mut self, record: &QuarantineRecord<'_>) -> Result<(), KafkaBusError> {
        let brokers = self.config.brokers.clone();
        let producer = match &mut self.producer {
            Some(producer) => producer,
            None => self.producer.insert(
                super::client_config(&self.config)
                    .create_with_context(ClientLog::new(&brokers))
                    .map_err(client_err(&brokers, "create a quarantine producer"))?,
            ),
        };
        let (body, headers) = quarantine_message(record);
        let message = FutureRecord::to(&self.config.quarantine_topic)
            .key(record.reason.as_str())
            .payload(&body)
            .headers(headers);
        producer
            .send(message, Duration::from_secs(30))
            .await
            .map_err(|(source, _)| KafkaBusError::Delivery {
                brokers,
                topic: self.config.quarantine_topic.clone(),
                source: Box::new(source),
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(bytes: u64) -> Sent {
        Sent {
            bytes,
            at: Instant::now(),
            event_ms: Some(0),
        }
    }

    #[test]
    fn the_resume_point_moves_only_past_acknowledged_messages() {
        let mut q: AckQueue<u32> = AckQueue::new(Some("start".into()));
        q.push(1, sent(10));
        q.push(2, sent(20));
        q.mark("after-2");
        q.push(3, sent(30));
        q.mark("after-3a");
        q.mark("after-3"); // marks in a row coalesce
        assert_eq!(q.buffered(), 60);
        assert_eq!(q.in_flight(), 3);
        assert_eq!(q.acked(), Some("start"));
        assert_eq!(q.front_mut().copied(), Some(1));
        assert_eq!(q.settle_front().map(|s| s.bytes), Some(10));
        assert_eq!(q.acked(), Some("start"), "message 2 is still in flight");
        assert_eq!(q.settle_front().map(|s| s.bytes), Some(20));
        assert_eq!(q.acked(), Some("after-2"));
        assert_eq!(q.front_mut().copied(), Some(3));
        q.settle_front();
        assert_eq!(q.acked(), Some("after-3"));
        assert!(q.is_empty());
        assert_eq!(q.buffered(), 0);
        assert_eq!(q.front_mut(), None);
    }

    #[test]
    fn a_mark_on_an_empty_queue_is_safe_at_once_and_forget_clears_it() {
        let mut q: AckQueue<()> = AckQueue::new(None);
        q.mark("a");
        assert_eq!(q.acked(), Some("a"));
        q.forget();
        assert_eq!(q.acked(), None);
        q.push((), sent(5));
        q.mark("b");
        assert_eq!(q.acked(), None);
        q.settle_front();
        assert_eq!(q.acked(), Some("b"));
    }
}
