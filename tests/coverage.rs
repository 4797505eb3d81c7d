//! Coverage end to end: a stream whose upstream offsets have holes of known sizes (inside a
//! day, over midnight, around a datacentre switch) and a day without offsets, counted through
//! the whole single-host pipeline while the daemon is killed with SIGKILL twice; the verdicts of
//! `/api/coverage` and of each day's `/api/stats/{day}` are then checked exactly, for both
//! stores, with the ingester's `pleiades_upstream_missed_events_total`.

mod common;

use common::*;
use pleiades::config::{Config, StoreKind};
use serde_json::{json, Value};
use std::time::Duration;

/// 2024-10-04, the first day of the stream.
const FIRST_DAY: i64 = 20000;
const DAY_MS: i64 = 86_400_000;
const EQIAD: &str = "eqiad.mediawiki.recentchange";
const CODFW: &str = "codfw.mediawiki.recentchange";

/// Where each event of the stream sits upstream, and when it happened.
struct Planned {
    time_ms: i64,
    /// `None`: the event carries no position at all.
    position: Option<(&'static str, u64)>,
}

/// The stream, in delivery order:
/// - day 0: 300 events, no hole (the daemon is killed twice here); its last event is stamped
///   just after midnight and the first of day 1 just before it, as upstream's times are not in
///   offset order, which must not look like a hole;
/// - day 1: 300 events with a hole of 3 and one of 7, and a hole of 5 between its last event
///   and the first of day 2;
/// - day 2: 200 more events from eqiad, then the switch to codfw, whose offsets start afresh
///   (not a hole), and 100 events from codfw;
/// - day 3: 100 events from codfw, no hole;
/// - day 4: 20 events without upstream positions.
fn plan() -> Vec<Planned> {
    let mut plan = Vec::new();
    let day = |d: i64| (FIRST_DAY + d) * DAY_MS;
    let mut eqiad = 1_000_000u64;
    let mut codfw = 7_000_000u64;
    for i in 0..300 {
        plan.push(Planned {
            time_ms: day(0) + 300_000 + i * 280_000,
            position: Some((EQIAD, eqiad)),
        });
        eqiad += 1;
    }
    for i in 0..300 {
        if i == 100 {
            eqiad += 3;
        }
        if i == 200 {
            eqiad += 7;
        }
        plan.push(Planned {
            time_ms: day(1) + 120_000 + i * 285_000,
            position: Some((EQIAD, eqiad)),
        });
        eqiad += 1;
    }
    // Day 0's last event after midnight, day 1's first before it.
    plan[299].time_ms = day(1) + 1_000;
    plan[300].time_ms = day(1) - 1_000;
    eqiad += 5;
    for i in 0..200 {
        plan.push(Planned {
            time_ms: day(2) + 60_000 + i * 200_000,
            position: Some((EQIAD, eqiad)),
        });
        eqiad += 1;
    }
    for i in 0..200 {
        let d = if i < 100 { 2 } else { 3 };
        plan.push(Planned {
            time_ms: day(d) + 50_000_000 + (i % 100) * 300_000,
            position: Some((CODFW, codfw)),
        });
        codfw += 1;
    }
    for i in 0..20 {
        plan.push(Planned {
            time_ms: day(4) + 3_600_000 + i * 60_000,
            position: None,
        });
    }
    plan
}

/// The recorded events, re-stamped and re-positioned as `plan` says.
fn stream(plan: &[Planned]) -> Vec<String> {
    let lines = synthetic_events_at(plan.len(), |i| plan[i].time_ms);
    lines
        .iter()
        .zip(plan)
        .map(|(line, planned)| {
            let mut v: Value = serde_json::from_str(line).expect("an event");
            let meta = v["meta"].as_object_mut().expect("meta");
            for key in ["topic", "partition", "offset"] {
                meta.remove(key);
            }
            if let Some((topic, offset)) = planned.position {
                meta.insert("topic".into(), topic.into());
                meta.insert("partition".into(), 0.into());
                meta.insert("offset".into(), offset.into());
            }
            v.to_string()
        })
        .collect()
}

fn at(plan: &[Planned], i: usize) -> String {
    chrono::DateTime::from_timestamp_millis(plan[i].time_ms)
        .expect("a time")
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// A hole between events `before` and `after` of `plan`.
fn gap(plan: &[Planned], before: usize, after: usize) -> Value {
    let (Some((topic, last)), Some((_, first))) = (plan[before].position, plan[after].position)
    else {
        panic!("a hole lies between positioned events");
    };
    json!({
        "topic": topic,
        "partition": 0,
        "missed": first - last - 1,
        "first_offset": last + 1,
        "last_offset": first - 1,
        "from": at(plan, before),
        "to": at(plan, after),
    })
}

/// The verdict every day of `FIRST_DAY - 1 ..= FIRST_DAY + 5` must get.
fn expected(plan: &[Planned]) -> Vec<Value> {
    let verdict = |day: i64, status: &str, gaps: Vec<Value>, switches: Vec<Value>, none: u64| {
        let missed: u64 = gaps.iter().filter_map(|g| g["missed"].as_u64()).sum();
        json!({
            "day": (FIRST_DAY + day).to_string(),
            "status": status,
            "missed": missed,
            "gaps": gaps,
            "switches": switches,
            "unpositioned": none,
        })
    };
    let midnight = gap(plan, 599, 600);
    let switch = json!({ "from": EQIAD, "to": CODFW, "at": at(plan, 800) });
    vec![
        verdict(-1, "unknown", vec![], vec![], 0),
        verdict(0, "complete", vec![], vec![], 0),
        verdict(
            1,
            "partial",
            vec![gap(plan, 399, 400), gap(plan, 499, 500), midnight.clone()],
            vec![],
            0,
        ),
        verdict(2, "partial", vec![midnight], vec![switch], 0),
        verdict(3, "complete", vec![], vec![], 0),
        verdict(4, "unknown", vec![], vec![], 20),
        verdict(5, "unknown", vec![], vec![], 0),
    ]
}

enum StoreChoice {
    Embedded,
    Redis(String),
}

fn config(upstream: std::net::SocketAddr, metrics: u16, web: u16, store: &StoreChoice) -> Config {
    let mut config = all_roles_config(upstream, metrics, web);
    config.store.path = "counters.db".into();
    config.aggregate.workers = 2;
    config.aggregate.batch_delay = ms(100);
    // Ask the store on every request, never a cached answer.
    config.web.cache_ttl = Duration::ZERO;
    if let StoreChoice::Redis(url) = store {
        config.store.kind = StoreKind::Redis;
        config.redis.url = url.clone();
    }
    config
}

async fn get(web: u16, path: &str) -> Option<(u16, Value)> {
    let response = reqwest::get(format!("http://127.0.0.1:{web}{path}"))
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

async fn holes_are_reported_exactly(store: StoreChoice) {
    let mut scope = TestScope::new();
    let plan = plan();
    let lines = stream(&plan);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).expect("stream written");
    let mut options = replay_options(vec![events]);
    options.rate = Some(150.0);
    let upstream = scope.replay(options).await.addr;
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    scope.write_config(&config(upstream, metrics, web, &store));
    let bus = scope.path("events");

    // Killed twice on day 0, before the first hole: the last daemon sees every hole, so its
    // metric must count each exactly once, and neither kill may leave a false one.
    let mut daemon = scope.spawn(&["--config", "pleiades.toml"]);
    for target in [90, 180] {
        wait_until(Duration::from_secs(60), "ingest progress", async || {
            (bus_lines(&bus).len() >= target).then_some(())
        })
        .await;
        scope.kill9(daemon);
        daemon = scope.spawn(&["--config", "pleiades.toml"]);
    }
    let total = lines.len() as i64;
    wait_until(
        Duration::from_secs(120),
        "every event counted",
        async || {
            let (status, totals) = get(web, "/api/totals").await?;
            (status == 200 && counters_of(&totals).get("pleiades_total") == Some(&total))
                .then_some(())
        },
    )
    .await;

    let expected = expected(&plan);
    let from = FIRST_DAY - 1;
    let to = FIRST_DAY + 5;
    let (status, body) = get(web, &format!("/api/coverage?from={from}&to={to}"))
        .await
        .expect("/api/coverage answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["from"], from.to_string());
    assert_eq!(body["to"], to.to_string());
    let days = body["days"].as_array().expect("a list of days");
    assert_eq!(days.len(), expected.len(), "{body:#}");
    for (found, expected) in days.iter().zip(&expected) {
        assert_eq!(found, expected, "/api/coverage");
    }
    // The same verdicts in each day's statistics, judged on their own (a range of one day
    // still sees the holes that open on the day before it), beside the original fields.
    for expected in &expected[1..6] {
        let day = expected["day"].as_str().expect("a day");
        let (status, body) = get(web, &format!("/api/stats/{day}"))
            .await
            .expect("/api/stats answers");
        assert_eq!(status, 200, "{body}");
        assert!(body["since"].is_i64(), "{body}");
        assert!(!counters_of(&body).is_empty(), "{body}");
        let mut verdict = expected.clone();
        verdict.as_object_mut().expect("an object").remove("day");
        assert_eq!(body["coverage"], verdict, "/api/stats/{day}");
        let (_, single) = get(web, &format!("/api/coverage?from={day}&to={day}"))
            .await
            .expect("/api/coverage answers");
        assert_eq!(
            &single["days"][0], expected,
            "/api/coverage for {day} alone"
        );
    }
    let (_, totals) = get(web, "/api/totals").await.expect("/api/totals answers");
    assert!(totals.get("coverage").is_none(), "all-time has no verdict");

    let missed = scrape(metrics)
        .await
        .and_then(|m| m.get("pleiades_upstream_missed_events_total").copied());
    assert_eq!(missed, Some(15.0), "3 + 7 + 5 offsets never arrived");
    let logs = scope.logs();
    assert_eq!(
        logs.matches("upstream offsets were skipped").count(),
        3,
        "one line per hole"
    );
    assert!(
        logs.contains("upstream switched topic"),
        "the switch is logged"
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holes_and_a_switch_are_reported_exactly_through_kill_9_embedded() {
    holes_are_reported_exactly(StoreChoice::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn holes_and_a_switch_are_reported_exactly_through_kill_9_redis() {
    let scope = TestScope::new();
    let redis = RedisServer::start(&scope, false).await;
    holes_are_reported_exactly(StoreChoice::Redis(redis.url())).await;
}
