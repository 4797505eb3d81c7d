//! Backfill at disk speed, in one run on one machine: the transport ceiling (`pleiades replay`
//! read by a plain HTTP client that only counts events), the single-host pipeline with the
//! default configuration, `file.fsync = "batch"` included (replay → ingester → event files →
//! aggregators → embedded store, until `/api/totals` shows every event), a recount (the
//! library's file aggregators counting the segments that pipeline wrote, compressed and not,
//! into an empty embedded store) and `pleiades reaggregate` of those segments into the
//! pipeline's store.
//!
//! `PLEIADES_BENCH_BASELINE=/path/to/an/older/pleiades` runs the pipeline with that binary
//! too, alternating with this build's, so that the two are compared under the same load.
//! `BACKFILL_EVENTS` changes the number of events (300,000 by default), `BACKFILL_ROUNDS` the
//! number of runs of this build (1 by default; each between two of the baseline's).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use futures_util::StreamExt;
use pleiades::config::{Config, StoreSettings};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The events of a run: the recorded ones, repeated with fresh `meta.id`s over a week.
fn event_count() -> usize {
    std::env::var("BACKFILL_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000)
}

/// The replay server serving `file` from the start, as fast as its client reads.
async fn upstream(scope: &TestScope, file: &Path) -> pleiades::replay::ReplayServer {
    let mut options = replay_options(vec![file.to_owned()]);
    options.disorder_ms = 0;
    options.heartbeat = Duration::from_secs(1);
    scope.replay(options).await
}

/// The transport ceiling: seconds until a plain client has read `total` events from a fresh
/// replay server (it counts `data:` lines, nothing more).
async fn ceiling(file: &Path, total: usize) -> f64 {
    let scope = TestScope::new();
    let server = upstream(&scope, file).await;
    let marker = b"\ndata:";
    let finder = memchr::memmem::Finder::new(marker);
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(format!("http://{}/v2/stream/recentchange", server.addr))
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("the replay server answers");
    let mut body = response.bytes_stream();
    let mut seen = 0;
    let mut tail: Vec<u8> = Vec::new();
    while seen < total {
        let chunk = body
            .next()
            .await
            .expect("the stream stays open")
            .expect("the stream reads");
        // A marker split across two reads is found in the tail of one joined to the next.
        tail.extend_from_slice(&chunk[..chunk.len().min(marker.len() - 1)]);
        seen += finder.find_iter(&tail).count() + finder.find_iter(&chunk).count();
        let keep = chunk.len().min(marker.len() - 1);
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - keep..]);
    }
    started.elapsed().as_secs_f64()
}

/// The single-host pipeline with the default configuration: the daemon `binary` with every
/// role, pointed at a fresh replay server. Returns the seconds from its start until
/// `/api/totals` counts `total` events, and the scope (its bus and store) for the rebuild.
async fn pipeline(binary: &Path, file: &Path, total: usize) -> (f64, TestScope) {
    let mut scope = TestScope::new();
    let server = upstream(&scope, file).await;
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut config = Config::default();
    config.ingest.url = format!("http://{}/v2/stream/recentchange", server.addr);
    config.ingest.user_agent = "pleiades-bench/1.0 (backfill)".into();
    // The events are dated in the past: retention must not delete what the rebuild reads.
    config.file.retention = Duration::from_secs(100 * 365 * 86_400);
    config.web.listen = loopback(web);
    config.metrics.listen = loopback(metrics);
    let path = scope.write_config(&config);
    let started = Instant::now();
    let daemon = scope.spawn_program(
        &binary.display().to_string(),
        &["--config", &path.display().to_string()],
    );
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{web}/api/totals");
    // When the bus, then the aggregators, first held every event: where the time goes.
    let (mut written, mut aggregated) = (None, None);
    try_wait_until(Duration::from_secs(900), async || {
        if let Some(m) = scrape(metrics).await {
            let at = Some(started.elapsed().as_secs_f64());
            let get = |name: &str| m.get(name).copied().unwrap_or(0.0) as usize;
            if written.is_none() && get("pleiades_file_publish_events_total") >= total {
                written = at;
            }
            if aggregated.is_none() && get("pleiades_aggregator_event_count_total") >= total {
                aggregated = at;
            }
        }
        let body: serde_json::Value = client.get(&url).send().await.ok()?.json().await.ok()?;
        let counted = counters_of(&body)
            .get(pleiades::counters::TOTAL)
            .copied()
            .unwrap_or(0);
        (counted as usize >= total).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{} did not count every event:\n{}",
            binary.display(),
            scope.logs()
        )
    });
    let seconds = started.elapsed().as_secs_f64();
    if let Some(m) = scrape(metrics).await {
        let get = |name: &str| m.get(name).copied().unwrap_or(0.0);
        let syncs = get("pleiades_file_publish_fsync_seconds_count");
        let batches = get("pleiades_aggregator_batch_events_count");
        println!(
            "  all on the bus after {:.2} s, all aggregated after {:.2} s",
            written.unwrap_or(f64::NAN),
            aggregated.unwrap_or(f64::NAN)
        );
        println!(
            "  bus: {syncs:.0} syncs ({:.1} ms each, {:.0} events per group); store: {batches:.0} batches ({:.1} ms each, {:.0} events per batch)",
            1000.0 * get("pleiades_file_publish_fsync_seconds_sum") / syncs.max(1.0),
            total as f64 / syncs.max(1.0),
            1000.0 * get("pleiades_store_apply_duration_seconds_sum") / batches.max(1.0),
            get("pleiades_aggregator_batch_events_sum") / batches.max(1.0),
        );
    }
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(60)).await,
        Some(0),
        "the daemon stops cleanly"
    );
    (seconds, scope)
}

