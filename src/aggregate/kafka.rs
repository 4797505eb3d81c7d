//! An aggregator worker on Kafka: a member of the consumer group, each partition counted from
//! the position the store records for it, never from the group's committed offsets.
//!
//! On the first message of a partition after an assignment, the worker reads the partition's
//! stored position and moves the partition there (a seek) when it starts anywhere else. A batch
//! covers consecutive offsets of one partition and is applied with its position atomically; a
//! batch the store refuses (another worker got there first during a rebalance) is dropped and
//! the partition moves to the stored position. Offsets are committed after each batch only so
//! that Kafka's own tools show the group's progress.

use super::batch::{BatchPolicy, Counting, Pending};
use super::{AggregateError, AggregateSettings};
use crate::bus::kafka::{source_key, Admit, Assignment, Change, GroupReader};
use crate::bus::Quarantine;
use crate::config::KafkaConfig;
use crate::metrics::KafkaMetrics;
use crate::store::{Applied, Batch, Store};
use crate::ComponentContext;
use std::collections::HashMap;

/// One aggregator worker on the Kafka bus.
pub struct KafkaAggregator {
    ctx: ComponentContext<AggregateSettings>,
    reader: GroupReader,
    assignment: Assignment,
    pending: HashMap<i32, Pending>,
    counting: Counting,
    policy: BatchPolicy,
    kafka_metrics: KafkaMetrics,
    index: usize,
    /// The store's epoch when the partitions' positions were read. When it moves, the store may
    /// have lost acknowledged writes (a Redis failover), so every partition is lined up again.
    epoch: u64,
}

impl KafkaAggregator {
    /// Creates missing topics and joins the consumer group.
    pub async fn start(
        ctx: ComponentContext<AggregateSettings>,
        kafka: &KafkaConfig,
        store: Store,
        index: usize,
    ) -> Result<Self, AggregateError> {
        let reader = GroupReader::join(kafka, index, ctx.metrics.kafka.clone()).await?;
        let quarantine = Quarantine::for_aggregator(&ctx.config.bus, index);
        // Read before any position is: a change after it is a change for every position read.
        let epoch = store.epoch().await;
        Ok(KafkaAggregator {
            epoch,
            counting: Counting::new(store, ctx.metrics.aggregate.clone(), quarantine)
                .with_statistics(ctx.config.aggregate.statistics),
            policy: BatchPolicy::of(&ctx.config.aggregate),
            kafka_metrics: ctx.metrics.kafka.clone(),
            reader,
            assignment: Assignment::default(),
            pending: HashMap::new(),
            index,
            ctx,
        })
    }

