//! Configuration: the schema of `pleiades.toml`, one section per concern.
//!
//! The doc comments on the fields below are the user documentation of each key; the shipped
//! `pleiades.toml` repeats them. `load` merges the file, `PLEIADES_*` environment overrides and
//! command-line flags; `validate` checks every key on its own terms and reports every problem at
//! once, named by its key. This module knows nothing of the bus or the store: the checks that
//! need librdkafka or a server live with those modules (see `daemon::preflight`).

mod load;
mod validate;

pub use load::{load, ConfigError, Overrides, Sources};
pub use validate::Problem;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The default upstream: Wikimedia's public recentchange stream.
pub const DEFAULT_URL: &str = "https://stream.wikimedia.org/v2/stream/recentchange";
/// Where people find the project (and Wikimedia's operators find who to contact).
pub const PROJECT_URL: &str = "https://github.com/pleiades-stats/pleiades";

/// The whole configuration; one section per concern.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub ingest: IngestConfig,
    pub file: FileConfig,
    pub kafka: KafkaConfig,
    pub aggregate: AggregateConfig,
    pub store: StoreConfig,
    pub redis: RedisConfig,
    pub web: WebConfig,
    pub intake: IntakeConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

/// Which bus connects the ingester to the aggregators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// Event files in `file.dir`: one host.
    File,
    /// A Kafka topic: many hosts.
    Kafka,
}

/// What the ingester does with an event that does not match the JSON Schema its `$schema` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValidateMode {
    /// Count it per rule, log it (once per rule and minute) and publish it all the same.
    Warn,
    /// Keep it in quarantine with the schema error; it is never counted.
    Quarantine,
    /// Do not check events against their schema.
    Off,
}

/// The `[ingest]` section: the one connection to the upstream stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Run the ingester on this host. Run exactly one per deployment.
    pub enabled: bool,
    /// The upstream server-sent events endpoint.
    pub url: String,
    /// Sent on every request. Wikimedia rejects generic agents: add a contact address.
    pub user_agent: String,
    /// Resume from the last event the bus holds; `false` starts at "now" (or at `since`).
    pub resume: bool,
    /// How far back in time a resume asks upstream to start; the overlap is dropped by `meta.id`.
    #[serde(with = "humantime_serde")]
    pub resume_rewind: Duration,
    /// Where to start when there is nothing to resume from: an RFC 3339 time or epoch
    /// milliseconds. Empty means "now".
    pub since: String,
    /// The bus events are published to: `"file"` or `"kafka"`.
    pub publisher: BusKind,
    /// A connection that completes no event and no heartbeat for this long is considered dead
    /// and reopened: bytes trickling in without completing anything do not count.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Longest line, and longest event, accepted from upstream; longer ones are dropped and counted.
    pub max_event_bytes: usize,
    /// How many recent `meta.id`s are remembered to drop repeats. Must hold a resume overlap at
    /// peak rate: `resume_rewind` × peak events per second, with room to spare.
    pub dedupe_window: usize,
    /// First reconnect delay after a failure; doubles (with jitter) up to `backoff_max`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Time allowed to open a connection and receive the response headers.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The longest wait upstream may ask for, with `Retry-After` on a 429 or 503 or with the
    /// stream's `retry:` field; a longer request is cut to this and counted in
    /// `pleiades_recv_anomalies_total{kind="retry_clamped"}`.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// How far in the future (by this host's clock) an event's `meta.dt` may be. Later events
    /// are quarantined as `future_dt`: one bad clock upstream must not create days that have not
    /// happened. Events from the past are accepted as they are.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Check every event against the `mediawiki/recentchange` JSON Schema its `$schema` names
    /// (1.0.0 or 1.0.1; the 2018 format as legacy): `"warn"` counts and logs failures and
    /// publishes the event, `"quarantine"` keeps failures in quarantine, `"off"` checks nothing.
    pub validate: ValidateMode,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            enabled: true,
            url: DEFAULT_URL.to_owned(),
            user_agent: default_user_agent(),
            resume: true,
            resume_rewind: Duration::from_secs(10),
            since: String::new(),
            publisher: BusKind::File,
            stall_timeout: Duration::from_secs(60),
            max_event_bytes: 4 * 1024 * 1024,
            dedupe_window: 100_000,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
            max_retry_after: Duration::from_secs(300),
            max_future_skew: Duration::from_secs(300),
            validate: ValidateMode::Warn,
        }
    }
}

