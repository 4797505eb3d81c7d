//! Months unattended on one host: a synthetic month through the embedded default under a
//! retention and a small disk budget (the soak), retention with aggregation stopped, a full
//! disk under the bus and under the store, and two ingesters started together.

mod common;

use common::*;
use pleiades::config::{StoreConfig, StoreKind, StoreSettings};
use std::path::Path;
use std::time::{Duration, Instant};

const DAY_MS: i64 = 86_400_000;

/// The month runs alone: its budget holds compressed segments, and the compressor is an
/// idle-class thread that the other tests' daemons, on two cores, would starve. Then closed
/// segments wait for it uncompressed and the bus outgrows its budget, not for any fault of
/// retention's. The other tests share the machine among themselves.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Bytes the segment files of `dir` take on disk, measured independently of the library.
fn bus_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// A month of events in time order (2026-03-01 to 2026-03-30): the first twenty days quiet (a
/// fifth of the events), the last ten busy, so that retention by age rules the quiet days and
/// the disk budget the busy ones.
fn synthetic_month(count: usize) -> Vec<String> {
    let start = 1_772_323_200_000_i64; // 2026-03-01T00:00:00Z
    let quiet = count / 5;
    synthetic_events_at(count, |i| {
        if i < quiet {
            start + (i as i64 * 20 * DAY_MS) / quiet as i64
        } else {
            start + 20 * DAY_MS + ((i - quiet) as i64 * 10 * DAY_MS) / (count - quiet) as i64
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synthetic_month_stays_under_its_budget_and_counts_every_day_exactly() {
    let _alone = ALONE.write().await;
    const EVENTS: usize = 300_000;
    const BUDGET: u64 = 6 * 1024 * 1024;
    let mut scope = TestScope::new();
    let lines = synthetic_month(EVENTS);
    let raw: usize = lines.iter().map(|l| l.len() + 1).sum();
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(RATE);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    let mut config = ingest_config(upstream, metrics);
    config.aggregate.enabled = true;
    config.aggregate.batch_delay = ms(100);
    config.aggregate.poll_interval = ms(20);
    config.store.path = "counters.db".into();
    config.file.segment_bytes = 1024 * 1024;
    // Syncing at most every 200 ms (not after every read from upstream) lets a month through
    // in minutes; retention does not depend on it.
    config.file.fsync = pleiades::config::FsyncPolicy::Interval;
    config.file.fsync_interval = ms(200);
    config.file.retention = Duration::from_secs(7 * 86_400);
    config.file.max_bytes = BUDGET;
    config.file.retention_interval = ms(200);
    // The dedupe window is bounded memory that fills with the first events it sees; at the
    // default 100,000 ids it would still be filling through the first third and make the
    // comparison of thirds measure that rather than a leak. 20,000 ids still hold a resume
    // overlap (100 ms here) at this rate many times over.
    config.ingest.dedupe_window = 20_000;
    scope.write_config(&config);
    let started = Instant::now();
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let pid = scope.child(daemon).id();
    let bus = scope.path("events");

    // Throughout the run: the bus on disk (sampled), and the daemon's memory with the progress
    // it was taken at.
    let expected = oracle(&lines);
    let mut peak = 0u64;
    let mut rss: Vec<(f64, u64)> = Vec::new();
    let counted = wait_until(
        Duration::from_secs(240),
        "every event counted",
        async || {
            peak = peak.max(bus_bytes(&bus));
            let scraped = scrape(metrics).await?;
            let counted = scraped
                .get("pleiades_aggregator_event_count_total")
                .copied()?;
            if let Some(bytes) = rss_bytes(pid) {
                rss.push((counted / EVENTS as f64, bytes));
            }
            (counted >= expected.events as f64).then_some(scraped)
        },
    )
    .await;
    let elapsed = started.elapsed();
    // The budget rules while the month arrives. Once it is in, what the budget left of the
    // last ten days reaches more than seven days back from the newest event, so age takes the
    // oldest of it: wait for that pass, then stop cleanly.
    let deleted_before = counted["pleiades_file_segments_deleted_total{reason=\"budget\"}"];
    wait_for_metric(
        metrics,
        "pleiades_file_segments_deleted_total{reason=\"retention\"}",
        Duration::from_secs(30),
        |v| v > 0.0,
    )
    .await;
    let end = scrape(metrics).await.expect("scrape");
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(15)).await,
        Some(0)
    );
    peak = peak.max(bus_bytes(&bus));

    // The counters of all thirty days equal a clean pass, though most segments are gone.
    let store = open_store(&StoreSettings::Embedded(StoreConfig {
        kind: StoreKind::Embedded,
        path: scope.path("counters.db"),
    }))
    .await;
    let found = stored(&store).await;
    assert_eq!(found.days.len(), 30, "thirty days counted");
    assert_counters_equal(&found, &expected);
    let left = bus_lines(&bus);
    assert!(
        left.len() < EVENTS / 4,
        "retention deleted most of the month ({} events left)",
        left.len()
    );

    // No segment was deleted before it was counted: every deletion says so.
    let logs = without_colours(&scope.logs());
    let deletions: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("deleted a counted event segment"))
        .collect();
    assert!(deletions.len() > 20, "{} deletions", deletions.len());
    for line in &deletions {
        let field = |name: &str| {
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("{name} in {line}"))
                .to_owned()
        };
        assert_eq!(field("stored_position"), field("length"), "{line}");
    }
    let by_age = end["pleiades_file_segments_deleted_total{reason=\"retention\"}"];
    let by_budget = end["pleiades_file_segments_deleted_total{reason=\"budget\"}"];
    assert!(
        by_age > 0.0 && deleted_before > 0.0,
        "age {by_age}, budget {by_budget}"
    );
    assert_eq!(end["pleiades_file_retention_blocked_segments"], 0.0);
    assert!(
        peak <= BUDGET,
        "the bus reached {peak} bytes, over its budget of {BUDGET}"
    );

    // Bytes per event at rest, from what the writer compressed.
    let published_bytes = end["pleiades_file_publish_bytes_total"];
    let published = end["pleiades_file_publish_events_total"];
    let content = end["pleiades_file_compressed_content_bytes_total"];
    let packed = end["pleiades_file_compressed_bytes_total"];
    let raw_per_event = published_bytes / published;
    let rest_per_event = packed / (content / raw_per_event);
    assert!(
        rest_per_event * 6.0 <= raw_per_event,
        "{rest_per_event:.0} bytes per event at rest against {raw_per_event:.0} raw"
    );

    // Memory: the last third of the run against the middle one. Two bounded memories fill
    // through the first part of the month and are no leak: the dedupe window (kept small
    // above), and the embedded store's decoded sketches of the last days counted (up to
    // 300,000 parts, about 13 of these 30 days). From the middle third on, both are full, and
    // resident memory must stay level.
    let mean = |picked: &[u64]| picked.iter().sum::<u64>() as f64 / picked.len() as f64;
    let third = |from: f64, to: f64| -> Vec<u64> {
        rss.iter()
            .filter(|(p, _)| *p >= from && *p < to)
            .map(|(_, b)| *b)
            .collect()
    };
    let early = third(1.0 / 3.0, 2.0 / 3.0);
    let late = third(2.0 / 3.0, 1.01);
    assert!(
        !early.is_empty() && !late.is_empty(),
        "RSS samples taken: {rss:?}"
    );
    let (first, last) = (mean(&early), mean(&late));
    println!(
        "a month: {EVENTS} events ({:.0} MiB raw) over 30 days through the embedded default in {:.0} s; \
         bus peak {:.2} MiB of a {:.0} MiB budget, {:.2} MiB at the end with {} events; \
         segments deleted: {by_age} by age, {by_budget} by budget; \
         {raw_per_event:.0} bytes per event raw, {rest_per_event:.0} at rest (1/{:.1}); \
         RSS middle third {:.1} MiB, last third {:.1} MiB ({:+.1} %)",
        raw as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        peak as f64 / 1048576.0,
        BUDGET as f64 / 1048576.0,
        end["pleiades_file_bus_bytes"] / 1048576.0,
        left.len(),
        raw_per_event / rest_per_event,
        first / 1048576.0,
        last / 1048576.0,
        (last / first - 1.0) * 100.0,
    );
    assert!(
        (last / first - 1.0).abs() <= 0.15,
        "RSS moved from {first} to {last}"
    );
}

