//! The Kafka bus: one topic of events and one of quarantine records.
//!
//! A message is one event's data exactly as received, keyed by its `meta.id`, with its SSE id in
//! the `sse-id` header. Every message also carries, in `pleiades-cursor`, the SSE id before which
//! every event of the stream had been acknowledged by the brokers when it was sent. Deliveries
//! complete out of order across partitions, so the newest message of a partition does not prove
//! that older events reached other partitions; this header does. Reading the newest message of
//! each partition is therefore enough to resume, and the ingest role keeps no local state.
//!
//! `settings` builds every client's configuration, `publisher` is the ingester's writer,
//! `tail` reads the resume point back, `group` is the aggregators' consumer-group reader,
//! `reader` reads partitions from given offsets, and `probe` is the readiness check.

mod group;
mod probe;
mod publisher;
mod reader;
mod settings;
mod tail;

pub use group::{Admit, Assignment, Change, GroupReader, Message};
pub use probe::Probe;
pub use publisher::{AckQueue, KafkaPublisher, QuarantineProducer, Refused, Sent};
pub use reader::TopicReader;
pub use settings::{check_properties, client_config, consumer_config, ensure_topics};
pub use tail::read_tail;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The header holding the event's own SSE id.
pub const SSE_ID_HEADER: &str = "sse-id";
/// The header holding the resume point that was safe when the message was sent.
pub const CURSOR_HEADER: &str = "pleiades-cursor";
/// The header holding a quarantined record's reason.
pub const REASON_HEADER: &str = "reason";

/// How long one metadata, watermark or admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the ingester takes the brokers' acknowledgements when nothing else wakes it.
pub const ACK_INTERVAL: Duration = Duration::from_millis(200);
/// How long a stopping ingester waits for the brokers to acknowledge what it has sent.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// The store's key for the position reached in `partition` of `topic`.
pub fn source_key(topic: &str, partition: i32) -> String {
    format!("kafka:{topic}:{partition}")
}

/// A Kafka failure, naming the brokers and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum KafkaBusError {
    #[error("kafka at {brokers}: cannot {op}: {source}")]
    Client {
        brokers: String,
        op: &'static str,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("kafka at {brokers}: the brokers refused an event for {topic}: {source}")]
    Delivery {
        brokers: String,
        topic: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("kafka at {brokers}: {message}")]
    Broker { brokers: String, message: String },
    #[error("kafka at {brokers}: a newer ingester took over transactional.id {id:?} and fenced this one; run one ingester per topic")]
    Fenced { brokers: String, id: String },
}

impl KafkaBusError {
    /// True when a newer producer with the same `transactional.id` took over: this one must
    /// stop.
    pub fn is_fenced(&self) -> bool {
        use rdkafka::error::RDKafkaErrorCode::{InvalidProducerEpoch, ProducerFenced};
        let code = match self {
            KafkaBusError::Client { source, .. } | KafkaBusError::Delivery { source, .. } => {
                source.rdkafka_error_code()
            }
            KafkaBusError::Broker { .. } => None,
            KafkaBusError::Fenced { .. } => return true,
        };
        matches!(code, Some(ProducerFenced | InvalidProducerEpoch))
    }
}

fn client_err<'a>(
    brokers: &'a str,
    op: &'static str,
) -> impl FnOnce(KafkaError) -> KafkaBusError + 'a {
    move |source| KafkaBusError::Client {
        brokers: brokers.to_owned(),
        op,
        source: Box::new(source),
    }
}

/// How often the same kind of client error is logged; a broker outage reports the same error
/// from every connection many times a second.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// librdkafka's logs and errors, routed to `tracing`: its chatter at debug level, and each kind
/// of error at most once per [`ERROR_LOG_INTERVAL`], with how many were suppressed.
pub struct ClientLog {
    brokers: String,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ClientLog {
    pub fn new(brokers: &str) -> Self {
        ClientLog {
            brokers: brokers.to_owned(),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `error` unless the same kind was logged within the interval.
    pub fn error(&self, error: &KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(rdkafka::error::RDKafkaErrorCode::PartitionEOF)
        {
            // The end of a partition, asked for by the tail reader: not an error.
            return;
        }
        let kind = error
            .rdkafka_error_code()
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| error.to_string());
        let suppressed = match self.seen.lock() {
            Ok(mut seen) => {
                let entry = seen
                    .entry(kind)
                    .or_insert((Instant::now() - ERROR_LOG_INTERVAL * 2, 0));
                if entry.0.elapsed() < ERROR_LOG_INTERVAL {
                    entry.1 += 1;
                    return;
                }
                let suppressed = entry.1;
                *entry = (Instant::now(), 0);
                suppressed
            }
            Err(_) => 0,
        };
        tracing::warn!(brokers = %self.brokers, error = %error, reason, suppressed, "Kafka client error");
    }
}

impl ClientContext for ClientLog {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        // Errors also arrive through `error`, deduplicated; the log lines repeat them.
        tracing::debug!(?level, facility, message, "librdkafka");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        ClientLog::error(self, &error, reason);
    }
}

impl ConsumerContext for ClientLog {}
