//! Redis as operators run it, against the real daemon: a master, a replica and three sentinels
//! through three `kill -9`s of the master (the last two with the replica frozen and cut off, so
//! that acknowledged writes are really lost, the last of them once everything is counted) while
//! events are counted through the file bus and through Kafka; Sentinel and master over TLS with
//! a password; and a three-master cluster through a resharding of the pleiades slot.

mod common;

use common::redis_ha::{Failover, Lag, RedisCluster, SentinelGroup, MASTER_NAME};
use common::*;
use pleiades::config::{BusKind, Config, RedisConfig, StoreKind, StoreSettings};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Events counted through the file bus during two failovers, and how many per second
/// upstream sends them: slow enough that both failovers land while it sends.
const FILE_EVENTS: usize = 20_000;
const FILE_RATE: f64 = 800.0;
/// The same through Kafka, more slowly and fewer: the test broker's reads slow down as its
/// database grows, and a read from a position left behind (a failover moves the partitions
/// back) takes it seconds, more on a busy machine, so that a partition falls further behind.
const KAFKA_EVENTS: usize = 12_000;
const KAFKA_RATE: f64 = 400.0;

/// `count` recorded events, each with a new `meta.id` and a `meta.dt` of today (in the last ten
/// minutes, never before midnight), so that `/api/stats` (today) has them.
fn events_of_today(count: usize) -> Vec<String> {
    let now = chrono::Utc::now().timestamp_millis();
    let base = (now - 600_000).max(now - now.rem_euclid(86_400_000));
    events_within(count, base, now - base, 7_919)
}

/// One `GET /api/stats` during the run.
struct Answer {
    /// When it was answered, from the start of polling.
    at: Duration,
    status: Option<u16>,
    counters: BTreeMap<String, i64>,
}

/// Asks `/api/stats` every 100 ms until `stop`.
async fn poll_stats(web: u16, stop: CancellationToken) -> Vec<Answer> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("a client");
    let started = Instant::now();
    let mut answers = Vec::new();
    while !stop.is_cancelled() {
        let response = client
            .get(format!("http://127.0.0.1:{web}/api/stats"))
            .send()
            .await;
        let (status, counters) = match response {
            Ok(response) => {
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let counters = if status == 200 {
                    counters_of(&body)
                } else {
                    BTreeMap::new()
                };
                (Some(status), counters)
            }
            Err(_) => (None, BTreeMap::new()),
        };
        answers.push(Answer {
            at: started.elapsed(),
            status,
            counters,
        });
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    answers
}

/// Checks what `/api/stats` said: only 200 and 503 once something was counted (404 before),
/// every 200 a whole number of batches (each event counted once under `pleiades_total`, once
/// under its wiki, once under its type) and never more than the clean pass; returns the
/// longest time without a 200 and the number of 503s.
fn check_answers(answers: &[Answer], today: &BTreeMap<String, i64>) -> (Duration, usize) {
    let total = today["pleiades_total"];
    let first = answers
        .iter()
        .position(|a| a.status == Some(200))
        .expect("/api/stats answered 200 at some point");
    let mut longest = Duration::ZERO;
    let mut last_ok = answers[first].at;
    let mut unavailable = 0;
    for answer in &answers[first..] {
        match answer.status {
            Some(200) => {
                let c = &answer.counters;
                let sum = |prefix: &str| -> i64 {
                    c.iter()
                        .filter(|(name, _)| name.starts_with(prefix))
                        .map(|(_, v)| v)
                        .sum()
                };
                let counted = c["pleiades_total"];
                assert!(counted <= total, "{counted} counted, more than {total}");
                assert_eq!(sum("pleiades_wiki_"), counted, "a torn answer: {c:?}");
                assert_eq!(sum("pleiades_type_"), counted, "a torn answer: {c:?}");
                longest = longest.max(answer.at - last_ok);
                last_ok = answer.at;
            }
            Some(503) => unavailable += 1,
            other => panic!("/api/stats answered {other:?} at {:?}", answer.at),
        }
    }
    (longest, unavailable)
}

fn metric(metrics: &std::collections::HashMap<String, f64>, name: &str) -> f64 {
    metrics.get(name).copied().unwrap_or(0.0)
}