/// The recount: the library's file aggregators (as many as the default configuration runs)
/// count the segments in `bus` into an empty embedded store, every dimension included. Returns
/// the seconds until the store holds `total` events, once its all-time counters equal those of
/// `live` (the store the pipeline filled).
async fn recount(bus: &Path, scratch: &Path, live: &Path, total: usize) -> f64 {
    let store_path = scratch.join("recounted.redb");
    let mut config = Config::default();
    config.file.dir = bus.to_owned();
    config.store.path = store_path.clone();
    let settings = pleiades::aggregate::AggregateSettings {
        aggregate: config.aggregate.clone(),
        bus: config.bus(config.aggregate_source()),
    };
    let store_settings = StoreSettings::Embedded(config.store.clone());
    let metrics = std::sync::Arc::new(
        pleiades::metrics::Metrics::new(config.aggregate.workers).expect("metrics"),
    );
    let store = pleiades::store::Store::open(&store_settings, metrics.store.clone())
        .await
        .expect("an empty store opens");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ctx = pleiades::ComponentContext {
        config: settings,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };
    let started = Instant::now();
    let workers: Vec<_> = (0..config.aggregate.workers)
        .map(|index| {
            tokio::spawn(pleiades::aggregate::run(
                ctx.with(ctx.config.clone()),
                store.clone(),
                index,
            ))
        })
        .collect();
    loop {
        let counted = store
            .all_time()
            .await
            .expect("the store reads")
            .get(pleiades::counters::TOTAL)
            .copied()
            .unwrap_or(0);
        if counted as usize >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    shutdown.cancel();
    for worker in workers {
        worker
            .await
            .expect("a worker ends")
            .expect("a worker ends cleanly");
    }
    let mut live_config = config.store.clone();
    live_config.path = live.to_owned();
    let live = open_store(&StoreSettings::Embedded(live_config)).await;
    assert_eq!(
        store.all_time().await.expect("the recounted store reads"),
        live.all_time().await.expect("the pipeline's store reads"),
        "the recount counts what the pipeline counted"
    );
    seconds
}

/// `pleiades reaggregate`, as the command runs it: the rebuild reads the segments in `bus`
/// into a fresh counter space of the pipeline's store (`live`, the daemon stopped) and switches
/// to it. Returns its seconds, once the all-time counters after the switch equal those before.
async fn reaggregate(bus: &Path, live: &Path, total: usize) -> f64 {
    let mut config = Config::default();
    config.file.dir = bus.to_owned();
    config.store.path = live.to_owned();
    let metrics = std::sync::Arc::new(pleiades::metrics::Metrics::new(1).expect("metrics"));
    let store = pleiades::store::Store::open(
        &StoreSettings::Embedded(config.store.clone()),
        metrics.store.clone(),
    )
    .await
    .expect("the pipeline's store opens");
    let before = store.all_time().await.expect("the store reads");
    let ctx = pleiades::ComponentContext {
        config: pleiades::aggregate::AggregateSettings {
            aggregate: config.aggregate.clone(),
            bus: config.bus(config.aggregate_source()),
        },
        metrics,
        shutdown: tokio_util::sync::CancellationToken::new(),
    };
    let started = Instant::now();
    let applies = ctx.metrics.aggregate.apply_seconds.clone();
    let report = pleiades::aggregate::rebuild::run(ctx, store.clone(), Default::default())
        .await
        .expect("the rebuild switches");
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "  {} rounds; {} batches written in {:.2} s",
        report.rounds,
        applies.get_sample_count(),
        applies.get_sample_sum()
    );
    assert_eq!(
        report.events as usize, total,
        "the rebuild counts every event"
    );
    assert_eq!(
        store.all_time().await.expect("the rebuilt store reads"),
        before,
        "the rebuild counts what the pipeline counted"
    );
    seconds
}

