//! The aggregators' reader: a member of the consumer group `kafka.group`, and what it knows of
//! each assigned partition ([`Assignment`], pure), so that every partition is read in offset
//! order from the position its reader chose, never from the group's committed offsets.

use super::{client_err, consumer_config, ensure_topics, ClientLog, KafkaBusError, SSE_ID_HEADER};
use crate::bus::{BadRecord, Record, Source};
use crate::config::KafkaConfig;
use crate::metrics::{KafkaMetrics, RebalanceKind};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A change of a member's partitions, recorded by the rebalance callbacks (which must return
/// quickly) and acted on by the reader's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
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
            self.metrics.rebalances.inc(RebalanceKind::Revoke);
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
                self.metrics.rebalances.inc(RebalanceKind::Assign);
                self.record(Change::Assigned(partitions));
            }
            Rebalance::Error(e) => {
                tracing::warn!(worker = %self.worker, error = %e, "consumer group rebalance failed")
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

/// One message of the topic, as a bus record.
pub struct Message<'a> {
    inner: BorrowedMessage<'a>,
}

impl<'a> Message<'a> {
    pub(super) fn new(inner: BorrowedMessage<'a>) -> Self {
        Message { inner }
    }

    pub fn partition(&self) -> i32 {
        self.inner.partition()
    }

    pub fn offset(&self) -> i64 {
        self.inner.offset()
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        self.inner.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(String::from_utf8_lossy)
        })
    }

    /// The message as a record covering `[offset, offset + 1)` of its partition.
    pub fn record(&self) -> Record<'_> {
        let offset = self.offset().max(0) as u64;
        let data = match self.inner.payload().map(std::str::from_utf8) {
            Some(Ok(data)) => Ok(data),
            Some(Err(e)) => Err(BadRecord {
                error: format!("message value is not UTF-8: {e}"),
                raw: String::from_utf8_lossy(self.inner.payload().unwrap_or_default()),
            }),
            None => Err(BadRecord {
                error: "message has no value".to_owned(),
                raw: Cow::Borrowed(""),
            }),
        };
        Record {
            source: Source::Partition(self.partition()),
            start: offset,
            end: offset + 1,
            sse_id: self.header(SSE_ID_HEADER).unwrap_or_default(),
            data,
        }
    }
}

/// A member of the aggregators' consumer group; cheap to clone (one consumer underneath).
#[derive(Clone)]
pub struct GroupReader {
    consumer: Arc<StreamConsumer<GroupContext>>,
    config: Arc<KafkaConfig>,
}

impl GroupReader {
    /// Creates missing topics and joins `kafka.group` as worker `worker`.
    pub async fn join(
        config: &KafkaConfig,
        worker: usize,
        metrics: KafkaMetrics,
    ) -> Result<Self, KafkaBusError> {
        ensure_topics(config).await?;
        let context = GroupContext {
            log: ClientLog::new(&config.brokers),
            topic: config.topic.clone(),
            worker: worker.to_string(),
            changes: Mutex::new(Vec::new()),
            metrics,
        };
        let consumer: StreamConsumer<GroupContext> = consumer_config(config)
            .create_with_context(context)
            .map_err(client_err(&config.brokers, "create a consumer"))?;
        consumer
            .subscribe(&[&config.topic])
            .map_err(client_err(&config.brokers, "subscribe"))?;
        tracing::info!(worker, topic = %config.topic, group = %config.group, brokers = %config.brokers, "aggregator joined the consumer group");
        Ok(GroupReader {
            consumer: Arc::new(consumer),
            config: Arc::new(config.clone()),
        })
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    /// The next message of any assigned partition. Rebalances happen inside this call: take
    /// [`GroupReader::take_changes`] after it.
    pub async fn recv(&self) -> Result<Message<'_>, KafkaError> {
        self.consumer.recv().await.map(Message::new)
    }