/// Events per second upstream sends in the soak: fast, yet slow enough that counting keeps up
/// (a bus over its budget because counting lags is retention blocked, which the next test
/// shows).
const RATE: f64 = 4000.0;

/// A daemon with every role but the web on `upstream`, counting into `store/counters.db`.
fn one_host(upstream: std::net::SocketAddr, metrics: u16) -> pleiades::config::Config {
    let mut config = ingest_config(upstream, metrics);
    config.aggregate.enabled = true;
    config.aggregate.batch_delay = ms(50);
    config.aggregate.poll_interval = ms(20);
    config.store.path = "store/counters.db".into();
    config.file.segment_bytes = 64 * 1024;
    config.file.retention_interval = ms(100);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs unshare -Urm for a small file system (scripts/test)"
)]
async fn a_full_store_disk_stops_counting_not_ingest_and_nothing_uncounted_is_deleted() {
    let _shared = ALONE.read().await;
    assert!(namespaces_work(), "unshare -Urm is refused on this machine");
    let mut scope = TestScope::new();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(400.0);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    let mut config = one_host(upstream, metrics);
    config.file.max_bytes = 256 * 1024;
    scope.write_config(&config);
    let daemon =
        scope.spawn_with_small_disks(&[("store", 8 << 20)], &["--config", "pleiades.toml"]);
    let pid = scope.child(daemon).id();
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(30),
        |v| v >= 500.0,
    )
    .await;
    wait_for_metric(
        metrics,
        "pleiades_file_segments_deleted_total{reason=\"budget\"}",
        Duration::from_secs(30),
        |v| v > 0.0,
    )
    .await;

    // The store's disk fills: counting stops, ingest goes on, and the bus grows past its
    // budget with nothing deleted.
    let ballast = fill_disk(&scope.inside(daemon, "store"));
    let stuck = wait_for_metric(
        metrics,
        "pleiades_file_retention_blocked_bytes",
        Duration::from_secs(30),
        |v| v > 0.0,
    )
    .await;
    let (status, body) = readyz(metrics).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"retention\"") && body.contains("not counted yet"),
        "{body}"
    );
    let on_bus = bus_lines(&scope.path("events")).len();
    wait_until(Duration::from_secs(30), "ingest to go on", async || {
        (bus_lines(&scope.path("events")).len() > on_bus + 500).then_some(())
    })
    .await;
    // Uncounted segments pile up past the budget rather than go.
    wait_for_metric(
        metrics,
        "pleiades_file_bus_bytes",
        Duration::from_secs(30),
        |v| v > config.file.max_bytes as f64,
    )
    .await;
    let (status, body) = readyz(metrics).await;
    println!("while the store's disk is full: /readyz {status} {body}");

    // Space comes back: the store is reopened in the same process and counting catches up.
    std::fs::remove_file(&ballast).expect("ballast removed");
    let counted = wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(120),
        |v| v >= expected.events as f64,
    )
    .await;
    assert_eq!(scope.child(daemon).id(), pid);
    assert!(
        scope.child(daemon).try_wait().expect("status").is_none(),
        "the process never stopped"
    );
    wait_for_metric(
        metrics,
        "pleiades_file_retention_blocked_bytes",
        Duration::from_secs(30),
        |v| v == 0.0,
    )
    .await;
    let after = scrape(metrics).await.expect("scrape");
    assert!(after["pleiades_store_reopens_total"] >= 1.0, "{after:?}");
    let (status, body) = readyz(metrics).await;
    assert_eq!(status, 200, "{body}");
    let copy = scope.path("counters-copy.db");
    std::fs::copy(scope.inside(daemon, "store/counters.db"), &copy).expect("store copied");
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(15)).await,
        Some(0)
    );
    let found = stored(
        &open_store(&StoreSettings::Embedded(StoreConfig {
            kind: StoreKind::Embedded,
            path: copy,
        }))
        .await,
    )
    .await;
    assert_counters_equal(&found, &expected);
    for line in without_colours(&scope.logs())
        .lines()
        .filter(|l| l.contains("deleted a counted event segment"))
    {
        let field = |name: &str| {
            line.split(&format!("{name}="))
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned)
        };
        assert_eq!(field("stored_position"), field("length"), "{line}");
    }
    println!(
        "store disk full: {stuck} bytes kept uncounted past the budget, {} store errors, {} reopens, {counted} events counted exactly",
        after["pleiades_store_errors_total"], after["pleiades_store_reopens_total"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs unshare -Urm for a small file system (scripts/test)"
)]
async fn a_full_bus_disk_pauses_ingest_and_loses_nothing() {
    let _shared = ALONE.read().await;
    assert!(namespaces_work(), "unshare -Urm is refused on this machine");
    let mut scope = TestScope::new();
    let lines = recorded_lines();
    let expected = expected_ids(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(600.0);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    let mut config = ingest_config(upstream, metrics);
    config.file.segment_bytes = 64 * 1024;
    scope.write_config(&config);
    let daemon =
        scope.spawn_with_small_disks(&[("events", 16 << 20)], &["--config", "pleiades.toml"]);
    let bus = scope.inside(daemon, "events");
    wait_until(Duration::from_secs(30), "events on the bus", async || {
        (bus_lines(&bus).len() >= 1000).then_some(())
    })
    .await;

    let ballast = fill_disk(&bus);
    wait_for_metric(
        metrics,
        "pleiades_ingest_write_blocked",
        Duration::from_secs(30),
        |v| v == 1.0,
    )
    .await;
    let (status, body) = readyz(metrics).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("\"bus_writes\"") && body.contains("No space left"),
        "{body}"
    );
    let paused_at = bus_lines(&bus).len();
    // Paused for real: a second later the bus holds no more events (reading is stopped).
    let held = wait_until(Duration::from_secs(5), "a second of pause", async || {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(bus_lines(&bus).len())
    })
    .await;
    assert_eq!(held, paused_at);
    assert!(
        paused_at < expected.len(),
        "the disk filled before the stream ended"
    );

    std::fs::remove_file(&ballast).expect("ballast removed");
    wait_until(
        Duration::from_secs(60),
        "every event on the bus",
        async || (bus_lines(&bus).len() >= expected.len()).then_some(()),
    )
    .await;
    let scraped = scrape(metrics).await.expect("scrape");
    assert_eq!(scraped["pleiades_ingest_write_blocked"], 0.0);
    assert_eq!(scraped["pleiades_ingest_write_pauses_total"], 1.0);
    assert_eq!(
        scraped["pleiades_goroutine_restarts{component=\"ingest\"}"],
        0.0
    );
    assert_eq!(readyz(metrics).await.0, 200);
    assert_exactly_once(&bus_lines(&bus), &expected);
    let logs = without_colours(&scope.logs());
    assert_eq!(
        logs.matches("the bus refuses writes").count(),
        1,
        "one line per change"
    );
    assert_eq!(logs.matches("the bus takes writes again").count(), 1);
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(15)).await,
        Some(0)
    );
    println!(
        "bus disk full after {paused_at} events: paused, /readyz 503, then all {} events exactly once",
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingesters_started_together_on_one_directory_write_every_event_once() {
    let _shared = ALONE.read().await;
    let mut scope = TestScope::new();
    let lines = recorded_lines();
    let expected_events = expected_ids(&lines);
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("events written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(3000.0);
    let upstream = scope.replay(options).await.addr;
    let ports = [TestScope::free_port(), TestScope::free_port()];
    let configs: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(n, port)| {
            scope
                .write_config_as(&format!("ingest-{n}.toml"), &ingest_config(upstream, *port))
                .display()
                .to_string()
        })
        .collect();
    // The daemon and the original `ingest` personality, at the same instant.
    let first = scope.spawn(&["--config", &configs[0]]);
    let second = scope.spawn(&["ingest", "--config", &configs[1]]);
    let (winner, loser) = scope
        .first_to_exit(
            (first, second),
            Duration::from_secs(30),
            "one ingester to exit",
        )
        .await;
    let status = scope.child(loser).wait().expect("exit status");
    assert_eq!(status.code(), Some(2), "the second ingester exits 2");
    let winner_pid = scope.child(winner).id();
    let message = without_colours(
        &std::fs::read_to_string(scope.path(&format!("daemon-{loser}.log"))).expect("log"),
    );
    assert!(
        message.contains("written by another ingester")
            && message.contains(&format!("held by pid {winner_pid}")),
        "the refusal names the holder:\n{message}"
    );
    let bus = scope.path("events");
    wait_until(
        Duration::from_secs(60),
        "every event on the bus",
        async || (bus_lines(&bus).len() >= expected_events.len()).then_some(()),
    )
    .await;
    assert_exactly_once(&bus_lines(&bus), &expected_events);
    assert_eq!(
        scope.terminate(winner, Duration::from_secs(15)).await,
        Some(0)
    );

    // And counted exactly, by an aggregator of its own.
    let metrics = TestScope::free_port();
    let mut aggregate = ingest_config(upstream, metrics);
    aggregate.ingest.enabled = false;
    aggregate.aggregate.enabled = true;
    aggregate.store.path = "counters.db".into();
    let path = scope.write_config_as("aggregate.toml", &aggregate);
    let counter = scope.spawn(&["--config", &path.display().to_string()]);
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(60),
        |v| v >= expected.events as f64,
    )
    .await;
    assert_eq!(
        scope.terminate(counter, Duration::from_secs(15)).await,
        Some(0)
    );
    let found = stored(
        &open_store(&StoreSettings::Embedded(StoreConfig {
            kind: StoreKind::Embedded,
            path: scope.path("counters.db"),
        }))
        .await,
    )
    .await;
    assert_counters_equal(&found, &expected);
    println!(
        "two ingesters: the loser exited 2 with {:?}",
        message
            .lines()
            .find(|l| l.contains("another ingester"))
            .unwrap_or("")
    );
}
