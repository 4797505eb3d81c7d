//! Hostile input and hostile networks, against the real binary: a hostile upstream
//! (`common::hostile`) plays each attack on the ingester, and hostile clients hold idle
//! connections, open live streams and read what the public listener tells. Nothing may crash,
//! stall or exhaust the daemon, and each attack shows in a metric.

mod common;

use common::hostile::{frame, frames, stream_id, Act, HostileUpstream, Then};
use common::*;
use pleiades::config::Config;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `count` valid events with ids `<prefix>-<n>`, made from the recorded ones (days in the past).
fn events(prefix: &str, count: usize) -> Vec<String> {
    synthetic_events(count, 30)
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let mut v: serde_json::Value = serde_json::from_str(&e).expect("JSON");
            v["meta"]["id"] = serde_json::json!(format!("{prefix}-{i}"));
            v.to_string()
        })
        .collect()
}

fn meta_id(event: &str) -> String {
    serde_json::from_str::<serde_json::Value>(event).expect("JSON")["meta"]["id"]
        .as_str()
        .expect("meta.id")
        .to_owned()
}

fn ids(events: &[String]) -> Vec<String> {
    events.iter().map(|e| meta_id(e)).collect()
}

/// An ingest-only configuration against `upstream`, quick to notice and to reconnect.
fn against(upstream: &HostileUpstream, metrics: u16) -> Config {
    let mut config = ingest_config(upstream.addr, metrics);
    config.ingest.url = upstream.url();
    config.ingest.stall_timeout = Duration::from_secs(1);
    config
}

/// [`against`], waiting at most a second when upstream asks for more.
fn against_impatient(upstream: &HostileUpstream, metrics: u16) -> Config {
    let mut config = against(upstream, metrics);
    config.ingest.max_retry_after = Duration::from_secs(1);
    config
}

async fn metric(port: u16, name: &str) -> f64 {
    scrape(port)
        .await
        .and_then(|m| m.get(name).copied())
        .unwrap_or_else(|| panic!("{name} is not exported"))
}

/// Waits until the bus holds every one of `expected`.
async fn wait_for_ids(scope: &TestScope, expected: &[String], limit: Duration) {
    let dir = scope.path("events");
    wait_until(limit, "every valid event on the bus", async || {
        let have: std::collections::HashSet<String> =
            bus_lines(&dir).into_iter().map(|(_, id)| id).collect();
        expected.iter().all(|id| have.contains(id)).then_some(())
    })
    .await;
}