    /// Logs a consumer error (deduplicated, like every client error).
    pub fn log_error(&self, error: &KafkaError) {
        self.consumer.context().log.error(error, "consuming");
    }

    /// The assignment changes since the last call.
    pub fn take_changes(&self) -> Vec<Change> {
        match self.consumer.context().changes.lock() {
            Ok(mut changes) => std::mem::take(&mut *changes),
            Err(_) => Vec::new(),
        }
    }

    /// Moves `partition` to `offset`: the next messages of it start there.
    pub fn seek(&self, partition: i32, offset: i64) -> Result<(), KafkaBusError> {
        self.consumer
            .seek(
                &self.config.topic,
                partition,
                Offset::Offset(offset),
                Duration::ZERO,
            )
            .map_err(client_err(&self.config.brokers, "seek"))
    }

    /// The partition's first and end offsets.
    pub fn watermarks(&self, partition: i32) -> Result<(i64, i64), KafkaBusError> {
        let consumer = self.consumer.clone();
        let topic = self.config.topic.clone();
        tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))
        })
        .map_err(client_err(
            &self.config.brokers,
            "fetch partition watermarks",
        ))
    }

    /// Commits `offset` for monitoring; failures only delay what Kafka's tools show.
    pub fn commit(&self, partition: i32, offset: i64) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.config.topic, partition, Offset::Offset(offset))
            .is_ok()
        {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(partition, error = %e, "offset commit failed");
            }
        }
    }

    /// Leaves the group.
    pub fn leave(&self) {
        self.consumer.unsubscribe();
    }
}

/// What a reader knows of one assigned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// The next offset to count; earlier ones are re-deliveries and are skipped.
    next: i64,
    /// After a seek, messages are skipped until offset `next` itself arrives: anything else
    /// was fetched before the seek.
    awaiting: bool,
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Not this member's to read (revoked, fetched before a seek, or a re-delivery).
    Skip,
    /// The partition has no position yet: the owner looks it up and calls
    /// [`Assignment::start`].
    Unpositioned,
    /// Next in order; `missing` offsets before it carry no committed message (transaction
    /// markers, aborted messages).
    Read { missing: u64 },
}

/// The partitions a group member owns and where each one stands. Pure: fed the rebalance
/// changes and the offsets of arriving messages, it says which messages to read and when to
/// seek, so its rules are tested without a broker.
#[derive(Debug, Default)]
pub struct Assignment {
    assigned: HashSet<i32>,
    cursors: HashMap<i32, Cursor>,
}

