//! Every Prometheus metric Pleiades exports, in one registry that is passed in, never global.
//!
//! Each role gets a typed handle built by its own `register`; no other module defines a metric.
//! Labelled metrics create every label value they can take (from the enums below) when they are
//! registered, so every series exists from the first scrape and dashboards see "none yet" rather
//! than "no data". Names of SPEC §7 keep their original meaning; new ones follow Prometheus
//! conventions.

use crate::event::RejectReason;
use crate::schema::{Rule, SchemaVersion};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Why the metrics could not be built or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("registering metric: {0}")]
    Register(#[from] prometheus::Error),
    #[error("cannot listen for /metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The values a label can take, known in advance.
pub trait LabelValue: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

impl LabelValue for RejectReason {
    const ALL: &'static [Self] = &RejectReason::ALL;
    fn as_str(self) -> &'static str {
        RejectReason::as_str(self)
    }
}

impl LabelValue for SchemaVersion {
    const ALL: &'static [Self] = &SchemaVersion::ALL;
    fn as_str(self) -> &'static str {
        SchemaVersion::as_str(self)
    }
}

impl LabelValue for Rule {
    const ALL: &'static [Self] = &Rule::ALL;
    fn as_str(self) -> &'static str {
        Rule::as_str(self)
    }
}

/// Declares a set of label values: the enum, `ALL` and `as_str`.
macro_rules! label_values {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl LabelValue for $name {
            const ALL: &'static [Self] = $name::ALL;
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
        }
    };
}

/// A counter with one label whose values are `E`: every series exists from registration, and
/// no other value can be counted.
#[derive(Clone)]
pub struct LabelledCounter<E> {
    vec: IntCounterVec,
    values: std::marker::PhantomData<E>,
}

impl<E: LabelValue> LabelledCounter<E> {
    fn register(
        r: &Registry,
        name: &str,
        help: &str,
        label: &str,
    ) -> Result<Self, prometheus::Error> {
        let vec = with_every_value::<E, _>(counter_vec(r, name, help, &[label])?);
        Ok(LabelledCounter {
            vec,
            values: std::marker::PhantomData,
        })
    }

    /// Counts one.
    pub fn inc(&self, value: E) {
        self.vec.with_label_values(&[value.as_str()]).inc();
    }

    /// The count so far.
    pub fn get(&self, value: E) -> u64 {
        self.vec.with_label_values(&[value.as_str()]).get()
    }

    /// The series of one value, for a component that counts into it without knowing the label.
    pub fn series(&self, value: E) -> IntCounter {
        self.vec.with_label_values(&[value.as_str()])
    }
}

/// A gauge with one label whose values are `E`, every series existing from registration.
#[derive(Clone)]
pub struct LabelledGauge<E> {
    vec: IntGaugeVec,
    values: std::marker::PhantomData<E>,
}

/// `vec` with the series of every value of `E` created, so that each exists from the first
/// scrape.
fn with_every_value<E: LabelValue, B: prometheus::core::MetricVecBuilder>(
    vec: prometheus::core::MetricVec<B>,
) -> prometheus::core::MetricVec<B> {
    for value in E::ALL {
        vec.with_label_values(&[value.as_str()]);
    }
    vec
}

impl<E: LabelValue> LabelledGauge<E> {
    fn register(r: &Registry, opts: Opts, label: &str) -> Result<Self, prometheus::Error> {
        let vec = registered(r, IntGaugeVec::new(opts, &[label]))?;
        let vec = with_every_value::<E, _>(vec);
        Ok(LabelledGauge {
            vec,
            values: std::marker::PhantomData,
        })
    }

    /// The series of one value.
    pub fn series(&self, value: E) -> IntGauge {
        self.vec.with_label_values(&[value.as_str()])
    }
}

label_values! {
    /// The components the supervisor runs: label `component` of `pleiades_goroutine_restarts`.
    Component {
        Ingest => "ingest",
        Aggregate => "aggregate",
        Web => "web",
        Live => "live",
        Retention => "retention",
        Relay => "relay",
        Intake => "intake",
    }
}

label_values! {
    /// Why an event segment was deleted.
    DeleteReason {
        /// Its newest event was older than `file.retention`.
        Retention => "retention",
        /// The segments took more than `file.max_bytes`.
        Budget => "budget",
    }
}

label_values! {
    /// Why the relay let a client go (or never took it).
    RelayDrop {
        /// It fell `web.relay_buffer_events` behind: it reads more slowly than events arrive.
        Slow => "slow",
        /// `web.relay_max_clients` were connected already (503).
        Full => "full",
        /// Its resume point could not be read from the bus.
        Bus => "bus",
        /// The server is shutting down.
        Shutdown => "shutdown",
    }
}

label_values! {
    /// The statuses the intake answers.
    IntakeStatus {
        Created => "201",
        MultiStatus => "207",
        BadRequest => "400",
        Unauthorized => "401",
        TooLarge => "413",
        Unavailable => "503",
    }
}

