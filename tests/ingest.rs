//! The ingest role against a real upstream (`pleiades replay`) and the real binary: every valid
//! event lands on the file bus exactly once, through cuts, kill -9, throttling and stalls.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// Waits until the bus holds at least `count` events.
async fn wait_for_bus(dir: &std::path::Path, count: usize, limit: Duration) {
    wait_until(limit, "every expected event on the bus", async || {
        (bus_lines(dir).len() >= count).then_some(())
    })
    .await;
}

fn write_events(scope: &TestScope, lines: &[String]) -> std::path::PathBuf {
    let path = scope.path("upstream.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("events written");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_every_300_events_delivers_every_valid_event_once() {
    let mut scope = TestScope::new();
    let (lines, invalid) = mixed_lines();
    let expected = expected_ids(&lines);
    let mut options = replay_options(vec![write_events(&scope, &lines)]);
    options.cut_after = Some(300);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    scope.write_config(&ingest_config(upstream, metrics));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);

    let bus_dir = scope.path("events");
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(120)).await;
    let scraped = scrape(metrics).await.expect("metrics answer");
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0),
        "clean exit on SIGTERM"
    );

    assert_exactly_once(&bus_lines(&bus_dir), &expected);
    let quarantine =
        std::fs::read_to_string(bus_dir.join("quarantine/quarantine.jsonl")).unwrap_or_default();
    assert_eq!(
        quarantine.lines().count(),
        invalid,
        "every invalid event quarantined once"
    );
    let reconnects = lines.len() / 300;
    assert!(
        scraped["pleiades_ingest_connects_total"] >= reconnects as f64,
        "{scraped:?}"
    );
    assert!(scraped["pleiades_recv_duplicate_events_total"] >= 1.0);
    assert!(scraped["pleiades_recv_canary_events_total"] >= 1.0);
    assert_eq!(
        scraped["pleiades_file_publish_events_total"],
        expected.len() as f64
    );
    assert_eq!(
        scraped["pleiades_goroutine_restarts{component=\"ingest\"}"],
        0.0
    );
    println!(
        "{} lines upstream, {} valid events, {} invalid, {} connections",
        lines.len(),
        expected.len(),
        invalid,
        scraped["pleiades_ingest_connects_total"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_neither_loses_nor_doubles() {
    let mut scope = TestScope::new();
    let lines = recorded_lines();
    let expected = expected_ids(&lines);
    let mut options = replay_options(vec![write_events(&scope, &lines)]);
    options.cut_after = Some(300);
    options.rate = Some(1500.0);
    let upstream = scope.replay(options).await.addr;
    let mut config = ingest_config(upstream, TestScope::free_port());
    config.file.segment_bytes = 1048576;
    scope.write_config(&config);

    let seed: u64 = rand::thread_rng().gen();
    println!("kill -9 schedule seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bus_dir = scope.path("events");
    let mut kills = 0;
    let mut daemon = scope.spawn(&["--config", "pleiades.toml"]);
    while kills < 12 {
        let have = bus_lines(&bus_dir).len();
        if have >= expected.len() {
            break;
        }
        // Kill after a random amount of progress (a few events to a few hundred), at a random
        // instant relative to the writes.
        let target = (have + rng.gen_range(1..400)).min(expected.len() - 1);
        wait_until(
            Duration::from_secs(60),
            "progress before the next kill",
            async || (bus_lines(&bus_dir).len() >= target).then_some(()),
        )
        .await;
        tokio::time::sleep(Duration::from_micros(rng.gen_range(0..20_000))).await;
        scope.kill9(daemon);
        kills += 1;
        daemon = scope.spawn(&["--config", "pleiades.toml"]);
    }
    assert!(
        kills >= 10,
        "only {kills} kills happened before the stream ended"
    );
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(120)).await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let bus = bus_lines(&bus_dir);
    assert_exactly_once(&bus, &expected);
    let segments = segment_files(&bus_dir).len();
    println!(
        "{kills} kills, {} events exactly once across {segments} segments",
        bus.len()
    );
    assert!(segments > 1, "rotation was exercised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_and_nothing_is_lost() {
    let mut scope = TestScope::new();
    let lines: Vec<String> = recorded_lines().into_iter().take(681).collect();
    let expected = expected_ids(&lines);
    let mut options = replay_options(vec![write_events(&scope, &lines)]);
    options.throttle = 2;
    options.retry_after = 1;
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    scope.write_config(&ingest_config(upstream, metrics));
    let started = Instant::now();
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let bus_dir = scope.path("events");
    wait_until(
        Duration::from_secs(30),
        "the first event on the bus",
        async || (!bus_lines(&bus_dir).is_empty()).then_some(()),
    )
    .await;
    let waited = started.elapsed();
    // Two 429s with Retry-After: 1 must cost at least two seconds; backoff alone is 50 ms.
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After ignored: first event after {waited:?}"
    );
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(30)).await;
    let scraped = scrape(metrics).await.expect("metrics");
    assert_eq!(
        scraped["pleiades_ingest_disconnects_total{reason=\"throttled\"}"],
        2.0
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&bus_dir), &expected);
    println!("two 429s (Retry-After: 1): first event after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_reopened_without_loss() {
    let mut scope = TestScope::new();
    let lines: Vec<String> = recorded_lines().into_iter().take(681).collect();
    let expected = expected_ids(&lines);
    let mut options = replay_options(vec![write_events(&scope, &lines)]);
    options.stall_after = Some(100);
    options.stall_connections = 2;
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    // Interval syncing adds a timer to the read loop; it must not postpone the watchdog.
    let mut config = ingest_config(upstream, metrics);
    config.file.fsync = pleiades::config::FsyncPolicy::Interval;
    config.file.fsync_interval = ms(200);
    config.ingest.stall_timeout = Duration::from_secs(1);
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let bus_dir = scope.path("events");
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(30)).await;
    let scraped = scrape(metrics).await.expect("metrics");
    assert_eq!(
        scraped["pleiades_ingest_disconnects_total{reason=\"stalled\"}"], 2.0,
        "{scraped:?}"
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&bus_dir), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_frequent_cuts_with_exact_resume_points() {
    let mut scope = TestScope::new();
    let lines: Vec<String> = recorded_lines().into_iter().take(681).collect();
    let expected = expected_ids(&lines);
    let mut options = replay_options(vec![write_events(&scope, &lines)]);
    options.cut_after = Some(7);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    let mut config = ingest_config(upstream, metrics);
    config.ingest.resume_rewind = Duration::ZERO;
    config.ingest.backoff_initial = ms(5);
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let bus_dir = scope.path("events");
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(60)).await;
    let scraped = scrape(metrics).await.expect("metrics");
    assert!(
        scraped["pleiades_ingest_connects_total"] >= 681.0 / 7.0,
        "{scraped:?}"
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&bus_dir), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_false_starts_at_now_and_user_agent_is_sent() {
    // With resume off and nothing else, the first connection carries no Last-Event-ID: the
    // replay then starts at its first event, so the bus receives the file once more, minus the
    // repeats the window (rebuilt from the bus) drops: nothing new lands.
    let mut scope = TestScope::new();
    let lines: Vec<String> = recorded_lines().into_iter().take(200).collect();
    let expected = expected_ids(&lines);
    let replay = scope
        .replay(replay_options(vec![write_events(&scope, &lines)]))
        .await;
    let upstream = replay.addr;
    let metrics = TestScope::free_port();
    let mut config = ingest_config(upstream, metrics);
    config.ingest.resume = false;
    scope.write_config(&config);
    let first = scope.spawn(&["--config", "pleiades.toml"]);
    let bus_dir = scope.path("events");
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(30)).await;
    assert_eq!(
        scope.terminate(first, Duration::from_secs(10)).await,
        Some(0)
    );
    let second = scope.spawn(&["--config", "pleiades.toml"]);
    let dupes = wait_for_metric(
        metrics,
        "pleiades_recv_duplicate_events_total",
        Duration::from_secs(30),
        |d| d >= expected.len() as f64,
    )
    .await;
    assert_eq!(dupes, expected.len() as f64);
    assert_eq!(
        replay.stats.last_event_id(),
        None,
        "resume = false sends no Last-Event-ID"
    );
    assert_eq!(
        scope.terminate(second, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&bus_dir), &expected);
    assert_eq!(
        replay.stats.user_agent().as_deref(),
        Some("pleiades-tests/1.0 (test suite)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_starts_at_a_point_in_time_when_there_is_nothing_to_resume() {
    // The replay stamps event i at first_dt + 10 ms × i (no disorder here), and `since` asks
    // for the earliest event at or after a time, as EventStreams does.
    let mut scope = TestScope::new();
    let lines: Vec<String> = recorded_lines().into_iter().take(681).collect();
    let first_ms = chrono::DateTime::parse_from_rfc3339(
        serde_json::from_str::<serde_json::Value>(&lines[0]).unwrap()["meta"]["dt"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
    .timestamp_millis();
    let mut options = replay_options(vec![write_events(&scope, &lines)]);
    options.disorder_ms = 0;
    let replay = scope.replay(options).await;
    let since = chrono::DateTime::from_timestamp_millis(first_ms + 10 * 500)
        .unwrap()
        .to_rfc3339();
    let metrics = TestScope::free_port();
    let mut config = ingest_config(replay.addr, metrics);
    config.ingest.since = since;
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let expected = expected_ids(&lines[500..]);
    let bus_dir = scope.path("events");
    wait_for_bus(&bus_dir, expected.len(), Duration::from_secs(30)).await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&bus_dir), &expected);
    assert_eq!(
        replay.stats.last_event_id(),
        None,
        "the first connection asks by time, not by id"
    );
}

/// Recorded events made to break their schema in ways the basic validity check (a JSON object
/// with a readable meta.dt) lets through: the rule each one breaks, and the event.
fn schema_breakers() -> Vec<(&'static str, String)> {
    let recorded = recorded_lines();
    let mutate = |n: usize, id: &str, change: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&recorded[n]).unwrap();
        v["meta"]["id"] = serde_json::Value::from(id);
        change(&mut v);
        v.to_string()
    };
    vec![
        ("type", mutate(1, "bad-bot", &|v| v["bot"] = "yes".into())),
        (
            "type",
            mutate(2, "bad-namespace", &|v| v["namespace"] = "0".into()),
        ),
        (
            "required",
            mutate(3, "no-stream", &|v| {
                v["meta"].as_object_mut().unwrap().remove("stream");
            }),
        ),
        (
            "format",
            mutate(4, "spaced-dt", &|v| {
                v["meta"]["dt"] = "2024-05-01 10:00:00Z".into()
            }),
        ),
        (
            "schema",
            mutate(5, "unknown-schema", &|v| {
                v["$schema"] = "/mediawiki/recentchange/7.0.0".into()
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_quarantine_mode_events_breaking_their_schema_are_kept_out_and_not_counted() {
    let mut scope = TestScope::new();
    // Both formats (the whole of each passes: see the unit tests of pleiades::schema).
    let valid: Vec<String> = recorded_lines().into_iter().take(981).collect();
    let mut lines = valid.clone();
    let breakers = schema_breakers();
    lines.extend(breakers.iter().map(|(_, line)| line.clone()));
    let upstream = scope
        .replay(replay_options(vec![write_events(&scope, &lines)]))
        .await
        .addr;
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut config = all_roles_config(upstream, metrics, web);
    config.ingest.validate = pleiades::config::ValidateMode::Quarantine;
    config.store.path = scope.path("counters.db");
    scope.write_config(&config);
    scope.spawn(&["--config", "pleiades.toml"]);
    let expected = oracle(&valid);
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(120),
        |v| v >= expected.events as f64,
    )
    .await;
    wait_for_metric(
        metrics,
        "pleiades_quarantined_events_total{reason=\"schema\",role=\"ingest\"}",
        Duration::from_secs(30),
        |v| v >= breakers.len() as f64,
    )
    .await;
    let scraped = scrape(metrics).await.expect("metrics");
    for rule in ["type", "required", "format", "schema"] {
        let want = breakers.iter().filter(|(r, _)| *r == rule).count() as f64;
        assert_eq!(
            scraped[&format!("pleiades_recv_schema_failures_total{{rule=\"{rule}\"}}")],
            want,
            "{rule}"
        );
    }
    assert_eq!(
        scraped["pleiades_recv_validated_events_total{schema=\"legacy\"}"],
        300.0
    );
    // Every recorded event passed: only the five breakers are in quarantine, each naming its rule.
    let quarantine =
        std::fs::read_to_string(scope.path("events/quarantine/quarantine.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = quarantine
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), breakers.len(), "{quarantine}");
    for ((rule, line), record) in breakers.iter().zip(&records) {
        assert_eq!(record["reason"], "schema");
        assert_eq!(record["data"].as_str(), Some(line.as_str()));
        assert!(
            record["error"]
                .as_str()
                .unwrap()
                .contains(&format!("{rule} at /")),
            "{record}"
        );
    }
    // Not on the bus, not counted: the store holds exactly the recorded events.
    let on_bus: std::collections::HashSet<String> = bus_lines(&scope.path("events"))
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert!(breakers.iter().all(|(_, line)| {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        !on_bus.contains(v["meta"]["id"].as_str().unwrap())
    }));
    let totals: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{web}/api/totals"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(counters_of(&totals), expected.all_time);
}
