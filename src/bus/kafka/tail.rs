//! Reading the resume point and the dedupe window back from the topic itself.

use super::{client_config, client_err, ClientLog, KafkaBusError, CURSOR_HEADER, REQUEST_TIMEOUT};
use crate::bus::Tail;
use crate::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Reads the newest messages of every partition: the safest recent resume point (the
/// `pleiades-cursor` of the most recently written message) and the newest `window` keys.
pub fn read_tail(k: &KafkaConfig, window: usize) -> Result<Tail, KafkaBusError> {
    let mut config = client_config(k);
    config.set("group.id", format!("{}-tail-reader", k.group));
    config.set("enable.auto.commit", "false");
    // Only committed messages count; the end of each partition is reported, because its last
    // offsets may be transaction markers that no message ever carries.
    config.set("isolation.level", "read_committed");
    config.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<ClientLog> = config
        .create_with_context(ClientLog::new(&k.brokers))
        .map_err(client_err(&k.brokers, "create a consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(&k.topic), REQUEST_TIMEOUT)
        .map_err(client_err(&k.brokers, "fetch topic metadata"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == k.topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let per_partition = window.div_ceil(partitions.len().max(1)).max(1) as i64;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = std::collections::HashMap::new();
    for &partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&k.topic, partition, REQUEST_TIMEOUT)
            .map_err(client_err(&k.brokers, "fetch partition watermarks"))?;
        if high > low {
            let from = low.max(high - per_partition);
            assignment
                .add_partition_offset(&k.topic, partition, Offset::Offset(from))
                .map_err(client_err(&k.brokers, "assign partitions"))?;
            remaining.insert(partition, high);
        }
    }
    let mut tail = Tail::default();
    if remaining.is_empty() {
        return Ok(tail);
    }
    consumer
        .assign(&assignment)
        .map_err(client_err(&k.brokers, "assign partitions"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut keys: Vec<(i64, i32, i64, String)> = Vec::new();
    let mut best: Option<(i64, String)> = None;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(KafkaBusError::Broker {
                brokers: k.brokers.clone(),
                message: format!(
                    "reading the tail of {} did not finish within 120 s",
                    k.topic
                ),
            });
        }
        let message = match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                remaining.remove(&partition);
                continue;
            }
            Some(Err(source)) => {
                return Err(KafkaBusError::Client {
                    brokers: k.brokers.clone(),
                    op: "read the topic tail",
                    source: Box::new(source),
                })
            }
            Some(Ok(message)) => message,
        };
        let partition = message.partition();
        let offset = message.offset();
        let written = message.timestamp().to_millis().unwrap_or(0);
        if let Some(Ok(data)) = message.payload().map(std::str::from_utf8) {
            if let Ok(head) = crate::event::inspect(data) {
                tail.saw(head.position.as_ref());
            }
        }
        match message.key().map(std::str::from_utf8) {
            Some(Ok(key)) => keys.push((written, partition, offset, key.to_owned())),
            Some(Err(_)) => tail.unreadable_lines += 1,
            None => {}
        }
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                if header.key == CURSOR_HEADER {
                    if let Some(Ok(cursor)) = header.value.map(std::str::from_utf8) {
                        if best.as_ref().is_none_or(|(t, _)| written >= *t) {
                            best = Some((written, cursor.to_owned()));
                        }
                    }
                }
            }
        }
        if remaining
            .get(&partition)
            .is_some_and(|high| offset + 1 >= *high)
        {
            remaining.remove(&partition);
        }
    }
    keys.sort();
    let skip = keys.len().saturating_sub(window);
    tail.recent_ids = keys
        .into_iter()
        .skip(skip)
        .map(|(_, _, _, key)| key)
        .collect();
    tail.last_id = best.map(|(_, cursor)| cursor);
    Ok(tail)
}
