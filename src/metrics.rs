//! Every Prometheus metric Pleiades exports, in one registry that is passed in, never global.
//!
//! Each role gets a typed handle; no other module defines a metric. Names of SPEC §7 keep their
//! original meaning; new ones follow Prometheus conventions.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
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

/// The reasons `event::Invalid::reason` gives, for label values known in advance.
const INVALID_REASONS: [&str; 5] = ["not_json", "not_object", "bad_meta", "missing_dt", "bad_dt"];

/// The registry and a handle per role.
pub struct Metrics {
    registry: Registry,
    pub ingest: IngestMetrics,
    pub file_bus: FileBusMetrics,
    pub aggregate: AggregateMetrics,
    pub kafka: KafkaMetrics,
    pub web: WebMetrics,
    pub supervisor: SupervisorMetrics,
}

/// Metrics of the web role.
#[derive(Clone)]
pub struct WebMetrics {
    /// `pleiades_web_http_response_total{path,status}`.
    pub responses: IntCounterVec,
    /// `pleiades_web_http_duration_seconds{path}`.
    pub duration: prometheus::HistogramVec,
    /// `pleiades_web_counter_marshal_duration_seconds`: turning counters into a JSON body.
    pub marshal: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub live_clients: IntGauge,
}

/// Metrics of the aggregators and the store.
#[derive(Clone)]
pub struct AggregateMetrics {
    /// `pleiades_aggregator_event_count_total`: events counted into the store.
    pub events: IntCounter,
    /// `pleiades_aggregator_message_lag_milliseconds`: age of events (now minus meta.dt) when counted.
    pub lag_ms: Histogram,
    pub skipped: IntCounterVec,
    /// `pleiades_quarantined_events_total{role="aggregate", reason}`, shared with ingest.
    pub quarantined: IntCounterVec,
    pub batch_events: Histogram,
    pub apply_seconds: Histogram,
    pub stale_batches: IntCounter,
    pub store_errors: IntCounter,
    pub position_bytes: IntGauge,
    /// `pleiades_aggregator_caught_up_timestamp_seconds{worker}`: when the worker's latest pass
    /// that counted everything on the bus began. Everything written before it is counted.
    pub caught_up: prometheus::GaugeVec,
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
    pub disconnects: IntCounterVec,
    pub connected: IntGauge,
    pub bytes: IntCounter,
    pub last_event_time: Arc<AtomicI64>,
    pub last_event_timestamp: Gauge,
    pub dedupe_window: IntGauge,
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
    pub rebalances: IntCounterVec,
    pub seeks: IntCounter,
    pub retention_gap: IntCounter,
}

/// Metrics of the actor supervisor.
#[derive(Clone)]
pub struct SupervisorMetrics {
    /// `pleiades_goroutine_restarts{component}`: restarts of each kind of actor after a failure.
    pub restarts: IntCounterVec,
}