/// `pleiades/<version> (<project URL>)`, as SPEC §3 asks.
pub fn default_user_agent() -> String {
    format!("pleiades/{} ({PROJECT_URL})", env!("CARGO_PKG_VERSION"))
}

/// When the event-file bus forces written data to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every batch of lines written (the safest; the default). A backlog is written in
    /// groups of whatever arrives without a pause of 2 ms, for at most 50 ms and up to 4 MiB
    /// (an eighth of a segment when that is less), one sync each.
    Batch,
    /// At most once per `file.fsync_interval`.
    Interval,
    /// Never; the operating system decides. Survives a crash of Pleiades, not of the host.
    Never,
}

/// The `[file]` section: the single-host event-file bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Directory of the append-only segment files (created if missing).
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it reaches this size in bytes.
    pub segment_bytes: u64,
    /// `"batch"`, `"interval"` or `"never"`.
    pub fsync: FsyncPolicy,
    /// With `fsync = "interval"`: the longest time written data may wait for a sync.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Closed segments whose newest event is older than this (in event time: behind the newest
    /// event on the bus) are deleted, once every aggregator has counted them.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// The disk budget of the segments: while they take more bytes than this, the oldest
    /// counted ones are deleted. Uncounted events are never deleted: a bus over budget because
    /// counting is stuck is reported (metric, log, alert, `/readyz`), not emptied.
    pub max_bytes: u64,
    /// The most bytes all quarantine files together may hold; the oldest rotated pieces go.
    pub quarantine_max_bytes: u64,
    /// How often retention looks at the segments (on hosts that aggregate the event files).
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            dir: PathBuf::from("./events"),
            segment_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Batch,
            fsync_interval: Duration::from_secs(1),
            retention: Duration::from_secs(30 * 86_400),
            max_bytes: 20 * 1024 * 1024 * 1024,
            quarantine_max_bytes: 256 * 1024 * 1024,
            retention_interval: Duration::from_secs(10),
        }
    }
}

/// The `[kafka]` section: the multi-host bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The topic events are published to and aggregated from. Each message is one event's data
    /// exactly as received, keyed by its `meta.id`, with its SSE id in the `sse-id` header.
    pub topic: String,
    /// Partitions of `topic` when Pleiades creates it (it does when the topic is missing).
    /// Aggregators share the partitions, so this caps how many can work at once.
    pub partitions: i32,
    /// Replicas of each partition when Pleiades creates a topic; -1 takes the broker's default.
    pub replication_factor: i32,
    /// Invalid events, with the reason, go to this topic (created like `topic`, one partition).
    pub quarantine_topic: String,
    /// The consumer group every aggregator of the deployment joins.
    pub group: String,
    /// The most event data the ingester holds in memory waiting for the brokers. When it is
    /// full, reading from upstream pauses until the brokers catch up (backpressure), so a broker
    /// outage costs time, never memory or events. What the ingester has read from upstream and
    /// not yet handed over, at most a quarter of this, comes on top.
    pub buffer_bytes: u64,
    /// The ingester's transactional producer id; empty (the default) publishes without
    /// transactions. With an id, an ingester that starts fences the one that held it (that one
    /// stops, exit 2): the newest wins and the topic never gets an event twice, and readers see
    /// committed events only. Every ingester of a deployment then uses the same id; to move the
    /// ingest role, start it on the new host, and the old one stops by itself.
    pub transactional_id: String,
    /// Passed to librdkafka unchanged (SASL, TLS, timeouts, …), for producers and consumers.
    /// Pleiades sets `acks`, `enable.idempotence`, `bootstrap.servers` and `group.id` itself.
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// librdkafka settings Pleiades owns: overriding them would break its guarantees or its
    /// configuration, so `[kafka.properties]` may not set them.
    pub const RESERVED_PROPERTIES: &'static [&'static str] = &[
        "bootstrap.servers",
        "metadata.broker.list",
        "group.id",
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "enable.auto.offset.store",
        "transactional.id",
        "isolation.level",
    ];
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".to_owned(),
            topic: "pleiades-events".to_owned(),
            partitions: 4,
            replication_factor: -1,
            quarantine_topic: "pleiades-quarantine".to_owned(),
            group: "pleiades-aggregators".to_owned(),
            buffer_bytes: 64 * 1024 * 1024,
            transactional_id: String::new(),
            properties: BTreeMap::new(),
        }
    }
}