label_values! {
    /// What became of one event posted to the intake.
    IntakeOutcome {
        /// Published to the bus.
        Accepted => "accepted",
        /// Already on the bus (its meta.id was delivered before): accepted, not published again.
        Repeat => "repeat",
        /// Refused: it does not match its schema, or is not an event.
        Invalid => "invalid",
        /// Valid, but the bus did not take it.
        Failed => "failed",
    }
}

label_values! {
    /// How a connection to upstream ended, or why an attempt failed.
    Disconnect {
        Closed => "closed",
        Stalled => "stalled",
        Broken => "broken",
        Throttled => "throttled",
        Status => "status",
        Transport => "transport",
    }
}

label_values! {
    /// Hostile or broken upstream behaviour the ingester defused: label `kind` of
    /// `pleiades_recv_anomalies_total`.
    Anomaly {
        /// An `id:` longer than `ingest::sse::MAX_ID_BYTES`, ignored.
        LongId => "long_id",
        /// A `Retry-After` or `retry:` longer than `ingest.max_retry_after`, cut to it.
        RetryClamped => "retry_clamped",
        /// Bytes kept arriving but completed no event or heartbeat within the stall timeout.
        SlowStream => "slow_stream",
    }
}

label_values! {
    /// The HTTP listeners: label `listener` of the connection metrics.
    Listener {
        Web => "web",
        Metrics => "metrics",
        Intake => "intake",
    }
}

label_values! {
    /// The readiness checks: label `check` of `pleiades_ready_check_failures_total`.
    ReadyCheck {
        Store => "store",
        EventFiles => "event_files",
        Kafka => "kafka",
        BusWrites => "bus_writes",
        Retention => "retention",
    }
}

label_values! {
    /// The role that quarantined an event.
    QuarantineRole {
        Ingest => "ingest",
        Aggregate => "aggregate",
    }
}

label_values! {
    /// Events read from the bus and deliberately not counted.
    Skip {
        Canary => "canary",
    }
}

label_values! {
    /// Consumer-group changes seen by the Kafka aggregators.
    RebalanceKind {
        Assign => "assign",
        Revoke => "revoke",
    }
}

label_values! {
    /// Store reads, by what they read.
    StoreRead {
        Position => "position",
        Days => "days",
        Day => "day",
        Range => "range",
        AllTime => "all_time",
        Hours => "hours",
        Editors => "editors",
        Top => "top",
        Coverage => "coverage",
    }
}

label_values! {
    /// The `path` label of web requests: fixed routes as they are, `/api/stats/{day}` folded,
    /// anything else `other`, so that labels cannot grow without bound.
    Route {
        Root => "/",
        AppJs => "/app.js",
        StyleCss => "/style.css",
        IndexHtml => "/index.html",
        Days => "/api/days",
        Today => "/api/stats",
        Day => "/api/stats/{day}",
        Totals => "/api/totals",
        Range => "/api/range",
        Live => "/api/live",
        Hours => "/api/hours/{day}",
        Top => "/api/top/{day}",
        Editors => "/api/editors/{day}",
        Coverage => "/api/coverage",
        Relay => "/v2/stream/recentchange",
        Healthz => "/healthz",
        Readyz => "/readyz",
        Other => "other",
    }
}

impl Route {
    /// The route a request path belongs to.
    pub fn of(path: &str) -> Route {
        if let Some(route) = Route::ALL
            .iter()
            .find(|r| !r.as_str().contains('{') && r.as_str() == path)
        {
            return *route;
        }
        if path.starts_with("/api/stats/") {
            return Route::Day;
        }
        for (prefix, route) in [
            ("/api/hours/", Route::Hours),
            ("/api/top/", Route::Top),
            ("/api/editors/", Route::Editors),
        ] {
            if path.starts_with(prefix) {
                return route;
            }
        }
        Route::Other
    }
}

/// The registry and a handle per role.
pub struct Metrics {
    registry: Registry,
    pub ingest: IngestMetrics,
    pub file_bus: FileBusMetrics,
    pub aggregate: AggregateMetrics,
    pub kafka: KafkaMetrics,
    pub web: WebMetrics,
    pub relay: RelayMetrics,
    pub intake: IntakeMetrics,
    pub store: StoreMetrics,
    pub supervisor: SupervisorMetrics,
    pub http: HttpMetrics,
    pub retention: RetentionMetrics,
}

/// Metrics of the HTTP listeners (`web.listen`, `metrics.listen`) and the readiness checks.
#[derive(Clone)]
pub struct HttpMetrics {
    /// `pleiades_http_open_connections{listener}`.
    pub open: LabelledGauge<Listener>,
    /// `pleiades_http_shed_connections_total{listener}`: idle connections closed to make room
    /// at the listener's connection limit.
    pub shed: LabelledCounter<Listener>,
    /// `pleiades_http_header_timeouts_total{listener}`: connections closed because no request
    /// headers arrived within the listener's header timeout.
    pub header_timeouts: LabelledCounter<Listener>,
    /// `pleiades_ready_check_failures_total{check}`: readiness checks that failed (the reason
    /// is logged; the public `/readyz` does not show it).
    pub ready_failures: LabelledCounter<ReadyCheck>,
}

