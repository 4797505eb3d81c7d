//! What the further dimensions cost the single-host pipeline: the same events counted with
//! `aggregate.statistics = "original"` (SPEC §5 only) and `"full"` (every further dimension,
//! the per-hour counters and the sketches), alternating in one run.
//!
//! Two measurements, each a real daemon process: (1) aggregation of a bus already on disk (event
//! files → aggregators → embedded store), where all of the counting cost lies; (2) the whole
//! pipeline (replay → ingest → event files → aggregate → embedded store) until the daemon has
//! counted every event. Also prints the store's size on disk per day for each setting. Needs
//! nothing outside the repository; prints figures. For a profiler, `PROFILE_FULL=1` runs the
//! first measurement three times with every dimension, and nothing else.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use pleiades::config::Statistics;
use std::time::{Duration, Instant};

const ON_DISK: usize = 200_000;
const PIPELINE: usize = 40_000;
const DAYS: i64 = 4;
const ROUNDS: usize = 3;

/// Recorded events made into `count` with many distinct pages and editors: each recorded page
/// and registered editor comes in 40 variants, as a busy day has thousands of both.
fn varied_events(count: usize) -> Vec<String> {
    synthetic_events(count, DAYS)
        .into_iter()
        .enumerate()
        .map(|(i, line)| {
            let mut v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
            let variant = i % 40;
            if let Some(title) = v["title"].as_str() {
                v["title"] = format!("{title} {variant}").into();
            }
            if let Some(user) = v["user"].as_str() {
                if !user.starts_with('~') && !user.contains('.') && !user.contains(':') {
                    v["user"] = format!("{user} {variant}").into();
                }
            }
            v.to_string()
        })
        .collect()
}

fn store_bytes(scope: &TestScope) -> u64 {
    std::fs::metadata(scope.path("store.db"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Runs the daemon of `scope` until its aggregators have counted `events`; returns the seconds
/// that took.
async fn run_until_counted(scope: &mut TestScope, metrics: u16, events: usize) -> f64 {
    let started = Instant::now();
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let want = events as f64;
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(600),
        |v| v >= want,
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    scope.terminate(daemon, Duration::from_secs(30)).await;
    seconds
}

/// Counts the bus already written into `scope` with `statistics`; returns the seconds taken
/// and the store's size.
async fn aggregate_on_disk(events: &[String], statistics: Statistics) -> (f64, u64) {
    let mut scope = TestScope::new();
    write_bus(&scope.path("events"), events);
    let metrics = TestScope::free_port();
    let mut config = aggregate_config(metrics);
    config.store.path = scope.path("store.db");
    config.file.dir = scope.path("events");
    config.file.retention = Duration::from_secs(100 * 365 * 86_400);
    config.aggregate.statistics = statistics;
    scope.write_config(&config);
    let seconds = run_until_counted(&mut scope, metrics, events.len()).await;
    (seconds, store_bytes(&scope))
}

/// The whole single-host pipeline with `statistics`, from an in-process replay server.
async fn whole_pipeline(source: &std::path::Path, events: usize, statistics: Statistics) -> f64 {
    let mut scope = TestScope::new();
    let mut options = replay_options(vec![source.to_owned()]);
    options.step_ms = 0;
    options.disorder_ms = 0;
    let upstream = scope.replay(options).await;
    let metrics = TestScope::free_port();
    let mut config = all_roles_config(upstream.addr, metrics, TestScope::free_port());
    config.web.enabled = false;
    config.store.path = scope.path("store.db");
    config.file.dir = scope.path("events");
    config.aggregate.statistics = statistics;
    scope.write_config(&config);
    run_until_counted(&mut scope, metrics, events).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let on_disk = varied_events(ON_DISK);
    let pipeline = varied_events(PIPELINE);
    let source = tempfile::tempdir().expect("a directory");
    let source_file = source.path().join("events.jsonl");
    std::fs::write(&source_file, pipeline.join("\n") + "\n").expect("events written");

    if std::env::var_os("PROFILE_FULL").is_some() {
        for _ in 0..3 {
            aggregate_on_disk(&on_disk, Statistics::Full).await;
        }
        return;
    }
    println!("The further dimensions' cost, {ROUNDS} rounds alternating, {DAYS} days of events");
    let mut disk = [(f64::MAX, 0u64); 2];
    let mut whole = [f64::MAX; 2];
    for round in 1..=ROUNDS {
        for (i, statistics) in [Statistics::Original, Statistics::Full]
            .into_iter()
            .enumerate()
        {
            let (seconds, bytes) = aggregate_on_disk(&on_disk, statistics).await;
            let rate = ON_DISK as f64 / seconds;
            println!(
                "  round {round}, {statistics:?}: bus on disk -> store: {ON_DISK} events in {seconds:.2} s = {rate:.0} events/s, store {:.1} MiB",
                bytes as f64 / 1048576.0
            );
            disk[i] = (disk[i].0.min(seconds), bytes);
            let seconds = whole_pipeline(&source_file, PIPELINE, statistics).await;
            let rate = PIPELINE as f64 / seconds;
            println!(
                "  round {round}, {statistics:?}: replay -> ingest -> files -> store: {PIPELINE} events in {seconds:.2} s = {rate:.0} events/s"
            );
            whole[i] = whole[i].min(seconds);
        }
    }
    let cost = |original: f64, full: f64| 100.0 * (1.0 - original / full);
    println!(
        "best of {ROUNDS}: bus on disk -> store {:.0} events/s original, {:.0} full: the further dimensions cost {:.1} % of throughput",
        ON_DISK as f64 / disk[0].0,
        ON_DISK as f64 / disk[1].0,
        cost(disk[0].0, disk[1].0)
    );
    println!(
        "best of {ROUNDS}: whole pipeline {:.0} events/s original, {:.0} full: the further dimensions cost {:.1} % of throughput",
        PIPELINE as f64 / whole[0],
        PIPELINE as f64 / whole[1],
        cost(whole[0], whole[1])
    );
    println!(
        "store on disk for {DAYS} days: {:.1} MiB original, {:.1} MiB full ({:.2} MiB per day more)",
        disk[0].1 as f64 / 1048576.0,
        disk[1].1 as f64 / 1048576.0,
        (disk[1].1 as f64 - disk[0].1 as f64) / 1048576.0 / DAYS as f64
    );
}