    /// Counts until shutdown, then applies what it holds and leaves the group.
    pub async fn run(mut self) -> Result<(), AggregateError> {
        let a = &self.ctx.config.aggregate;
        let mut tick = tokio::time::interval(a.poll_interval.min(a.batch_delay));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reader = self.reader.clone();
        loop {
            self.take_changes().await?;
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.follow_store().await?;
                    self.flush_due().await?;
                }
                message = reader.recv() => match message {
                    Ok(message) => {
                        // A rebalance may have happened inside `recv`: act on it before counting.
                        self.take_changes().await?;
                        self.handle(&message).await?;
                    }
                    Err(e) => reader.log_error(&e),
                },
            }
        }
        for partition in self.pending.keys().copied().collect::<Vec<_>>() {
            self.flush(partition).await?;
        }
        reader.leave();
        tracing::info!(worker = self.index, "aggregator stopped");
        Ok(())
    }

    /// Acts on rebalances: a revoked partition's batch is applied (the store refuses it if the
    /// new owner got there first) and its state forgotten; an assigned one starts afresh.
    async fn take_changes(&mut self) -> Result<(), AggregateError> {
        for change in self.reader.take_changes() {
            tracing::info!(worker = self.index, change = ?change, "partition assignment changed");
            self.assignment.apply(&change);
            let (Change::Revoked(partitions) | Change::Assigned(partitions)) = &change;
            if let Change::Revoked(_) = change {
                // No longer owned: a refused batch is dropped rather than followed by a seek.
                for p in partitions {
                    self.flush(*p).await?;
                }
            }
            for p in partitions {
                self.pending.remove(p);
            }
            self.kafka_metrics
                .assigned
                .with_label_values(&[&self.index.to_string()])
                .set(self.assignment.len() as i64);
        }
        Ok(())
    }

    async fn handle(
        &mut self,
        message: &crate::bus::kafka::Message<'_>,
    ) -> Result<(), AggregateError> {
        let p = message.partition();
        let offset = message.offset();
        let mut admit = self.assignment.admit(p, offset);
        if admit == Admit::Unpositioned {
            self.begin(p, offset).await?;
            admit = self.assignment.admit(p, offset);
        }
        let Admit::Read { missing } = admit else {
            return Ok(());
        };
        if missing > 0 {
            // Offsets a committed reader never sees: transaction markers, and the messages of
            // an aborted transaction (an ingester fenced mid-way). Retention deletes from the
            // start of a partition only, and that loss is recorded on assignment (`begin`).
            tracing::trace!(
                partition = p,
                from = offset - missing as i64,
                to = offset,
                "offsets without a committed message passed over"
            );
        }
        let Some(pending) = self.pending.get_mut(&p) else {
            return Ok(());
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.counting
            .add(pending, &message.record(), now_ms)
            .await?;
        if pending.is_full(&self.policy) {
            self.flush(p).await?;
        }
        Ok(())
    }

    /// First message of a partition since its assignment: line up with the stored position.
    async fn begin(&mut self, p: i32, first: i64) -> Result<(), AggregateError> {
        let key = source_key(self.reader.topic(), p);
        let store = self.counting.store().clone();
        let mut stored = self.counting.store_call(store.position(&key)).await? as i64;
        if first > stored {
            // Messages below the log start were deleted by retention before anyone counted them:
            // record the loss once, in the store, so that every later owner starts after it.
            let (low, _) = self.reader.watermarks(p)?;
            if low > stored {
                let gap = Batch {
                    source: key.clone(),
                    start: stored as u64,
                    end: low as u64,
                    tally: Default::default(),
                };
                if self.counting.store_call(store.apply(&gap)).await? == Applied::Counted {
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
                stored = self.counting.store_call(store.position(&key)).await? as i64;
            }
        }
        if self.assignment.start(p, stored, first) {
            self.seek(p, stored)?;
        }
        tracing::info!(
            worker = self.index,
            partition = p,
            stored,
            first,
            "counting partition from its stored position"
        );
        self.pending.insert(p, Pending::new(key, stored as u64));
        Ok(())
    }

    fn seek(&self, p: i32, offset: i64) -> Result<(), AggregateError> {
        self.kafka_metrics.seeks.inc();
        Ok(self.reader.seek(p, offset)?)
    }

    /// After the store's epoch moved (a new connection to Redis, perhaps to a promoted replica
    /// that never received the last batches), no position read before is trusted: each
    /// positioned partition drops its batch, moves to the position the store holds now, and
    /// looks it up again on its next message (which also notices a retention gap). A partition
    /// with nothing new is thereby still counted again from where the store is.
    async fn follow_store(&mut self) -> Result<(), AggregateError> {
        let epoch = self.counting.store().epoch().await;
        if epoch == self.epoch {
            return Ok(());
        }
        self.epoch = epoch;
        let store = self.counting.store().clone();
        let positioned = self.assignment.positioned();
        tracing::info!(
            worker = self.index,
            epoch,
            partitions = ?positioned,
            "new store connection; every partition is read again from its stored position"
        );
        for p in positioned {
            let key = source_key(self.reader.topic(), p);
            let stored = self.counting.store_call(store.position(&key)).await? as i64;
            self.pending.remove(&p);
            self.assignment.unposition(p);
            self.seek(p, stored)?;
        }
        Ok(())
    }

    /// Applies every batch that has waited `aggregate.batch_delay`.
    async fn flush_due(&mut self) -> Result<(), AggregateError> {
        let due: Vec<i32> = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.is_due(&self.policy))
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
        let Some(pending) = self.pending.get_mut(&p) else {
            return Ok(());
        };
        if pending.is_empty() {
            return Ok(());
        }
        match self.counting.apply(pending).await? {
            Applied::Counted => self.reader.commit(p, pending.end() as i64),
            Applied::Stale { stored } => {
                if self.assignment.owns(p) {
                    self.assignment.rewind(p, stored as i64);
                    self.seek(p, stored as i64)?;
                } else {
                    self.pending.remove(&p);
                }
            }
        }
        Ok(())
    }
}
