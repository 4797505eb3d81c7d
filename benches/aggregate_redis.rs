//! Aggregation throughput into Redis: Pleiades' batched, scripted apply against a baseline that
//! issues one INCRBY round trip per counter per event (the original design), on the same
//! `redis-server` in the same run; and Pleiades with and without the further dimensions
//! (`aggregate.statistics`), with the Redis commands each costs per event, in batches of 2,000
//! events and in batches of the default `aggregate.batch_events` (a backfill's), and the
//! counting alone without a store. Needs `redis-server` on the PATH; prints figures. For a
//! profiler, `PROFILE_FULL=1` runs ten passes with every dimension into Redis and
//! `PROFILE_COUNTING=1` twenty passes of the counting alone, and nothing else.

use pleiades::config::Statistics;
use pleiades::counters::{Deltas, OpenTally, Scratch};
use pleiades::store::{Applied, Batch, Store};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recorded_events(count: usize) -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/events");
    let mut recorded = Vec::new();
    for file in [
        "recentchange-2022-2026.jsonl",
        "recentchange-2018-wikidata.jsonl",
    ] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).expect("recorded events");
        recorded.extend(text.lines().map(str::to_owned));
    }
    // Re-stamped into one day, as a live stream's batch would be.
    let base = 1_767_225_600_000_i64;
    (0..count)
        .map(|i| {
            let mut v: serde_json::Value =
                serde_json::from_str(&recorded[i % recorded.len()]).expect("JSON");
            let ms = base + (i as i64 * 997) % 86_400_000;
            v["meta"]["id"] = format!("bench-{i}").into();
            v["meta"]["dt"] = chrono::DateTime::from_timestamp_millis(ms)
                .expect("time")
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into();
            v.to_string()
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a port")
}

async fn pleiades_batched(
    store: &Store,
    events: &[String],
    batch_events: usize,
    statistics: Statistics,
) -> Duration {
    let started = Instant::now();
    let mut position = 0u64;
    let mut tally = OpenTally::default();
    let mut in_store = Duration::ZERO;
    for chunk in events.chunks(batch_events) {
        for event in chunk {
            let head = pleiades::event::inspect(event).expect("valid");
            tally.count(&head, statistics == Statistics::Full);
        }
        let batch = Batch {
            source: "bench".into(),
            start: position,
            end: position + chunk.len() as u64,
            tally: tally.seal().into(),
        };
        let applying = Instant::now();
        assert_eq!(store.apply(&batch).await.expect("apply"), Applied::Counted);
        in_store += applying.elapsed();
        position = batch.end;
    }
    // Sketch merges run beside the batches; the last one started belongs to this run.
    let merged = Instant::now();
    while store.merging() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    eprintln!(
        "    ({statistics:?}: {in_store:?} of it in the store's apply, {:?} waiting for the last sketch merge)",
        merged.elapsed()
    );
    started.elapsed()
}

/// Counting alone, into a tally per batch as the aggregators do, without a store.
fn counting_only(events: &[String], batch_events: usize, statistics: Statistics) -> Duration {
    let started = Instant::now();
    let mut tally = OpenTally::default();
    let mut counted = 0;
    for chunk in events.chunks(batch_events) {
        for event in chunk {
            let head = pleiades::event::inspect(event).expect("valid");
            tally.count(&head, statistics == Statistics::Full);
        }
        counted += std::hint::black_box(tally.seal()).events;
    }
    assert_eq!(counted as usize, events.len());
    started.elapsed()
}

async fn incr_per_counter(url: &str, events: &[String]) -> Duration {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let started = Instant::now();
    let mut name = String::new();
    for event in events {
        let head = pleiades::event::inspect(event).expect("valid");
        let mut scratch = Scratch::default();
        let deltas = Deltas::of(&head, &mut scratch);
        let mut keys = Vec::new();
        deltas.for_each(&mut name, |counter, delta| {
            keys.push((format!("baseline:{counter}:{}", deltas.day), delta));
            keys.push((format!("baseline:{counter}:all"), delta));
        });
        for (key, delta) in keys {
            let _: i64 = redis::cmd("INCRBY")
                .arg(&key)
                .arg(delta)
                .query_async(&mut conn)
                .await
                .expect("INCRBY");
        }
    }
    started.elapsed()
}

/// Redis commands called since the last reset (the script's own included), without INFO and
/// CONFIG.
async fn commands(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("INFO");
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| !l.starts_with("info") && !l.starts_with("config"))
        .filter_map(|l| {
            l.split(',')
                .find_map(|kv| {
                    kv.split(':')
                        .nth(1)
                        .and_then(|kv| kv.strip_prefix("calls="))
                })
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

async fn reset_stats(url: &str) {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .expect("RESETSTAT");
}

async fn flush(url: &str) {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
}

#[tokio::main]
async fn main() {
    let port = free_port();
    let dir = tempfile::tempdir().expect("dir");
    let mut server = match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            println!("redis-server is needed for this benchmark ({e}); skipped");
            return;
        }
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let metrics = pleiades::metrics::Metrics::new(1).expect("metrics");
    let settings = pleiades::config::StoreSettings::Redis(pleiades::config::RedisConfig {
        url: url.clone(),
        ..pleiades::config::RedisConfig::default()
    });
    let store = Store::open(&settings, metrics.store.clone())
        .await
        .expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let ours_n = 100_000;
    let base_n = 10_000;
    let events = recorded_events(ours_n);
    println!("Aggregation into redis-server on loopback, one run (best of 3 each)");
    let mut full = Duration::MAX;
    let mut original = Duration::MAX;
    let mut base = Duration::MAX;
    let mut full_commands = 0;
    let mut original_commands = 0;
    // A backfill's batches are as large as `aggregate.batch_events` allows, where throughput
    // matters; live batches are cut by `aggregate.batch_delay` and are much smaller.
    let default_batch = pleiades::config::AggregateConfig::default().batch_events;
    let mut count_original = Duration::MAX;
    let mut count_full = Duration::MAX;
    let mut full_large = Duration::MAX;
    let mut original_large = Duration::MAX;
    if std::env::var_os("PROFILE_COUNTING").is_some() {
        for _ in 0..20 {
            counting_only(&events, 2000, Statistics::Full);
        }
        let _ = server.kill();
        return;
    }
    if std::env::var_os("PROFILE_FULL").is_some() {
        for _ in 0..10 {
            flush(&url).await;
            pleiades_batched(&store, &events, 2000, Statistics::Full).await;
        }
        return;
    }
    for round in 0..3 {
        count_original = count_original.min(counting_only(&events, 2000, Statistics::Original));
        count_full = count_full.min(counting_only(&events, 2000, Statistics::Full));
        flush(&url).await;
        reset_stats(&url).await;
        original =
            original.min(pleiades_batched(&store, &events, 2000, Statistics::Original).await);
        original_commands = commands(&url).await;
        flush(&url).await;
        reset_stats(&url).await;
        full = full.min(pleiades_batched(&store, &events, 2000, Statistics::Full).await);
        full_commands = commands(&url).await;
        flush(&url).await;
        original_large = original_large
            .min(pleiades_batched(&store, &events, default_batch, Statistics::Original).await);
        flush(&url).await;
        full_large = full_large
            .min(pleiades_batched(&store, &events, default_batch, Statistics::Full).await);
        base = base.min(incr_per_counter(&url, &events[..base_n]).await);

        println!("  round {round}: done");
    }
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let (full_rate, original_rate) = (rate(ours_n, full), rate(ours_n, original));
    let base_rate = rate(base_n, base);
    let per_event = |c: u64| c as f64 / ours_n as f64;
    println!("  pleiades, original counters only (batches of 2000, one script call each): {ours_n} events in {original:?} = {original_rate:.0} events/s, {:.4} Redis commands per event", per_event(original_commands));
    println!("  pleiades, with the further dimensions: {ours_n} events in {full:?} = {full_rate:.0} events/s, {:.4} Redis commands per event", per_event(full_commands));
    println!(
        "  the further dimensions cost {:.1} % of the throughput",
        100.0 * (1.0 - full_rate / original_rate)
    );
    let (full_large_rate, original_large_rate) =
        (rate(ours_n, full_large), rate(ours_n, original_large));
    println!("  with batches of aggregate.batch_events = {default_batch} (a backfill): {original_large_rate:.0} events/s original, {full_large_rate:.0} with the further dimensions: they cost {:.1} % of the throughput", 100.0 * (1.0 - full_large_rate / original_large_rate));
    println!(
        "  counting alone (parsing included, no store): {:.0} events/s original, {:.0} with the further dimensions",
        rate(ours_n, count_original),
        rate(ours_n, count_full)
    );
    println!("  baseline (one INCRBY round trip per counter per event): {base_n} events in {base:?} = {base_rate:.0} events/s");
    println!(
        "  speed-up of pleiades with every dimension over the baseline: {:.1}x",
        full_rate / base_rate
    );
    let _ = server.kill();
    let _ = server.wait();
}