/// The two failover runs take turns: each keeps a broker or a file bus, five Redis processes
/// and the daemon busy, and together on two cores they made each other's failovers slow.
static ONE_FAILOVER_RUN_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Counts `count` events of today, `rate` a second, through `bus` into Redis behind three
/// sentinels while the master is killed three times: with the replica in step, with the replica
/// three batches behind, and with it behind by the last batches once everything is counted.
/// Then checks the counters against a clean pass, the public API during the failovers, and the
/// metrics.
async fn count_through_failovers(bus: BusKind, count: usize, rate: f64) {
    let _turn = ONE_FAILOVER_RUN_AT_A_TIME.lock().await;
    let mut scope = TestScope::new();
    let started = Instant::now();
    let mut group = SentinelGroup::start(&scope, 3, true).await;
    let broker = match bus {
        BusKind::Kafka => Some(KafkaBroker::start(&scope).await),
        BusKind::File => None,
    };
    let lines = events_of_today(count);
    let expected = oracle(&lines);
    let today = *expected.days.keys().next_back().expect("a day");
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(rate);
    let upstream = scope.replay(options).await.addr;

    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut config = all_roles_config(upstream, metrics, web);
    config.ingest.publisher = bus;
    if let Some(broker) = &broker {
        use_test_brokers(&mut config, &broker.brokers());
    }
    config.file.segment_bytes = 1 << 20;
    config.aggregate.workers = 2;
    config.aggregate.batch_events = 500;
    config.store.kind = StoreKind::Redis;
    config.redis.sentinels = group.sentinel_addrs();
    config.redis.master_name = MASTER_NAME.to_owned();
    config.redis.timeout = Duration::from_secs(5);
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);

    let stop = CancellationToken::new();
    let poller = tokio::spawn(poll_stats(web, stop.clone()));
    let counted = async |at_least: f64| {
        wait_for_metric(
            metrics,
            "pleiades_aggregator_event_count_total",
            Duration::from_secs(120),
            |v| v >= at_least,
        )
        .await
    };
    let lost = |failover: &Failover| {
        let loss = failover
            .lost
            .expect("a lagging failover says what was lost");
        assert!(
            loss.replica_at_most < loss.acknowledged,
            "nothing was acknowledged after the replica was cut off: {loss:?}"
        );
        assert!(loss.replica_read <= loss.replica_at_most, "{loss:?}");
    };
    let before = counted(count as f64 * 0.15).await;
    let first: Failover = group.fail_over(Lag::None).await;
    println!("failover 1 after {before} events: {first:?}");
    let before = counted(before + count as f64 * 0.1).await;
    let second = group.fail_over(Lag::Batches(3)).await;
    println!("failover 2 (replica behind by 3 batches) after {before} events: {second:?}");
    lost(&second);
    // The last one once everything is counted: the batches the promoted replica lacks must be
    // counted again although nothing new arrives whose batch the store could refuse.
    let before = counted(count as f64 - rate * 2.0).await;
    let third = group
        .fail_over(Lag::UntilCounted(expected.events as i64))
        .await;
    println!("failover 3 (replica behind by the last batches) after {before} events: {third:?}");
    lost(&third);

    // Every event, counted once, in the master the sentinels name now.
    let store = open_store(&StoreSettings::Redis(RedisConfig {
        sentinels: group.sentinel_addrs(),
        master_name: MASTER_NAME.to_owned(),
        ..RedisConfig::default()
    }))
    .await;
    wait_until(
        Duration::from_secs(180),
        "every event counted",
        async || {
            let all = store.all_time().await.ok()?;
            (all.get("pleiades_total").copied().unwrap_or(0) >= expected.events as i64)
                .then_some(())
        },
    )
    .await;
    let found = stored(&store).await;
    assert_counters_equal(&found, &expected);
    stop.cancel();
    let answers = poller.await.expect("the poller");
    let (longest, unavailable) = check_answers(&answers, &expected.days[&today]);

    let scraped = scrape(metrics).await.expect("metrics");
    assert!(
        scope
            .child(daemon)
            .try_wait()
            .expect("the daemon")
            .is_none(),
        "the daemon exited"
    );
    for component in ["ingest", "aggregate", "web", "live"] {
        let name = format!("pleiades_goroutine_restarts{{component=\"{component}\"}}");
        assert_eq!(metric(&scraped, &name), 0.0, "{name}");
    }
    // Every failover was seen (a busy machine can make the sentinels fail over once more).
    let failovers = metric(&scraped, "pleiades_redis_failovers_total");
    assert!(failovers >= 3.0, "{failovers} failovers seen");
    wait_until(
        Duration::from_secs(30),
        "the master's address in the metrics",
        async || {
            let master = format!(
                "pleiades_redis_master_info{{address=\"127.0.0.1:{}\"}}",
                group.master_port().await?
            );
            (metric(&scrape(metrics).await?, &master) == 1.0).then_some(())
        },
    )
    .await;
    // The lost batches are counted again by one of two paths: a batch built on a lost position
    // is refused, or an aggregator that notices the new connection first reads its positions
    // again from the new master. Which one comes first is a race between the failover and the
    // workers (an idle worker always takes the second), but one of them must have happened.
    let rewound = metric(&scraped, "pleiades_aggregator_rewound_batches_total");
    let message = match bus {
        BusKind::File => "new store connection; every segment's position is read again",
        _ => "new store connection; every partition is read again from its stored position",
    };
    let read_again = scope.logs().matches(message).count();
    assert!(
        rewound >= 1.0 || read_again >= 2,
        "after the lost writes, no batch was refused and no worker read its positions again"
    );
    println!(
        "{} events exact through 3 failovers in {:?} ({:?} bus): failovers took {:?}, {:?} and \
         {:?}; lost by the lagging ones {:?} and {:?}; {rewound} \
         batches refused as rewound, {} stale in all, {} reconnects; /api/stats: {} answers, \
         {unavailable} 503s, longest without a 200 {longest:?}",
        expected.events,
        started.elapsed(),
        bus,
        first.took,
        second.took,
        third.took,
        second.lost,
        third.lost,
        metric(&scraped, "pleiades_aggregator_stale_batches_total"),
        metric(&scraped, "pleiades_redis_reconnects_total"),
        answers.len(),
    );
    assert!(
        longest < Duration::from_secs(10),
        "/api/stats went {longest:?} without an answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn sentinel_failovers_keep_file_bus_counters_exact() {
    count_through_failovers(BusKind::File, FILE_EVENTS, FILE_RATE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server and nisshi (scripts/test)"
)]
async fn sentinel_failovers_keep_kafka_counters_exact() {
    count_through_failovers(BusKind::Kafka, KAFKA_EVENTS, KAFKA_RATE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server and openssl (scripts/test)"
)]
async fn sentinel_and_master_over_tls_with_a_password_count_exactly_and_never_show_it() {
    const PASSWORD: &str = "pleiades-sentinel-s3cret";
    let mut scope = TestScope::new();
    let group = SentinelGroup::start_tls(&scope, PASSWORD).await;
    let tls = group.tls().expect("a TLS group").clone();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let upstream = scope.replay(replay_options(vec![events])).await.addr;
    let metrics = TestScope::free_port();
    let mut config = all_roles_config(upstream, metrics, TestScope::free_port());
    config.web.enabled = false;
    config.store.kind = StoreKind::Redis;
    // The URL's host is not used: the sentinel names the master; its TLS and password apply to
    // the sentinel and the master alike.
    let redis = RedisConfig {
        url: format!("rediss://:{PASSWORD}@sentinel-names-it/"),
        sentinels: group.sentinel_addrs(),
        master_name: MASTER_NAME.to_owned(),
        ca_file: Some(tls.ca_file.clone()),
        ..RedisConfig::default()
    };
    config.redis = redis.clone();
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let store = open_store(&StoreSettings::Redis(redis)).await;
    wait_until(Duration::from_secs(60), "every event counted", async || {
        let all = store.all_time().await.ok()?;
        (all.get("pleiades_total").copied() == Some(expected.events as i64)).then_some(())
    })
    .await;
    assert_counters_equal(&stored(&store).await, &expected);
    let master = format!(
        "pleiades_redis_master_info{{address=\"127.0.0.1:{}\"}}",
        group.nodes[0].port
    );
    wait_for_metric(metrics, &master, Duration::from_secs(10), |v| v == 1.0).await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let logs = scope.logs();
    assert!(
        !logs.contains(PASSWORD),
        "the password in the logs:\n{logs}"
    );
    println!("{} events exact through a TLS sentinel", expected.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server and redis-cli (scripts/test)"
)]
async fn a_cluster_counts_exactly_through_a_resharding_of_the_pleiades_slot() {
    let mut scope = TestScope::new();
    let cluster = RedisCluster::start(&scope).await;
    let slot = u16::try_from(redis_integer(
        &cluster.nodes[0]
            .query(&["CLUSTER", "KEYSLOT", pleiades::store::redis::HASH_TAG])
            .await
            .expect("CLUSTER KEYSLOT"),
    ))
    .expect("a slot");
    let lines = synthetic_events(FILE_EVENTS / 2, 30);
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(FILE_RATE);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    let mut config: Config = all_roles_config(upstream, metrics, TestScope::free_port());
    config.web.enabled = false;
    config.aggregate.batch_events = 500;
    config.store.kind = StoreKind::Redis;
    config.redis.cluster = cluster.addrs();
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);

    let before = wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(60),
        |v| v >= 2000.0,
    )
    .await;
    let from = cluster.owner(slot).await;
    let to = (from + 1) % cluster.nodes.len();
    let store = open_store(&StoreSettings::Redis(RedisConfig {
        cluster: cluster.addrs(),
        ..RedisConfig::default()
    }))
    .await;
    let reshard = Instant::now();
    let mut split_reads = 0;
    let moved = cluster
        .move_slot(slot, to, async || {
            // Half the keys on each node: each read goes where its key is (`ASK` for the moved
            // ones), and a pipelined range read gives what the reads one by one give (or less:
            // batches whose keys have not moved yet are still counted meanwhile).
            let days = store.days().await.expect("the days index, mid-migration");
            let (first, last) = (days[0], days[days.len() - 1]);
            let range = store
                .range(first, last)
                .await
                .expect("a range, mid-migration");
            assert_eq!(range.len(), days.len());
            for (day, counters) in &range {
                let one = store.day(*day).await.expect("a day, mid-migration");
                let total = |c: &BTreeMap<String, i64>| c.get("pleiades_total").copied();
                assert!(
                    total(counters) > Some(0),
                    "day {day} is empty mid-migration"
                );
                assert!(
                    one.as_ref().and_then(total) >= total(counters),
                    "day {day} went back mid-migration"
                );
            }
            store.all_time().await.expect("all-time, mid-migration");
            split_reads = range.len();
        })
        .await;
    println!(
        "slot {slot} moved from :{} to :{} with {moved} keys in {:?}, after {before} events",
        cluster.nodes[from].port,
        cluster.nodes[to].port,
        reshard.elapsed()
    );
    assert!(moved >= 3, "the slot held the store's keys ({moved})");
    assert!(split_reads > 0, "the days were read mid-migration");
    wait_until(
        Duration::from_secs(120),
        "every event counted",
        async || {
            let all = store.all_time().await.ok()?;
            (all.get("pleiades_total").copied().unwrap_or(0) >= expected.events as i64)
                .then_some(())
        },
    )
    .await;
    let found = stored(&store).await;
    assert_counters_equal(&found, &expected);

    // Every key the store wrote is in the pleiades slot, on its new owner, and nothing else is
    // anywhere in the cluster.
    let days: Vec<i64> = expected.days.keys().copied().collect();
    let mut want = pleiades::store::redis::keys_for(&days);
    want.sort();
    let owner = &cluster.nodes[to];
    let redis::Value::Array(keys) = owner.query(&["KEYS", "*"]).await.expect("KEYS") else {
        panic!("KEYS answered no list");
    };
    let mut keys: Vec<String> = keys
        .iter()
        .map(|k| common::redis_ha::text(k).expect("a key"))
        .collect();
    keys.sort();
    assert_eq!(keys, want, "the keys the store wrote");
    for key in &keys {
        let key_slot = redis_integer(
            &owner
                .query(&["CLUSTER", "KEYSLOT", key])
                .await
                .expect("KEYSLOT"),
        );
        assert_eq!(key_slot, i64::from(slot), "{key}");
    }
    for (n, node) in cluster.nodes.iter().enumerate().filter(|(n, _)| *n != to) {
        let size = redis_integer(&node.query(&["DBSIZE"]).await.expect("DBSIZE"));
        assert_eq!(size, 0, "node {n} holds keys");
    }

    let scraped = scrape(metrics).await.expect("metrics");
    assert!(scope
        .child(daemon)
        .try_wait()
        .expect("the daemon")
        .is_none());
    assert_eq!(
        metric(
            &scraped,
            "pleiades_goroutine_restarts{component=\"aggregate\"}"
        ),
        0.0
    );
    let master = format!(
        "pleiades_redis_master_info{{address=\"127.0.0.1:{}\"}}",
        owner.port
    );
    assert_eq!(metric(&scraped, &master), 1.0, "{master}");
    assert_eq!(metric(&scraped, "pleiades_redis_failovers_total"), 1.0);
    println!(
        "{} events exact through the resharding; {} keys all in slot {slot}; {} stale batches",
        expected.events,
        keys.len(),
        metric(&scraped, "pleiades_aggregator_stale_batches_total")
    );
}

fn redis_integer(value: &redis::Value) -> i64 {
    match value {
        redis::Value::Int(n) => *n,
        other => panic!("not an integer: {other:?}"),
    }
}
