//! `pleiades reaggregate`: a rebuild from the bus into a fresh counter space beside the running
//! daemon, switched atomically. Redis: the real binary beside the real daemon, 200,000 events
//! over several days, the daemon counting new events throughout, and a request loop on
//! `/api/stats/{day}` that may only ever see the wrong old counters or the right new ones. The
//! embedded store: the same switch beside an aggregator of the same process, with a segment
//! that retention already deleted and a `--from`, from the command line too.

mod common;

use common::*;
use pleiades::aggregate::rebuild::{self, RebuildOptions};
use pleiades::aggregate::AggregateSettings;
use pleiades::config::{BusSettings, Config, StoreKind, StoreSettings};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DAY_MS: i64 = 86_400_000;
/// 2026-01-01, the first day of the synthetic events.
const BASE_MS: i64 = 1_767_225_600_000;

/// Writes `events` as segments of `per_segment` lines, numbered from `first`, as the ingester
/// would; returns the segment paths.
fn write_segments(
    dir: &Path,
    events: &[String],
    per_segment: usize,
    first: u64,
) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(dir).expect("bus dir");
    events
        .chunks(per_segment)
        .enumerate()
        .map(|(n, chunk)| {
            let path = dir.join(pleiades::bus::file::segment_name(first + n as u64));
            let mut text = String::new();
            for (i, event) in chunk.iter().enumerate() {
                text.push_str(&format!(
                    "{{\"id\":\"[{{\\\"offset\\\":{}}}]\",\"data\":{event}}}\n",
                    n * per_segment + i
                ));
            }
            std::fs::write(&path, text).expect("segment written");
            path
        })
        .collect()
}

/// Appends `events` to segment `path`, a line at a time as the ingester does.
fn append(path: &Path, events: &[String], first_offset: usize) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("live segment");
    let mut text = String::new();
    for (i, event) in events.iter().enumerate() {
        text.push_str(&format!(
            "{{\"id\":\"[{{\\\"offset\\\":{}}}]\",\"data\":{event}}}\n",
            first_offset + i
        ));
    }
    file.write_all(text.as_bytes()).expect("appended");
}

/// Events on `days` whole days from 2026-01-01, spread evenly, ids from `first_id`.
fn events_on_days(count: usize, days: i64, first_id: usize) -> Vec<String> {
    synthetic_events_at(count, |i| {
        BASE_MS + ((i as i64) * days * DAY_MS) / count as i64
    })
    .into_iter()
    .enumerate()
    .map(|(i, line)| line.replace("\"synthetic-", &format!("\"synthetic-{first_id}-{i}-")))
    .collect()
}

/// The daemon with the aggregate and web roles only, on the file bus in `bus`.
fn daemon_config(bus: &Path, metrics: u16, web: u16) -> Config {
    let mut config = Config::default();
    config.ingest.enabled = false;
    config.aggregate.enabled = true;
    config.aggregate.batch_delay = ms(50);
    config.aggregate.poll_interval = ms(20);
    config.web.enabled = true;
    config.web.listen = loopback(web);
    config.web.cache_ttl = ms(20);
    config.metrics.listen = loopback(metrics);
    config.file.dir = bus.to_owned();
    config.file.retention = Duration::from_secs(100 * 365 * 86_400);
    config
}

/// The events a clean pass counts (the recorded events include canaries and invalid ones).
fn total_of(events: &[String]) -> i64 {
    oracle(events).events as i64
}

async fn api_day(web: u16, day: i64) -> Option<BTreeMap<String, i64>> {
    let response = reqwest::get(format!("http://127.0.0.1:{web}/api/stats/{day}"))
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    Some(counters_of(&response.json().await.ok()?))
}

