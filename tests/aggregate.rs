//! The aggregate role over the whole single-host pipeline (`pleiades replay` → ingest → event
//! files → aggregators → store), for both stores, against an independent recomputation; through
//! kill -9 of the daemon and a Redis crash; and the Redis command budget per event.

mod common;

use common::*;
use pleiades::config::{Config, RedisConfig, StoreConfig, StoreKind, StoreSettings};
use rand::{Rng, SeedableRng};
use std::time::Duration;

enum StoreChoice {
    Embedded,
    /// The Redis URL.
    Redis(String),
    /// A `rediss://` URL and the authority that signed the server's certificate.
    RedisTls(String, std::path::PathBuf),
}

impl StoreChoice {
    /// The store settings, with the embedded file in `scope`.
    fn settings(&self, scope: &TestScope) -> StoreSettings {
        match self {
            StoreChoice::Embedded => StoreSettings::Embedded(StoreConfig {
                kind: StoreKind::Embedded,
                path: scope.path("counters.db"),
            }),
            StoreChoice::Redis(url) => StoreSettings::Redis(RedisConfig {
                url: url.clone(),
                ..RedisConfig::default()
            }),
            StoreChoice::RedisTls(url, ca_file) => StoreSettings::Redis(RedisConfig {
                url: url.clone(),
                ca_file: Some(ca_file.clone()),
                ..RedisConfig::default()
            }),
        }
    }

    /// Points `config` at this store.
    fn apply(&self, config: &mut Config) {
        match self {
            StoreChoice::Embedded => config.store.path = "counters.db".into(),
            StoreChoice::Redis(url) => {
                config.store.kind = StoreKind::Redis;
                config.redis.url = url.clone();
            }
            StoreChoice::RedisTls(url, ca_file) => {
                config.store.kind = StoreKind::Redis;
                config.redis.url = url.clone();
                config.redis.ca_file = Some(ca_file.clone());
            }
        }
    }
}

fn pipeline_config(upstream: std::net::SocketAddr, metrics: u16, store: &StoreChoice) -> Config {
    let mut config = ingest_config(upstream, metrics);
    config.file.segment_bytes = 262144;
    config.aggregate.enabled = true;
    config.aggregate.workers = 2;
    config.aggregate.batch_events = 500;
    config.aggregate.batch_delay = ms(100);
    config.aggregate.poll_interval = ms(20);
    store.apply(&mut config);
    config
}

async fn read_store(scope: &TestScope, choice: &StoreChoice) -> Expected {
    stored(&open_store(&choice.settings(scope)).await).await
}

/// Checks the further dimensions of `choice` against the oracle and one clean pass.
async fn check_dimensions(scope: &TestScope, choice: &StoreChoice, lines: &[String]) {
    let store = open_store(&choice.settings(scope)).await;
    dimensions::check(&store, lines, &scope.path("clean-pass.db")).await;
}

/// Counts the mixed events through the whole pipeline into `choice` and compares with the
/// oracle; returns the scope (with its configuration and logs) and the metrics port.
async fn whole_pipeline(choice: StoreChoice) -> (TestScope, u16) {
    let mut scope = TestScope::new();
    let (lines, _) = mixed_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.cut_after = Some(300);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    scope.write_config(&pipeline_config(upstream, metrics, &choice));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let counted = wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(120),
        |v| v >= expected.events as f64,
    )
    .await;
    assert_eq!(counted, expected.events as f64);
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let found = read_store(&scope, &choice).await;
    assert_counters_equal(&found, &expected);
    check_dimensions(&scope, &choice, &lines).await;
    let segments = bus_segment_count(&scope.path("events"));
    assert!(
        segments >= 2,
        "both workers had segments to read ({segments})"
    );
    println!(
        "{} events counted exactly, {} days, {} counters all-time, {segments} segments",
        expected.events,
        expected.days.len(),
        expected.all_time.len()
    );
    (scope, metrics)
}

