//! The aggregate role on Kafka: workers of one consumer group, each partition counted from the
//! position the store records for it, never from the group's committed offsets.
//!
//! On the first message of a partition after an assignment, the worker reads the partition's
//! stored position and moves the partition there (a seek) when it starts anywhere else. A batch
//! covers consecutive offsets of one partition and is applied with its position atomically; a
//! batch the store refuses (another worker got there first during a rebalance) is dropped and
//! the partition moves to the stored position. Offsets are committed after each batch only so
//! that Kafka's own tools show the group's progress.

use super::{count_event, note_rejected, AggregateError};
use crate::bus::file::QuarantineRecord;
use crate::bus::kafka::{self, ClientLog, KafkaBusError, REASON_HEADER, SSE_ID_HEADER};
use crate::config::KafkaConfig;
use crate::metrics::{AggregateMetrics, KafkaMetrics};
use crate::store::{Applied, Batch, Store, StoreError};
use crate::ComponentContext;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A change of this worker's partitions, recorded by the rebalance callbacks (which must return
/// quickly) and acted on by the worker.
#[derive(Debug)]
enum Change {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// The consumer's callbacks: rebalances and statistics (consumer lag per partition).
struct GroupContext {
    log: ClientLog,
    topic: String,
    worker: String,
    changes: Mutex<Vec<Change>>,
    metrics: KafkaMetrics,
}

impl GroupContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect()
    }

    fn record(&self, change: Change) {
        if let Ok(mut changes) = self.changes.lock() {
            changes.push(change);
        }
    }
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        for (partition, stats) in &topic.partitions {
            // librdkafka reports -1 for partitions this member does not fetch.
            if *partition >= 0 && stats.consumer_lag >= 0 && stats.fetch_state == "active" {
                self.metrics
                    .consumer_lag
                    .with_label_values(&[&partition.to_string()])
                    .set(stats.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let partitions = self.partitions(tpl);
            self.metrics.rebalances.with_label_values(&["revoke"]).inc();
            for p in &partitions {
                let _ = self
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[&p.to_string()]);
            }
            self.record(Change::Revoked(partitions));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let partitions = self.partitions(tpl);
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                self.record(Change::Assigned(partitions));
            }
            Rebalance::Error(e) => {
                tracing::warn!(worker = %self.worker, error = %e, "consumer group rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

/// What a worker knows of one assigned partition.
struct Partition {
    /// The next offset to count; earlier ones are re-deliveries and are skipped.
    next: i64,
    /// After a seek, messages are skipped until offset `next` itself arrives: anything else
    /// was fetched before the seek.
    awaiting: bool,
    batch: Batch,
    lines: usize,
    opened: Instant,
}

/// One aggregator worker on the Kafka bus.
pub struct KafkaAggregator {
    ctx: ComponentContext,
    store: Store,
    index: usize,
    config: KafkaConfig,
    consumer: Arc<StreamConsumer<GroupContext>>,
    partitions: HashMap<i32, Partition>,
    /// The partitions the group gave this worker, as the rebalance callbacks reported them.
    assigned: HashSet<i32>,
    quarantine: Option<FutureProducer<ClientLog>>,
    metrics: AggregateMetrics,
    kafka_metrics: KafkaMetrics,
    name: String,
}

impl KafkaAggregator {
    /// Creates missing topics and joins the consumer group.
    pub async fn start(
        ctx: ComponentContext,
        store: Store,
        index: usize,
    ) -> Result<Self, AggregateError> {
        let config = ctx.config.kafka.clone();
        kafka::ensure_topics(&config).await?;
        let context = GroupContext {
            log: ClientLog::new(&config.brokers),
            topic: config.topic.clone(),
            worker: index.to_string(),
            changes: Mutex::new(Vec::new()),
            metrics: ctx.metrics.kafka.clone(),
        };
        let consumer: StreamConsumer<GroupContext> = kafka::consumer_config(&config)
            .create_with_context(context)
            .map_err(|source| KafkaBusError::Client {
                brokers: config.brokers.clone(),
                op: "create a consumer",
                source: Box::new(source),
            })?;
        consumer
            .subscribe(&[&config.topic])
            .map_err(|source| KafkaBusError::Client {
                brokers: config.brokers.clone(),
                op: "subscribe",
                source: Box::new(source),
            })?;
        tracing::info!(worker = index, topic = %config.topic, group = %config.group, brokers = %config.brokers, "aggregator joined the consumer group");
        Ok(KafkaAggregator {
            metrics: ctx.metrics.aggregate.clone(),
            kafka_metrics: ctx.metrics.kafka.clone(),
            ctx,
            store,
            index,
            config,
            consumer: Arc::new(consumer),
            partitions: HashMap::new(),
            assigned: HashSet::new(),
            quarantine: None,
            name: String::new(),
        })
    }

    /// Counts until shutdown, then applies what it holds and leaves the group.
    pub async fn run(mut self) -> Result<(), AggregateError> {
        let a = &self.ctx.config.aggregate;
        let mut tick = tokio::time::interval(a.poll_interval.min(a.batch_delay));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let consumer = self.consumer.clone();
        loop {
            self.take_changes().await?;
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                _ = tick.tick() => self.flush_due().await?,
                message = consumer.recv() => match message {
                    Ok(message) => {
                        // A rebalance may have happened inside `recv`: act on it before counting.
                        self.take_changes().await?;
                        self.handle(&message).await?;
                    }
                    Err(e) => self.consumer.context().log.error(&e, "consuming"),
                },
            }
        }
        for partition in self.partitions.keys().copied().collect::<Vec<_>>() {
            self.flush(partition).await?;
        }
        consumer.unsubscribe();
        tracing::info!(worker = self.index, "aggregator stopped");
        Ok(())
    }

    /// Acts on rebalances: a revoked partition's batch is applied (the store refuses it if the
    /// new owner got there first) and its state forgotten; an assigned one starts afresh.
    async fn take_changes(&mut self) -> Result<(), AggregateError> {
        let changes = match self.consumer.context().changes.lock() {
            Ok(mut changes) => std::mem::take(&mut *changes),
            Err(_) => Vec::new(),
        };
        for change in changes {
            tracing::info!(worker = self.index, change = ?change, "partition assignment changed");
            match change {
                Change::Revoked(partitions) => {
                    for p in partitions {
                        self.assigned.remove(&p);
                        self.flush(p).await?;
                        self.partitions.remove(&p);
                    }
                }
                Change::Assigned(partitions) => {
                    for p in partitions {
                        self.assigned.insert(p);
                        self.partitions.remove(&p);
                    }
                }
            }
            self.kafka_metrics
                .assigned
                .with_label_values(&[&self.index.to_string()])
                .set(self.assigned.len() as i64);
        }
        Ok(())
    }

    fn source(&self, partition: i32) -> String {
        format!("kafka:{}:{partition}", self.config.topic)
    }

    async fn handle(&mut self, message: &BorrowedMessage<'_>) -> Result<(), AggregateError> {
        let p = message.partition();
        let offset = message.offset();
        if !self.assigned.contains(&p) {
            // Fetched before the partition was revoked; its new owner counts it.
            return Ok(());
        }
        if !self.partitions.contains_key(&p) {
            self.begin(p, offset).await?;
        }
        let Some(state) = self.partitions.get_mut(&p) else {
            return Ok(());
        };
        if state.awaiting {
            if offset != state.next {
                return Ok(());
            }
            state.awaiting = false;
        }
        if offset < state.next {
            return Ok(());
        }
        if offset > state.next {
            // Offsets can only be missing when the topic lost them (retention, compaction).
            let missing = (offset - state.next) as u64;
            self.kafka_metrics.retention_gap.inc_by(missing);
            tracing::error!(
                partition = p,
                from = state.next,
                to = offset,
                "offsets missing from the topic; their events cannot be counted"
            );
        }
        if state.lines == 0 {
            state.opened = Instant::now();
        }
        state.batch.end = (offset + 1) as u64;
        state.next = offset + 1;
        state.lines += 1;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let invalid = match message.payload().map(std::str::from_utf8) {
            Some(Ok(data)) => {
                match count_event(
                    data,
                    &mut state.batch.tally,
                    &mut self.name,
                    &self.metrics,
                    now_ms,
                ) {
                    Ok(()) => None,
                    Err(invalid) => Some((invalid.reason(), invalid.to_string(), data.to_owned())),
                }
            }
            Some(Err(e)) => Some((
                "bad_record",
                format!("message value is not UTF-8: {e}"),
                String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
            )),
            None => Some((
                "bad_record",
                "message has no value".to_owned(),
                String::new(),
            )),
        };
        let full = state.lines >= self.ctx.config.aggregate.batch_events;
        if let Some((reason, error, data)) = invalid {
            let id = header(message, SSE_ID_HEADER).unwrap_or_default();
            self.reject(reason, &error, &id, &data).await?;
        }
        if full {
            self.flush(p).await?;
        }
        Ok(())
    }

    /// First message of a partition since its assignment: line up with the stored position.
    async fn begin(&mut self, p: i32, first: i64) -> Result<(), AggregateError> {
        let source = self.source(p);
        let mut stored = self.store_call(self.store.position(&source)).await? as i64;
        if first > stored {
            // Messages below the log start were deleted by retention before anyone counted them:
            // record the loss once, in the store, so that every later owner starts after it.
            let (low, _) = self.watermarks(p)?;
            if low > stored {
                let gap = Batch {
                    source: source.clone(),
                    start: stored as u64,
                    end: low as u64,
                    tally: Default::default(),
                };
                if self.store_call(self.store.apply(&gap)).await? == Applied::Counted {
                    self.kafka_metrics
                        .retention_gap
                        .inc_by((low - stored) as u64);
                    tracing::error!(
                        partition = p,
                        from = stored,
                        to = low,
                        "messages were deleted by retention before they were counted"
                    );
                }
                stored = self.store_call(self.store.position(&source)).await? as i64;
            }
        }
        let awaiting = first != stored;
        if awaiting {
            self.seek(p, stored)?;
        }
        tracing::info!(
            worker = self.index,
            partition = p,
            stored,
            first,
            "counting partition from its stored position"
        );
        self.partitions.insert(
            p,
            Partition {
                next: stored,
                awaiting,
                batch: Batch {
                    source,
                    start: stored as u64,
                    end: stored as u64,
                    tally: Default::default(),
                },
                lines: 0,
                opened: Instant::now(),
            },
        );
        Ok(())
    }

    fn watermarks(&self, p: i32) -> Result<(i64, i64), AggregateError> {
        let consumer = self.consumer.clone();
        let topic = self.config.topic.clone();
        tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))
        })
        .map_err(|source| {
            KafkaBusError::Client {
                brokers: self.config.brokers.clone(),
                op: "fetch partition watermarks",
                source: Box::new(source),
            }
            .into()
        })
    }

    fn seek(&self, p: i32, offset: i64) -> Result<(), AggregateError> {
        self.kafka_metrics.seeks.inc();
        self.consumer
            .seek(
                &self.config.topic,
                p,
                Offset::Offset(offset),
                Duration::ZERO,
            )
            .map_err(|source| {
                KafkaBusError::Client {
                    brokers: self.config.brokers.clone(),
                    op: "seek to the stored position",
                    source: Box::new(source),
                }
                .into()
            })
    }

    /// Applies every batch that has waited `aggregate.batch_delay`.
    async fn flush_due(&mut self) -> Result<(), AggregateError> {
        let delay = self.ctx.config.aggregate.batch_delay;
        let due: Vec<i32> = self
            .partitions
            .iter()
            .filter(|(_, s)| s.lines > 0 && s.opened.elapsed() >= delay)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            self.flush(p).await?;
        }
        Ok(())
    }

    /// Applies the partition's batch with its position, or, when the store refuses it, drops it
    /// and moves the partition to the stored position.
    async fn flush(&mut self, p: i32) -> Result<(), AggregateError> {
        let Some(state) = self.partitions.get(&p) else {
            return Ok(());
        };
        if state.batch.end <= state.batch.start {
            return Ok(());
        }
        let batch = state.batch.clone();
        let lines = state.lines;
        let started = Instant::now();
        let applied = self.store_call(self.store.apply(&batch)).await?;
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        let next = match applied {
            Applied::Counted => {
                self.metrics.batch_events.observe(lines as f64);
                self.metrics.events.inc_by(batch.tally.events);
                tracing::debug!(source = %batch.source, start = batch.start, end = batch.end, events = batch.tally.events, "batch counted");
                self.commit(p, batch.end as i64);
                None
            }
            Applied::Stale { stored } => {
                self.metrics.stale_batches.inc();
                tracing::warn!(source = %batch.source, batch_start = batch.start, stored, "store refused a batch that does not start at its stored position; moving there");
                Some(stored as i64)
            }
        };
        let Some(state) = self.partitions.get_mut(&p) else {
            return Ok(());
        };
        state.lines = 0;
        state.batch.tally = Default::default();
        match next {
            None => state.batch.start = state.batch.end,
            Some(stored) => {
                state.next = stored;
                state.awaiting = true;
                state.batch.start = stored as u64;
                state.batch.end = stored as u64;
                if self.assigned.contains(&p) {
                    self.seek(p, stored)?;
                } else {
                    self.partitions.remove(&p);
                }
            }
        }
        Ok(())
    }

    /// Commits `offset` for monitoring; failures only delay what Kafka's tools show.
    fn commit(&self, p: i32, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.config.topic, p, Offset::Offset(offset))
            .is_ok()
        {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(partition = p, error = %e, "offset commit failed");
            }
        }
    }

    /// Sends an event that cannot be counted to the quarantine topic, and counts it.
    async fn reject(
        &mut self,
        reason: &'static str,
        error: &str,
        id: &str,
        data: &str,
    ) -> Result<(), AggregateError> {
        note_rejected(&self.metrics, reason, error, id);
        if self.quarantine.is_none() {
            let producer: FutureProducer<ClientLog> = kafka::client_config(&self.config)
                .create_with_context(ClientLog::new(&self.config.brokers))
                .map_err(|source| KafkaBusError::Client {
                    brokers: self.config.brokers.clone(),
                    op: "create a quarantine producer",
                    source: Box::new(source),
                })?;
            self.quarantine = Some(producer);
        }
        let Some(producer) = &self.quarantine else {
            return Ok(());
        };
        let body = serde_json::to_string(&QuarantineRecord {
            time: chrono::Utc::now().to_rfc3339(),
            reason,
            error: error.to_owned(),
            id,
            data,
        })
        .unwrap_or_default();
        let record = FutureRecord::to(&self.config.quarantine_topic)
            .key(reason)
            .payload(&body)
            .headers(OwnedHeaders::new().insert(Header {
                key: REASON_HEADER,
                value: Some(reason),
            }));
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(source, _)| KafkaBusError::Delivery {
                brokers: self.config.brokers.clone(),
                topic: self.config.quarantine_topic.clone(),
                source: Box::new(source),
            })?;
        Ok(())
    }

    async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, AggregateError> {
        super::store_call(&self.metrics, call).await
    }
}

/// A header's value as text.
fn header(message: &BorrowedMessage<'_>, name: &str) -> Option<String> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}
