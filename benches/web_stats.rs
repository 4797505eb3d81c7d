//! `GET /api/stats/{day}` under load: an embedded store holding 365 days × 1,000 counters, the
//! web role serving it, and batches being applied for today the whole time (aggregation running).
//! Prints requests per second and latency percentiles; the load generator shares the machine.

use pleiades::config::Config;
use pleiades::counters::Tally;
use pleiades::metrics::Metrics;
use pleiades::store::{Batch, Store};
use pleiades::ComponentContext;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const DAYS: i64 = 365;
const COUNTERS: usize = 1000;
/// Concurrent clients of each load level; the load generator runs on the same two cores.
const LEVELS: [usize; 3] = [4, 8, 16];
const RUN: Duration = Duration::from_secs(8);

fn day_tally(day: i64, scale: i64) -> Tally {
    let counters = (0..COUNTERS)
        .map(|c| (format!("pleiades_wiki_wiki{c:04}"), scale * (c as i64 + 1)))
        .collect();
    Tally {
        days: [(day, counters)].into_iter().collect(),
        events: 1,
        ..Tally::default()
    }
}

/// Runs `clients` request loops against the server for `RUN`; returns every latency, sorted.
async fn load(addr: std::net::SocketAddr, first: i64, clients: usize) -> Vec<Duration> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let deadline = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for worker in 0..clients {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = worker as i64;
            while Instant::now() < deadline {
                // Spread over every day, today included.
                let day = first + (n * 7919).rem_euclid(DAYS);
                n += 1;
                let sent = Instant::now();
                let response = client
                    .get(format!("http://{addr}/api/stats/{day}"))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(response.status(), 200);
                let body = response.bytes().await.expect("body");
                assert!(body.len() > 50_000);
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client"));
    }
    all.sort();
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = Config::default();
    config.store.path = dir.path().join("bench.db");
    config.web.listen = "127.0.0.1:0".parse().expect("addr");
    let metrics = Arc::new(Metrics::new(1).expect("metrics"));
    let store = Store::open(&config.store_settings(), metrics.store.clone())
        .await
        .expect("store");
    let today = pleiades::web::api::today();
    let first = today - DAYS + 1;
    let started = Instant::now();
    let mut position = 0;
    for day in first..=today {
        let batch = Batch {
            source: "bench".into(),
            start: position,
            end: position + 1,
            tally: day_tally(day, 1).into(),
        };
        store.apply(&batch).await.expect("apply");
        position += 1;
    }
    println!(
        "store filled: {DAYS} days x {COUNTERS} counters in {:?}",
        started.elapsed()
    );

    let shutdown = CancellationToken::new();
    let ctx = ComponentContext {
        config: config.web.clone(),
        metrics,
        shutdown: shutdown.clone(),
    };
    let (_live_tx, live) = tokio::sync::watch::channel(String::new());
    let parts = pleiades::web::WebParts {
        store: store.clone(),
        readiness: Default::default(),
        live,
        relay: None,
    };
    let (addr, _server) = pleiades::web::serve(ctx, parts).await.expect("web");

    // Aggregation keeps running: a batch for today every 50 ms.
    let writer = {
        let store = store.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut applied = 0u64;
            while !shutdown.is_cancelled() {
                let batch = Batch {
                    source: "bench".into(),
                    start: position,
                    end: position + 1,
                    tally: day_tally(today, 1).into(),
                };
                store.apply(&batch).await.expect("apply");
                position += 1;
                applied += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            applied
        })
    };

    println!("GET /api/stats/{{day}} ({COUNTERS} counters, ~100 KB each) while a batch for today is applied every 50 ms:");
    for clients in LEVELS {
        let all = load(addr, first, clients).await;
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
        println!(
            "  {clients:>2} clients: {:>6.0} requests/s   p50 {:>9.3?}  p90 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}",
            all.len() as f64 / RUN.as_secs_f64(),
            pct(0.50),
            pct(0.90),
            pct(0.99),
            all[all.len() - 1]
        );
    }
    shutdown.cancel();
    let applied = writer.await.expect("writer");
    println!("  batches applied during the runs: {applied}");
}