/// The gap between the first connection and the next, once there is one.
async fn reconnect_gap(upstream: &HostileUpstream, limit: Duration) -> Duration {
    let seen = wait_until(limit, "a second connection", async || {
        let seen = upstream.seen();
        (seen.len() >= 2).then_some(seen)
    })
    .await;
    seen[1].at - seen[0].at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_line_costs_its_bytes_once_not_once_per_event() {
    let mut scope = TestScope::new();
    // A 256 KiB id, then 2,000 events without ids of their own, all in one write: once copied
    // into every event, this is half a gigabyte of memory and of bus.
    let first = events("before", 10);
    let after = events("after", 2000);
    let mut body = frames(&first, 0);
    body.push_str(&format!("id: {}\n\n", "9".repeat(256 * 1024)));
    for event in &after {
        body.push_str(&format!("data: {event}\n\n"));
    }
    let upstream = HostileUpstream::start(vec![Act::stream(body.into_bytes())]).await;
    let metrics = TestScope::free_port();
    scope.write_config(&against(&upstream, metrics));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let pid = scope.child(daemon).id();
    let mut expected = ids(&first);
    expected.extend(ids(&after));
    wait_for_ids(&scope, &expected, Duration::from_secs(60)).await;
    let peak = peak_rss_bytes(pid).expect("the daemon's memory");
    let long_ids = metric(metrics, "pleiades_recv_anomalies_total{kind=\"long_id\"}").await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let bus = bus_lines(&scope.path("events"));
    assert_exactly_once(&bus, &expected);
    let longest = bus.iter().map(|(id, _)| id.len()).max().unwrap_or(0);
    println!(
        "256 KiB id + 2,000 events: peak RSS {} MiB, longest id on the bus {longest} bytes",
        peak >> 20
    );
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(longest < 1024, "an id of {longest} bytes reached the bus");
    assert_eq!(long_ids, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_u64_max_is_clamped_not_a_panic() {
    let mut scope = TestScope::new();
    let batch = events("throttled", 50);
    let upstream = HostileUpstream::start(vec![
        Act::Refuse {
            status: 429,
            headers: vec![("Retry-After".into(), u64::MAX.to_string())],
        },
        Act::stream(frames(&batch, 0).into_bytes()),
    ])
    .await;
    let metrics = TestScope::free_port();
    scope.write_config(&against_impatient(&upstream, metrics));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let gap = reconnect_gap(&upstream, Duration::from_secs(20)).await;
    wait_for_ids(&scope, &ids(&batch), Duration::from_secs(20)).await;
    let m = scrape(metrics).await.expect("metrics");
    assert_eq!(m["pleiades_goroutine_restarts{component=\"ingest\"}"], 0.0);
    assert_eq!(
        m["pleiades_ingest_disconnects_total{reason=\"throttled\"}"],
        1.0
    );
    assert_eq!(
        m["pleiades_recv_anomalies_total{kind=\"retry_clamped\"}"],
        1.0
    );
    // Cut to ingest.max_retry_after (1 s), plus at most a tenth of jitter.
    println!("Retry-After: {}: reconnected after {gap:?}", u64::MAX);
    assert!(
        gap >= Duration::from_secs(1) && gap < Duration::from_secs(3),
        "{gap:?}"
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
}

/// Plays `first` (made from the frames of 20 events) on the first connection and 20 more events
/// on the next; returns once all 40 are on the bus exactly once, with the gap between the two
/// connections and the metrics then.
async fn reconnect_after(
    first: impl FnOnce(String) -> Act,
    config: fn(&HostileUpstream, u16) -> Config,
) -> (Duration, HashMap<String, f64>) {
    let mut scope = TestScope::new();
    let (before, after) = (events("first", 20), events("second", 20));
    let upstream = HostileUpstream::start(vec![
        first(frames(&before, 0)),
        Act::stream(frames(&after, 100).into_bytes()),
    ])
    .await;
    let metrics = TestScope::free_port();
    scope.write_config(&config(&upstream, metrics));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let gap = reconnect_gap(&upstream, Duration::from_secs(20)).await;
    let mut expected = ids(&before);
    expected.extend(ids(&after));
    wait_for_ids(&scope, &expected, Duration::from_secs(20)).await;
    let m = scrape(metrics).await.expect("metrics");
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&scope.path("events")), &expected);
    (gap, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_field_of_u64_max_is_clamped() {
    let first = |frames| Act::stream(format!("retry: {}\n{frames}", u64::MAX).into_bytes());
    let (gap, m) = reconnect_after(first, against_impatient).await;
    println!("retry: {}: reconnected after {gap:?}", u64::MAX);
    assert!(
        gap >= Duration::from_millis(900) && gap < Duration::from_secs(3),
        "{gap:?}"
    );
    assert_eq!(
        m["pleiades_recv_anomalies_total{kind=\"retry_clamped\"}"],
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_stream_is_reopened_by_the_watchdog() {
    // A byte every 100 ms, none of them completing a line: the 1 s watchdog still fires.
    let first = |frames: String| Act::Stream {
        chunks: vec![frames.into_bytes()],
        then: Then::Trickle { every: ms(100) },
    };
    let (gap, m) = reconnect_after(first, against).await;
    println!("a byte every 100 ms: reopened after {gap:?}");
    assert!(gap < Duration::from_secs(4), "{gap:?}");
    assert_eq!(
        m["pleiades_ingest_disconnects_total{reason=\"stalled\"}"],
        1.0
    );
    assert_eq!(
        m["pleiades_recv_anomalies_total{kind=\"slow_stream\"}"],
        1.0
    );
}

/// Compares the embedded store `counters.db` of `scope` with `expected`.
async fn assert_embedded_counters(scope: &TestScope, expected: &Expected) {
    let settings = pleiades::config::StoreSettings::Embedded(pleiades::config::StoreConfig {
        path: scope.path("counters.db"),
        ..Default::default()
    });
    assert_counters_equal(&stored(&open_store(&settings).await).await, expected);
}

/// Events whose `length` no page can have, one per way of getting it wrong.
fn absurd_lengths() -> Vec<String> {
    [
        r#"{"old":0,"new":9223372036854775807}"#,
        r#"{"old":9223372036854775807,"new":-9223372036854775808}"#,
        r#"{"old":5,"new":-3}"#,
        r#"{"old":1,"new":4294967296}"#,
        r#"{"old":1,"new":1e300}"#,
    ]
    .iter()
    .enumerate()
    .map(|(i, length)| {
        format!(
            r#"{{"meta":{{"id":"absurd-{i}","dt":"2026-01-02T03:04:05Z","domain":"en.wikipedia.org"}},"wiki":"enwiki","type":"edit","length":{length}}}"#
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lengths_near_the_i64_limits_are_quarantined_and_counting_goes_on() {
    let mut scope = TestScope::new();
    let mut lines = events("before", 100);
    lines.extend(absurd_lengths());
    lines.extend(absurd_lengths()); // twice: two i64::MAX growths would wrap
    lines.extend(events("after", 100));
    let expected = oracle(&lines);
    assert_eq!(expected.events, 200);
    let upstream = HostileUpstream::start(vec![Act::stream(frames(&lines, 0).into_bytes())]).await;
    let metrics = TestScope::free_port();
    let mut config = against(&upstream, metrics);
    config.aggregate.enabled = true;
    config.aggregate.batch_delay = ms(50);
    config.aggregate.poll_interval = ms(20);
    config.store.path = "counters.db".into();
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let counted = wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(30),
        |v| v >= 200.0,
    )
    .await;
    let m = scrape(metrics).await.expect("metrics");
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_eq!(counted, 200.0);
    // Quarantined ids are not remembered as delivered, so the second copies are quarantined
    // again.
    assert_eq!(
        m["pleiades_quarantined_events_total{reason=\"out_of_range\",role=\"ingest\"}"],
        10.0
    );
    assert_eq!(
        m["pleiades_goroutine_restarts{component=\"aggregate\"}"],
        0.0
    );
    assert_embedded_counters(&scope, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_length_already_on_the_bus_is_quarantined_by_the_aggregator() {
    let mut scope = TestScope::new();
    let mut lines = events("ok", 30);
    lines.extend(absurd_lengths());
    write_bus(&scope.path("events"), &lines);
    let expected = oracle(&lines);
    let metrics = TestScope::free_port();
    let mut config = aggregate_config(metrics);
    config.aggregate.batch_delay = ms(50);
    config.aggregate.poll_interval = ms(20);
    config.store.path = "counters.db".into();
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let name = "pleiades_quarantined_events_total{reason=\"out_of_range\",role=\"aggregate\"}";
    wait_for_metric(metrics, name, Duration::from_secs(30), |v| v >= 5.0).await;
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(30),
        |v| v >= 30.0,
    )
    .await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_embedded_counters(&scope, &expected).await;
}

/// A valid event with meta.dt `at`.
fn event_at(id: &str, at: chrono::DateTime<chrono::Utc>) -> String {
    format!(
        r#"{{"meta":{{"id":"{id}","dt":"{}","domain":"en.wikipedia.org"}},"wiki":"enwiki","type":"edit"}}"#,
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_the_future_is_quarantined_and_the_age_stays_positive() {
    let mut scope = TestScope::new();
    let now = chrono::Utc::now();
    let mut lines = events("past", 20);
    lines.push(event_at("far-future", now + chrono::Duration::days(3650)));
    lines.push(event_at("soon", now + chrono::Duration::seconds(60)));
    lines.push(event_at("epoch", chrono::DateTime::UNIX_EPOCH));
    let upstream = HostileUpstream::start(vec![Act::stream(frames(&lines, 0).into_bytes())]).await;
    let metrics = TestScope::free_port();
    scope.write_config(&against(&upstream, metrics));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let mut expected = ids(&lines[..20]);
    expected.push("soon".into());
    expected.push("epoch".into());
    wait_for_ids(&scope, &expected, Duration::from_secs(20)).await;
    // The event a minute ahead was accepted, yet the age is not negative (it is recorded just
    // after the event reaches the bus, so it is waited for).
    let name = "pleiades_ingest_last_event_age_seconds";
    let age = wait_for_metric(metrics, name, Duration::from_secs(10), |age| {
        (0.0..30.0).contains(&age)
    })
    .await;
    println!("after an event a minute ahead of the clock, the event age is {age} s");
    let m = scrape(metrics).await.expect("metrics");
    assert_eq!(
        m["pleiades_quarantined_events_total{reason=\"future_dt\",role=\"ingest\"}"],
        1.0
    );
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    assert_exactly_once(&bus_lines(&scope.path("events")), &expected);
}

/// Raises this process's soft limit on open files to its hard limit (the daemon inherits it).
fn raise_open_file_limit() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// Opens `n` TCP connections to `addr` that send nothing.
fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|i| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("idle connection {i} to {addr}: {e}"))
        })
        .collect()
}

/// How many of `sockets` the server has closed (end of stream or reset).
fn closed(sockets: &[std::net::TcpStream]) -> usize {
    use std::io::Read;
    sockets
        .iter()
        .filter(|s| {
            let _ = s.set_nonblocking(true);
            let mut byte = [0u8; 1];
            match (&mut &**s).read(&mut byte) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            }
        })
        .count()
}

/// GETs `url` on a new connection and returns its status and how long it took.
async fn timed_get(url: &str) -> (u16, Duration) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("a client");
    let started = Instant::now();
    let response = client.get(url).send().await.expect("an answer");
    let status = response.status().as_u16();
    response.bytes().await.expect("a body");
    (status, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_to_each_listener_starve_nothing() {
    const IDLE: usize = 5000;
    let limit = raise_open_file_limit();
    assert!(
        limit > 2 * IDLE as libc::rlim_t + 500,
        "RLIMIT_NOFILE hard limit {limit} is too low for this test"
    );
    let mut scope = TestScope::new();
    let lines = recorded_lines();
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.rate = Some(150.0);
    let upstream = scope.replay(options).await.addr;
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let config = all_roles_config(upstream, metrics, web);
    let header_timeout = config.web.header_timeout;
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let pid = scope.child(daemon).id();
    let published = |m: &HashMap<String, f64>| m["pleiades_file_publish_events_total"];
    let before = published(
        &wait_until(Duration::from_secs(30), "ingest publishing", async || {
            scrape(metrics)
                .await
                .filter(|m| m["pleiades_file_publish_events_total"] > 0.0)
        })
        .await,
    );

    let opened = Instant::now();
    let held = tokio::task::spawn_blocking(move || {
        let mut held = idle_connections(loopback(web), IDLE);
        held.extend(idle_connections(loopback(metrics), IDLE));
        held
    })
    .await
    .expect("connections opened");
    println!(
        "{} idle connections opened in {:?}",
        held.len(),
        opened.elapsed()
    );
    let fds = open_fds(pid).expect("the daemon's descriptors");
    println!("the daemon has {fds} descriptors open");
    // web.max_connections + metrics.max_connections, plus the bus, the store and the runtime.
    assert!(fds < 1024 + 64 + 300, "{fds} descriptors open");
    let m = scrape(metrics).await.expect("metrics");
    let (open_web, open_metrics) = (
        m["pleiades_http_open_connections{listener=\"web\"}"],
        m["pleiades_http_open_connections{listener=\"metrics\"}"],
    );
    println!("it holds {open_web} + {open_metrics} connections");
    assert!(open_web <= 1024.0 && open_metrics <= 64.0);

    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        for url in [
            format!("http://127.0.0.1:{web}/api/stats"),
            format!("http://127.0.0.1:{web}/api/totals"),
            format!("http://127.0.0.1:{metrics}/metrics"),
        ] {
            let (status, took) = timed_get(&url).await;
            assert!(status == 200 || status == 404, "{url}: {status}");
            assert!(took < Duration::from_secs(1), "{url} took {took:?}");
            slowest = slowest.max(took);
        }
    }
    let after = published(&scrape(metrics).await.expect("metrics"));
    println!("while {IDLE} idle connections to each listener were held: slowest answer {slowest:?}, ingest published {} events", after - before);
    assert!(after > before, "ingest stopped publishing");

    // Every idle connection is closed by the header timeout at the latest.
    let all_closed = wait_until(
        header_timeout + Duration::from_secs(10),
        "every idle connection closed",
        async || {
            let n = closed(&held);
            (n == held.len()).then_some(n)
        },
    )
    .await;
    let m = scrape(metrics).await.expect("metrics");
    println!(
        "all {all_closed} closed {:?} after opening; shed {} + {}, header timeouts {} + {}",
        opened.elapsed(),
        m["pleiades_http_shed_connections_total{listener=\"web\"}"],
        m["pleiades_http_shed_connections_total{listener=\"metrics\"}"],
        m["pleiades_http_header_timeouts_total{listener=\"web\"}"],
        m["pleiades_http_header_timeouts_total{listener=\"metrics\"}"],
    );
    assert!(m["pleiades_http_header_timeouts_total{listener=\"web\"}"] > 0.0);
    assert!(m["pleiades_http_shed_connections_total{listener=\"metrics\"}"] > 0.0);
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
}

/// A web-only daemon on an empty embedded store, or on a Redis nobody listens on.
fn web_only(web: u16, metrics: u16, redis_port: Option<u16>) -> Config {
    let mut config = Config::default();
    config.ingest.enabled = false;
    config.aggregate.enabled = false;
    config.web.listen = loopback(web);
    config.metrics.listen = loopback(metrics);
    if let Some(port) = redis_port {
        config.store.kind = pleiades::config::StoreKind::Redis;
        config.redis.url = format!("redis://127.0.0.1:{port}/");
        config.redis.timeout = ms(500);
    }
    config
}

/// Sends a GET on a new connection and reads the status line; the connection is returned open.
async fn raw_get(port: u16, path: &str) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(loopback(port))
        .await
        .expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        let n = socket.read(&mut byte).await.expect("read");
        assert!(n > 0, "{path}: closed before a status line");
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_streams_are_bounded() {
    let mut scope = TestScope::new();
    let (web, metrics) = (TestScope::free_port(), TestScope::free_port());
    scope.write_config(&web_only(web, metrics, None));
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    wait_until(Duration::from_secs(20), "the web role", async || {
        reqwest::get(format!("http://127.0.0.1:{web}/healthz"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let max = Config::default().web.live_max_clients;
    let mut streams = Vec::new();
    for _ in 0..max {
        let (status, socket) = raw_get(web, "/api/live").await;
        assert_eq!(status, 200);
        streams.push(socket);
    }
    let (status, _) = raw_get(web, "/api/live").await;
    assert_eq!(status, 503, "stream {} was accepted", max + 1);
    assert_eq!(
        metric(metrics, "pleiades_web_live_refused_total").await,
        1.0
    );
    // One viewer leaves: there is room again.
    drop(streams.pop());
    let what = "room for a live stream after one closed";
    wait_until(Duration::from_secs(10), what, async || {
        (raw_get(web, "/api/live").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
}

/// A web-only daemon on a Redis nobody listens on; returns its web base URL, metrics port and
/// the Redis port.
async fn web_on_a_missing_redis(scope: &mut TestScope) -> (String, u16, u16) {
    let (web, metrics) = (TestScope::free_port(), TestScope::free_port());
    let redis_port = TestScope::free_port(); // nothing listens there
    scope.write_config(&web_only(web, metrics, Some(redis_port)));
    scope.spawn(&["--config", "pleiades.toml"]);
    let base = format!("http://127.0.0.1:{web}");
    wait_until(Duration::from_secs(20), "the web role", async || {
        reqwest::get(format!("{base}/healthz"))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    (base, metrics, redis_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_answer_carries_security_headers() {
    let mut scope = TestScope::new();
    let (base, _, _) = web_on_a_missing_redis(&mut scope).await;
    for path in [
        "/",
        "/app.js",
        "/api/days",
        "/api/totals",
        "/readyz",
        "/nothing",
    ] {
        let response = reqwest::get(format!("{base}{path}")).await.expect("answer");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let csp = header("content-security-policy");
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp:?}");
        assert!(csp.contains("default-src 'self'"), "{path}: {csp:?}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_errors_and_readiness_tell_nothing_internal() {
    let mut scope = TestScope::new();
    let (base, metrics, redis_port) = web_on_a_missing_redis(&mut scope).await;
    for path in ["/api/days", "/api/totals", "/api/stats/19000", "/readyz"] {
        let response = reqwest::get(format!("{base}{path}")).await.expect("answer");
        let status = response.status().as_u16();
        let body = response.text().await.expect("body");
        assert_eq!(status, 503, "{path}: {body}");
        for secret in [redis_port.to_string(), "127.0.0.1".into(), "redis".into()] {
            assert!(!body.contains(&secret), "{path} tells {secret:?}: {body}");
        }
    }
    // The operator's listener says why; the log and a metric too.
    let ready = reqwest::get(format!("http://127.0.0.1:{metrics}/readyz"))
        .await
        .expect("answer")
        .text()
        .await
        .expect("body");
    assert!(ready.contains(&redis_port.to_string()), "{ready}");
    let failures = metric(
        metrics,
        "pleiades_ready_check_failures_total{check=\"store\"}",
    )
    .await;
    assert!(failures >= 2.0, "{failures}");
    assert!(
        scope.logs().contains("readiness check failing"),
        "{}",
        scope.logs()
    );
}

/// A non-message event whose data tries to start log lines of its own and colour a terminal.
fn forged_event() -> String {
    "event: x\x1b[31m\ndata: harmless\ndata: 2030-01-01T00:00:00.000000Z ERROR pleiades: forged line\n\n"
        .to_owned()
}

/// Runs an ingester (with `args`) against an upstream that sends [`forged_event`] and a few
/// events, until both arrived; returns its log.
async fn log_of_a_forged_stream(scope: &mut TestScope, args: &[&str]) -> String {
    let batch = events("logged", 5);
    let body = format!("{}{}", forged_event(), frames(&batch, 0));
    let upstream = HostileUpstream::start(vec![Act::stream(body.into_bytes())]).await;
    let metrics = TestScope::free_port();
    scope.write_config(&against(&upstream, metrics));
    let daemon = scope.spawn(args);
    let what = "the forged event";
    wait_for_metric(
        metrics,
        "pleiades_recv_errors_total",
        Duration::from_secs(20),
        |v| v >= 1.0,
    )
    .await;
    wait_until(Duration::from_secs(20), what, async || {
        (bus_lines(&scope.path("events")).len() >= 5).then_some(())
    })
    .await;
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    scope.logs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_plain_text_off_a_terminal_and_json_on_request() {
    let mut scope = TestScope::new();
    let logs = log_of_a_forged_stream(&mut scope, &["--config", "pleiades.toml"]).await;
    assert!(
        !logs.contains('\x1b'),
        "terminal escapes in a log file:\n{logs}"
    );
    assert!(logs.contains("non-message event"), "{logs}");

    let mut scope = TestScope::new();
    let json = log_of_a_forged_stream(
        &mut scope,
        &["--config", "pleiades.toml", "--log-format", "json"],
    )
    .await;
    assert!(json.lines().count() >= 3, "{json}");
    for line in json.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["fields"].is_object(), "{line}");
    }
    assert!(json.contains("forged line"), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_text_cannot_forge_log_lines() {
    let mut scope = TestScope::new();
    let logs = log_of_a_forged_stream(&mut scope, &["--config", "pleiades.toml"]).await;
    for line in logs.lines() {
        assert!(!line.starts_with("2030-01-01"), "a forged line: {line:?}");
        assert!(
            !line.contains("\x1b[31m"),
            "upstream colours the log: {line:?}"
        );
    }
    assert!(
        logs.contains("\\n2030-01-01"),
        "the data is shown escaped:\n{logs}"
    );
    assert!(
        logs.contains("\\u{1b}[31m"),
        "the escape is shown escaped:\n{logs}"
    );
}

/// The WHATWG event-stream edge cases, each with the events it must yield.
fn whatwg_edge_cases(valid: &[String]) -> (Vec<Vec<u8>>, Vec<String>) {
    let v = |i: usize| valid[i].as_str();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    // A byte order mark, split across writes, before the first field.
    chunks.push(b"\xEF\xBB".to_vec());
    chunks.push(
        [
            b"\xBF".as_slice(),
            format!("id: {}\ndata: {}\n\n", stream_id(1000), v(0)).as_bytes(),
        ]
        .concat(),
    );
    // CR-only and CRLF line ends, a CRLF split across writes.
    chunks.push(format!("id: {}\rdata: {}\r\r", stream_id(1001), v(1)).into_bytes());
    chunks.push(format!("id: {}\r\ndata: {}\r", stream_id(1002), v(2)).into_bytes());
    chunks.push(b"\n\r\n".to_vec());
    // Comments, an unknown field, no space after the colon, and an id holding NULL (ignored).
    chunks.push(format!(": heartbeat\nunknown: x\nid: bad\0id\ndata:{}\n\n", v(3)).into_bytes());
    // One JSON object over several data lines (joined with LF, still valid JSON).
    let value: serde_json::Value = serde_json::from_str(v(4)).expect("JSON");
    let spread = serde_json::to_string_pretty(&value).expect("JSON");
    chunks.push(frame(&stream_id(1004), &spread).into_bytes());
    // A field name alone (`data` with no colon) adds an empty line: that event is not JSON.
    chunks.push(b"data\ndata\n\n".to_vec());
    // A non-message type is not an event to publish.
    chunks.push(format!("event: error\ndata: {}\n\n", v(5)).into_bytes());
    chunks.push(frame(&stream_id(1006), v(6)).into_bytes());
    // The last frame lacks its blank line when the connection ends: never dispatched.
    chunks.push(format!("id: {}\ndata: {}\n", stream_id(1007), v(7)).into_bytes());
    let expected = [0, 1, 2, 3, 4, 6].iter().map(|&i| meta_id(v(i))).collect();
    (chunks, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_upstream_plays_every_attack_and_costs_nothing() {
    let mut scope = TestScope::new();
    let now = chrono::Utc::now();
    let mut expected: Vec<String> = Vec::new();
    let mut script = Vec::new();
    // 1. Throttled with the largest Retry-After there is.
    script.push(Act::Refuse {
        status: 503,
        headers: vec![("Retry-After".into(), u64::MAX.to_string())],
    });
    // 2. A huge id line, then many events that would carry it; a huge retry: as well.
    let before = events("a", 20);
    let after = events("b", 1000);
    let mut body = format!("retry: {}\n{}", u64::MAX, frames(&before, 0));
    body.push_str(&format!("id: {}\n\n", "7".repeat(1 << 20)));
    for event in &after {
        body.push_str(&format!("data: {event}\n\n"));
    }
    expected.extend(ids(&before));
    expected.extend(ids(&after));
    script.push(Act::stream(body.into_bytes()));
    // 3. Data beyond ingest.max_event_bytes, bad JSON, absurd lengths, the far future, 1970,
    //    a forged log line; then a trickle that completes nothing.
    let mid = events("c", 20);
    let mut body = String::new();
    body.push_str(&format!("data: {}\n\n", "x".repeat(5 << 20)));
    body.push_str("data: {\"not json\n\n");
    body.push_str(&frames(&absurd_lengths(), 2000));
    body.push_str(&frame(
        &stream_id(2100),
        &event_at("future", now + chrono::Duration::days(400)),
    ));
    body.push_str(&frame(
        &stream_id(2101),
        &event_at("epoch", chrono::DateTime::UNIX_EPOCH),
    ));
    body.push_str(&forged_event());
    body.push_str(&frames(&mid, 2200));
    expected.push("epoch".into());
    expected.extend(ids(&mid));
    script.push(Act::Stream {
        chunks: vec![body.into_bytes()],
        then: Then::Trickle { every: ms(50) },
    });
    // 4. The WHATWG edge cases, then the connection ends.
    let edge = events("d", 8);
    let (chunks, edge_ids) = whatwg_edge_cases(&edge);
    expected.extend(edge_ids);
    script.push(Act::Stream {
        chunks,
        then: Then::Close,
    });
    // 5. A server error status, then a clean stream of the rest.
    script.push(Act::Refuse {
        status: 500,
        headers: Vec::new(),
    });
    let last = events("e", 50);
    expected.extend(ids(&last));
    script.push(Act::stream(frames(&last, 3000).into_bytes()));
    let acts = script.len();

    let upstream = HostileUpstream::start(script).await;
    let metrics = TestScope::free_port();
    let config = against_impatient(&upstream, metrics);
    let backoff_initial = config.ingest.backoff_initial;
    scope.write_config(&config);
    let daemon = scope.spawn(&["--config", "pleiades.toml"]);
    let pid = scope.child(daemon).id();
    wait_for_ids(&scope, &expected, Duration::from_secs(60)).await;
    // Past the script, the server only sends heartbeats: the connection stays.
    wait_until(
        Duration::from_secs(10),
        "the quiet connection",
        async || (upstream.seen().len() > acts).then_some(()),
    )
    .await;
    let peak = peak_rss_bytes(pid).expect("memory");
    let m = scrape(metrics).await.expect("metrics");
    assert_eq!(
        scope.terminate(daemon, Duration::from_secs(10)).await,
        Some(0)
    );
    let bus = bus_lines(&scope.path("events"));
    assert_exactly_once(&bus, &expected);

    let seen = upstream.seen();
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    println!(
        "{} connections for {acts} acts, gaps {gaps:?}; peak RSS {} MiB; {} events exactly once",
        seen.len(),
        peak >> 20,
        bus.len()
    );
    assert!(peak < 256 << 20, "peak RSS {} MiB", peak >> 20);
    assert_eq!(
        seen.len(),
        acts + 1,
        "one connection per act, then the quiet one"
    );
    assert!(
        gaps.iter().all(|g| *g >= backoff_initial / 2),
        "a reconnect faster than the backoff: {gaps:?}"
    );
    for component in ["ingest", "aggregate", "web", "live"] {
        let name = format!("pleiades_goroutine_restarts{{component=\"{component}\"}}");
        assert_eq!(m[&name], 0.0, "{name}");
    }
    let visible = [
        (
            "pleiades_ingest_disconnects_total{reason=\"throttled\"}",
            1.0,
        ),
        ("pleiades_ingest_disconnects_total{reason=\"status\"}", 1.0),
        ("pleiades_ingest_disconnects_total{reason=\"stalled\"}", 1.0),
        ("pleiades_recv_anomalies_total{kind=\"slow_stream\"}", 1.0),
        ("pleiades_recv_anomalies_total{kind=\"long_id\"}", 1.0),
        ("pleiades_recv_anomalies_total{kind=\"retry_clamped\"}", 2.0),
        ("pleiades_recv_oversize_events_total", 1.0),
        (
            "pleiades_quarantined_events_total{reason=\"not_json\",role=\"ingest\"}",
            2.0,
        ),
        (
            "pleiades_quarantined_events_total{reason=\"out_of_range\",role=\"ingest\"}",
            5.0,
        ),
        (
            "pleiades_quarantined_events_total{reason=\"future_dt\",role=\"ingest\"}",
            1.0,
        ),
    ];
    for (name, want) in visible {
        assert_eq!(m.get(name).copied(), Some(want), "{name}");
    }
    // Non-message events (the forged one, the edge case's error event) count as errors.
    assert!(m["pleiades_recv_errors_total"] >= 2.0);
}
