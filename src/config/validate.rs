//! Validation: every key checked on its own terms, each section by itself, so that a value that
//! parses but cannot work is reported with its key before anything starts.

use super::{
    Config, FileConfig, IngestConfig, IntakeConfig, KafkaConfig, RedisConfig, StoreKind, WebConfig,
};
use std::time::Duration;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key, e.g. `ingest.url`.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Collects problems, named by key.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn positive(&mut self, durations: &[(&str, Duration)]) {
        for (key, value) in durations {
            if value.is_zero() {
                self.bad(key, "must be longer than zero");
            }
        }
    }

    fn at_least(&mut self, key: &str, value: u64, minimum: u64) {
        if value < minimum {
            self.bad(key, format!("{value} is below the minimum of {minimum}"));
        }
    }
}

impl Config {
    /// Every semantic problem: values that parse but cannot work, and contradictions. Sections
    /// a host does not use (Kafka on a file-bus host, Redis with the embedded store) are not
    /// checked, so a shared file can carry settings for other hosts.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        self.ingest.validate(&mut p);
        self.file.validate(&mut p);
        if self.needs_kafka() {
            self.kafka.validate(&mut p);
        }
        let a = &self.aggregate;
        p.positive(&[
            ("aggregate.batch_delay", a.batch_delay),
            ("aggregate.poll_interval", a.poll_interval),
        ]);
        p.at_least("aggregate.workers", a.workers as u64, 1);
        p.at_least("aggregate.batch_events", a.batch_events as u64, 1);
        p.positive(&[
            ("redis.timeout", self.redis.timeout),
            ("web.live_interval", self.web.live_interval),
            ("web.header_timeout", self.web.header_timeout),
            ("metrics.header_timeout", self.metrics.header_timeout),
            ("intake.header_timeout", self.intake.header_timeout),
        ]);
        p.at_least("web.max_connections", self.web.max_connections as u64, 1);
        p.at_least("web.live_max_clients", self.web.live_max_clients as u64, 1);
        p.at_least(
            "metrics.max_connections",
            self.metrics.max_connections as u64,
            1,
        );
        p.at_least(
            "intake.max_connections",
            self.intake.max_connections as u64,
            1,
        );
        if self.store.kind == StoreKind::Redis {
            self.redis.validate(&mut p);
        }
        if self.web.enabled {
            self.web.validate(self, &mut p);
        }
        if self.intake.listen.is_some() {
            self.intake.validate(self, &mut p);
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.bad(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            );
        }
        p.0
    }
}

impl IngestConfig {
    fn validate(&self, p: &mut Problems) {
        match reqwest::Url::parse(&self.url) {
            Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {}
            Ok(url) => p.bad(
                "ingest.url",
                format!("scheme {:?} is not http or https", url.scheme()),
            ),
            Err(e) => p.bad("ingest.url", format!("{:?} is not a URL: {e}", self.url)),
        }
        if self.user_agent.trim().is_empty() {
            p.bad(
                "ingest.user_agent",
                "must not be empty: Wikimedia rejects requests without a descriptive agent",
            );
        } else if reqwest::header::HeaderValue::from_str(&self.user_agent).is_err() {
            p.bad(
                "ingest.user_agent",
                "contains characters not allowed in an HTTP header",
            );
        }
        if !self.since.is_empty() && super::parse_since(&self.since).is_none() {
            p.bad(
                "ingest.since",
                format!(
                    "{:?} is neither an RFC 3339 time nor epoch milliseconds",
                    self.since
                ),
            );
        }
        p.positive(&[
            ("ingest.stall_timeout", self.stall_timeout),
            ("ingest.backoff_initial", self.backoff_initial),
            ("ingest.backoff_max", self.backoff_max),
            ("ingest.connect_timeout", self.connect_timeout),
            ("ingest.max_retry_after", self.max_retry_after),
        ]);
        if self.backoff_max < self.backoff_initial {
            p.bad(
                "ingest.backoff_max",
                "must not be shorter than ingest.backoff_initial",
            );
        }
        p.at_least("ingest.max_event_bytes", self.max_event_bytes as u64, 1024);
        p.at_least("ingest.dedupe_window", self.dedupe_window as u64, 1);
    }
}

impl FileConfig {
    fn validate(&self, p: &mut Problems) {
        p.positive(&[
            ("file.fsync_interval", self.fsync_interval),
            ("file.retention", self.retention),
            ("file.retention_interval", self.retention_interval),
        ]);
        p.at_least("file.segment_bytes", self.segment_bytes, 4096);
        p.at_least(
            "file.quarantine_max_bytes",
            self.quarantine_max_bytes,
            1024 * 1024,
        );
        if self.max_bytes < self.segment_bytes.saturating_mul(2) {
            p.bad(
                "file.max_bytes",
                format!(
                    "{} cannot hold the segment being written and a closed one: make it at least twice file.segment_bytes ({})",
                    self.max_bytes, self.segment_bytes
                ),
            );
        }
        if self.dir.as_os_str().is_empty() {
            p.bad("file.dir", "must not be empty");
        }
    }
}