/// The handles one listener counts into.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub open: IntGauge,
    pub shed: IntCounter,
    pub header_timeouts: IntCounter,
}

impl HttpMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(HttpMetrics {
            open: LabelledGauge::register(
                r,
                Opts::new(
                    "pleiades_http_open_connections",
                    "Connections open on each HTTP listener",
                ),
                "listener",
            )?,
            shed: LabelledCounter::register(
                r,
                "pleiades_http_shed_connections_total",
                "Idle connections closed to make room at the listener's connection limit",
                "listener",
            )?,
            header_timeouts: LabelledCounter::register(
                r,
                "pleiades_http_header_timeouts_total",
                "Connections closed because no request headers arrived within the header timeout",
                "listener",
            )?,
            ready_failures: LabelledCounter::register(
                r,
                "pleiades_ready_check_failures_total",
                "Readiness checks that failed, by check",
                "check",
            )?,
        })
    }

    /// The handles of one listener.
    pub fn listener(&self, listener: Listener) -> ListenerMetrics {
        ListenerMetrics {
            open: self.open.series(listener),
            shed: self.shed.series(listener),
            header_timeouts: self.header_timeouts.series(listener),
        }
    }
}

/// Metrics of retention on the event-file bus: what is on disk and what was deleted.
#[derive(Clone)]
pub struct RetentionMetrics {
    /// `pleiades_file_bus_bytes`: bytes the segment files take on disk.
    pub bus_bytes: IntGauge,
    pub segments: IntGauge,
    /// `pleiades_file_oldest_event_timestamp_seconds`: meta.dt of the oldest event kept.
    pub oldest_event: Gauge,
    pub deleted: LabelledCounter<DeleteReason>,
    pub deleted_bytes: IntCounter,
    /// `pleiades_file_retention_blocked_bytes`: bytes that should be deleted but are not counted.
    pub blocked_bytes: IntGauge,
    pub blocked_segments: IntGauge,
}

/// Metrics of the relay (`/v2/stream/recentchange` on the web role).
#[derive(Clone)]
pub struct RelayMetrics {
    /// `pleiades_relay_clients`: connected clients.
    pub clients: IntGauge,
    pub connections: IntCounter,
    pub dropped: LabelledCounter<RelayDrop>,
    pub events_sent: IntCounter,
    pub bytes_sent: IntCounter,
    /// Events the relay's one reader took from the bus.
    pub bus_events: IntCounter,
    /// Clients reading the bus on their own to catch up from an old resume point.
    pub catching_up: IntGauge,
}

/// Metrics of the intake (`POST /v1/events`).
#[derive(Clone)]
pub struct IntakeMetrics {
    pub requests: LabelledCounter<IntakeStatus>,
    pub events: LabelledCounter<IntakeOutcome>,
    pub schema_failures: LabelledCounter<Rule>,
}

/// Metrics of the counter store, whoever uses it.
#[derive(Clone)]
pub struct StoreMetrics {
    /// `pleiades_store_reads_total{query}`: reads of the store, by what they read.
    pub reads: LabelledCounter<StoreRead>,
    /// `pleiades_redis_master_info{address}`: 1 for the Redis server the store talks to (with
    /// Sentinel, the master; with Cluster, the master of the pleiades slot). The address is not
    /// known in advance, so there is no series before the first connection.
    pub master: IntGaugeVec,
    /// `pleiades_redis_failovers_total`: times the store found the master at another address
    /// than before (a failover, or a moved cluster slot).
    pub failovers: IntCounter,
    /// `pleiades_redis_reconnects_total`: connections to Redis made after the first; each
    /// begins a new epoch, after which aggregators read their positions again.
    pub reconnects: IntCounter,
    /// `pleiades_store_reopens_total`: the embedded store reopened after an I/O error.
    pub reopens: IntCounter,
}

/// Metrics of the web role.
#[derive(Clone)]
pub struct WebMetrics {
    /// `pleiades_web_http_response_total{path,status}`.
    pub responses: IntCounterVec,
    /// `pleiades_web_http_duration_seconds{path}`.
    pub duration: HistogramVec,
    /// `pleiades_web_counter_marshal_duration_seconds`: turning counters into a JSON body.
    pub marshal: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub live_clients: IntGauge,
    /// `pleiades_web_live_refused_total`: `/api/live` requests refused at `web.live_max_clients`.
    pub live_refused: IntCounter,
}

/// Metrics of the aggregators and the store.
#[derive(Clone)]
pub struct AggregateMetrics {
    /// `pleiades_aggregator_event_count_total`: events counted into the store.
    pub events: IntCounter,
    /// `pleiades_aggregator_message_lag_milliseconds`: age of events (now minus meta.dt) when counted.
    pub lag_ms: Histogram,
    pub skipped: LabelledCounter<Skip>,
    /// `pleiades_quarantined_events_total{role="aggregate", reason}`, shared with ingest.
    pub quarantined: IntCounterVec,
    pub batch_events: Histogram,
    pub apply_seconds: Histogram,
    pub stale_batches: IntCounter,
    /// `pleiades_aggregator_rewound_batches_total`: refused batches whose source the store had
    /// at an earlier position than the batch's start. Positions only move forward, so this
    /// means the store lost writes it had acknowledged (a Redis failover or restart): the
    /// events from the stored position on are read and counted again.
    pub rewound_batches: IntCounter,
    pub store_errors: IntCounter,
    pub position_bytes: IntGauge,
    /// `pleiades_aggregator_caught_up_timestamp_seconds{worker}`: when the worker's latest pass
    /// that counted everything on the bus began. Everything written before it is counted.
    pub caught_up: GaugeVec,
}