/// The `[aggregate]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    /// Run aggregators on this host.
    pub enabled: bool,
    /// The bus to read: `"file"` or `"kafka"`; unset means the same as `ingest.publisher`.
    pub source: Option<BusKind>,
    /// Aggregator actors on this host (with Kafka: members of one consumer group). With event
    /// files, worker `i` reads the segments whose number modulo `workers` is `i`.
    pub workers: usize,
    /// A batch is written to the store once it covers this many events…
    pub batch_events: usize,
    /// …or once its oldest event has waited this long, whichever comes first. On event files, a
    /// backlog's last batch (at least a hundredth of `batch_events`, filled at least as fast as
    /// `batch_events` per `batch_delay`) is written once a poll finds nothing new behind it.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// How often an idle aggregator looks for new events.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// `"full"`: the original counters and the further ones (families, languages, namespaces,
    /// user classes, log actions, patrolling, bytes, hours, distinct editors, busiest pages and
    /// editors). `"original"`: only the original counters. Every aggregator sharing a store
    /// should say the same: a day counted partly with `"original"` lacks those events in the
    /// further statistics.
    pub statistics: Statistics,
}

/// What the aggregators count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Statistics {
    /// The original counters and the further dimensions.
    Full,
    /// The original counters only (SPEC §5).
    Original,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            enabled: true,
            source: None,
            workers: 2,
            batch_events: 20_000,
            batch_delay: Duration::from_millis(500),
            poll_interval: Duration::from_millis(100),
            statistics: Statistics::Full,
        }
    }
}

/// Where counters are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A database file under `store.path`: one host.
    Embedded,
    /// A Redis server at `redis.url`: many hosts.
    Redis,
}

/// The `[store]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `"embedded"` or `"redis"`.
    pub kind: StoreKind,
    /// The embedded store's file.
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Embedded,
            path: PathBuf::from("./pleiades.db"),
        }
    }
}

/// The `[redis]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS), with a password in the URL if needed
    /// (`rediss://:password@host:6380/0`). The password is never printed. With `sentinels` or
    /// `cluster`, its host and port are not used, but its scheme (TLS), user, password and
    /// database apply to every server Pleiades connects to.
    pub url: String,
    /// The longest one store operation may take, reconnections and retries through a failover
    /// included, before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Redis Sentinel: the sentinels' `host:port`. When set, the store asks them in turn for
    /// the address of the master named `master_name`, checks with `ROLE` that it is the
    /// master, and asks again after any failure, so it follows a failover without a restart.
    /// Reads and writes both go to the master only: a replica may lag behind it.
    pub sentinels: Vec<String>,
    /// With `sentinels`: the name the sentinels monitor the master under
    /// (`sentinel monitor <name> …`); the default is the original's.
    pub master_name: String,
    /// Redis Cluster: some nodes' `host:port`. Every key Pleiades writes carries the hash tag
    /// `{pleiades}`, so they all live in one slot; the store finds the master of that slot
    /// from these nodes and follows it when the slot moves (a resharding) or fails over.
    pub cluster: Vec<String>,
    /// With `rediss://`: a PEM file of the certificate authorities that may sign the server's
    /// certificate, for a Redis whose certificate no system authority signed. Unset trusts the
    /// system's authorities.
    pub ca_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            timeout: Duration::from_secs(10),
            sentinels: Vec::new(),
            master_name: "mymaster".to_owned(),
            cluster: Vec::new(),
            ca_file: None,
        }
    }
}

