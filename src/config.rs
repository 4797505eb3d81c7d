//! Configuration: the TOML file, `PLEIADES_*` environment overrides and command-line flags, typed
//! and validated at start so that every problem is reported at once, named by its key.
//!
//! The doc comments on the fields below are the user documentation of each key; the shipped
//! `pleiades.toml` repeats them.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// A connection that receives no byte at all for this long is considered dead and reopened.
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
    /// After every batch of lines written (the safest; the default).
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
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            dir: PathBuf::from("./events"),
            segment_bytes: 64 * 1024 * 1024,
            fsync: FsyncPolicy::Batch,
            fsync_interval: Duration::from_secs(1),
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
    /// outage costs time, never memory or events.
    pub buffer_bytes: u64,
    /// Passed to librdkafka unchanged (SASL, TLS, timeouts, …), for producers and consumers.
    /// Pleiades sets `acks`, `enable.idempotence`, `bootstrap.servers` and `group.id` itself.
    pub properties: BTreeMap<String, String>,
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
    /// …or once its oldest event has waited this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// How often an idle aggregator looks for new events.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            enabled: true,
            source: None,
            workers: 2,
            batch_events: 2000,
            batch_delay: Duration::from_millis(500),
            poll_interval: Duration::from_millis(100),
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
    /// `redis://` or `rediss://`, with a password in the URL if needed.
    pub url: String,
    /// The longest one store operation may take before it counts as failed (and is retried).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            timeout: Duration::from_secs(10),
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
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cache_ttl: Duration::from_secs(1),
            live_interval: Duration::from_secs(1),
        }
    }
}

/// The `[metrics]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint, served whatever roles this host runs.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
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

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Settings given on the command line; they win over the file and the environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Run only this role (the original `ingest|aggregate|frontend` personalities).
    pub only_role: Option<Role>,
    pub file_enable: bool,
    pub kafka_enable: bool,
    pub file_dir: Option<PathBuf>,
    pub kafka_broker: Option<String>,
    pub kafka_topic: Option<String>,
    pub metrics_port: Option<u16>,
    pub resume: Option<bool>,
    pub quiet: bool,
    pub verbose: bool,
}

/// The three roles a host can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Ingest,
    Aggregate,
    Web,
}

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    /// The TOML file, if any.
    pub file: Option<&'a Path>,
    /// The process environment (only `PLEIADES_*` variables are read).
    pub env: HashMap<String, String>,
    pub overrides: Overrides,
}

/// Keys whose contents are free-form and passed through unchecked.
const FREE_FORM: &[&str] = &["kafka.properties"];

/// Reads, merges and validates the configuration, reporting every problem found.
pub fn load(sources: &Sources<'_>) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = sources.file {
        // Read the file ourselves so that a missing or unreadable file names its path.
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    // Only PLEIADES_<SECTION>__<KEY> names configure Pleiades; other variables that happen to
    // start with PLEIADES_ belong to someone else and are left alone.
    let env: HashMap<String, String> = sources
        .env
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("PLEIADES_")
                .and_then(|rest| rest.split_once("__"))
                .is_some_and(|(section, key)| !section.is_empty() && !key.is_empty())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        config::Environment::with_prefix("PLEIADES")
            .prefix_separator("_")
            .separator("__")
            .source(Some(env)),
    );
    let merged = builder.build().map_err(|e| {
        ConfigError::Invalid(vec![Problem {
            key: sources
                .file
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "environment".to_owned()),
            message: e.to_string(),
        }])
    })?;

    let mut problems = unknown_keys(&merged);
    let config = Config {
        ingest: section(&merged, "ingest", &mut problems),
        file: section(&merged, "file", &mut problems),
        kafka: section(&merged, "kafka", &mut problems),
        aggregate: section(&merged, "aggregate", &mut problems),
        store: section(&merged, "store", &mut problems),
        redis: section(&merged, "redis", &mut problems),
        web: section(&merged, "web", &mut problems),
        metrics: section(&merged, "metrics", &mut problems),
        log: section(&merged, "log", &mut problems),
    };
    let mut config = config;
    problems.extend(apply_overrides(&mut config, &sources.overrides));
    problems.extend(config.validate());
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Reads one section. Each key is first checked on its own (the others at their defaults), so
/// that every bad value is reported, not only the first one serde meets in a map of random order.
fn section<T: serde::de::DeserializeOwned + Default>(
    merged: &config::Config,
    name: &str,
    problems: &mut Vec<Problem>,
) -> T {
    let Ok(value) = merged.get::<config::Value>(name) else {
        return T::default();
    };
    let table = match value.into_table() {
        Ok(table) => table,
        Err(e) => {
            problems.push(Problem {
                key: name.to_owned(),
                message: format!("must be a table of keys: {e}"),
            });
            return T::default();
        }
    };
    let as_value = |entries: Vec<(String, config::Value)>| {
        config::Value::new(
            None,
            config::ValueKind::Table(entries.into_iter().collect()),
        )
    };
    let entries: Vec<(String, config::Value)> = table.into_iter().collect();
    let before = problems.len();
    for entry in &entries {
        if let Err(e) = serde_path_to_error::deserialize::<_, T>(as_value(vec![entry.clone()])) {
            problems.extend(type_problem(name, e));
        }
    }
    if problems.len() > before {
        return T::default();
    }
    match serde_path_to_error::deserialize(as_value(entries)) {
        Ok(section) => section,
        Err(e) => {
            problems.extend(type_problem(name, e));
            T::default()
        }
    }
}

