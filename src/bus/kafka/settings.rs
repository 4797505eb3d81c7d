//! Client settings: what every producer and consumer is built with, the checks librdkafka
//! makes of `[kafka.properties]`, and creating the topics.

use super::{client_err, ClientLog, KafkaBusError, REQUEST_TIMEOUT};
use crate::config::{KafkaConfig, Problem};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

/// Every problem librdkafka finds with the names and values of `[kafka.properties]`, for the
/// producer and the consumer; no connection is made. The section's own keys are checked by
/// `config` (`Config::validate`).
pub fn check_properties(k: &KafkaConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    // librdkafka validates each name and value as it is set.
    for (role, config) in [
        ("producer", producer_config(k)),
        ("consumer", consumer_config(k)),
    ] {
        if let Err(e) = config.create_native_config() {
            p.push(Problem {
                key: "kafka.properties".into(),
                message: format!("refused by librdkafka for the {role}: {e}"),
            });
        }
    }
    p
}

/// The settings every client shares: the brokers and the user's properties.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    with_properties(base_config(k), k)
}

fn base_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    c.set("client.id", format!("pleiades-{}", crate::build::VERSION));
    c
}

/// The user's settings come last, so that timeouts, TLS and SASL can be tuned; the ones
/// Pleiades owns are refused by `config`'s validation.
fn with_properties(mut c: ClientConfig, k: &KafkaConfig) -> ClientConfig {
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

/// The publisher's settings: idempotent, every in-sync replica acknowledges, deliveries are
/// retried until they succeed (no message timeout), and the queue is capped in bytes.
pub(super) fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(k);
    c.set("enable.idempotence", "true");
    if !k.transactional_id.is_empty() {
        // Transactions make a second ingester harmless: the newest one fences the older, whose
        // unfinished transaction is aborted and never seen by readers.
        c.set("transactional.id", &k.transactional_id);
        // A transaction left open by an ingester that died is aborted after this long, and
        // only then can the next one write: keep it short. Transactions are committed every
        // 200 ms, at the latest after 2 s.
        c.set("transaction.timeout.ms", "10000");
    }
    c.set("acks", "all");
    c.set("message.timeout.ms", "0");
    // The publisher enforces `buffer_bytes` itself, counting what it hands over; librdkafka's
    // limit sits a quarter above it to cover its per-message bookkeeping.
    c.set(
        "queue.buffering.max.kbytes",
        (k.buffer_bytes / 1024 * 5 / 4)
            .clamp(1, i32::MAX as u64)
            .to_string(),
    );
    c.set(
        "queue.buffering.max.messages",
        (k.buffer_bytes / 256).clamp(1000, 10_000_000).to_string(),
    );
    with_properties(c, k)
}

/// The settings of a consumer in the aggregators' group. Offsets are committed for monitoring
/// only; the store decides where each partition resumes.
pub fn consumer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(k);
    c.set("group.id", &k.group);
    c.set("isolation.level", "read_committed");
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c.set("auto.offset.reset", "earliest");
    c.set("statistics.interval.ms", "5000");
    c.set("session.timeout.ms", "10000");
    c.set("heartbeat.interval.ms", "1000");
    with_properties(c, k)
}

/// Creates the events topic (`kafka.partitions`) and the quarantine topic (one partition) when
/// they are missing; existing topics are left as they are.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), KafkaBusError> {
    let admin: AdminClient<ClientLog> = client_config(k)
        .create_with_context(ClientLog::new(&k.brokers))
        .map_err(client_err(&k.brokers, "create an admin client"))?;
    let replication = || TopicReplication::Fixed(k.replication_factor);
    let topics = [
        NewTopic::new(&k.topic, k.partitions, replication()).set("cleanup.policy", "delete"),
        NewTopic::new(&k.quarantine_topic, 1, replication()).set("cleanup.policy", "delete"),
    ];
    let options = AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics(&topics, &options)
        .await
        .map_err(client_err(&k.brokers, "create topics"))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(topic, brokers = %k.brokers, "created Kafka topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaBusError::Broker {
                    brokers: k.brokers.clone(),
                    message: format!("cannot create topic {topic}: {code}"),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_checks_property_names_and_values() {
        let mut k = KafkaConfig::default();
        k.properties
            .insert("no.such.setting".to_owned(), "1".to_owned());
        let p = check_properties(&k);
        assert_eq!(p[0].key, "kafka.properties");
        assert!(p[0].message.contains("no.such.setting"), "{p:?}");
        k.properties.clear();
        k.properties
            .insert("security.protocol".to_owned(), "ssl".to_owned());
        k.properties
            .insert("socket.timeout.ms".to_owned(), "30000".to_owned());
        assert_eq!(check_properties(&k), Vec::new());
    }
}