fn bus_segment_count(dir: &std::path::Path) -> usize {
    segment_files(dir).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pipeline_counts_exactly_into_the_embedded_store() {
    whole_pipeline(StoreChoice::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn whole_pipeline_counts_exactly_into_redis() {
    let scope = TestScope::new();
    let redis = RedisServer::start(&scope, false).await;
    whole_pipeline(StoreChoice::Redis(redis.url())).await;
}

/// Kills the daemon with SIGKILL at random moments while it ingests and aggregates; with Redis,
/// also crashes Redis (AOF on) once midway.
async fn crash_repeatedly(choice: StoreChoice, mut redis_crash: Option<&mut RedisServer>) {
    let mut scope = TestScope::new();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.cut_after = Some(300);
    options.rate = Some(1200.0);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    scope.write_config(&pipeline_config(upstream, metrics, &choice));

    let seed: u64 = rand::thread_rng().gen();
    println!("kill -9 schedule seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bus = scope.path("events");
    let mut daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let mut kills = 0;
    while kills < 10 {
        let have = bus_lines(&bus).len();
        let target = (have + rng.gen_range(1..350)).min(lines.len() - 1);
        wait_until(Duration::from_secs(60), "ingest progress", async || {
            (bus_lines(&bus).len() >= target).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_micros(rng.gen_range(0..30_000))).await;
        scope.kill9(daemon);
        kills += 1;
        if kills == 5 {
            if let Some(redis) = redis_crash.as_deref_mut() {
                redis.crash_and_restart().await;
                println!("redis crashed and restarted after kill {kills}");
            }
        }
        daemon = scope.spawn(&["--config", "pleiades.toml"]);
    }
    if let Some(redis) = redis_crash {
        // And once more while the daemon is running and aggregating.
        wait_for_metric(
            metrics,
            "pleiades_aggregator_event_count_total",
            Duration::from_secs(60),
            |v| v > 0.0,
        )
        .await;
        redis.crash_and_restart().await;
    }
    wait_until(
        Duration::from_secs(120),
        "every event on the bus",
        async || (bus_lines(&bus).len() >= lines.len()).then_some(()),
    )
    .await;
    wait_until_counted(metrics, 2).await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let found = read_store(&scope, &choice).await;
    assert_counters_equal(&found, &expected);
    check_dimensions(&scope, &choice, &lines).await;
    println!(
        "{kills} kills: {} events counted exactly once",
        found.events
    );
}

/// Waits until every aggregator has begun a full pass after now: all that the bus holds now is
/// then counted.
async fn wait_until_counted(metrics: u16, workers: usize) {
    let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
    for worker in 0..workers {
        let name =
            format!("pleiades_aggregator_caught_up_timestamp_seconds{{worker=\"{worker}\"}}");
        wait_for_metric(metrics, &name, Duration::from_secs(120), |t| t > now).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_aggregation_keeps_embedded_counters_exact() {
    crash_repeatedly(StoreChoice::Embedded, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn kill_9_and_a_redis_crash_keep_redis_counters_exact() {
    let scope = TestScope::new();
    let mut redis = RedisServer::start(&scope, true).await;
    let url = redis.url();
    crash_repeatedly(StoreChoice::Redis(url), Some(&mut redis)).await;
}

/// `events` written to the bus of `scope`, what they count to, and a configuration that only
/// aggregates them, with its metrics on the port returned.
fn aggregating_only(scope: &TestScope, events: &[String]) -> (Expected, u16, Config) {
    let expected = oracle(events);
    write_bus(&scope.path("events"), events);
    let metrics = TestScope::free_port();
    (expected, metrics, aggregate_config(metrics))
}

/// A backlog on the live segment is counted as soon as it has been read, not a batch delay
/// later: with a delay far longer than the deadline and batches far larger than the backlog,
/// only the end of the backlog can have written it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlogs_last_batch_does_not_wait_out_the_batch_delay() {
    let mut scope = TestScope::new();
    let events = synthetic_events(5_000, 3);
    let (expected, metrics, mut config) = aggregating_only(&scope, &events);
    config.aggregate.batch_events = 100_000;
    config.aggregate.batch_delay = Duration::from_secs(3600);
    config.aggregate.poll_interval = ms(20);
    StoreChoice::Embedded.apply(&mut config);
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let counted = wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(60),
        |v| v >= 5_000.0,
    )
    .await;
    assert_eq!(counted, 5_000.0);
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_counters_equal(&read_store(&scope, &StoreChoice::Embedded).await, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn redis_commands_per_event_stay_under_budget() {
    let mut scope = TestScope::new();
    let redis = RedisServer::start(&scope, false).await;
    let events = synthetic_events(100_000, 40);
    let (expected, metrics, mut config) = aggregating_only(&scope, &events);
    config.aggregate.workers = 2;
    StoreChoice::Redis(redis.url()).apply(&mut config);
    scope.write_config(&config);
    redis
        .query(&["CONFIG", "RESETSTAT"])
        .await
        .expect("resetstat");
    let started = std::time::Instant::now();
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(180),
        |v| v >= 100_000.0,
    )
    .await;
    let elapsed = started.elapsed();
    let calls = redis.command_calls().await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let total: u64 = calls
        .iter()
        .filter(|(name, _)| !name.starts_with("info") && !name.starts_with("config"))
        .map(|(_, n)| n)
        .sum();
    let per_event = total as f64 / 100_000.0;
    println!(
        "100000 events in {elapsed:?}: {total} Redis commands, {per_event:.4} per event: {calls:?}"
    );
    assert!(per_event <= 0.05, "{per_event} commands per event");
    assert!(
        !calls.keys().any(|c| c == "keys" || c == "scan"),
        "the keyspace was scanned: {calls:?}"
    );
    let found = read_store(&scope, &StoreChoice::Redis(redis.url())).await;
    assert_counters_equal(&found, &expected);
    check_dimensions(&scope, &StoreChoice::Redis(redis.url()), &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server and openssl (scripts/test)"
)]
async fn redis_over_tls_with_a_password_counts_exactly_and_never_shows_it() {
    const PASSWORD: &str = "pleiades-tls-s3cret";
    let redis_scope = TestScope::new();
    let redis = RedisServer::start_tls(&redis_scope, PASSWORD).await;
    let ca_file = redis.tls().expect("a TLS server").ca_file.clone();
    let (mut scope, metrics) = whole_pipeline(StoreChoice::RedisTls(redis.url(), ca_file)).await;

    let check = std::process::Command::new(binary())
        .args(["check-config", "--config", "pleiades.toml"])
        .current_dir(scope.dir.path())
        .output()
        .expect("check-config runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{said}");
    assert!(!said.contains(PASSWORD), "{said}");

    // With a wrong password nothing is counted, and the logs say so without either password.
    let text = std::fs::read_to_string(scope.path("pleiades.toml")).expect("the configuration");
    let mut wrong: Config = toml::from_str(&text).expect("a configuration");
    wrong.redis.url = redis.url().replace(PASSWORD, "not-the-s3cret");
    scope.write_config_as("wrong.toml", &wrong);
    let refused = scope.spawn(&["--config", "wrong.toml"]);
    wait_for_metric(
        metrics,
        "pleiades_store_errors_total",
        Duration::from_secs(30),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        scope.terminate(refused, Duration::from_secs(10)).await,
        Some(0)
    );
    let logs = scope.logs();
    assert!(logs.contains("rediss://:***@127.0.0.1"), "{logs}");
    for secret in [PASSWORD, "not-the-s3cret"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn redis_counters_stay_exact_beyond_2_53_and_saturate_like_the_embedded_store() {
    use pleiades::counters::Tally;
    use pleiades::store::Batch;
    let scope = TestScope::new();
    let redis = RedisServer::start(&scope, false).await;
    let stores = [
        open_store(&StoreChoice::Redis(redis.url()).settings(&scope)).await,
        open_store(&StoreChoice::Embedded.settings(&scope)).await,
    ];
    let big = (1_i64 << 53) + 1;
    let steps: [&[(&str, i64)]; 6] = [
        &[("exact", big), ("low", -(1 << 60)), ("up", i64::MAX - 5)],
        &[("exact", 1), ("low", -(1 << 60)), ("up", 3)],
        &[("exact", big), ("low", -(1 << 62)), ("up", 10)],
        &[("exact", -1), ("low", i64::MIN), ("up", i64::MIN)],
        &[("exact", 999_999_999_999_999), ("low", 7), ("up", 1)],
        &[("exact", -999_999_999_999_999), ("low", 0), ("up", 0)],
    ];
    for (n, step) in steps.iter().enumerate() {
        let mut tally = Tally::default();
        for (name, delta) in step.iter() {
            tally
                .days
                .entry(20_000)
                .or_default()
                .insert((*name).to_owned(), *delta);
        }
        tally.events = 1;
        let batch = Batch {
            source: "exact".into(),
            start: n as u64,
            end: n as u64 + 1,
            tally: tally.into(),
        };
        for store in &stores {
            store.apply(&batch).await.expect("applied");
        }
    }
    let want = std::collections::BTreeMap::from([
        ("exact".to_owned(), 2 * big + 1 - 1),
        ("low".to_owned(), i64::MIN + 7),
        ("up".to_owned(), i64::MAX + i64::MIN + 1),
    ]);
    for store in &stores {
        assert_eq!(store.all_time().await.expect("all-time"), want);
        assert_eq!(store.day(20_000).await.expect("a day"), Some(want.clone()));
    }
}

/// Sketch merges run beside the batches, not on their path: batches applied one after another
/// while merges run leave every sketch identical to one clean pass, merges do happen, and the
/// deltas waiting beside a sketch stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn sketch_merges_beside_the_batches_keep_sketches_exact_and_bounded() {
    use pleiades::counters::OpenTally;
    use pleiades::store::{redis::COMPACT_AFTER, Applied, Batch, Store};
    let scope = TestScope::new();
    let redis = RedisServer::start(&scope, false).await;
    let metrics = pleiades::metrics::Metrics::new(1).expect("metrics");
    let settings = StoreSettings::Redis(RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    });
    let store = Store::open(&settings, metrics.store.clone())
        .await
        .expect("store");
    let events = synthetic_events(30_000, 1);
    let (mut whole, mut tally) = (OpenTally::default(), OpenTally::default());
    let mut position = 0;
    for chunk in events.chunks(250) {
        for event in chunk {
            let head = pleiades::event::inspect(event).expect("a valid event");
            tally.count(&head, true);
            whole.count(&head, true);
        }
        let batch = Batch {
            source: "merges".into(),
            start: position,
            end: position + chunk.len() as u64,
            tally: tally.seal().into(),
        };
        assert_eq!(store.apply(&batch).await.expect("apply"), Applied::Counted);
        position = batch.end;
    }
    wait_until(
        Duration::from_secs(30),
        "the last sketch merge",
        async || (!store.merging()).then_some(()),
    )
    .await;

    let whole = whole.seal();
    assert!(!whole.editors.is_empty() && !whole.top.is_empty());
    for ((day, family), sketch) in &whole.editors {
        let stored = store.editors(*day, &[*family]).await.expect("editors");
        assert_eq!(stored.get(family), Some(sketch), "editors of {family:?}");
    }
    for ((day, family, list), sketch) in &whole.top {
        let stored = store.top(*day, *list, &[*family]).await.expect("top");
        assert_eq!(stored.get(family), Some(sketch), "{list:?} of {family:?}");
    }

    // Fields of the sketches' hash: `<sketch>:base`, `:done`, `:next`, and `<sketch>:<n>` per
    // delta waiting.
    let Some(redis::Value::Array(fields)) = redis.query(&["HKEYS", "{pleiades}:sketches"]).await
    else {
        panic!("HKEYS answered something else than a list");
    };
    let mut bases = 0;
    let mut waiting = std::collections::HashMap::<String, u32>::new();
    for field in fields {
        let redis::Value::BulkString(field) = field else {
            panic!("a field that is not a string: {field:?}");
        };
        let field = String::from_utf8(field).expect("UTF-8");
        let (sketch, last) = field.rsplit_once(':').expect("a sketch field");
        if last == "base" {
            bases += 1;
        } else if last.parse::<u64>().is_ok() {
            *waiting.entry(sketch.to_owned()).or_default() += 1;
        }
    }
    let most = waiting.values().copied().max().unwrap_or(0);
    println!(
        "120 batches: {bases} sketches merged into a base, at most {most} deltas waiting beside one"
    );
    assert!(bases > 0, "no sketch delta was ever merged");
    assert!(
        most <= 2 * COMPACT_AFTER,
        "{most} deltas wait beside one sketch"
    );
}
