//! The Kafka bus: client settings, topic creation, the idempotent publisher with a memory cap,
//! and recovering the ingest cursor and dedupe window from the topic itself.
//!
//! A message is one event's data exactly as received, keyed by its `meta.id`, with its SSE id in
//! the `sse-id` header. Every message also carries, in `pleiades-cursor`, the SSE id before which
//! every event of the stream had been acknowledged by the brokers when it was sent. Deliveries
//! complete out of order across partitions, so the newest message of a partition does not prove
//! that older events reached other partitions; this header does. Reading the newest message of
//! each partition is therefore enough to resume, and the ingest role keeps no local state.

use crate::bus::file::{QuarantineRecord, Tail};
use crate::config::{KafkaConfig, Problem};
use crate::metrics::KafkaMetrics;
use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The header holding the event's own SSE id.
pub const SSE_ID_HEADER: &str = "sse-id";
/// The header holding the resume point that was safe when the message was sent.
pub const CURSOR_HEADER: &str = "pleiades-cursor";
/// The header holding a quarantined record's reason.
pub const REASON_HEADER: &str = "reason";

/// Settings Pleiades owns: overriding them would break its guarantees or its configuration.
const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "enable.auto.offset.store",
];

/// Quarantined data is cut to this size so that a record too large for the events topic still
/// fits the quarantine topic.
const QUARANTINE_DATA_BYTES: usize = 256 * 1024;

/// How long one metadata, watermark or admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Every problem with the `[kafka]` section, named by key. Property names and values are checked
/// by librdkafka itself, without connecting.
pub fn check_config(k: &KafkaConfig) -> Vec<Problem> {
    let mut p = Vec::new();
    let mut bad = |key: &str, message: String| {
        p.push(Problem {
            key: key.to_owned(),
            message,
        })
    };
    if k.brokers.trim().is_empty() {
        bad("kafka.brokers", "must name at least one host:port".into());
    }
    for (key, value) in [
        ("kafka.topic", &k.topic),
        ("kafka.quarantine_topic", &k.quarantine_topic),
        ("kafka.group", &k.group),
    ] {
        if value.is_empty() {
            bad(key, "must not be empty".into());
        }
    }
    if k.quarantine_topic == k.topic {
        bad(
            "kafka.quarantine_topic",
            "must differ from kafka.topic: invalid events must not reach the aggregators".into(),
        );
    }
    if k.partitions < 1 {
        bad("kafka.partitions", format!("{} is below 1", k.partitions));
    }
    if k.replication_factor == 0 || k.replication_factor < -1 {
        bad(
            "kafka.replication_factor",
            format!("{} is neither -1 nor at least 1", k.replication_factor),
        );
    }
    if k.buffer_bytes < 1024 * 1024 {
        bad(
            "kafka.buffer_bytes",
            format!("{} is below the minimum of 1 MiB", k.buffer_bytes),
        );
    }
    for key in k.properties.keys() {
        if RESERVED.contains(&key.as_str()) {
            bad(
                &format!("kafka.properties.{key}"),
                "is set by Pleiades (use kafka.brokers and kafka.group; acks and idempotence are what make the bus lossless)".into(),
            );
        }
    }
    if p.is_empty() {
        // librdkafka validates each name and value as it is set; no connection is made.
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
/// Pleiades owns are refused by `check_config`.
fn with_properties(mut c: ClientConfig, k: &KafkaConfig) -> ClientConfig {
    for (key, value) in &k.properties {
        c.set(key, value);
    }
    c
}

/// The publisher's settings: idempotent, every in-sync replica acknowledges, deliveries are
/// retried until they succeed (no message timeout), and the queue is capped in bytes.
fn producer_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = base_config(k);
    c.set("enable.idempotence", "true");
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
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    c.set("auto.offset.reset", "earliest");
    c.set("statistics.interval.ms", "5000");
    c.set("session.timeout.ms", "10000");
    c.set("heartbeat.interval.ms", "1000");
    with_properties(c, k)
}

fn client_err<'a>(
    k: &'a KafkaConfig,
    op: &'static str,
) -> impl FnOnce(KafkaError) -> KafkaBusError + 'a {
    move |source| KafkaBusError::Client {
        brokers: k.brokers.clone(),
        op,
        source: Box::new(source),
    }
}