/// Metrics of the ingester: what arrived from upstream and what became of it.
#[derive(Clone)]
pub struct IngestMetrics {
    /// `pleiades_recv_events_total`: events parsed from upstream.
    pub events: IntCounter,
    /// `pleiades_recv_event_lines_total`: raw lines read from upstream.
    pub lines: IntCounter,
    /// `pleiades_recv_errors_total`: connection, HTTP and stream errors.
    pub errors: IntCounter,
    pub canaries: IntCounter,
    pub duplicates: IntCounter,
    pub oversize: IntCounter,
    pub quarantined: IntCounterVec,
    pub connects: IntCounter,
    pub disconnects: LabelledCounter<Disconnect>,
    pub connected: IntGauge,
    pub bytes: IntCounter,
    /// `pleiades_recv_anomalies_total{kind}`: hostile or broken upstream behaviour defused.
    pub anomalies: LabelledCounter<Anomaly>,
    pub last_event_time: Arc<AtomicI64>,
    pub last_event_timestamp: Gauge,
    pub dedupe_window: IntGauge,
    /// `pleiades_ingest_write_blocked`: 1 while the bus refuses writes and reading is paused.
    pub write_blocked: IntGauge,
    pub write_pauses: IntCounter,
    /// `pleiades_recv_validated_events_total{schema}`: events checked against their JSON Schema.
    pub validated: LabelledCounter<SchemaVersion>,
    /// `pleiades_recv_schema_failures_total{rule}`: events that broke a rule of their schema.
    pub schema_failures: LabelledCounter<Rule>,
    /// `pleiades_upstream_missed_events_total`: offsets upstream skipped within a
    /// topic-partition while this process read it.
    pub missed: IntCounter,
}

/// Metrics of the event-file bus.
#[derive(Clone)]
pub struct FileBusMetrics {
    /// `pleiades_file_publish_events_total`: events written to segment files.
    pub events: IntCounter,
    /// `pleiades_file_publish_errors_total`: failed writes (each retried until it succeeds).
    pub errors: IntCounter,
    pub bytes: IntCounter,
    pub fsync_seconds: Histogram,
    pub segments: IntCounter,
    pub quarantine_bytes: IntCounter,
    pub compressed_segments: IntCounter,
    pub compressed_content_bytes: IntCounter,
    pub compressed_bytes: IntCounter,
}

/// Metrics of the Kafka bus: the publisher in the ingester, the consumers in the aggregators.
#[derive(Clone)]
pub struct KafkaMetrics {
    /// `pleiades_kafka_publish_events_total`: events the brokers acknowledged.
    pub events: IntCounter,
    /// `pleiades_kafka_publish_writes_total`: messages handed to the producer (events and
    /// quarantine records).
    pub writes: IntCounter,
    /// `pleiades_kafka_writer_errors_total`: messages refused or not acknowledged.
    pub errors: IntCounter,
    /// `pleiades_kafka_publish_write_time_seconds`: from handing a message over to its
    /// acknowledgement.
    pub write_seconds: Histogram,
    /// `pleiades_kafka_publish_wait_time_seconds`: time reading paused for room in the buffer.
    pub wait_seconds: Histogram,
    /// `pleiades_kafka_publish_lag_milliseconds`: age of events (now minus meta.dt) when
    /// acknowledged.
    pub lag_ms: Histogram,
    pub buffered: IntGauge,
    pub buffer_limit: IntGauge,
    /// `pleiades_kafka_consumer_lag_messages{partition}`: messages behind the partition's end,
    /// for the partitions this host's aggregators own.
    pub consumer_lag: IntGaugeVec,
    pub assigned: IntGaugeVec,
    pub rebalances: LabelledCounter<RebalanceKind>,
    pub seeks: IntCounter,
    pub retention_gap: IntCounter,
}

/// Metrics of the actor supervisor.
#[derive(Clone)]
pub struct SupervisorMetrics {
    /// `pleiades_goroutine_restarts{component}`: restarts of each kind of actor after a failure.
    pub restarts: LabelledCounter<Component>,
}

