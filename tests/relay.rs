//! The relay (`GET /v2/stream/recentchange`) of the real daemon while events are ingested: 200
//! clients with and without filters each get exactly their events in bus order, then resume with
//! `Last-Event-ID` (from the ring and from further back) without a gap or a repeat; `?since=`
//! starts at a time; a client that stops reading is dropped while another keeps up; the client
//! cap and bad requests are answered; on Kafka a web-only host relays the topic.

mod common;

use common::*;
use pleiades::config::Config;
use pleiades::ingest::sse::{SseEvent, SseParser};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// One event as a client received it: the relay id and the event's meta.id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    id: String,
    meta_id: String,
}

/// Every event of the file bus in order, with its data.
fn bus_events(dir: &Path) -> Vec<Value> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut events = Vec::new();
    for name in names {
        let text = std::fs::read_to_string(&name).unwrap_or_default();
        for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
            let v: Value = serde_json::from_str(line).expect("a bus line");
            events.push(v["data"].clone());
        }
    }
    events
}

/// The filters the clients use, as query strings, and the same rule written from the contract.
const FILTERS: &[&str] = &[
    "",
    "wiki=enwiki,dewiki",
    "type=new,log",
    "bot=true",
    "namespace=14,6",
    "wiki=wikidatawiki&bot=false&namespace=0",
    "type=edit&bot=false",
    "wiki=commonswiki,frwiki&type=categorize,edit",
];

fn selects(query: &str, event: &Value) -> bool {
    query.split('&').filter(|p| !p.is_empty()).all(|pair| {
        let (key, values) = pair.split_once('=').expect("key=value");
        let values: Vec<&str> = values.split(',').collect();
        match key {
            "wiki" => event["wiki"].as_str().is_some_and(|w| values.contains(&w)),
            "type" => event["type"].as_str().is_some_and(|t| values.contains(&t)),
            "bot" => event["bot"].as_bool() == Some(values[0] == "true"),
            "namespace" => event["namespace"]
                .as_i64()
                .is_some_and(|n| values.contains(&n.to_string().as_str())),
            other => panic!("unknown filter {other}"),
        }
    })
}

fn meta_id(data: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Meta {
        id: String,
    }
    #[derive(serde::Deserialize)]
    struct Event {
        meta: Meta,
    }
    serde_json::from_str::<Event>(data)
        .expect("relayed data is an event")
        .meta
        .id
}

/// Reads the relay at `url` (from `last_id` when given) until `enough` says so or `limit`
/// passes; events of other types than `message` fail the test.
async fn read_relay(
    http: &reqwest::Client,
    url: &str,
    last_id: Option<&str>,
    limit: Duration,
    mut enough: impl FnMut(&[Got]) -> bool,
) -> Vec<Got> {
    let mut request = http.get(url);
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id);
    }
    let response = request.send().await.expect("the relay answers");
    assert_eq!(response.status(), 200, "{url}");
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(kind.starts_with("text/event-stream"), "{kind}");
    let mut body = response;
    let mut parser = SseParser::new(8 << 20);
    let mut parsed: Vec<SseEvent> = Vec::new();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !enough(&got) {
        let chunk = match tokio::time::timeout_at(deadline, body.chunk()).await {
            Err(_) => break,
            Ok(Ok(Some(chunk))) => chunk,
            Ok(_) => break,
        };
        parser.push(&chunk, &mut parsed);
        for event in parsed.drain(..) {
            assert_eq!(event.event_type, "message");
            got.push(Got {
                meta_id: meta_id(&event.data),
                id: event.id.to_string(),
            });
        }
    }
    got
}

/// The events a client with `query` must have received: the filtered bus from its first one.
fn expected_from(bus: &[Value], query: &str, first: &str) -> Vec<String> {
    let selected: Vec<String> = bus
        .iter()
        .filter(|e| selects(query, e))
        .map(|e| e["meta"]["id"].as_str().unwrap().to_owned())
        .collect();
    let at = selected
        .iter()
        .position(|id| id == first)
        .unwrap_or_else(|| {
            panic!(
                "{first} is not a {query:?} event of the bus ({} events, {} selected)",
                bus.len(),
                selected.len()
            )
        });
    selected[at..].to_vec()
}