async fn api_total(web: u16) -> Option<i64> {
    let response = reqwest::get(format!("http://127.0.0.1:{web}/api/totals"))
        .await
        .ok()?;
    counters_of(&response.json().await.ok()?)
        .get("pleiades_total")
        .copied()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn a_rebuild_beside_the_running_daemon_switches_at_once_on_redis() {
    let mut scope = TestScope::new();
    let redis = RedisServer::start(&scope, false).await;
    let bus = scope.path("bus");
    // 200,000 events over five days in four segments, the oldest compressed.
    let history = events_on_days(200_000, 5, 0);
    let paths = write_segments(&bus, &history, 50_000, 1);
    pleiades::bus::file::compressed::compress_segment(&paths[0], 3).expect("compressed");
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut config = daemon_config(&bus, metrics, web);
    config.store.kind = StoreKind::Redis;
    config.redis.url = redis.url();
    let config_path = scope.write_config(&config);
    let daemon = scope.spawn(&["--config", config_path.to_str().unwrap()]);
    wait_until(
        Duration::from_secs(120),
        "the daemon counting the history",
        async || (api_total(web).await == Some(total_of(&history))).then_some(()),
    )
    .await;

    // Wrong counters on purpose: every day of the history gains 1,000 events and a counter no
    // rule makes, so that the old and the new value of each day differ, whole.
    let history_days: Vec<i64> = (0..5).map(|d| BASE_MS / DAY_MS + d).collect();
    for day in &history_days {
        let key = format!("{{pleiades}}:day:{day}");
        redis
            .query(&["HINCRBY", &key, "pleiades_total", "1000"])
            .await
            .expect("bad counter");
        redis
            .query(&["HSET", &key, "pleiades_wiki_bogus", "7"])
            .await
            .expect("bad counter");
    }
    let store = open_store(&StoreSettings::Redis(config.redis.clone())).await;
    let mut old = BTreeMap::new();
    for day in &history_days {
        old.insert(*day, store.day(*day).await.unwrap().unwrap());
    }
    let expected_history = oracle(&history);

    // The daemon keeps counting: new events on a sixth day, appended to a new segment all
    // through the rebuild.
    let writing = Arc::new(AtomicBool::new(true));
    let live_path = bus.join(pleiades::bus::file::segment_name(5));
    let live_day_events = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let (writing, live_path, written) =
            (writing.clone(), live_path.clone(), live_day_events.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while writing.load(Ordering::Relaxed) {
                let chunk: Vec<String> = synthetic_events_at(40, |i| {
                    BASE_MS + 5 * DAY_MS + ((n + i) as i64 % 86_400) * 1000
                })
                .into_iter()
                .enumerate()
                .map(|(i, line)| line.replace("\"synthetic-", &format!("\"live-{}-", n + i)))
                .collect();
                append(&live_path, &chunk, n);
                written.lock().unwrap().extend(chunk);
                n += 40;
                tokio::time::sleep(ms(50)).await;
            }
        })
    };

    // The request loop: every answer for a history day is its whole old or its whole new value.
    let polling = Arc::new(AtomicBool::new(true));
    let poller = {
        let (polling, days) = (polling.clone(), history_days.clone());
        tokio::spawn(async move {
            // Every change of each day's answer, in order.
            let mut seen: Vec<(i64, BTreeMap<String, i64>)> = Vec::new();
            let mut last = BTreeMap::new();
            let mut requests = 0u64;
            while polling.load(Ordering::Relaxed) {
                for day in &days {
                    if let Some(counters) = api_day(web, *day).await {
                        requests += 1;
                        if last.get(day) != Some(&counters) {
                            last.insert(*day, counters.clone());
                            seen.push((*day, counters));
                        }
                    }
                }
            }
            (seen, requests)
        })
    };

    let started = Instant::now();
    let output = tokio::process::Command::new(binary())
        .args([
            "--config",
            config_path.to_str().unwrap(),
            // A rebuild of this size takes about a second: progress lines come more often.
            "--progress-interval",
            "100ms",
            "reaggregate",
        ])
        .current_dir(scope.path(""))
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("reaggregate runs");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "reaggregate failed: {stdout}\n{stderr}"
    );
    println!("{stdout}");
    println!(
        "reaggregate of {} history events beside the daemon: {:.1} s, {:.0} events/s (the binary's own figure above)",
        history.len(),
        elapsed.as_secs_f64(),
        history.len() as f64 / elapsed.as_secs_f64()
    );
    // Off a terminal, the progress display writes periodic log lines.
    assert!(
        stderr.contains("progress task=reaggregate"),
        "no progress lines: {stderr}"
    );
    assert!(stdout.contains("rebuilt 6 day(s)"), "{stdout}");

    // Let the daemon count the last live events, then compare everything with a clean pass.
    writing.store(false, Ordering::Relaxed);
    writer.await.unwrap();
    let live_events = live_day_events.lock().unwrap().clone();
    let everything: Vec<String> = history.iter().chain(&live_events).cloned().collect();
    let total = total_of(&everything);
    wait_until(
        Duration::from_secs(60),
        "the daemon counting the live events",
        async || (api_total(web).await == Some(total)).then_some(()),
    )
    .await;
    polling.store(false, Ordering::Relaxed);
    let (seen, requests) = poller.await.unwrap();
    assert_counters_equal(&stored(&store).await, &oracle(&everything));
    assert!(
        scope.child(daemon).try_wait().unwrap().is_none(),
        "the daemon kept running"
    );

    let mut switched = BTreeSet::new();
    for (day, counters) in &seen {
        let new = &expected_history.days[day];
        if counters == new {
            switched.insert(*day);
        } else {
            assert_eq!(
                counters, &old[day],
                "day {day} showed a value that is neither old nor new"
            );
            assert!(
                !switched.contains(day),
                "day {day} went back to its old value"
            );
        }
    }
    assert_eq!(
        switched.len(),
        history_days.len(),
        "every day showed its new value"
    );
    assert!(
        seen.len() >= 2 * history_days.len(),
        "the loop saw old values before the switch: {seen:?}"
    );
    println!(
        "{requests} requests during the rebuild; {} live events counted meanwhile",
        live_events.len()
    );
}