impl Metrics {
    /// Builds and registers every role's metrics. `workers` is `aggregate.workers`: the
    /// per-worker series exist from the start for each of them.
    pub fn new(workers: usize) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let r = &registry;
        // Shared by the two roles that quarantine, so registered once.
        let quarantined = counter_vec(
            r,
            "pleiades_quarantined_events_total",
            "Invalid events written to quarantine, by role and reason",
            &["role", "reason"],
        )?;
        for role in QuarantineRole::ALL {
            for reason in RejectReason::ALL {
                quarantined.with_label_values(&[role.as_str(), reason.as_str()]);
            }
        }
        let metrics = Metrics {
            ingest: IngestMetrics::register(r, quarantined.clone())?,
            file_bus: FileBusMetrics::register(r)?,
            aggregate: AggregateMetrics::register(r, quarantined, workers)?,
            kafka: KafkaMetrics::register(r, workers)?,
            web: WebMetrics::register(r)?,
            relay: RelayMetrics::register(r)?,
            intake: IntakeMetrics::register(r)?,
            store: StoreMetrics::register(r)?,
            supervisor: SupervisorMetrics::register(r)?,
            http: HttpMetrics::register(r)?,
            retention: RetentionMetrics::register(r)?,
            registry,
        };
        register_build_info(&metrics.registry)?;
        Ok(metrics)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on metric families that cannot exist here.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl IngestMetrics {
    fn register(r: &Registry, quarantined: IntCounterVec) -> Result<Self, prometheus::Error> {
        let last_event_time = Arc::new(AtomicI64::new(0));
        let m = IngestMetrics {
            events: counter(r, "pleiades_recv_events_total", "Total number of parsed events received from upstream")?,
            lines: counter(r, "pleiades_recv_event_lines_total", "Total number of raw lines read from upstream, regardless of whether they become part of an event object")?,
            errors: counter(r, "pleiades_recv_errors_total", "Total number of errors encountered by the consumer")?,
            canaries: counter(r, "pleiades_recv_canary_events_total", "Canary (liveness heartbeat) events received from upstream; never counted")?,
            duplicates: counter(r, "pleiades_recv_duplicate_events_total", "Events dropped because their meta.id was already delivered")?,
            oversize: counter(r, "pleiades_recv_oversize_events_total", "Events dropped because a line or the data exceeded ingest.max_event_bytes")?,
            quarantined,
            connects: counter(r, "pleiades_ingest_connects_total", "Connections opened to upstream that answered 200")?,
            disconnects: LabelledCounter::register(r, "pleiades_ingest_disconnects_total", "Connection attempts or connections that ended, by reason", "reason")?,
            connected: gauge(r, "pleiades_ingest_connected", "1 while a stream from upstream is open, else 0")?,
            bytes: counter(r, "pleiades_recv_bytes_total", "Bytes received from upstream")?,
            anomalies: LabelledCounter::register(r, "pleiades_recv_anomalies_total", "Hostile or broken upstream behaviour the ingester defused, by kind", "kind")?,
            last_event_timestamp: float_gauge(r, "pleiades_ingest_last_event_timestamp_seconds", "meta.dt of the newest event delivered to the bus, in seconds since the epoch")?,
            last_event_time: last_event_time.clone(),
            dedupe_window: gauge(r, "pleiades_ingest_dedupe_window_ids", "meta.ids currently remembered to drop repeats")?,
            write_blocked: gauge(r, "pleiades_ingest_write_blocked", "1 while the bus refuses writes (a full or failing disk) and reading from upstream is paused")?,
            write_pauses: counter(r, "pleiades_ingest_write_pauses_total", "Times reading from upstream paused because the bus refused writes")?,
            validated: LabelledCounter::register(r, "pleiades_recv_validated_events_total", "Events checked against the JSON Schema their $schema names, by the version checked (legacy: the 2018 format)", "schema")?,
            schema_failures: LabelledCounter::register(r, "pleiades_recv_schema_failures_total", "Events that did not match their JSON Schema, by the first rule broken", "rule")?,
            missed: counter(r, "pleiades_upstream_missed_events_total", "Upstream events never received: holes in meta.offset within a topic-partition, seen by this process")?,
        };
        r.register(Box::new(EventAge::new(last_event_time)?))?;
        Ok(m)
    }

    /// Counts an event the ingester quarantined.
    pub fn quarantined(&self, reason: RejectReason) {
        self.quarantined
            .with_label_values(&[QuarantineRole::Ingest.as_str(), reason.as_str()])
            .inc();
    }
}

impl FileBusMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(FileBusMetrics {
            events: counter(
                r,
                "pleiades_file_publish_events_total",
                "Total number of events written to file by the filesystem publisher",
            )?,
            errors: counter(
                r,
                "pleiades_file_publish_errors_total",
                "Total number of errors encountered while writing event files",
            )?,
            bytes: counter(
                r,
                "pleiades_file_publish_bytes_total",
                "Bytes appended to event segment files",
            )?,
            fsync_seconds: histogram(
                r,
                "pleiades_file_publish_fsync_seconds",
                "Time taken to sync event files to disk",
                prometheus::exponential_buckets(0.0001, 4.0, 9)?,
            )?,
            segments: counter(
                r,
                "pleiades_file_publish_segments_total",
                "Segment files opened for writing",
            )?,
            quarantine_bytes: counter(
                r,
                "pleiades_file_quarantine_bytes_total",
                "Bytes appended to the quarantine file",
            )?,
            compressed_segments: counter(
                r,
                "pleiades_file_compressed_segments_total",
                "Closed event segments compressed",
            )?,
            compressed_content_bytes: counter(
                r,
                "pleiades_file_compressed_content_bytes_total",
                "Bytes of content in the segments compressed",
            )?,
            compressed_bytes: counter(
                r,
                "pleiades_file_compressed_bytes_total",
                "Bytes the compressed segments take on disk",
            )?,
        })
    }
}