fn rate(events: usize, seconds: f64) -> f64 {
    events as f64 / seconds
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total = event_count();
    let work = TestScope::new();
    let file = work.path("events.jsonl");
    let events = synthetic_events(total, 7);
    let bytes: usize = events.iter().map(|e| e.len() + 1).sum();
    std::fs::write(&file, events.join("\n")).expect("events written");
    drop(events);
    let this: PathBuf = PathBuf::from(env!("CARGO_BIN_EXE_pleiades"));
    let baseline = std::env::var_os("PLEIADES_BENCH_BASELINE").map(PathBuf::from);
    println!(
        "{total} events ({:.0} MiB of JSON), default configuration (file.fsync = \"batch\")",
        bytes as f64 / (1 << 20) as f64
    );

    let ceiling_s = ceiling(&file, total).await;
    println!(
        "transport ceiling (replay read by a plain client): {:>8.2} s {:>9.0} events/s",
        ceiling_s,
        rate(total, ceiling_s)
    );
    // With a baseline: baseline, this build, baseline, … (`BACKFILL_ROUNDS` times this build),
    // so that both see the same drift of a noisy machine.
    let rounds: usize = std::env::var("BACKFILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut runs: Vec<(&str, PathBuf)> = Vec::new();
    for _ in 0..rounds.max(1) {
        if let Some(old) = &baseline {
            runs.push(("baseline", old.clone()));
        }
        runs.push(("this build", this.clone()));
    }
    if let Some(old) = &baseline {
        runs.push(("baseline", old.clone()));
    }
    let mut pipeline_s = f64::MAX;
    let mut last_scope = None;
    for (name, binary) in &runs {
        let (seconds, scope) = pipeline(binary, &file, total).await;
        println!(
            "end to end, {name:<10} (replay → files → embedded store): {:>8.2} s {:>9.0} events/s",
            seconds,
            rate(total, seconds)
        );
        if binary == &this {
            pipeline_s = pipeline_s.min(seconds);
            last_scope = Some(scope);
        }
    }
    let scope = last_scope.expect("this build ran");
    let bus = scope.path("events");
    let segments = segment_files(&bus).len();
    let live = scope.path("pleiades.db");
    let recount_s = recount(&bus, scope.dir.path(), &live, total).await;
    println!(
        "recount ({segments} segments → empty embedded store, aggregators): {:>8.2} s {:>9.0} events/s",
        recount_s,
        rate(total, recount_s)
    );
    let rebuild_s = reaggregate(&bus, &live, total).await;
    println!(
        "reaggregate ({segments} segments → the pipeline's store):     {:>8.2} s {:>9.0} events/s",
        rebuild_s,
        rate(total, rebuild_s)
    );
    println!(
        "ratios: end to end / ceiling {:.2}, rebuild / ceiling {:.2}, rebuild / end to end {:.2}",
        ceiling_s / pipeline_s,
        ceiling_s / rebuild_s,
        pipeline_s / rebuild_s
    );
    println!(
        "goals: end to end ≥ 100,000 events/s ({}), rebuild ≥ 250,000 events/s ({})",
        if rate(total, pipeline_s) >= 100_000.0 {
            "met"
        } else {
            "not met"
        },
        if rate(total, rebuild_s) >= 250_000.0 {
            "met"
        } else {
            "not met"
        }
    );
}