/// An aggregator of this process on the embedded store, as the daemon runs it.
fn aggregator(
    settings: &AggregateSettings,
    store: &pleiades::store::Store,
    metrics: &Arc<pleiades::metrics::Metrics>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let ctx = pleiades::ComponentContext {
        config: settings.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let store = store.clone();
    tokio::spawn(async move {
        pleiades::aggregate::run(ctx, store, 0)
            .await
            .expect("the aggregator counts");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_store_switches_beside_its_aggregator_and_keeps_what_the_bus_lost() {
    let scope = TestScope::new();
    let bus = scope.path("bus");
    // Days 0 to 3; segment 1 holds days 0 and 1, and retention will have deleted it.
    let history = events_on_days(20_000, 4, 0);
    let paths = write_segments(&bus, &history, 7_000, 1);
    let mut config = daemon_config(&bus, TestScope::free_port(), TestScope::free_port());
    config.store.path = scope.path("counters.db");
    config.aggregate.workers = 1;
    let settings = AggregateSettings {
        aggregate: config.aggregate.clone(),
        bus: BusSettings::File(config.file.clone()),
    };
    let metrics = Arc::new(pleiades::metrics::Metrics::new(1).unwrap());
    let store = pleiades::store::Store::open(
        &StoreSettings::Embedded(config.store.clone()),
        metrics.store.clone(),
    )
    .await
    .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let counting = aggregator(&settings, &store, &metrics, &shutdown);
    let everything_total = total_of(&history);
    wait_until(Duration::from_secs(60), "the history counted", async || {
        let all = store.all_time().await.ok()?;
        (all.get("pleiades_total") == Some(&everything_total)).then_some(())
    })
    .await;
    // Segment 1 goes, as retention deletes a counted segment; its days' counters stay.
    std::fs::remove_file(&paths[0]).unwrap();
    let first_day = BASE_MS / DAY_MS;
    let before = stored(&store).await;

    // Wrong counters for the last day, as a changed rule would have left them: the rebuild
    // must replace them. They are written as the daemon writes, one batch with its position,
    // on a source of its own that the rebuild copies as lost.
    let bogus = pleiades::store::Batch {
        source: "file:segment-00000000000000000000.jsonl".into(),
        start: 0,
        end: 1,
        tally: pleiades::counters::Tally {
            days: [(
                first_day + 3,
                [("pleiades_total".to_owned(), 5)].into_iter().collect(),
            )]
            .into_iter()
            .collect(),
            events: 5,
            ..Default::default()
        }
        .into(),
    };
    assert_eq!(
        store.apply(&bogus).await.unwrap(),
        pleiades::store::Applied::Counted
    );
    let old_last = store.day(first_day + 3).await.unwrap().unwrap();

    // New events on day 3 keep arriving while the rebuild runs.
    let live_path = bus.join(pleiades::bus::file::segment_name(9));
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (writing, live_path) = (writing.clone(), live_path.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut n = 0;
            while writing.load(Ordering::Relaxed) || n < 2_000 {
                let chunk: Vec<String> =
                    synthetic_events_at(100, |i| BASE_MS + 3 * DAY_MS + ((n + i) as i64) * 1000)
                        .into_iter()
                        .enumerate()
                        .map(|(i, l)| l.replace("\"synthetic-", &format!("\"live-{}-", n + i)))
                        .collect();
                append(&live_path, &chunk, n);
                written.extend(chunk);
                n += 100;
                tokio::time::sleep(ms(5)).await;
            }
            written
        })
    };
    let polling = Arc::new(AtomicBool::new(true));
    let poller = {
        let (polling, store) = (polling.clone(), store.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while polling.load(Ordering::Relaxed) {
                let counters = store.day(first_day + 2).await.unwrap().unwrap();
                if seen.last() != Some(&counters) {
                    seen.push(counters);
                }
            }
            seen
        })
    };
    let ctx = pleiades::ComponentContext {
        config: settings.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.child_token(),
    };
    let report = rebuild::run(
        ctx,
        store.clone(),
        RebuildOptions {
            from: Some(first_day + 1),
            to: None,
        },
    )
    .await
    .expect("the rebuild switches");
    writing.store(false, Ordering::Relaxed);
    let live_events = writer.await.unwrap();
    polling.store(false, Ordering::Relaxed);
    let seen = poller.await.unwrap();

    // Day 0 is outside the range, day 1 lost some events with segment 1: both keep their
    // counters. Days 2 and 3 are rebuilt, so day 3 loses the wrong counters.
    assert_eq!(report.lost_days, vec![first_day + 1]);
    assert_eq!(report.outside_days, 1);
    assert_eq!(report.rebuilt_days, vec![first_day + 2, first_day + 3]);
    assert_eq!(
        report.lost_sources,
        vec![
            "file:segment-00000000000000000000.jsonl".to_owned(),
            "file:segment-00000000000000000001.jsonl".to_owned()
        ]
    );
    assert_ne!(store.day(first_day + 3).await.unwrap().unwrap(), old_last);
    let everything: Vec<String> = history.iter().chain(&live_events).cloned().collect();
    let total = total_of(&everything);
    wait_until(
        Duration::from_secs(60),
        "the live events counted",
        async || {
            let all = store.all_time().await.ok()?;
            (all.get("pleiades_total") == Some(&total)).then_some(())
        },
    )
    .await;
    let after = stored(&store).await;
    let clean = oracle(&everything);
    assert_eq!(after.days[&first_day], before.days[&first_day]);
    assert_eq!(after.days[&(first_day + 1)], before.days[&(first_day + 1)]);
    assert_counters_equal(&after, &clean);
    // Day 2 had no wrong counters and no new events: every read saw the one value.
    assert_eq!(seen, vec![clean.days[&(first_day + 2)].clone()]);
    shutdown.cancel();
    counting.await.unwrap();

    // The command line, with the daemon stopped: a second rebuild over the same bus, now with
    // the right counters, changes nothing and says what it kept.
    drop(store);
    let config_path = scope.write_config(&config);
    let output = std::process::Command::new(binary())
        .args([
            "--config",
            config_path.to_str().unwrap(),
            "reaggregate",
            "--from",
            "2026-01-02",
        ])
        .current_dir(scope.path(""))
        .env_remove("RUST_LOG")
        .output()
        .expect("reaggregate runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}: {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("kept 1 day(s) whose events the bus no longer holds: 2026-01-02"),
        "{stdout}"
    );
    assert!(
        stdout.contains("kept 1 day(s) outside --from/--to"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rebuilt 2 day(s): 2026-01-03, 2026-01-04"),
        "{stdout}"
    );
    let store = open_store(&StoreSettings::Embedded(config.store.clone())).await;
    assert_counters_equal(&stored(&store).await, &clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_segments_a_rebuild_has_not_read() {
    let scope = TestScope::new();
    let bus = scope.path("bus");
    let events = events_on_days(300, 1, 0);
    let paths = write_segments(&bus, &events, 100, 1);
    // Closed and compressed, so retention does not wait for the compressor to settle.
    for path in &paths[..2] {
        pleiades::bus::file::compressed::compress_segment(path, 3).expect("compressed");
    }
    let mut config = daemon_config(&bus, TestScope::free_port(), TestScope::free_port());
    config.store.path = scope.path("counters.db");
    // Over budget at once: every counted closed segment may go.
    config.file.max_bytes = 1;
    config.file.retention_interval = ms(20);
    let store = open_store(&StoreSettings::Embedded(config.store.clone())).await;
    let lengths: Vec<u64> = paths
        .iter()
        .map(|p| pleiades::bus::file::segment_len(p).unwrap())
        .collect();
    let counted = |n: usize| pleiades::store::Batch {
        source: pleiades::bus::file::source_key(n as u64 + 1),
        start: 0,
        end: lengths[n],
        tally: Default::default(),
    };
    for n in 0..3 {
        store.apply(&counted(n)).await.unwrap();
    }
    let now = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        store.begin_rebuild(now).await.unwrap(),
        pleiades::store::space::Lease::Taken
    );
    // A second rebuild is refused while the first holds the lease.
    assert!(matches!(
        store.begin_rebuild(now).await.unwrap(),
        pleiades::store::space::Lease::HeldElsewhere { .. }
    ));
    let metrics = Arc::new(pleiades::metrics::Metrics::new(1).unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ctx = pleiades::ComponentContext {
        config: config.file.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let retention = tokio::spawn(pleiades::aggregate::retention::run(
        ctx,
        store.clone(),
        pleiades::bus::Trouble::default(),
    ));
    let exists = |n: usize| {
        paths[n].exists() || pleiades::bus::file::compressed::compressed_path(&paths[n]).exists()
    };
    // Passes run (the gauge counts what each kept) and delete nothing the rebuild still needs.
    wait_until(Duration::from_secs(10), "a retention pass", async || {
        (metrics.retention.segments.get() == 3).then_some(())
    })
    .await;
    assert!(
        exists(0) && exists(1),
        "retention deleted what the rebuild has not read"
    );
    // Once the rebuild has read segment 1, it may go; segment 2 waits.
    store.rebuild_space().apply(&counted(0)).await.unwrap();
    wait_until(Duration::from_secs(10), "segment 1 deleted", async || {
        (!exists(0)).then_some(())
    })
    .await;
    assert!(exists(1));
    // Without the rebuild, retention goes back to the live positions alone.
    store.end_rebuild().await.unwrap();
    wait_until(Duration::from_secs(10), "segment 2 deleted", async || {
        (!exists(1)).then_some(())
    })
    .await;
    assert!(exists(2), "never the newest");
    shutdown.cancel();
    retention.await.unwrap().unwrap();
}