/// The `[web]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the REST API and the dashboard on this host.
    pub enabled: bool,
    /// Address of the REST API, the dashboard and the health endpoints.
    pub listen: SocketAddr,
    /// How long a day's counters may be served from memory before the store is read again.
    /// Batches counted by this process refresh the cache at once; this bounds the delay for
    /// batches counted on other hosts.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// How often live updates are pushed to open dashboards (when something changed).
    #[serde(with = "humantime_serde")]
    pub live_interval: Duration,
    /// Open `/api/live` streams at most; one more is answered 503 until another closes.
    pub live_max_clients: usize,
    /// Connections held open at most. At the limit, the oldest connection that has no request
    /// in progress is closed to make room, so idle connections cannot lock out real clients,
    /// and the file descriptors every role shares stay bounded.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from connecting or from its previous
    /// answer; a connection that sends none is closed after it (this is also the idle timeout).
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The relay (`GET /v2/stream/recentchange`, the bus as EventStreams-compatible server-sent
    /// events) serves at most this many clients at once and answers 503 beyond; 0 turns it off.
    pub relay_max_clients: usize,
    /// The bus the relay serves: `"file"` or `"kafka"`; unset means the bus `ingest.publisher`
    /// names (a web-only host on Kafka sets `ingest.publisher = "kafka"` and `[kafka]`).
    pub relay_source: Option<BusKind>,
    /// Recent events the relay keeps in memory, shared by every client. A client that falls this
    /// many events behind is disconnected as too slow; one that resumes from further back reads
    /// the bus on its own until it has caught up.
    pub relay_buffer_events: usize,
    /// A comment is sent on relay connections this often, so that proxies keep idle ones open.
    #[serde(with = "humantime_serde")]
    pub relay_heartbeat: Duration,
    /// How often the relay looks for new events in the event files (Kafka delivers them).
    #[serde(with = "humantime_serde")]
    pub relay_poll_interval: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cache_ttl: Duration::from_secs(1),
            live_interval: Duration::from_secs(1),
            live_max_clients: 256,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            relay_max_clients: 1000,
            relay_source: None,
            relay_buffer_events: 4096,
            relay_heartbeat: Duration::from_secs(15),
            relay_poll_interval: Duration::from_millis(20),
        }
    }
}

/// The `[intake]` section: `POST /v1/events`, EventGate's HTTP side, for wikis of your own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// Accept events at `POST /v1/events` on this address; unset means no intake. Accepted
    /// events are handed to this host's ingester, the one writer of the bus, so the ingest role
    /// must run here too.
    pub listen: Option<SocketAddr>,
    /// The bearer token every request must carry (`Authorization: Bearer <token>`); best set
    /// from the environment as `PLEIADES_INTAKE__TOKEN`. Empty means none, which is allowed
    /// only on a loopback address.
    pub token: String,
    /// The largest request body accepted, in bytes; larger ones are refused with 413.
    pub max_body_bytes: u64,
    /// How long a request waits for the ingester to publish its events before answering 503.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Connections held open at most (the oldest idle one is closed to make room, as on
    /// `web.max_connections`).
    pub max_connections: usize,
    /// Time a client has to send a request's headers; idle connections are closed after it.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            listen: None,
            token: String::new(),
            max_body_bytes: 4 * 1024 * 1024,
            timeout: Duration::from_secs(10),
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint, served whatever roles this host runs.
    pub listen: SocketAddr,
    /// Connections held open at most (the oldest idle one is closed to make room, as on
    /// `web.max_connections`).
    pub max_connections: usize,
    /// Time a client has to send a request's headers; idle connections are closed after it.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter: `error`, `warn`, `info`, `debug`, `trace`, or per-module directives.
    pub level: String,
    /// `"text"` or `"json"`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

impl AggregateConfig {
    /// The bus aggregators read, resolving "same as the publisher".
    pub fn source_or(&self, publisher: BusKind) -> BusKind {
        self.source.unwrap_or(publisher)
    }
}

/// The three roles a host can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Aggregate,
    Web,
}

/// One bus as a component sees it: its kind and its section.
#[derive(Debug, Clone, PartialEq)]
pub enum BusSettings {
    File(FileConfig),
    Kafka(KafkaConfig),
}

impl BusSettings {
    pub fn kind(&self) -> BusKind {
        match self {
            BusSettings::File(_) => BusKind::File,
            BusSettings::Kafka(_) => BusKind::Kafka,
        }
    }
}

/// Which store, with the section it needs.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreSettings {
    Embedded(StoreConfig),
    Redis(RedisConfig),
}