/// Creates the events topic (`kafka.partitions`) and the quarantine topic (one partition) when
/// they are missing; existing topics are left as they are.
pub async fn ensure_topics(k: &KafkaConfig) -> Result<(), KafkaBusError> {
    let admin: AdminClient<ClientLog> = client_config(k)
        .create_with_context(ClientLog::new(&k.brokers))
        .map_err(client_err(k, "create an admin client"))?;
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
        .map_err(client_err(k, "create topics"))?;
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

/// One entry of the publisher's in-flight queue, in send order.
enum Pending {
    Delivery {
        future: DeliveryFuture,
        bytes: u64,
        sent: Instant,
        /// `meta.dt` of the event; `None` for quarantine records.
        event_ms: Option<i64>,
    },
    /// Everything before this entry, once acknowledged, makes this SSE id a safe resume point.
    Mark(String),
}

/// What an event could not be published as.
#[derive(Debug)]
pub enum Refused {
    /// Larger than the producer's `message.max.bytes`: it goes to quarantine instead.
    TooLarge(String),
    Failed(KafkaBusError),
}

/// The ingester's side of the Kafka bus.
pub struct KafkaPublisher {
    producer: FutureProducer<ClientLog>,
    config: KafkaConfig,
    pending: VecDeque<Pending>,
    buffered: u64,
    /// The newest SSE id before which every event was acknowledged.
    acked: Option<String>,
    metrics: KafkaMetrics,
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
            .map_err(client_err(config, "create a producer"))?;
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
                pending: VecDeque::new(),
                buffered: 0,
                acked: tail.last_id.clone(),
                metrics,
            },
            tail,
        ))
    }

    /// Hands one event to the producer, waiting for room when `kafka.buffer_bytes` are in flight.
    /// Returns `Ok(false)` when shutdown interrupted the wait.
    pub async fn publish(
        &mut self,
        sse_id: &str,
        data: &str,
        key: Option<&str>,
        event_ms: i64,
        shutdown: &CancellationToken,
    ) -> Result<bool, Refused> {
        // Before any acknowledgement in this run, the first event's own id is a safe resume
        // point: nothing before it is this run's responsibility.
        let cursor = self.acked.clone().unwrap_or_else(|| sse_id.to_owned());
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
            if self.buffered + bytes > self.config.buffer_bytes
                && !self.pending.is_empty()
                && !self
                    .wait_for_room(bytes, shutdown)
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
                    self.track(future, bytes, Some(event_ms));
                    self.metrics.writes.inc();
                    return Ok(true);
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    // librdkafka's own limits (message count, its bookkeeping) bind before
                    // ours: wait for one delivery, never spin.
                    headers = record.headers.unwrap_or_default();
                    let started = Instant::now();
                    if self.pending.is_empty() {
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
        let mut cut = record.data.len().min(QUARANTINE_DATA_BYTES);
        while !record.data.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut error = record.error.clone();
        if cut < record.data.len() {
            error.push_str(&format!(
                " (data cut to {cut} of {} bytes)",
                record.data.len()
            ));
        }
        let body = serde_json::to_string(&QuarantineRecord {
            time: record.time.clone(),
            reason: record.reason,
            error,
            id: record.id,
            data: &record.data[..cut],
        })
        .unwrap_or_default();
        let headers = OwnedHeaders::new().insert(Header {
            key: REASON_HEADER,
            value: Some(record.reason),
        });
        let topic = self.config.quarantine_topic.clone();
        let bytes = body.len() as u64;
        loop {
            let sent = self.producer.send_result(
                FutureRecord::to(&topic)
                    .key(record.reason)
                    .payload(&body)
                    .headers(headers.clone()),
            );
            match sent {
                Ok(future) => {
                    self.track(future, bytes, None);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if !self.pending.is_empty() =>
                {
                    if !self.complete_front(shutdown).await? {
                        return Ok(());
                    }
                }
                Err((source, _)) => {
                    self.metrics.errors.inc();
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
        self.pending.push_back(Pending::Delivery {
            future,
            bytes,
            sent: Instant::now(),
            event_ms,
        });
        self.buffered += bytes;
        self.metrics.buffered.set(self.buffered as i64);
    }

    /// Records that every event handed over so far is covered by `sse_id`: once they are all
    /// acknowledged, it becomes the resume point written into later messages.
    pub fn mark(&mut self, sse_id: &str) {
        if let Some(Pending::Mark(last)) = self.pending.back_mut() {
            last.clear();
            last.push_str(sse_id);
            return;
        }
        if self.pending.is_empty() {
            self.acked = Some(sse_id.to_owned());
        } else {
            self.pending.push_back(Pending::Mark(sse_id.to_owned()));
        }
    }

    /// Takes every acknowledgement that has already arrived, without waiting.
    pub fn collect_acks(&mut self) -> Result<(), KafkaBusError> {
        loop {
            match self.pending.front_mut() {
                None => return Ok(()),
                Some(Pending::Mark(id)) => {
                    self.acked = Some(std::mem::take(id));
                    self.pending.pop_front();
                }
                Some(Pending::Delivery { future, .. }) => match future.now_or_never() {
                    None => return Ok(()),
                    Some(result) => {
                        let Some(Pending::Delivery {
                            bytes,
                            sent,
                            event_ms,
                            ..
                        }) = self.pending.pop_front()
                        else {
                            return Ok(());
                        };
                        self.settle(result, bytes, sent, event_ms)?;
                    }
                },
            }
        }
    }

    /// Waits for the oldest delivery; false when shutdown came first.
    async fn complete_front(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<bool, KafkaBusError> {
        self.collect_acks()?;
        let Some(Pending::Delivery { future, .. }) = self.pending.front_mut() else {
            return Ok(true);
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            result = future => result,
        };
        if let Some(Pending::Delivery {
            bytes,
            sent,
            event_ms,
            ..
        }) = self.pending.pop_front()
        {
            self.settle(result, bytes, sent, event_ms)?;
        }
        self.collect_acks()?;
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
        while self.buffered + bytes > self.config.buffer_bytes && !self.pending.is_empty() {
            if !logged && started.elapsed() > Duration::from_secs(5) {
                tracing::warn!(brokers = %self.config.brokers, buffered = self.buffered, limit = self.config.buffer_bytes, "Kafka buffer full; reading from upstream is paused until the brokers acknowledge");
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

    fn settle<E>(
        &mut self,
        result: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
        bytes: u64,
        sent: Instant,
        event_ms: Option<i64>,
    ) -> Result<(), KafkaBusError> {
        self.buffered = self.buffered.saturating_sub(bytes);
        self.metrics.buffered.set(self.buffered as i64);
        match result {
            Ok(Ok(_)) => {
                self.metrics
                    .write_seconds
                    .observe(sent.elapsed().as_secs_f64());
                if let Some(ms) = event_ms {
                    self.metrics.events.inc();
                    let now = chrono::Utc::now().timestamp_millis();
                    self.metrics.lag_ms.observe((now - ms).max(0) as f64);
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

    /// Waits until every event handed over is acknowledged, or `limit` passes.
    pub async fn flush(&mut self, limit: Duration) -> Result<(), KafkaBusError> {
        let never = CancellationToken::new();
        let drained = tokio::time::timeout(limit, async {
            while !self.pending.is_empty() {
                self.complete_front(&never).await?;
            }
            Ok::<_, KafkaBusError>(())
        })
        .await;
        match drained {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(unacknowledged = self.pending.len(), "shutting down before the brokers acknowledged every event; they will be fetched again from upstream");
                Ok(())
            }
        }
    }

    /// Starts afresh (`ingest.resume = false`): until the first acknowledgement, messages carry
    /// this run's first event as their resume point instead of the one read from the topic.
    pub fn forget_cursor(&mut self) {
        self.acked = None;
    }

    /// The resume point proven by acknowledgements.
    pub fn acked(&self) -> Option<&str> {
        self.acked.as_deref()
    }

    /// Bytes of event data waiting for the brokers.
    pub fn buffered(&self) -> u64 {
        self.buffered
    }
}

/// Reads the newest messages of every partition: the safest recent resume point (the
/// `pleiades-cursor` of the most recently written message) and the newest `window` keys.
pub fn read_tail(k: &KafkaConfig, window: usize) -> Result<Tail, KafkaBusError> {
    let mut config = client_config(k);
    config.set("group.id", format!("{}-tail-reader", k.group));
    config.set("enable.auto.commit", "false");
    let consumer: BaseConsumer<ClientLog> = config
        .create_with_context(ClientLog::new(&k.brokers))
        .map_err(client_err(k, "create a consumer"))?;
    let metadata = consumer
        .fetch_metadata(Some(&k.topic), REQUEST_TIMEOUT)
        .map_err(client_err(k, "fetch topic metadata"))?;
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
            .map_err(client_err(k, "fetch partition watermarks"))?;
        if high > low {
            let from = low.max(high - per_partition);
            assignment
                .add_partition_offset(&k.topic, partition, Offset::Offset(from))
                .map_err(client_err(k, "assign partitions"))?;
            remaining.insert(partition, high);
        }
    }
    let mut tail = Tail::default();
    if remaining.is_empty() {
        return Ok(tail);
    }
    consumer
        .assign(&assignment)
        .map_err(client_err(k, "assign partitions"))?;
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

/// Asks the brokers for the topic's metadata: the readiness check of Kafka roles.
pub async fn probe(k: &KafkaConfig) -> Result<(), KafkaBusError> {
    let owned = k.clone();
    let result = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer<ClientLog> = client_config(&owned)
            .create_with_context(ClientLog::new(&owned.brokers))
            .map_err(client_err(&owned, "create a client"))?;
        let metadata = consumer
            .fetch_metadata(Some(&owned.topic), Duration::from_secs(3))
            .map_err(client_err(&owned, "fetch topic metadata"))?;
        match metadata.topics().iter().find(|t| t.name() == owned.topic) {
            Some(t) if t.error().is_none() => Ok(()),
            Some(t) => Err(KafkaBusError::Broker {
                brokers: owned.brokers.clone(),
                message: format!("topic {}: {:?}", owned.topic, t.error()),
            }),
            None => Err(KafkaBusError::Broker {
                brokers: owned.brokers.clone(),
                message: format!("topic {} is missing", owned.topic),
            }),
        }
    })
    .await;
    result.unwrap_or_else(|e| {
        Err(KafkaBusError::Broker {
            brokers: k.brokers.clone(),
            message: e.to_string(),
        })
    })
}
