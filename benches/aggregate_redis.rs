//! Aggregation throughput into Redis: Pleiades' batched, scripted apply against a baseline that
//! issues one INCRBY round trip per counter per event (the original design), on the same
//! `redis-server` in the same run. Needs `redis-server` on the PATH; prints figures.

use pleiades::counters::{Deltas, Scratch, Tally};
use pleiades::store::redis::RedisStore;
use pleiades::store::{Applied, Batch};
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

async fn pleiades_batched(store: &RedisStore, events: &[String], batch_events: usize) -> Duration {
    let started = Instant::now();
    let mut name = String::new();
    let mut position = 0u64;
    for chunk in events.chunks(batch_events) {
        let mut tally = Tally::default();
        for event in chunk {
            let head = pleiades::event::inspect(event).expect("valid");
            let mut scratch = Scratch::default();
            tally.add(&Deltas::of(&head, &mut scratch), &mut name);
        }
        let batch = Batch {
            source: "bench".into(),
            start: position,
            end: position + chunk.len() as u64,
            tally,
        };
        assert_eq!(store.apply(&batch).await.expect("apply"), Applied::Counted);
        position = batch.end;
    }
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
    let config = pleiades::config::RedisConfig {
        url: url.clone(),
        ..pleiades::config::RedisConfig::default()
    };
    let metrics = pleiades::metrics::Metrics::new(1).expect("metrics");
    let store = RedisStore::open(&config, metrics.store.clone()).expect("store");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.ping().await.is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let ours_n = 100_000;
    let base_n = 10_000;
    let events = recorded_events(ours_n);
    println!("Aggregation into redis-server on loopback, one run (best of 3 each)");
    let mut ours = Duration::MAX;
    let mut base = Duration::MAX;
    for round in 0..3 {
        flush(&url).await;
        ours = ours.min(pleiades_batched(&store, &events, 2000).await);
        base = base.min(incr_per_counter(&url, &events[..base_n]).await);
        println!("  round {round}: done");
    }
    let ours_rate = ours_n as f64 / ours.as_secs_f64();
    let base_rate = base_n as f64 / base.as_secs_f64();
    println!("  pleiades (batches of 2000, one script call each): {ours_n} events in {ours:?} = {ours_rate:.0} events/s");
    println!("  baseline (one INCRBY round trip per counter per event): {base_n} events in {base:?} = {base_rate:.0} events/s");
    println!("  speed-up: {:.1}x", ours_rate / base_rate);
    let _ = server.kill();
    let _ = server.wait();
}