impl Config {
    /// True when an enabled role of this host reads or writes the Kafka bus.
    pub fn uses_kafka(&self) -> bool {
        (self.ingest.enabled && self.ingest.publisher == BusKind::Kafka)
            || (self.aggregate.enabled && self.aggregate_source() == BusKind::Kafka)
    }

    /// True when an enabled role of this host reads or writes event files.
    pub fn uses_files(&self) -> bool {
        (self.ingest.enabled && self.ingest.publisher == BusKind::File)
            || (self.aggregate.enabled && self.aggregate_source() == BusKind::File)
    }

    /// The bus the web role's relay serves, when this host runs it.
    pub fn relay_bus(&self) -> Option<BusKind> {
        (self.web.enabled && self.web.relay_max_clients > 0)
            .then(|| self.web.relay_source.unwrap_or(self.ingest.publisher))
    }

    /// True when this host's configuration needs the `[kafka]` section: a role or the relay
    /// reads or writes the topic.
    pub fn needs_kafka(&self) -> bool {
        self.uses_kafka() || self.relay_bus() == Some(BusKind::Kafka)
    }

    /// The bus aggregators read, resolving "same as the publisher".
    pub fn aggregate_source(&self) -> BusKind {
        self.aggregate.source_or(self.ingest.publisher)
    }

    /// The settings of a bus of the given kind.
    pub fn bus(&self, kind: BusKind) -> BusSettings {
        match kind {
            BusKind::File => BusSettings::File(self.file.clone()),
            BusKind::Kafka => BusSettings::Kafka(self.kafka.clone()),
        }
    }

    /// The store's settings.
    pub fn store_settings(&self) -> StoreSettings {
        match self.store.kind {
            StoreKind::Embedded => StoreSettings::Embedded(self.store.clone()),
            StoreKind::Redis => StoreSettings::Redis(self.redis.clone()),
        }
    }

    /// The roles this host runs, for logs and readiness.
    pub fn roles(&self) -> Vec<Role> {
        let mut roles = Vec::new();
        if self.ingest.enabled {
            roles.push(Role::Ingest);
        }
        if self.aggregate.enabled {
            roles.push(Role::Aggregate);
        }
        if self.web.enabled {
            roles.push(Role::Web);
        }
        roles
    }
}

/// Parses `ingest.since`: RFC 3339, or milliseconds since the epoch.
pub fn parse_since(since: &str) -> Option<i64> {
    if let Ok(ms) = since.parse::<i64>() {
        return Some(ms);
    }
    crate::event::parse_time_ms(since).ok()
}

/// Splits `host:port` (`[v6]:port` for IPv6 addresses); None unless both parts are there.
pub fn parse_host_port(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty() && !host.contains(['/', '@', ' '])).then(|| (host.to_owned(), port))
}

/// `url` with its host and port replaced, everything else (scheme, user, password, database)
/// kept; None when `url` does not parse.
pub fn with_host_port(url: &str, host: &str, port: u16) -> Option<String> {
    let mut parsed = reqwest::Url::parse(url).ok()?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    parsed.set_host(Some(&host)).ok()?;
    parsed.set_port(Some(port)).ok()?;
    Some(parsed.to_string())
}

/// A listen address in the original's form: `:8080` is every interface, `localhost:8080` the
/// loopback one, anything else an `IP:PORT`.
pub fn parse_listen_addr(addr: &str) -> Option<SocketAddr> {
    if let Some(port) = addr.strip_prefix(':') {
        return port
            .parse()
            .ok()
            .map(|port| SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Some(port) = addr.strip_prefix("localhost:") {
        return port
            .parse()
            .ok()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
    }
    addr.parse().ok()
}

/// `url` with its password replaced, so that it can be shown in errors and logs. A URL that
/// does not parse may still hold a password: everything up to its last `@` (after the scheme)
/// is hidden then.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            if parsed.set_password(Some("***")).is_ok() {
                parsed.to_string()
            } else {
                redact_userinfo(url)
            }
        }
        Ok(_) => url.to_owned(),
        Err(_) => redact_userinfo(url),
    }
}

/// Hides whatever precedes the last `@` of `url`, keeping its scheme.
fn redact_userinfo(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    let scheme_end = url[..at].find("://").map_or(0, |i| i + 3);
    format!("{}***{}", &url[..scheme_end], &url[at..])
}