impl Assignment {
    /// Applies a rebalance: revoked partitions are forgotten, assigned ones start afresh (their
    /// position is looked up again on their first message).
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Revoked(partitions) => {
                for p in partitions {
                    self.assigned.remove(p);
                    self.cursors.remove(p);
                }
            }
            Change::Assigned(partitions) => {
                for p in partitions {
                    self.assigned.insert(*p);
                    self.cursors.remove(p);
                }
            }
        }
    }

    /// Partitions owned now.
    pub fn len(&self) -> usize {
        self.assigned.len()
    }

    pub fn is_empty(&self) -> bool {
        self.assigned.is_empty()
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.assigned.contains(&partition)
    }

    /// Positions `partition` at `stored` on the arrival of its first message at `first`;
    /// returns true when the reader must seek there.
    pub fn start(&mut self, partition: i32, stored: i64, first: i64) -> bool {
        let awaiting = first != stored;
        self.cursors.insert(
            partition,
            Cursor {
                next: stored,
                awaiting,
            },
        );
        awaiting
    }

    /// Forgets where `partition` stands; it stays assigned, and its next message looks its
    /// position up again (after the store's epoch moved: a position read before may be gone).
    pub fn unposition(&mut self, partition: i32) {
        self.cursors.remove(&partition);
    }

    /// Partitions owned now that have a position.
    pub fn positioned(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self.cursors.keys().copied().collect();
        partitions.sort_unstable();
        partitions
    }

    /// Moves `partition` back (or on) to `stored`, after the store refused a batch; the reader
    /// must seek there.
    pub fn rewind(&mut self, partition: i32, stored: i64) {
        self.cursors.insert(
            partition,
            Cursor {
                next: stored,
                awaiting: true,
            },
        );
    }

    /// Decides about a message at `offset` of `partition`.
    pub fn admit(&mut self, partition: i32, offset: i64) -> Admit {
        if !self.assigned.contains(&partition) {
            return Admit::Skip;
        }
        let Some(cursor) = self.cursors.get_mut(&partition) else {
            return Admit::Unpositioned;
        };
        if cursor.awaiting {
            if offset != cursor.next {
                return Admit::Skip;
            }
            cursor.awaiting = false;
        }
        if offset < cursor.next {
            return Admit::Skip;
        }
        // Offsets between messages hold transaction markers or aborted messages.
        let missing = (offset - cursor.next) as u64;
        cursor.next = offset + 1;
        Admit::Read { missing }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_read_in_order_from_the_chosen_position() {
        let mut a = Assignment::default();
        assert_eq!(a.admit(0, 5), Admit::Skip, "not assigned");
        a.apply(&Change::Assigned(vec![0, 1]));
        assert_eq!(a.len(), 2);
        assert_eq!(a.admit(0, 5), Admit::Unpositioned);
        // The store says 3, the group delivered 5: seek, and skip what was fetched before.
        assert!(a.start(0, 3, 5));
        assert_eq!(a.admit(0, 5), Admit::Skip);
        assert_eq!(a.admit(0, 6), Admit::Skip);
        assert_eq!(a.admit(0, 3), Admit::Read { missing: 0 });
        assert_eq!(a.admit(0, 4), Admit::Read { missing: 0 });
        assert_eq!(a.admit(0, 4), Admit::Skip, "a re-delivery");
        assert_eq!(a.admit(0, 7), Admit::Read { missing: 2 });
        // Starting where the store says needs no seek.
        assert!(!a.start(1, 10, 10));
        assert_eq!(a.admit(1, 10), Admit::Read { missing: 0 });
    }

    #[test]
    fn a_refused_batch_rewinds_and_a_revocation_forgets() {
        let mut a = Assignment::default();
        a.apply(&Change::Assigned(vec![2]));
        a.start(2, 0, 0);
        for offset in 0..10 {
            assert_eq!(a.admit(2, offset), Admit::Read { missing: 0 });
        }
        a.rewind(2, 4);
        assert_eq!(a.admit(2, 10), Admit::Skip);
        assert_eq!(a.admit(2, 4), Admit::Read { missing: 0 });
        a.apply(&Change::Revoked(vec![2]));
        assert!(!a.owns(2));
        assert_eq!(a.admit(2, 5), Admit::Skip);
        a.apply(&Change::Assigned(vec![2]));
        assert_eq!(
            a.admit(2, 5),
            Admit::Unpositioned,
            "positions are looked up again"
        );
    }

    #[test]
    fn an_unpositioned_partition_is_looked_up_again_and_stays_owned() {
        let mut a = Assignment::default();
        a.apply(&Change::Assigned(vec![0, 1]));
        a.start(0, 0, 0);
        a.start(1, 7, 7);
        assert_eq!(a.positioned(), vec![0, 1]);
        for offset in 0..5 {
            assert_eq!(a.admit(0, offset), Admit::Read { missing: 0 });
        }
        a.unposition(0);
        assert!(a.owns(0));
        assert_eq!(a.positioned(), vec![1]);
        assert_eq!(a.admit(0, 5), Admit::Unpositioned);
        // The store now says 3 (it lost the batch that ended at 5): seek back and read again.
        assert!(a.start(0, 3, 5));
        assert_eq!(a.admit(0, 5), Admit::Skip);
        assert_eq!(a.admit(0, 3), Admit::Read { missing: 0 });
    }
}