/// `count` recorded events: one of every three from the current-format captures (43 wikis),
/// the others from the 2018 Wikidata capture, so that every filter has events all along.
fn relay_lines(count: usize) -> Vec<String> {
    let all = recorded_lines();
    let (current, wikidata) = all.split_at(681);
    // The captures are each of a few wikis: shuffled (always the same way), every wiki and
    // kind of change comes up all along the stream.
    let mut current = current.to_vec();
    rand::seq::SliceRandom::shuffle(&mut current[..], &mut rand::rngs::StdRng::seed_from_u64(15));
    let (mut c, mut w) = (current.iter().cycle(), wikidata.iter());
    (0..count)
        .map(|i| {
            let line = if i % 3 == 0 { c.next() } else { w.next() };
            line.expect("enough recorded events").clone()
        })
        .collect()
}

fn relay_config(upstream: std::net::SocketAddr, metrics: u16, web: u16) -> Config {
    let mut config = all_roles_config(upstream, metrics, web);
    config.aggregate.enabled = false;
    config.web.relay_buffer_events = 256;
    config.web.relay_heartbeat = ms(500);
    config.web.relay_poll_interval = ms(10);
    config.web.relay_max_clients = 300;
    config.ingest.validate = pleiades::config::ValidateMode::Off;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_get_exactly_their_events_and_resume_without_loss() {
    let mut scope = TestScope::new();
    let lines = relay_lines(2000);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.rate = Some(400.0);
    let upstream = scope.replay(options).await.addr;
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    scope.write_config(&relay_config(upstream, metrics, web));
    scope.spawn(&["--config", "pleiades.toml"]);
    let base = format!("http://127.0.0.1:{web}/v2/stream/recentchange");
    let http = reqwest::Client::new();
    wait_for_web(&http, web).await;

    let seed: u64 = rand::thread_rng().gen();
    println!("client schedule seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let bus_dir = scope.path("events");
    // The whole bus, once everything is on it, for the clients to know when they are done.
    let (bus_tx, bus_rx) = tokio::sync::watch::channel(None::<std::sync::Arc<Vec<Value>>>);
    {
        let bus_dir = bus_dir.clone();
        tokio::spawn(async move {
            // Polled with a deadline (the clients' own deadlines end the test otherwise).
            let deadline = Instant::now() + Duration::from_secs(60);
            while bus_lines(&bus_dir).len() < 2000 && Instant::now() < deadline {
                tokio::time::sleep(ms(100)).await;
            }
            let _ = bus_tx.send(Some(std::sync::Arc::new(bus_events(&bus_dir))));
        });
    }
    let mut clients = Vec::new();
    for n in 0..200usize {
        // Half the clients read everything, the others one of the filters.
        let query = if n % 2 == 0 {
            ""
        } else {
            FILTERS[1 + n % (FILTERS.len() - 1)]
        };
        let first_part = if query.is_empty() {
            rng.gen_range(3..40usize)
        } else {
            rng.gen_range(2..6)
        };
        // Some resume at once (from memory), some after a pause that leaves their id behind
        // the 256 events the relay keeps (they read the bus on their own first).
        let pause = if n % 3 == 0 {
            ms(1500)
        } else {
            ms(rng.gen_range(0..200))
        };
        let (http, base, bus_rx) = (http.clone(), base.clone(), bus_rx.clone());
        clients.push(tokio::spawn(async move {
            let url = format!("{base}?{query}");
            // Every filter selects events all along the stream: a few seconds bring some.
            let first = read_relay(&http, &url, None, Duration::from_secs(3), |got| {
                got.len() >= first_part
            })
            .await;
            assert!(
                !first.is_empty(),
                "client {n} ({query:?}) received nothing live"
            );
            tokio::time::sleep(pause).await;
            let last_id = first.last().unwrap().id.clone();
            // Read until the whole stream is on the bus and this client has all its events.
            let mut complete: Option<usize> = None;
            let rest = read_relay(
                &http,
                &url,
                Some(&last_id),
                Duration::from_secs(60),
                |got| {
                    if complete.is_none() {
                        if let Some(bus) = bus_rx.borrow().as_ref() {
                            let want = expected_from(bus, query, &first[0].meta_id).len();
                            complete = Some(want - first.len());
                        }
                    }
                    complete.is_some_and(|want| got.len() >= want)
                },
            )
            .await;
            (n, query, first, rest)
        }));
    }
    let mut resumed_behind = 0;
    let mut total = 0;
    let mut results = Vec::new();
    for client in clients {
        results.push(client.await.expect("a client task"));
    }
    let bus = bus_events(&bus_dir);
    for (n, query, first, rest) in results {
        let want = expected_from(&bus, query, &first[0].meta_id);
        let got: Vec<String> = first
            .iter()
            .chain(&rest)
            .map(|g| g.meta_id.clone())
            .collect();
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "client {n} ({query:?}) got an event twice"
        );
        assert_eq!(
            got, want,
            "client {n} ({query:?}): not exactly its events in bus order"
        );
        // Ids are positions on the bus: each one is past the one before.
        let positions: Vec<(u64, u64)> = first
            .iter()
            .chain(&rest)
            .map(|g| {
                let v: Value = serde_json::from_str(&g.id).expect("a JSON id");
                (
                    v[0]["segment"].as_u64().unwrap(),
                    v[0]["offset"].as_u64().unwrap(),
                )
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "client {n}: ids do not advance"
        );
        if n % 3 == 0 {
            resumed_behind += 1;
        }
        total += got.len();
    }
    let scraped = scrape(metrics).await.expect("metrics");
    println!(
        "200 clients received {total} events in {:?}; {resumed_behind} resumed from behind the ring; relay sent {} bytes",
        started.elapsed(),
        scraped["pleiades_relay_sent_bytes_total"]
    );
    assert_eq!(scraped["pleiades_relay_connections_total"], 400.0);
    assert_eq!(
        scraped["pleiades_relay_clients_dropped_total{reason=\"slow\"}"],
        0.0
    );
    assert_eq!(
        scraped["pleiades_goroutine_restarts{component=\"relay\"}"],
        0.0
    );

    // ?since= starts at the first event in bus order whose meta.dt is at or after the time.
    let since = bus[300]["meta"]["dt"].as_str().unwrap().to_owned();
    let since_ms = chrono::DateTime::parse_from_rfc3339(&since)
        .unwrap()
        .timestamp_millis();
    let first_at = bus
        .iter()
        .position(|e| {
            chrono::DateTime::parse_from_rfc3339(e["meta"]["dt"].as_str().unwrap())
                .unwrap()
                .timestamp_millis()
                >= since_ms
        })
        .unwrap();
    let want: Vec<String> = bus[first_at..]
        .iter()
        .filter(|e| selects("wiki=enwiki,dewiki", e))
        .map(|e| e["meta"]["id"].as_str().unwrap().to_owned())
        .collect();
    let url = format!("{base}?wiki=enwiki,dewiki&since={}", urlencode(&since));
    let got = read_relay(&http, &url, None, Duration::from_secs(20), |got| {
        got.len() >= want.len()
    })
    .await;
    let got: Vec<String> = got.into_iter().map(|g| g.meta_id).collect();
    assert_eq!(got, want, "?since={since}");
}

/// Waits until the web role of the daemon answers on `web`.
async fn wait_for_web(http: &reqwest::Client, web: u16) {
    wait_until(
        Duration::from_secs(30),
        "the web role to answer",
        async || {
            let r = http
                .get(format!("http://127.0.0.1:{web}/healthz"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
}

fn urlencode(text: &str) -> String {
    text.replace('+', "%2B").replace(':', "%3A")
}

fn set_receive_buffer(stream: &std::net::TcpStream, bytes: libc::c_int) {
    // SAFETY: setsockopt(2) on a socket this test owns, with a pointer to a live c_int.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &bytes as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A client on a raw socket with a tiny receive buffer that reads the response head and then
/// nothing more.
fn stuck_client(port: u16, path: &str) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    set_receive_buffer(&stream, 4096);
    let mut writer = &stream;
    write!(
        writer,
        "GET {path} HTTP/1.1\r\nHost: relay\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    (&stream).read_exact(&mut head).expect("a response");
    assert_eq!(&head, b"HTTP/1.1 200");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_while_another_keeps_up() {
    let mut scope = TestScope::new();
    // Large events (recorded ones with a long comment), so that the stuck client's socket
    // buffers fill with few of them.
    let lines: Vec<String> = synthetic_events(1500, 2)
        .into_iter()
        .map(|line| {
            let mut v: Value = serde_json::from_str(&line).unwrap();
            v["comment"] = Value::from("ü".repeat(4000));
            v.to_string()
        })
        .collect();
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut options = replay_options(vec![events]);
    options.rate = Some(500.0);
    // The daemon starts first: the replay is bound to a port it already knows.
    let upstream_port = TestScope::free_port();
    options.listen = loopback(upstream_port);
    let mut config = relay_config(loopback(upstream_port), metrics, web);
    config.web.relay_buffer_events = 64;
    scope.write_config(&config);
    scope.spawn(&["--config", "pleiades.toml"]);
    let http = reqwest::Client::new();
    wait_for_web(&http, web).await;
    let path = "/v2/stream/recentchange";
    let stuck = stuck_client(web, path);
    let url = format!("http://127.0.0.1:{web}{path}");
    let reader = {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            read_relay(&http, &url, None, Duration::from_secs(60), |got| {
                got.len() >= 1500
            })
            .await
        })
    };
    // Both are connected before the stream starts.
    wait_for_metric(
        metrics,
        "pleiades_relay_clients",
        Duration::from_secs(10),
        |v| v >= 2.0,
    )
    .await;
    let started = Instant::now();
    scope.replay(options).await;
    wait_for_metric(
        metrics,
        "pleiades_relay_clients_dropped_total{reason=\"slow\"}",
        Duration::from_secs(60),
        |v| v >= 1.0,
    )
    .await;
    let dropped_after = started.elapsed();
    let got = reader.await.expect("the reading client");
    println!(
        "the stuck client was dropped after {dropped_after:?}; the reading one had all 1,500 events after {:?}",
        started.elapsed()
    );
    let bus: Vec<String> = bus_lines(&scope.path("events"))
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let got: Vec<String> = got.into_iter().map(|g| g.meta_id).collect();
    assert_eq!(got.len(), 1500, "the reading client kept up");
    assert_eq!(got, bus, "the reading client got the whole bus in order");
    let scraped = scrape(metrics).await.expect("metrics");
    assert_eq!(
        scraped["pleiades_relay_clients_dropped_total{reason=\"slow\"}"],
        1.0
    );
    assert_eq!(
        scraped["pleiades_relay_clients"], 0.0,
        "the stuck client holds no place"
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_cap_and_bad_requests_are_answered() {
    let mut scope = TestScope::new();
    let dir = scope.path("events");
    write_bus(&dir, &relay_lines(50));
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut config = relay_config(loopback(1), metrics, web);
    config.ingest.enabled = false;
    config.web.relay_max_clients = 2;
    scope.write_config(&config);
    scope.spawn(&["--config", "pleiades.toml"]);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{web}/v2/stream/recentchange");
    wait_for_web(&http, web).await;
    for (query, id, fragment) in [
        ("?bot=maybe", None, "?bot="),
        ("?namespace=main", None, "?namespace="),
        ("?since=yesterday", None, "since"),
        ("", Some("not an id"), "Last-Event-ID"),
        (
            "",
            Some(r#"[{"topic":"t","partition":0,"offset":1}]"#),
            "Last-Event-ID",
        ),
    ] {
        let mut request = http.get(format!("{url}{query}"));
        if let Some(id) = id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400, "{query} {id:?}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains(fragment), "{body}");
    }
    // From the start of the bus: the ids of what the history holds resume exactly.
    let all = read_relay(
        &http,
        &format!("{url}?since=0"),
        None,
        Duration::from_secs(10),
        |g| g.len() >= 50,
    )
    .await;
    assert_eq!(all.len(), 50);
    let after = read_relay(
        &http,
        &url,
        Some(&all[19].id),
        Duration::from_secs(10),
        |g| g.len() >= 30,
    )
    .await;
    assert_eq!(after, all[20..].to_vec());
    // Two clients hold the two places; the third is refused until one leaves.
    let one = http.get(&url).send().await.unwrap();
    let two = http.get(&url).send().await.unwrap();
    assert_eq!((one.status().as_u16(), two.status().as_u16()), (200, 200));
    let refused = http.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    drop(one);
    wait_until(Duration::from_secs(10), "a place to free up", async || {
        let r = http.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let scraped = scrape(metrics).await.expect("metrics");
    assert!(scraped["pleiades_relay_clients_dropped_total{reason=\"full\"}"] >= 1.0);
    assert!(
        scraped
            ["pleiades_web_http_response_total{path=\"/v2/stream/recentchange\",status=\"400\"}"]
            >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "service-tests"), ignore = "needs nisshi (scripts/test)")]
async fn a_web_only_host_relays_the_kafka_topic_and_resumes_by_partition_offsets() {
    let mut scope = TestScope::new();
    let broker = KafkaBroker::start(&scope).await;
    let lines = relay_lines(1200);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.rate = Some(300.0);
    let upstream_port = TestScope::free_port();
    options.listen = loopback(upstream_port);
    let topic = "relay-events";
    let kafka = |config: &mut Config| {
        config.ingest.publisher = pleiades::config::BusKind::Kafka;
        config.kafka.brokers = broker.brokers();
        config.kafka.topic = topic.into();
        config.kafka.quarantine_topic = "relay-quarantine".into();
        config.kafka.partitions = 3;
    };
    // The ingest host.
    let mut ingest = ingest_config(loopback(upstream_port), TestScope::free_port());
    kafka(&mut ingest);
    scope.write_config_as("ingest.toml", &ingest);
    scope.spawn(&["--config", "ingest.toml"]);
    // The web-only host: no ingest, no aggregation; the relay reads the topic.
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut host = relay_config(loopback(1), metrics, web);
    host.ingest.enabled = false;
    host.store.path = scope.path("web.db");
    kafka(&mut host);
    scope.write_config_as("web.toml", &host);
    scope.spawn(&["--config", "web.toml"]);
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{web}/v2/stream/recentchange");
    wait_until(Duration::from_secs(60), "the relay to answer", async || {
        let r = http.get(format!("{url}?since=0")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    scope.replay(options).await;
    let mut clients = Vec::new();
    for (n, query) in ["", "wiki=wikidatawiki", "", "bot=false"]
        .into_iter()
        .enumerate()
    {
        let (http, url) = (http.clone(), format!("{url}?{query}"));
        clients.push(tokio::spawn(async move {
            let first = read_relay(&http, &url, None, Duration::from_secs(30), |g| {
                g.len() >= 20 + n * 10
            })
            .await;
            let last = first.last().expect("events").id.clone();
            tokio::time::sleep(ms(300 * n as u64)).await;
            (query, first, last)
        }));
    }
    let brokers = broker.brokers();
    wait_until(
        Duration::from_secs(90),
        "every event on the topic",
        async || (topic_len(&brokers, topic) >= 1200).then_some(()),
    )
    .await;
    let messages = read_topic(&brokers, topic);
    let place: HashMap<String, (i32, i64, Value)> = messages
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_str(&m.value).unwrap();
            (
                v["meta"]["id"].as_str().unwrap().to_owned(),
                (m.partition, m.offset, v),
            )
        })
        .collect();
    for client in clients {
        let (query, first, last) = client.await.unwrap();
        let rest_want = {
            // Everything of each partition after the id's offset that the filter selects.
            let id: Value = serde_json::from_str(&last).unwrap();
            let next: HashMap<i64, i64> = id
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["partition"].as_i64().unwrap(),
                        e["offset"].as_i64().unwrap(),
                    )
                })
                .collect();
            messages
                .iter()
                .filter(|m| m.offset >= next[&(m.partition as i64)])
                .filter(|m| selects(query, &serde_json::from_str(&m.value).unwrap()))
                .count()
        };
        let rest = read_relay(
            &http,
            &format!("{url}?{query}"),
            Some(&last),
            Duration::from_secs(30),
            |g| g.len() >= rest_want,
        )
        .await;
        let all: Vec<&Got> = first.iter().chain(&rest).collect();
        let unique: HashSet<&str> = all.iter().map(|g| g.meta_id.as_str()).collect();
        assert_eq!(unique.len(), all.len(), "{query:?}: an event twice");
        assert_eq!(rest.len(), rest_want, "{query:?}: the resume missed events");
        // Within each partition, offsets follow each other through the filter.
        let mut by_partition: HashMap<i32, Vec<i64>> = HashMap::new();
        for g in &all {
            let (p, o, v) = &place[&g.meta_id];
            assert!(
                selects(query, v),
                "{query:?} got an event it does not select"
            );
            by_partition.entry(*p).or_default().push(*o);
        }
        for (p, offsets) in by_partition {
            let selected: Vec<i64> = messages
                .iter()
                .filter(|m| {
                    m.partition == p && selects(query, &serde_json::from_str(&m.value).unwrap())
                })
                .map(|m| m.offset)
                .filter(|o| *o >= offsets[0])
                .collect();
            assert_eq!(
                offsets, selected,
                "{query:?}: partition {p} out of order or with a gap"
            );
        }
    }
    let scraped = scrape(metrics).await.expect("metrics");
    assert!(
        scraped["pleiades_relay_bus_events_total"] >= 1200.0,
        "{scraped:?}"
    );
}

/// Wikimedia's own Python example for EventStreams, pointed at the relay: `sseclient`'s
/// EventSource with a filter, `count` events, then stop; prints id, meta.id and wiki per event.
const PYTHON_CLIENT: &str = r#"
import json, sys
from sseclient import SSEClient as EventSource

url, last_id, count = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
seen = 0
for event in EventSource(url, last_id=last_id):
    if event.event == 'message':
        try:
            change = json.loads(event.data)
        except ValueError:
            continue
        print(json.dumps([event.id, change['meta']['id'], change['wiki']]), flush=True)
        seen += 1
        if seen >= count:
            break
"#;

/// Runs the Python client and returns its lines: (id, meta.id, wiki).
async fn python_client(
    scope: &TestScope,
    url: &str,
    last_id: &str,
    count: usize,
) -> Vec<(String, String, String)> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/ops-tools/bin/python");
    let script = scope.write_file("eventstreams_client.py", PYTHON_CLIENT);
    let mut child = std::process::Command::new(python)
        .arg(&script)
        .args([url, last_id, &count.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the Python client starts (scripts/install-test-deps installs sseclient)");
    let status = try_wait_until(Duration::from_secs(30), async || {
        child.try_wait().ok().flatten()
    })
    .await;
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "the Python client did not finish"
    );
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a line of the client"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs sseclient from PyPI (scripts/test)"
)]
async fn wikimedias_python_eventstreams_example_reads_the_relay_and_resumes() {
    let mut scope = TestScope::new();
    let lines = relay_lines(600);
    write_bus(&scope.path("events"), &lines);
    let (metrics, web) = (TestScope::free_port(), TestScope::free_port());
    let mut config = relay_config(loopback(1), metrics, web);
    config.ingest.enabled = false;
    scope.write_config(&config);
    scope.spawn(&["--config", "pleiades.toml"]);
    let http = reqwest::Client::new();
    wait_for_web(&http, web).await;
    let bus = bus_events(&scope.path("events"));
    let want: Vec<String> = bus
        .iter()
        .filter(|e| selects("wiki=commonswiki,enwiki", e))
        .map(|e| e["meta"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(want.len() > 40, "{}", want.len());
    let url =
        format!("http://127.0.0.1:{web}/v2/stream/recentchange?since=0&wiki=commonswiki,enwiki");
    let first = python_client(&scope, &url, "", 15).await;
    let rest = python_client(&scope, &url, &first.last().unwrap().0, want.len() - 15).await;
    let got: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|(_, id, _)| id.clone())
        .collect();
    assert_eq!(
        got, want,
        "the Python client read exactly the filtered bus, resuming by its id"
    );
    assert!(first
        .iter()
        .chain(&rest)
        .all(|(_, _, wiki)| wiki == "commonswiki" || wiki == "enwiki"));
}