impl RetentionMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(RetentionMetrics {
            bus_bytes: gauge(r, "pleiades_file_bus_bytes", "Bytes the event segment files take on disk")?,
            segments: gauge(r, "pleiades_file_bus_segments", "Event segment files on disk")?,
            oldest_event: float_gauge(r, "pleiades_file_oldest_event_timestamp_seconds", "meta.dt of the oldest event the segments keep, in seconds since the epoch")?,
            deleted: LabelledCounter::register(r, "pleiades_file_segments_deleted_total", "Counted event segments deleted, by reason (retention, budget)", "reason")?,
            deleted_bytes: counter(r, "pleiades_file_deleted_bytes_total", "Bytes of event segments deleted")?,
            blocked_bytes: gauge(r, "pleiades_file_retention_blocked_bytes", "Bytes of segments past file.retention or over file.max_bytes that are kept because they are not counted yet")?,
            blocked_segments: gauge(r, "pleiades_file_retention_blocked_segments", "Segments past file.retention or over file.max_bytes that are kept because they are not counted yet")?,
        })
    }
}

impl AggregateMetrics {
    fn register(
        r: &Registry,
        quarantined: IntCounterVec,
        workers: usize,
    ) -> Result<Self, prometheus::Error> {
        let m = AggregateMetrics {
            events: counter(r, "pleiades_aggregator_event_count_total", "Total number of events aggregated")?,
            lag_ms: histogram(r, "pleiades_aggregator_message_lag_milliseconds", "Age of events at aggregation (now minus meta.dt), in milliseconds", prometheus::exponential_buckets(10.0, 4.0, 12)?)?,
            skipped: LabelledCounter::register(r, "pleiades_aggregator_skipped_events_total", "Events read from the bus and deliberately not counted, by reason", "reason")?,
            quarantined,
            batch_events: histogram(r, "pleiades_aggregator_batch_events", "Bus lines covered by one store batch", prometheus::exponential_buckets(1.0, 4.0, 9)?)?,
            apply_seconds: histogram(r, "pleiades_store_apply_duration_seconds", "Time to apply one batch to the store", prometheus::exponential_buckets(0.0001, 4.0, 10)?)?,
            stale_batches: counter(r, "pleiades_aggregator_stale_batches_total", "Batches the store refused because their source had moved on (replays after a crash, stale owners)")?,
            rewound_batches: counter(r, "pleiades_aggregator_rewound_batches_total", "Refused batches whose source the store had at an earlier position than their start: the store lost acknowledged writes (a Redis failover or restart), and the events are counted again from there")?,
            store_errors: counter(r, "pleiades_store_errors_total", "Failed store operations")?,
            position_bytes: gauge(r, "pleiades_aggregator_bus_position_bytes", "Byte position reached in the newest event segment")?,
            caught_up: registered(r, GaugeVec::new(Opts::new("pleiades_aggregator_caught_up_timestamp_seconds", "Start time of the worker's latest pass that counted every complete line on the bus; everything written before it is counted"), &["worker"]))?,
        };
        for worker in 0..workers {
            m.caught_up.with_label_values(&[&worker.to_string()]);
        }
        Ok(m)
    }

    /// Counts an event the aggregators quarantined.
    pub fn quarantined(&self, reason: RejectReason) {
        self.quarantined
            .with_label_values(&[QuarantineRole::Aggregate.as_str(), reason.as_str()])
            .inc();
    }
}

impl KafkaMetrics {
    fn register(r: &Registry, workers: usize) -> Result<Self, prometheus::Error> {
        let m = KafkaMetrics {
            events: counter(r, "pleiades_kafka_publish_events_total", "Total number of events published to Kafka and acknowledged by the brokers")?,
            writes: counter(r, "pleiades_kafka_publish_writes_total", "Total number of messages handed to the Kafka producer")?,
            errors: counter(r, "pleiades_kafka_writer_errors_total", "Total number of messages the Kafka producer could not queue or the brokers did not acknowledge")?,
            write_seconds: histogram(r, "pleiades_kafka_publish_write_time_seconds", "Time from handing a message to the Kafka producer to its acknowledgement", prometheus::exponential_buckets(0.0005, 4.0, 10)?)?,
            wait_seconds: histogram(r, "pleiades_kafka_publish_wait_time_seconds", "Time reading from upstream paused waiting for room in the Kafka buffer", prometheus::exponential_buckets(0.0005, 4.0, 10)?)?,
            lag_ms: histogram(r, "pleiades_kafka_publish_lag_milliseconds", "Age of events (now minus meta.dt) when Kafka acknowledged them, in milliseconds", prometheus::exponential_buckets(10.0, 4.0, 12)?)?,
            buffered: gauge(r, "pleiades_kafka_buffered_bytes", "Event bytes handed to the Kafka producer and not yet acknowledged")?,
            buffer_limit: gauge(r, "pleiades_kafka_buffer_limit_bytes", "kafka.buffer_bytes: the most event bytes held waiting for the brokers")?,
            consumer_lag: registered(r, IntGaugeVec::new(Opts::new("pleiades_kafka_consumer_lag_messages", "Messages between an aggregator's position and the end of its partition"), &["partition"]))?,
            assigned: registered(r, IntGaugeVec::new(Opts::new("pleiades_kafka_assigned_partitions", "Partitions assigned to each aggregator worker of this host"), &["worker"]))?,
            rebalances: LabelledCounter::register(r, "pleiades_kafka_rebalances_total", "Partition assignments and revocations seen by this host's aggregators", "kind")?,
            seeks: counter(r, "pleiades_kafka_seeks_total", "Times an aggregator moved a partition to the position recorded in the store")?,
            retention_gap: counter(r, "pleiades_kafka_retention_gap_messages_total", "Messages deleted by topic retention before any aggregator counted them")?,
        };
        for worker in 0..workers {
            m.assigned.with_label_values(&[&worker.to_string()]);
        }
        Ok(m)
    }
}