impl KafkaConfig {
    fn validate(&self, p: &mut Problems) {
        if self.brokers.trim().is_empty() {
            p.bad("kafka.brokers", "must name at least one host:port");
        }
        for (key, value) in [
            ("kafka.topic", &self.topic),
            ("kafka.quarantine_topic", &self.quarantine_topic),
            ("kafka.group", &self.group),
        ] {
            if value.is_empty() {
                p.bad(key, "must not be empty");
            }
        }
        if self.transactional_id != self.transactional_id.trim() {
            p.bad(
                "kafka.transactional_id",
                "must not start or end with spaces",
            );
        }
        if self.quarantine_topic == self.topic {
            p.bad(
                "kafka.quarantine_topic",
                "must differ from kafka.topic: invalid events must not reach the aggregators",
            );
        }
        if self.partitions < 1 {
            p.bad(
                "kafka.partitions",
                format!("{} is below 1", self.partitions),
            );
        }
        if self.replication_factor == 0 || self.replication_factor < -1 {
            p.bad(
                "kafka.replication_factor",
                format!("{} is neither -1 nor at least 1", self.replication_factor),
            );
        }
        if self.buffer_bytes < 1024 * 1024 {
            p.bad(
                "kafka.buffer_bytes",
                format!("{} is below the minimum of 1 MiB", self.buffer_bytes),
            );
        }
        for key in self.properties.keys() {
            if Self::RESERVED_PROPERTIES.contains(&key.as_str()) {
                p.bad(
                    &format!("kafka.properties.{key}"),
                    "is set by Pleiades (use kafka.brokers and kafka.group; acks and idempotence are what make the bus lossless)",
                );
            }
        }
    }
}

impl RedisConfig {
    fn validate(&self, p: &mut Problems) {
        match reqwest::Url::parse(&self.url) {
            Ok(url) if url.scheme() == "redis" || url.scheme() == "rediss" => {
                let db = url.path().trim_matches('/');
                if !self.cluster.is_empty() && !db.is_empty() && db != "0" {
                    p.bad(
                        "redis.url",
                        format!("names database {db:?}, but Redis Cluster has database 0 only"),
                    );
                }
            }
            _ => p.bad(
                "redis.url",
                format!(
                    "{:?} is not a redis:// or rediss:// URL",
                    super::redact_url(&self.url)
                ),
            ),
        }
        for (key, nodes) in [
            ("redis.sentinels", &self.sentinels),
            ("redis.cluster", &self.cluster),
        ] {
            for node in nodes {
                if super::parse_host_port(node).is_none() {
                    p.bad(key, format!("{node:?} is not HOST:PORT"));
                }
            }
        }
        if !self.sentinels.is_empty() && !self.cluster.is_empty() {
            p.bad(
                "redis.cluster",
                "is set together with redis.sentinels; Redis is reached through one or the other",
            );
        }
        if !self.sentinels.is_empty() && self.master_name.trim().is_empty() {
            p.bad(
                "redis.master_name",
                "must name the master the sentinels monitor",
            );
        }
    }
}

impl WebConfig {
    fn validate(&self, config: &Config, p: &mut Problems) {
        if self.listen == config.metrics.listen {
            p.bad(
                "web.listen",
                format!(
                    "{} is also metrics.listen; give each its own port",
                    self.listen
                ),
            );
        }
        if self.relay_max_clients > 0 {
            p.at_least(
                "web.relay_buffer_events",
                self.relay_buffer_events as u64,
                16,
            );
            p.positive(&[
                ("web.relay_heartbeat", self.relay_heartbeat),
                ("web.relay_poll_interval", self.relay_poll_interval),
            ]);
        }
    }
}

impl IntakeConfig {
    fn validate(&self, config: &Config, p: &mut Problems) {
        let Some(listen) = self.listen else {
            return;
        };
        if !config.ingest.enabled {
            p.bad(
                "intake.listen",
                "the intake hands events to this host's ingester, the one writer of the bus: enable ingest here (ingest.enabled = true)",
            );
        }
        for (key, other) in [
            (
                "web.listen",
                config.web.enabled.then_some(config.web.listen),
            ),
            ("metrics.listen", Some(config.metrics.listen)),
        ] {
            if other == Some(listen) {
                p.bad(
                    "intake.listen",
                    format!("{listen} is also {key}; give each its own port"),
                );
            }
        }
        if self.token.is_empty() && !listen.ip().is_loopback() {
            p.bad(
                "intake.token",
                format!("must be set when intake.listen ({listen}) is beyond loopback: anyone who can reach it could publish events"),
            );
        }
        if !self.token.is_empty()
            && reqwest::header::HeaderValue::from_str(&format!("Bearer {}", self.token)).is_err()
        {
            p.bad(
                "intake.token",
                "contains characters not allowed in an HTTP header",
            );
        }
        p.at_least("intake.max_body_bytes", self.max_body_bytes, 1024);
        p.positive(&[("intake.timeout", self.timeout)]);
    }
}
