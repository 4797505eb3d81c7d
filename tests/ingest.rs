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