impl WebMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let m = WebMetrics {
            responses: counter_vec(
                r,
                "pleiades_web_http_response_total",
                "Total number of HTTP responses by path and status code",
                &["path", "status"],
            )?,
            duration: registered(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pleiades_web_http_duration_seconds",
                        "Time taken to generate responses, by path",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 3.0, 12)?),
                    &["path"],
                ),
            )?,
            marshal: histogram(
                r,
                "pleiades_web_counter_marshal_duration_seconds",
                "Time taken to marshal JSON for response bodies",
                prometheus::exponential_buckets(0.00001, 3.0, 12)?,
            )?,
            cache_hits: counter(
                r,
                "pleiades_web_cache_hits_total",
                "Counter responses served from the in-memory cache",
            )?,
            cache_misses: counter(
                r,
                "pleiades_web_cache_misses_total",
                "Counter responses built from the store",
            )?,
            live_clients: gauge(
                r,
                "pleiades_web_live_clients",
                "Open live-update (server-sent events) connections",
            )?,
            live_refused: counter(
                r,
                "pleiades_web_live_refused_total",
                "Live-update requests refused because web.live_max_clients streams were open",
            )?,
        };
        for route in Route::ALL {
            m.duration.with_label_values(&[route.as_str()]);
        }
        Ok(m)
    }

    /// Counts one response.
    pub fn responded(&self, route: Route, status: u16, seconds: f64) {
        self.responses
            .with_label_values(&[route.as_str(), &status.to_string()])
            .inc();
        self.duration
            .with_label_values(&[route.as_str()])
            .observe(seconds);
    }
}

impl RelayMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(RelayMetrics {
            clients: gauge(
                r,
                "pleiades_relay_clients",
                "Clients connected to the relay",
            )?,
            connections: counter(
                r,
                "pleiades_relay_connections_total",
                "Relay connections accepted",
            )?,
            dropped: LabelledCounter::register(
                r,
                "pleiades_relay_clients_dropped_total",
                "Relay clients disconnected or refused by the server, by reason",
                "reason",
            )?,
            events_sent: counter(
                r,
                "pleiades_relay_events_sent_total",
                "Events sent to relay clients (one per client that received it)",
            )?,
            bytes_sent: counter(
                r,
                "pleiades_relay_sent_bytes_total",
                "Bytes of server-sent events written to relay clients",
            )?,
            bus_events: counter(
                r,
                "pleiades_relay_bus_events_total",
                "Events the relay's reader took from the bus",
            )?,
            catching_up: gauge(
                r,
                "pleiades_relay_catching_up_clients",
                "Relay clients reading the bus on their own to catch up from an old resume point",
            )?,
        })
    }
}

impl IntakeMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(IntakeMetrics {
            requests: LabelledCounter::register(
                r,
                "pleiades_intake_requests_total",
                "Requests to POST /v1/events, by the status answered",
                "status",
            )?,
            events: LabelledCounter::register(
                r,
                "pleiades_intake_events_total",
                "Events posted to the intake, by outcome",
                "outcome",
            )?,
            schema_failures: LabelledCounter::register(
                r,
                "pleiades_intake_schema_failures_total",
                "Posted events that did not match their JSON Schema, by the first rule broken",
                "rule",
            )?,
        })
    }
}

impl StoreMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(StoreMetrics {
            reads: LabelledCounter::register(
                r,
                "pleiades_store_reads_total",
                "Reads of the counter store, by what they read",
                "query",
            )?,
            master: registered(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "pleiades_redis_master_info",
                        "Always 1; the label is the address of the Redis server the store writes to (the master, with Sentinel or Cluster)",
                    ),
                    &["address"],
                ),
            )?,
            failovers: counter(
                r,
                "pleiades_redis_failovers_total",
                "Times the store found the Redis master at another address than before: a failover, or a moved cluster slot",
            )?,
            reconnects: counter(
                r,
                "pleiades_redis_reconnects_total",
                "Connections to Redis made after the first; aggregators read their positions again after each",
            )?,
            reopens: counter(
                r,
                "pleiades_store_reopens_total",
                "Times the embedded store was reopened after an I/O error latched it",
            )?,
        })
    }
}

