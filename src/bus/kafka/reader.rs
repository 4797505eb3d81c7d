//! Reading partitions from given offsets without joining the group: for readers that are not
//! aggregators (a rebuild, a relay), which choose their own positions.

use super::{client_config, client_err, ClientLog, KafkaBusError, Message, REQUEST_TIMEOUT};
use crate::config::KafkaConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

/// A reader of chosen partitions of `kafka.topic`, each from a chosen offset.
pub struct TopicReader {
    consumer: StreamConsumer<ClientLog>,
    config: KafkaConfig,
}

impl TopicReader {
    /// Every partition of the topic with its first and end offsets.
    pub fn partitions(config: &KafkaConfig) -> Result<Vec<(i32, i64, i64)>, KafkaBusError> {
        let consumer: StreamConsumer<ClientLog> = reader_config(config)
            .create_with_context(ClientLog::new(&config.brokers))
            .map_err(client_err(&config.brokers, "create a consumer"))?;
        let metadata = consumer
            .fetch_metadata(Some(&config.topic), REQUEST_TIMEOUT)
            .map_err(client_err(&config.brokers, "fetch topic metadata"))?;
        let mut found = Vec::new();
        for topic in metadata
            .topics()
            .iter()
            .filter(|t| t.name() == config.topic)
        {
            for partition in topic.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(&config.topic, partition.id(), REQUEST_TIMEOUT)
                    .map_err(client_err(&config.brokers, "fetch partition watermarks"))?;
                found.push((partition.id(), low, high));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Every partition's first offset whose message reached the topic at or after `time_ms`
    /// (Kafka's own timestamp), or its end offset when none did.
    pub fn offsets_for_time(
        config: &KafkaConfig,
        time_ms: i64,
    ) -> Result<Vec<(i32, i64)>, KafkaBusError> {
        let partitions = Self::partitions(config)?;
        let consumer: StreamConsumer<ClientLog> = reader_config(config)
            .create_with_context(ClientLog::new(&config.brokers))
            .map_err(client_err(&config.brokers, "create a consumer"))?;
        let mut query = TopicPartitionList::new();
        for (partition, _, _) in &partitions {
            query
                .add_partition_offset(&config.topic, *partition, Offset::Offset(time_ms))
                .map_err(client_err(&config.brokers, "look up offsets by time"))?;
        }
        let found = consumer
            .offsets_for_times(query, REQUEST_TIMEOUT)
            .map_err(client_err(&config.brokers, "look up offsets by time"))?;
        Ok(partitions
            .iter()
            .map(|(partition, _, high)| {
                let offset = found
                    .find_partition(&config.topic, *partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
                    .unwrap_or(*high);
                (*partition, offset)
            })
            .collect())
    }

    /// Reads each `(partition, offset)` of `starts` from that offset.
    pub fn open(config: &KafkaConfig, starts: &[(i32, i64)]) -> Result<Self, KafkaBusError> {
        let consumer: StreamConsumer<ClientLog> = reader_config(config)
            .create_with_context(ClientLog::new(&config.brokers))
            .map_err(client_err(&config.brokers, "create a consumer"))?;
        let mut assignment = TopicPartitionList::new();
        for (partition, offset) in starts {
            assignment
                .add_partition_offset(&config.topic, *partition, Offset::Offset(*offset))
                .map_err(client_err(&config.brokers, "assign partitions"))?;
        }
        consumer
            .assign(&assignment)
            .map_err(client_err(&config.brokers, "assign partitions"))?;
        Ok(TopicReader {
            consumer,
            config: config.clone(),
        })
    }

    /// The next message of any of the partitions, in offset order within each.
    pub async fn recv(&self) -> Result<Message<'_>, KafkaBusError> {
        self.consumer
            .recv()
            .await
            .map(Message::new)
            .map_err(client_err(&self.config.brokers, "read the topic"))
    }
}

/// A consumer that commits nothing: its position is its owner's business.
fn reader_config(config: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut c = client_config(config);
    c.set("group.id", format!("{}-reader", config.group));
    c.set("isolation.level", "read_committed");
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c
}
