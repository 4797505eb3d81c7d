//! End-to-end throughput on the Kafka bus (replay → ingester → topic → two aggregators → Redis),
//! next to the broker's own ceiling: the same client library producing and consuming the same
//! messages (same size, key and headers) concurrently, in the same run, on a fresh broker each.
//! Needs `nisshi` and `redis-server` (scripts/test installs both); prints figures.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};

const EVENTS: usize = 5_000;
const TOPIC: &str = "pleiades-events";

/// The broker's ceiling: one idempotent producer and one consumer, running at once, moving
/// `events` as Pleiades would publish them. Returns the seconds until the consumer has them all.
async fn ceiling(brokers: &str, events: &[String]) -> f64 {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("admin");
    admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                TOPIC,
                4,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("topic");
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ceiling")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribe");
    // Join the group before timing, as the aggregators do before the pipeline is timed.
    while consumer.assignment().map(|a| a.count()).unwrap_or(0) < 4 {
        let _ = tokio::time::timeout(Duration::from_millis(100), consumer.recv()).await;
    }
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer");
    let sse_id =
        r#"[{"topic":"replay.mediawiki.recentchange","partition":0,"timestamp":1767225600000}]"#;
    let started = Instant::now();
    let total = events.len();
    let reader = async {
        let mut n = 0;
        while n < total {
            if consumer.recv().await.is_ok() {
                n += 1;
            }
        }
    };
    let writer = async {
        let mut deliveries = Vec::with_capacity(total);
        for (i, event) in events.iter().enumerate() {
            let key = format!("synthetic-{i}");
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "sse-id",
                    value: Some(sse_id),
                })
                .insert(Header {
                    key: "pleiades-cursor",
                    value: Some(sse_id),
                });
            let record = FutureRecord::to(TOPIC)
                .key(&key)
                .payload(event)
                .headers(headers);
            deliveries.push(producer.send_result(record).expect("queued"));
        }
        for d in deliveries {
            d.await.expect("delivered").expect("acknowledged");
        }
    };
    tokio::join!(reader, writer);
    started.elapsed().as_secs_f64()
}

/// The pipeline: aggregators joined first, then the ingester started on a replay of `events`;
/// returns the seconds from the ingester's start until Redis has counted every event.
async fn pipeline(
    scope: &mut TestScope,
    brokers: &str,
    redis: &RedisServer,
    file: &std::path::Path,
) -> f64 {
    let upstream = scope.replay(replay_options(vec![file.to_owned()])).await;
    let config = |port: u16, ingest: bool| {
        let mut config = pleiades::config::Config::default();
        config.ingest.enabled = ingest;
        config.ingest.url = format!("http://{}/v2/stream/recentchange", upstream.addr);
        config.ingest.user_agent = "pleiades-bench/1.0".into();
        config.ingest.publisher = pleiades::config::BusKind::Kafka;
        config.kafka.brokers = brokers.to_owned();
        config.kafka.replication_factor = 1;
        config.aggregate.enabled = !ingest;
        config.aggregate.workers = 2;
        config.store.kind = pleiades::config::StoreKind::Redis;
        config.redis.url = redis.url();
        config.web.enabled = false;
        config.metrics.listen = loopback(port);
        config
    };
    let (aggregate_port, ingest_port) = (TestScope::free_port(), TestScope::free_port());
    let aggregate = scope.write_config_as("aggregate.toml", &config(aggregate_port, false));
    let ingest = scope.write_config_as("ingest.toml", &config(ingest_port, true));
    scope.spawn(&["--config", &aggregate.display().to_string()]);
    wait_for_partitions(aggregate_port, 2, 4.0, Duration::from_secs(60)).await;
    let started = Instant::now();
    scope.spawn(&["--config", &ingest.display().to_string()]);
    wait_for_metric(
        aggregate_port,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(600),
        |v| v >= EVENTS as f64,
    )
    .await;
    started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events = synthetic_events(EVENTS, 1);
    let bytes: usize = events.iter().map(String::len).sum();

    let ceiling_scope = TestScope::new();
    let ceiling_broker = KafkaBroker::start(&ceiling_scope).await;
    let ceiling_seconds = ceiling(&ceiling_broker.brokers(), &events).await;
    drop(ceiling_broker);

    let mut scope = TestScope::new();
    let broker = KafkaBroker::start(&scope).await;
    let redis = RedisServer::start(&scope, false).await;
    let file = scope.path("events.jsonl");
    std::fs::write(&file, events.join("\n")).expect("events written");
    let pipeline_seconds = pipeline(&mut scope, &broker.brokers(), &redis, &file).await;

    let ceiling_rate = EVENTS as f64 / ceiling_seconds;
    let pipeline_rate = EVENTS as f64 / pipeline_seconds;
    println!(
        "kafka_pipeline: {EVENTS} events ({:.1} MiB), 4 partitions, fresh nisshi broker each",
        bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  broker ceiling (idempotent produce + consume at once, same client): {ceiling_rate:.0} events/s ({ceiling_seconds:.2} s)"
    );
    println!(
        "  pipeline (replay → ingest → Kafka → 2 aggregators → Redis):        {pipeline_rate:.0} events/s ({pipeline_seconds:.2} s)"
    );
    println!("  pipeline / ceiling: {:.2}", pipeline_rate / ceiling_rate);
}