impl SupervisorMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        Ok(SupervisorMetrics {
            restarts: LabelledCounter::register(
                r,
                "pleiades_goroutine_restarts",
                "Total numbers of restarts of component actors after a failure",
                "component",
            )?,
        })
    }
}

fn register_build_info(r: &Registry) -> Result<(), prometheus::Error> {
    let build_info = IntGaugeVec::new(
        Opts::new(
            "pleiades_build_info",
            "Always 1; labels carry the version, commit, compiler and target of this binary",
        ),
        &["version", "commit", "rustc", "target"],
    )?;
    build_info
        .with_label_values(&[
            crate::build::VERSION,
            crate::build::COMMIT,
            crate::build::RUSTC,
            crate::build::TARGET,
        ])
        .set(1);
    r.register(Box::new(build_info))
}

/// Registers a metric just built, and returns it.
fn registered<T: Collector + Clone + 'static>(
    r: &Registry,
    metric: Result<T, prometheus::Error>,
) -> Result<T, prometheus::Error> {
    let metric = metric?;
    r.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    registered(r, IntCounter::with_opts(Opts::new(name, help)))
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    registered(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    registered(r, IntGauge::with_opts(Opts::new(name, help)))
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> Result<Gauge, prometheus::Error> {
    registered(r, Gauge::with_opts(Opts::new(name, help)))
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    registered(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
    )
}

/// `pleiades_ingest_last_event_age_seconds`, computed when scraped so that it keeps growing while
/// nothing arrives (a stored gauge would freeze at its last value exactly when it matters).
struct EventAge {
    last_ms: Arc<AtomicI64>,
    gauge: Gauge,
}

impl EventAge {
    fn new(last_ms: Arc<AtomicI64>) -> Result<Self, prometheus::Error> {
        let gauge = Gauge::with_opts(Opts::new(
            "pleiades_ingest_last_event_age_seconds",
            "Age (now minus meta.dt, never negative) of the newest event delivered to the bus; 0 before the first",
        ))?;
        Ok(EventAge { last_ms, gauge })
    }
}

impl Collector for EventAge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let age = if last == 0 {
            0.0
        } else {
            (chrono::Utc::now().timestamp_millis().saturating_sub(last)).max(0) as f64 / 1000.0
        };
        self.gauge.set(age);
        self.gauge.collect()
    }
}

impl IngestMetrics {
    /// Records the event time of the newest event delivered to the bus. The caller passes a
    /// time no later than its clock, so that an event from the (tolerated) future cannot make
    /// the age negative, which would keep the upstream-stalled alert from ever firing.
    pub fn delivered_event_time(&self, time_ms: i64) {
        let newest = self
            .last_event_time
            .fetch_max(time_ms, Ordering::Relaxed)
            .max(time_ms);
        self.last_event_timestamp.set(newest as f64 / 1000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_spec_names() {
        let m = Metrics::new(2).unwrap();
        m.supervisor.restarts.inc(Component::Ingest);
        m.ingest.delivered_event_time(1_000_000);
        let text = m.render();
        for name in [
            "pleiades_recv_events_total",
            "pleiades_recv_event_lines_total",
            "pleiades_recv_errors_total",
            "pleiades_goroutine_restarts{component=\"ingest\"} 1",
            "pleiades_file_publish_events_total",
            "pleiades_file_publish_errors_total",
            "pleiades_ingest_last_event_age_seconds",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn every_labelled_series_exists_from_the_first_scrape() {
        let text = Metrics::new(2).unwrap().render();
        for series in [
            "pleiades_quarantined_events_total{reason=\"too_large\",role=\"ingest\"} 0",
            "pleiades_quarantined_events_total{reason=\"bad_record\",role=\"aggregate\"} 0",
            "pleiades_kafka_assigned_partitions{worker=\"1\"} 0",
            "pleiades_aggregator_caught_up_timestamp_seconds{worker=\"0\"} 0",
            "pleiades_web_http_duration_seconds_count{path=\"/api/stats/{day}\"} 0",
            "pleiades_goroutine_restarts{component=\"live\"} 0",
            "pleiades_ingest_disconnects_total{reason=\"stalled\"} 0",
            "pleiades_store_reads_total{query=\"range\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn routes_fold_days_and_unknown_paths() {
        assert_eq!(Route::of("/api/stats"), Route::Today);
        assert_eq!(Route::of("/api/stats/19337"), Route::Day);
        assert_eq!(Route::of("/api/stats/{day}"), Route::Day);
        assert_eq!(Route::of("/wp-admin"), Route::Other);
        assert_eq!(Route::of("/"), Route::Root);
        assert_eq!(Route::of("/api/hours/19337"), Route::Hours);
        assert_eq!(Route::of("/api/top/19337"), Route::Top);
        assert_eq!(Route::of("/api/editors/x"), Route::Editors);
        assert_eq!(Route::of("/api/hours"), Route::Other);
    }
}