impl Metrics {
    /// Builds every metric and registers it.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let r = &registry;
        let last_event_time = Arc::new(AtomicI64::new(0));
        let ingest = IngestMetrics {
            events: counter(r, "pleiades_recv_events_total", "Total number of parsed events received from upstream")?,
            lines: counter(r, "pleiades_recv_event_lines_total", "Total number of raw lines read from upstream, regardless of whether they become part of an event object")?,
            errors: counter(r, "pleiades_recv_errors_total", "Total number of errors encountered by the consumer")?,
            canaries: counter(r, "pleiades_recv_canary_events_total", "Canary (liveness heartbeat) events received from upstream; never counted")?,
            duplicates: counter(r, "pleiades_recv_duplicate_events_total", "Events dropped because their meta.id was already delivered")?,
            oversize: counter(r, "pleiades_recv_oversize_events_total", "Events dropped because a line or the data exceeded ingest.max_event_bytes")?,
            quarantined: counter_vec(r, "pleiades_quarantined_events_total", "Invalid events written to quarantine, by role and reason", &["role", "reason"])?,
            connects: counter(r, "pleiades_ingest_connects_total", "Connections opened to upstream that answered 200")?,
            disconnects: counter_vec(r, "pleiades_ingest_disconnects_total", "Connection attempts or connections that ended, by reason", &["reason"])?,
            connected: gauge(r, "pleiades_ingest_connected", "1 while a stream from upstream is open, else 0")?,
            bytes: counter(r, "pleiades_recv_bytes_total", "Bytes received from upstream")?,
            last_event_timestamp: float_gauge(r, "pleiades_ingest_last_event_timestamp_seconds", "meta.dt of the newest event delivered to the bus, in seconds since the epoch")?,
            last_event_time: last_event_time.clone(),
            dedupe_window: gauge(r, "pleiades_ingest_dedupe_window_ids", "meta.ids currently remembered to drop repeats")?,
        };
        r.register(Box::new(EventAge::new(last_event_time)?))?;
        // Series for every known label value exist from the start (at 0), so that dashboards and
        // alerts see "none yet" rather than "no data".
        for reason in [
            "closed",
            "stalled",
            "broken",
            "throttled",
            "status",
            "transport",
        ] {
            ingest.disconnects.with_label_values(&[reason]);
        }
        for reason in INVALID_REASONS {
            ingest.quarantined.with_label_values(&["ingest", reason]);
        }
        let file_bus = FileBusMetrics {
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
        };
        let aggregate = AggregateMetrics {
            events: counter(r, "pleiades_aggregator_event_count_total", "Total number of events aggregated")?,
            lag_ms: histogram(r, "pleiades_aggregator_message_lag_milliseconds", "Age of events at aggregation (now minus meta.dt), in milliseconds", prometheus::exponential_buckets(10.0, 4.0, 12)?)?,
            skipped: counter_vec(r, "pleiades_aggregator_skipped_events_total", "Events read from the bus and deliberately not counted, by reason", &["reason"])?,
            quarantined: ingest.quarantined.clone(),
            batch_events: histogram(r, "pleiades_aggregator_batch_events", "Bus lines covered by one store batch", prometheus::exponential_buckets(1.0, 4.0, 9)?)?,
            apply_seconds: histogram(r, "pleiades_store_apply_duration_seconds", "Time to apply one batch to the store", prometheus::exponential_buckets(0.0001, 4.0, 10)?)?,
            stale_batches: counter(r, "pleiades_aggregator_stale_batches_total", "Batches the store refused because their source had moved on (replays after a crash, stale owners)")?,
            store_errors: counter(r, "pleiades_store_errors_total", "Failed store operations")?,
            position_bytes: gauge(r, "pleiades_aggregator_bus_position_bytes", "Byte position reached in the newest event segment")?,
            caught_up: {
                let g = prometheus::GaugeVec::new(Opts::new("pleiades_aggregator_caught_up_timestamp_seconds", "Start time of the worker's latest pass that counted every complete line on the bus; everything written before it is counted"), &["worker"])?;
                r.register(Box::new(g.clone()))?;
                g
            },
        };
        aggregate.skipped.with_label_values(&["canary"]);
        for reason in INVALID_REASONS.iter().chain(&["bad_record"]) {
            aggregate
                .quarantined
                .with_label_values(&["aggregate", reason]);
        }
        let kafka = KafkaMetrics {
            events: counter(r, "pleiades_kafka_publish_events_total", "Total number of events published to Kafka and acknowledged by the brokers")?,
            writes: counter(r, "pleiades_kafka_publish_writes_total", "Total number of messages handed to the Kafka producer")?,
            errors: counter(r, "pleiades_kafka_writer_errors_total", "Total number of messages the Kafka producer could not queue or the brokers did not acknowledge")?,
            write_seconds: histogram(r, "pleiades_kafka_publish_write_time_seconds", "Time from handing a message to the Kafka producer to its acknowledgement", prometheus::exponential_buckets(0.0005, 4.0, 10)?)?,
            wait_seconds: histogram(r, "pleiades_kafka_publish_wait_time_seconds", "Time reading from upstream paused waiting for room in the Kafka buffer", prometheus::exponential_buckets(0.0005, 4.0, 10)?)?,
            lag_ms: histogram(r, "pleiades_kafka_publish_lag_milliseconds", "Age of events (now minus meta.dt) when Kafka acknowledged them, in milliseconds", prometheus::exponential_buckets(10.0, 4.0, 12)?)?,
            buffered: gauge(r, "pleiades_kafka_buffered_bytes", "Event bytes handed to the Kafka producer and not yet acknowledged")?,
            buffer_limit: gauge(r, "pleiades_kafka_buffer_limit_bytes", "kafka.buffer_bytes: the most event bytes held waiting for the brokers")?,
            consumer_lag: {
                let g = IntGaugeVec::new(Opts::new("pleiades_kafka_consumer_lag_messages", "Messages between an aggregator's position and the end of its partition"), &["partition"])?;
                r.register(Box::new(g.clone()))?;
                g
            },
            assigned: {
                let g = IntGaugeVec::new(Opts::new("pleiades_kafka_assigned_partitions", "Partitions assigned to each aggregator worker of this host"), &["worker"])?;
                r.register(Box::new(g.clone()))?;
                g
            },
            rebalances: counter_vec(r, "pleiades_kafka_rebalances_total", "Partition assignments and revocations seen by this host's aggregators", &["kind"])?,
            seeks: counter(r, "pleiades_kafka_seeks_total", "Times an aggregator moved a partition to the position recorded in the store")?,
            retention_gap: counter(r, "pleiades_kafka_retention_gap_messages_total", "Messages deleted by topic retention before any aggregator counted them")?,
        };
        for kind in ["assign", "revoke"] {
            kafka.rebalances.with_label_values(&[kind]);
        }
        let web = WebMetrics {
            responses: counter_vec(
                r,
                "pleiades_web_http_response_total",
                "Total number of HTTP responses by path and status code",
                &["path", "status"],
            )?,
            duration: {
                let h = prometheus::HistogramVec::new(
                    HistogramOpts::new(
                        "pleiades_web_http_duration_seconds",
                        "Time taken to generate responses, by path",
                    )
                    .buckets(prometheus::exponential_buckets(0.0001, 3.0, 12)?),
                    &["path"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
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
        };
        let build_info = prometheus::IntGaugeVec::new(
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
        r.register(Box::new(build_info))?;
        let supervisor = SupervisorMetrics {
            restarts: counter_vec(
                r,
                "pleiades_goroutine_restarts",
                "Total numbers of restarts of component actors after a failure",
                &["component"],
            )?,
        };
        Ok(Metrics {
            registry,
            ingest,
            file_bus,
            aggregate,
            kafka,
            web,
            supervisor,
        })
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

fn counter(r: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> Result<Gauge, prometheus::Error> {
    let g = Gauge::with_opts(Opts::new(name, help))?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> Result<Histogram, prometheus::Error> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
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
            "Age (now minus meta.dt) of the newest event delivered to the bus; 0 before the first",
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
            (chrono::Utc::now().timestamp_millis() - last) as f64 / 1000.0
        };
        self.gauge.set(age);
        self.gauge.collect()
    }
}

impl IngestMetrics {
    /// Records the event time of the newest event delivered to the bus.
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
        let m = Metrics::new().unwrap();
        m.supervisor.restarts.with_label_values(&["ingest"]).inc();
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
}