/// Turns a deserialisation error into a problem named by its full key. Unknown keys are left
/// out: [`unknown_keys`] reports all of them, not just the first of each section.
fn type_problem(
    section: &str,
    error: serde_path_to_error::Error<config::ConfigError>,
) -> Option<Problem> {
    let message = error.inner().to_string();
    if message.starts_with("unknown field") {
        return None;
    }
    let path = error.path().to_string();
    let key = if path.is_empty() || path == "." {
        section.to_owned()
    } else {
        format!("{section}.{path}")
    };
    // The config crate sometimes appends its own idea of the key; ours is more precise.
    let message = match message.rsplit_once(" for key `") {
        Some((m, _)) => m.to_owned(),
        None => message,
    };
    Some(Problem { key, message })
}

/// Every key present in `merged` that the configuration does not define, with its full path.
fn unknown_keys(merged: &config::Config) -> Vec<Problem> {
    let known = match serde_json::to_value(Config::default()) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let given: serde_json::Value = match merged.clone().try_deserialize() {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    let mut problems = Vec::new();
    walk_unknown(&given, &known, "", &mut problems);
    problems
}

fn walk_unknown(
    given: &serde_json::Value,
    known: &serde_json::Value,
    prefix: &str,
    out: &mut Vec<Problem>,
) {
    let (Some(given), Some(known)) = (given.as_object(), known.as_object()) else {
        return;
    };
    for (key, value) in given {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known.get(key) {
            None => {
                let expected: Vec<&str> = known.keys().map(String::as_str).collect();
                out.push(Problem {
                    key: path,
                    message: format!("unknown key (expected one of: {})", expected.join(", ")),
                });
            }
            Some(_) if FREE_FORM.contains(&path.as_str()) => {}
            Some(known_value) => walk_unknown(value, known_value, &path, out),
        }
    }
}

fn apply_overrides(config: &mut Config, o: &Overrides) -> Vec<Problem> {
    let mut problems = Vec::new();
    if let Some(role) = o.only_role {
        config.ingest.enabled = role == Role::Ingest;
        config.aggregate.enabled = role == Role::Aggregate;
        config.web.enabled = role == Role::Web;
    }
    match (o.file_enable, o.kafka_enable) {
        (true, true) => problems.push(Problem {
            key: "ingest.publisher".into(),
            message: "--file.enable and --kafka.enable both given; choose one publisher".into(),
        }),
        (true, false) => config.ingest.publisher = BusKind::File,
        (false, true) => config.ingest.publisher = BusKind::Kafka,
        (false, false) => {}
    }
    if let Some(dir) = &o.file_dir {
        config.file.dir.clone_from(dir);
    }
    if let Some(broker) = &o.kafka_broker {
        config.kafka.brokers.clone_from(broker);
    }
    if let Some(topic) = &o.kafka_topic {
        config.kafka.topic.clone_from(topic);
    }
    if let Some(port) = o.metrics_port {
        config.metrics.listen.set_port(port);
    }
    if let Some(resume) = o.resume {
        config.ingest.resume = resume;
    }
    match (o.quiet, o.verbose) {
        (true, true) => problems.push(Problem {
            key: "log.level".into(),
            message: "-q and -v both given; choose one".into(),
        }),
        (true, false) => config.log.level = "error".into(),
        (false, true) => config.log.level = "debug".into(),
        (false, false) => {}
    }
    problems
}

impl Config {
    /// Every semantic problem: values that parse but cannot work, and contradictions.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(Problem {
                key: key.to_owned(),
                message,
            })
        };
        let i = &self.ingest;
        match reqwest::Url::parse(&i.url) {
            Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {}
            Ok(url) => bad(
                "ingest.url",
                format!("scheme {:?} is not http or https", url.scheme()),
            ),
            Err(e) => bad("ingest.url", format!("{:?} is not a URL: {e}", i.url)),
        }
        if i.user_agent.trim().is_empty() {
            bad(
                "ingest.user_agent",
                "must not be empty: Wikimedia rejects requests without a descriptive agent".into(),
            );
        } else if reqwest::header::HeaderValue::from_str(&i.user_agent).is_err() {
            bad(
                "ingest.user_agent",
                "contains characters not allowed in an HTTP header".into(),
            );
        }
        if !i.since.is_empty() && parse_since(&i.since).is_none() {
            bad(
                "ingest.since",
                format!(
                    "{:?} is neither an RFC 3339 time nor epoch milliseconds",
                    i.since
                ),
            );
        }
        for (key, value) in [
            ("ingest.stall_timeout", i.stall_timeout),
            ("ingest.backoff_initial", i.backoff_initial),
            ("ingest.backoff_max", i.backoff_max),
            ("ingest.connect_timeout", i.connect_timeout),
            ("file.fsync_interval", self.file.fsync_interval),
            ("aggregate.batch_delay", self.aggregate.batch_delay),
            ("aggregate.poll_interval", self.aggregate.poll_interval),
            ("web.live_interval", self.web.live_interval),
            ("redis.timeout", self.redis.timeout),
        ] {
            if value.is_zero() {
                bad(key, "must be longer than zero".into());
            }
        }
        if i.backoff_max < i.backoff_initial {
            bad(
                "ingest.backoff_max",
                "must not be shorter than ingest.backoff_initial".into(),
            );
        }
        if i.max_event_bytes < 1024 {
            bad(
                "ingest.max_event_bytes",
                format!("{} is below the minimum of 1024", i.max_event_bytes),
            );
        }
        if i.dedupe_window == 0 {
            bad("ingest.dedupe_window", "must be at least 1".into());
        }
        if self.file.segment_bytes < 4096 {
            bad(
                "file.segment_bytes",
                format!("{} is below the minimum of 4096", self.file.segment_bytes),
            );
        }
        if self.file.dir.as_os_str().is_empty() {
            bad("file.dir", "must not be empty".into());
        }
        if self.aggregate.workers == 0 {
            bad("aggregate.workers", "must be at least 1".into());
        }
        if self.aggregate.batch_events == 0 {
            bad("aggregate.batch_events", "must be at least 1".into());
        }
        if self.store.kind == StoreKind::Redis {
            match reqwest::Url::parse(&self.redis.url) {
                Ok(url) if url.scheme() == "redis" || url.scheme() == "rediss" => {}
                _ => bad(
                    "redis.url",
                    format!(
                        "{:?} is not a redis:// or rediss:// URL",
                        crate::store::redis::redact(&self.redis.url)
                    ),
                ),
            }
        }
        if self.uses_kafka() {
            for problem in crate::bus::kafka::check_config(&self.kafka) {
                bad(&problem.key, problem.message);
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            );
        }
        if self.web.enabled && self.web.listen == self.metrics.listen {
            bad(
                "web.listen",
                format!(
                    "{} is also metrics.listen; give each its own port",
                    self.web.listen
                ),
            );
        }
        p
    }

    /// True when an enabled role of this host reads or writes the Kafka bus.
    pub fn uses_kafka(&self) -> bool {
        (self.ingest.enabled && self.ingest.publisher == BusKind::Kafka)
            || (self.aggregate.enabled
                && self.aggregate.source_or(self.ingest.publisher) == BusKind::Kafka)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_toml(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        load(&Sources {
            file: Some(file.path()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            overrides: Overrides::default(),
        })
    }

    fn problems(result: Result<Config, ConfigError>) -> Vec<Problem> {
        match result {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn no_sources_gives_the_defaults() {
        let config = load(&Sources::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.ingest.url, DEFAULT_URL);
        assert!(config.ingest.user_agent.starts_with("pleiades/"));
    }

    #[test]
    fn the_shipped_file_equals_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pleiades.toml");
        let config = load(&Sources {
            file: Some(&path),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn every_unknown_key_is_named_with_its_path() {
        let p = problems(load_toml(
            "bogus = 1\n[ingest]\nurl2 = \"x\"\n[kafka.properties]\n\"sasl.mechanism\" = \"PLAIN\"\n[web]\nlisten = \"127.0.0.1:1\"\nport = 3\n",
            &[],
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"bogus"), "{p:?}");
        assert!(keys.contains(&"ingest.url2"), "{p:?}");
        assert!(keys.contains(&"web.port"), "{p:?}");
        assert_eq!(keys.len(), 3, "{p:?}");
    }

    #[test]
    fn bad_values_are_named_by_key() {
        let p = problems(load_toml(
            "[ingest]\npublisher = \"carrier-pigeon\"\nstall_timeout = \"x\"\nmax_event_bytes = \"lots\"\n[metrics]\nlisten = \"nowhere\"\n[file]\nsegment_bytes = 10\n",
            &[],
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"ingest.publisher"), "{p:?}");
        assert!(keys.contains(&"ingest.stall_timeout"), "{p:?}");
        assert!(keys.contains(&"ingest.max_event_bytes"), "{p:?}");
        assert!(keys.contains(&"metrics.listen"), "{p:?}");
        assert!(keys.contains(&"file.segment_bytes"), "{p:?}");
    }

    #[test]
    fn durations_parse_and_zero_is_refused() {
        let config = load_toml(
            "[ingest]\nresume_rewind = \"2s\"\nstall_timeout = \"1m\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(config.ingest.resume_rewind, Duration::from_secs(2));
        assert_eq!(config.ingest.stall_timeout, Duration::from_secs(60));
        let p = problems(load_toml("[ingest]\nstall_timeout = \"0s\"\n", &[]));
        assert_eq!(p[0].key, "ingest.stall_timeout");
        let p = problems(load_toml("[ingest]\nresume_rewind = \"soon\"\n", &[]));
        assert_eq!(p[0].key, "ingest.resume_rewind", "{p:?}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = load_toml(
            "[web]\nlisten = \"127.0.0.1:1000\"\n",
            &[
                ("PLEIADES_WEB__LISTEN", "127.0.0.1:2000"),
                ("PLEIADES_INGEST__URL", "http://127.0.0.1:9/x"),
                ("PLEIADES_INGEST__RESUME", "false"),
                ("PLEIADES_AGGREGATE__WORKERS", "5"),
                ("HOME", "/root"),
                ("PLEIADES_HOME", "/opt/pleiades"),
            ],
        )
        .unwrap();
        assert_eq!(config.web.listen.port(), 2000);
        assert_eq!(config.ingest.url, "http://127.0.0.1:9/x");
        assert!(!config.ingest.resume);
        assert_eq!(config.aggregate.workers, 5);
        let p = problems(load_toml("", &[("PLEIADES_INGEST__NOPE", "1")]));
        assert_eq!(p[0].key, "ingest.nope");
    }

    #[test]
    fn flags_override_and_contradictions_are_errors() {
        let config = load(&Sources {
            overrides: Overrides {
                only_role: Some(Role::Ingest),
                file_enable: true,
                file_dir: Some("/tmp/ev".into()),
                metrics_port: Some(9100),
                resume: Some(false),
                verbose: true,
                ..Overrides::default()
            },
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config.roles(), vec![Role::Ingest]);
        assert_eq!(config.file.dir, PathBuf::from("/tmp/ev"));
        assert_eq!(config.metrics.listen.port(), 9100);
        assert!(!config.ingest.resume);
        assert_eq!(config.log.level, "debug");

        let p = problems(load(&Sources {
            overrides: Overrides {
                file_enable: true,
                kafka_enable: true,
                quiet: true,
                verbose: true,
                ..Overrides::default()
            },
            ..Sources::default()
        }));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"ingest.publisher"));
        assert!(keys.contains(&"log.level"));
    }

    #[test]
    fn kafka_settings_are_checked_by_key_and_by_librdkafka() {
        let kafka = "[ingest]\npublisher = \"kafka\"\n[kafka]\n";
        let p = problems(load_toml(
            &format!("{kafka}partitions = 0\nbuffer_bytes = 10\nquarantine_topic = \"pleiades-events\"\n[kafka.properties]\n\"group.id\" = \"mine\"\n"),
            &[],
        ));
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "kafka.partitions",
            "kafka.buffer_bytes",
            "kafka.quarantine_topic",
            "kafka.properties.group.id",
        ] {
            assert!(keys.contains(&key), "{key} missing from {p:?}");
        }
        let p = problems(load_toml(
            &format!("{kafka}[kafka.properties]\n\"no.such.setting\" = \"1\"\n"),
            &[],
        ));
        assert_eq!(p[0].key, "kafka.properties");
        assert!(p[0].message.contains("no.such.setting"), "{p:?}");
        let config = load_toml(
            &format!("{kafka}[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"socket.timeout.ms\" = \"30000\"\n"),
            &[],
        )
        .unwrap();
        assert!(config.uses_kafka());
        // A host that uses files never checks the Kafka section's properties.
        assert!(load_toml("[kafka.properties]\n\"no.such.setting\" = \"1\"\n", &[]).is_ok());
    }

    #[test]
    fn missing_file_names_its_path() {
        let err = load(&Sources {
            file: Some(Path::new("/nonexistent/pleiades.toml")),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/pleiades.toml"),
            "{err}"
        );
    }
}
