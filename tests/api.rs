//! The web role in-process, on a store filled beforehand: every route through `warp::test`
//! against an independent recomputation, the store read once per cache period however many
//! dashboards load at once, and a listener that fails after start being restarted by its
//! supervisor. Needs no outside service.

mod common;

use common::*;
use pleiades::config::{StoreConfig, StoreKind, StoreSettings, WebConfig};
use pleiades::counters::OpenTally;
use pleiades::health::Readiness;
use pleiades::metrics::{Component, Metrics, StoreRead};
use pleiades::store::{Batch, Store};
use pleiades::web::WebParts;
use pleiades::ComponentContext;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A store in `scope` holding `lines` counted once, the way an aggregator would count them.
async fn filled_store(scope: &TestScope, metrics: &Metrics, lines: &[String]) -> Store {
    let store = Store::open(
        &StoreSettings::Embedded(StoreConfig {
            kind: StoreKind::Embedded,
            path: scope.path("counters.db"),
        }),
        metrics.store.clone(),
    )
    .await
    .expect("the store opens");
    store
        .apply(&batch_of(lines, 0))
        .await
        .expect("the batch applies");
    store
}

/// `lines` counted once into one batch at bus position `start`, as an aggregator counts them.
fn batch_of(lines: &[String], start: u64) -> Batch {
    let mut tally = OpenTally::default();
    let mut seen = std::collections::HashSet::new();
    for line in lines {
        let Ok(head) = pleiades::event::inspect(line) else {
            continue;
        };
        if head.canary
            || !head
                .id
                .as_deref()
                .is_none_or(|id| seen.insert(id.to_owned()))
        {
            continue;
        }
        tally.count(&head, true);
    }
    Batch {
        source: "test".into(),
        start,
        end: start + 1,
        tally: tally.seal().into(),
    }
}

struct Harness {
    metrics: Arc<Metrics>,
    store: Store,
    ctx: ComponentContext<WebConfig>,
    parts: WebParts,
    _live: tokio::sync::watch::Sender<String>,
}

impl Harness {
    async fn new(scope: &TestScope, lines: &[String], cache_ttl: Duration) -> Harness {
        let metrics = Arc::new(Metrics::new(1).expect("metrics"));
        let store = filled_store(scope, &metrics, lines).await;
        let (live_tx, live) = tokio::sync::watch::channel(String::new());
        let ctx = ComponentContext {
            config: WebConfig {
                cache_ttl,
                listen: loopback(0),
                ..WebConfig::default()
            },
            metrics: metrics.clone(),
            shutdown: CancellationToken::new(),
        };
        let parts = WebParts {
            store: store.clone(),
            readiness: Readiness {
                store: Some(store.clone()),
                ..Readiness::default()
            },
            live,
            relay: None,
        };
        Harness {
            metrics,
            store,
            ctx,
            parts,
            _live: live_tx,
        }
    }

    fn reads(&self, query: StoreRead) -> u64 {
        self.metrics.store.reads.get(query)
    }
}

async fn get(
    routes: &(impl warp::Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible>
          + Clone
          + Send
          + Sync
          + 'static),
    path: &str,
) -> (u16, String, Value) {
    let response = warp::test::request().path(path).reply(routes).await;
    let kind = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = String::from_utf8_lossy(response.body()).into_owned();
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (response.status().as_u16(), kind, json)
}

#[tokio::test]
async fn every_route_answers_what_the_store_holds() {
    let scope = TestScope::new();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let h = Harness::new(&scope, &lines, Duration::from_secs(1)).await;
    let routes = pleiades::web::routes(&h.ctx, h.parts.clone());

    let (status, kind, days) = get(&routes, "/api/days").await;
    assert_eq!((status, kind.as_str()), (200, "application/json"));
    let want: Vec<String> = expected.days.keys().map(i64::to_string).collect();
    assert_eq!(days, serde_json::json!(want));

    for (day, counters) in &expected.days {
        let (status, _, body) = get(&routes, &format!("/api/stats/{day}")).await;
        assert_eq!(status, 200);
        let object = body.as_object().expect("an object");
        // The original fields keep their shape; coverage is a new one beside them.
        assert_eq!(
            object.keys().collect::<Vec<_>>(),
            vec!["counters", "coverage", "since"]
        );
        let status = body["coverage"]["status"].as_str().unwrap_or("");
        assert!(
            ["complete", "partial", "unknown"].contains(&status),
            "{}",
            body["coverage"]
        );
        assert_eq!(body["since"], serde_json::json!(day * 86_400));
        let got = counters_of(&body);
        assert_eq!(&got, counters, "day {day}");
    }

    let (status, _, totals) = get(&routes, "/api/totals").await;
    assert_eq!(status, 200);
    assert_eq!(totals["since"], Value::Null);
    let all = counters_of(&totals);
    assert_eq!(all, expected.all_time);

    let first = *expected.days.keys().next().unwrap();
    let last = *expected.days.keys().last().unwrap();
    let (status, _, range) = get(&routes, &format!("/api/range?from={first}&to={last}")).await;
    assert_eq!(status, 200);
    let range = range.as_array().expect("a list");
    assert_eq!(range.len(), expected.days.len());
    for entry in range {
        let day: i64 = entry["day"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            entry["counters"]["pleiades_total"].as_i64(),
            expected.days[&day].get("pleiades_total").copied()
        );
    }

    for &(path, want) in API_ERRORS {
        let (status, kind, body) = get(&routes, path).await;
        assert_eq!(status, want, "{path}: {body}");
        assert_eq!(kind, "application/json", "{path}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }
    // The last days there are end a range like any others (no wrap-around, no endless loop).
    let (status, _, far) = get(
        &routes,
        "/api/coverage?from=9223372036854775806&to=9223372036854775807",
    )
    .await;
    assert_eq!(status, 200, "{far}");
    assert_eq!(far["days"].as_array().map(Vec::len), Some(2), "{far}");
    let posted = warp::test::request()
        .method("POST")
        .path("/api/days")
        .reply(&routes)
        .await;
    assert_eq!(posted.status(), 405);

    assert_eq!(get(&routes, "/healthz").await.0, 200);
    let (status, _, ready) = get(&routes, "/readyz").await;
    assert_eq!(
        (status, &ready["ready"]),
        (200, &Value::Bool(true)),
        "{ready}"
    );
    let page = warp::test::request().path("/").reply(&routes).await;
    assert_eq!(page.status(), 200);
    assert!(String::from_utf8_lossy(page.body()).contains("<title>Pleiades"));

    let text = h.metrics.render();
    assert!(
        text.contains(
            "pleiades_web_http_response_total{path=\"/api/stats/{day}\",status=\"400\"} 2"
        ),
        "{text}"
    );
    assert!(text.contains("pleiades_web_http_response_total{path=\"/api/days\",status=\"200\"} 1"));
}

/// Requests the day, editor and top-list routes refuse, with the status and a word the error
/// must name.
const SKETCH_ERRORS: &[(&str, u16, &str)] = &[
    ("/api/hours/abc", 400, "abc"),
    ("/api/hours/1", 404, "1"),
    ("/api/editors/x1", 400, "x1"),
    ("/api/editors/DAY?family=wikipdia", 400, "wikipdia"),
    ("/api/editors/DAY?exclude=wikidata,Commons", 400, "Commons"),
    ("/api/top/1.5?what=pages", 400, "1.5"),
    ("/api/top/DAY", 400, "what"),
    ("/api/top/DAY?what=wikis", 400, "wikis"),
    ("/api/top/DAY?what=pages&limit=51", 400, "51"),
    ("/api/top/DAY?what=pages&limit=0", 400, "limit"),
    ("/api/top/DAY?what=editors&family=nope", 400, "nope"),
];

/// Percent-decodes a URL path (the test's own reading of RFC 3986, not the library's encoder).
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8")
}

#[tokio::test]
async fn hours_editors_and_top_lists_answer_what_the_events_say() {
    let scope = TestScope::new();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let h = Harness::new(&scope, &lines, Duration::from_secs(1)).await;
    let routes = pleiades::web::routes(&h.ctx, h.parts.clone());
    // The servers each page and editor was seen on, from the events themselves.
    let mut servers: std::collections::HashMap<String, std::collections::HashSet<String>> =
        Default::default();
    for line in delivered(&lines) {
        let v: Value = serde_json::from_str(&line).expect("JSON");
        let server = v["server_name"].as_str().unwrap_or("").to_owned();
        if let (Some(wiki), Some(title)) = (v["wiki"].as_str(), v["title"].as_str()) {
            servers
                .entry(format!("{wiki}\t{title}"))
                .or_default()
                .insert(server.clone());
        }
        if let Some(user) = v["user"].as_str() {
            servers.entry(user.to_owned()).or_default().insert(server);
        }
    }

    let (mut hours_checked, mut entries_checked, mut links_checked) = (0, 0, 0);
    for (day, hours) in &expected.hours {
        let (status, kind, body) = get(&routes, &format!("/api/hours/{day}")).await;
        assert_eq!((status, kind.as_str()), (200, "application/json"), "{body}");
        assert_eq!(body["day"], Value::String(day.to_string()));
        assert_eq!(body["since"], serde_json::json!(day * 86_400));
        let list = body["hours"].as_array().expect("a list of hours");
        assert_eq!(list.len(), 24);
        for (hour, entry) in list.iter().enumerate() {
            assert_eq!(entry["hour"], serde_json::json!(hour));
            assert_eq!(
                entry["since"],
                serde_json::json!(day * 86_400 + hour as i64 * 3600)
            );
            let prefix = format!("{hour:02}:");
            let want: serde_json::Map<String, Value> = hours
                .iter()
                .filter_map(|(name, value)| {
                    Some((name.strip_prefix(&prefix)?.to_owned(), Value::from(*value)))
                })
                .collect();
            assert_eq!(
                entry["counters"],
                Value::Object(want),
                "day {day} hour {hour}"
            );
            hours_checked += usize::from(!want_is_empty(&entry["counters"]));
        }

        // Distinct editors: all families merged, and without Wikidata, against the exact sets.
        for (query, left_out) in [("", None), ("?exclude=wikidata", Some("wikidata"))] {
            let (status, _, body) = get(&routes, &format!("/api/editors/{day}{query}")).await;
            assert_eq!(status, 200, "{body}");
            let mut exact = std::collections::BTreeSet::new();
            let mut families = std::collections::BTreeSet::new();
            for ((d, family), names) in &expected.editors {
                if d == day && Some(family.as_str()) != left_out {
                    exact.extend(names.iter().cloned());
                    families.insert(family.clone());
                }
            }
            let count = body["editors"].as_f64().expect("a number");
            let exact = exact.len() as f64;
            let error = body["standard_error"].as_f64().expect("the standard error");
            assert!(
                (count - exact).abs() <= (3.0 * error * exact).max(1.0),
                "day {day}{query}: {count} editors for {exact} exact"
            );
            let listed: std::collections::BTreeSet<String> = body["families"]
                .as_object()
                .expect("families")
                .keys()
                .cloned()
                .collect();
            assert_eq!(listed, families, "day {day}{query}");
        }

        // The busiest pages and editors without Wikidata, against the exact counts.
        for what in ["pages", "editors"] {
            let path = format!("/api/top/{day}?what={what}&exclude=wikidata&limit=20");
            let (status, _, body) = get(&routes, &path).await;
            assert_eq!(status, 200, "{path}: {body}");
            assert_eq!(body["what"], what);
            assert_eq!(body["family"], "all");
            let mut truth: std::collections::BTreeMap<&str, i64> = Default::default();
            for ((d, family, list), counts) in &expected.top {
                if d == day && list == what && family != "wikidata" {
                    for (key, n) in counts {
                        *truth.entry(key.as_str()).or_default() += n;
                    }
                }
            }
            let entries = body["entries"].as_array().expect("entries");
            assert!(entries.len() <= 20);
            assert_eq!(entries.len(), truth.len().min(20), "{path}");
            let mut previous = i64::MAX;
            for entry in entries {
                let key = entry["key"].as_str().expect("a key");
                let count = entry["count"].as_i64().expect("a count");
                let want = truth.get(key).copied().unwrap_or(0);
                assert!(
                    count >= want && count <= previous,
                    "{path}: {entry} for {want}"
                );
                previous = count;
                if entry["exact"] == true {
                    assert_eq!(count, want, "{path}: {entry} is marked exact");
                }
                let server = entry["server"].as_str().expect("a server");
                assert!(
                    servers.get(key).is_some_and(|s| s.contains(server)),
                    "{path}: {entry} was never seen on {server:?}"
                );
                if what == "pages" {
                    let (wiki, title) = key.split_once('\t').expect("wiki and title");
                    assert_eq!(
                        (entry["wiki"].as_str(), entry["title"].as_str()),
                        (Some(wiki), Some(title))
                    );
                    if !server.is_empty() {
                        let url = entry["url"].as_str().expect("a link");
                        let path = url
                            .strip_prefix(&format!("https://{server}/wiki/"))
                            .unwrap_or_else(|| panic!("{url} is not on {server}"));
                        assert!(!path.contains([' ', '?', '#', '"', '&']), "{url}");
                        assert_eq!(percent_decoded(path), title.replace(' ', "_"));
                        links_checked += 1;
                    }
                } else {
                    assert!(entry.get("url").is_none(), "{entry}");
                }
                entries_checked += 1;
            }
            let busiest = truth.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
            if let Some((key, n)) = busiest.filter(|(_, n)| **n >= 3) {
                assert!(
                    entries.iter().any(|e| e["key"] == *key),
                    "{path}: the busiest {key:?} ({n}) is missing"
                );
            }
        }
    }
    assert!(hours_checked > 0 && entries_checked > 0 && links_checked > 0);

    // One family: its own sketch, named in the answer.
    let day = *expected.days.keys().last().expect("a day");
    let (status, _, body) = get(
        &routes,
        &format!("/api/top/{day}?what=pages&family=wikidata"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["family"], "wikidata");
    for entry in body["entries"].as_array().expect("entries") {
        assert!(
            entry["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("wikidatawiki\t")),
            "{entry}"
        );
    }

    for &(path, want, named) in SKETCH_ERRORS {
        let path = path.replace("DAY", &day.to_string());
        let (status, kind, body) = get(&routes, &path).await;
        assert_eq!(
            (status, kind.as_str()),
            (want, "application/json"),
            "{path}: {body}"
        );
        let error = body["error"].as_str().unwrap_or("");
        assert!(error.contains(named), "{path}: {body}");
    }
    let text = h.metrics.render();
    for route in ["hours", "editors", "top"] {
        assert!(
            text.contains(&format!(
                "pleiades_web_http_response_total{{path=\"/api/{route}/{{day}}\",status=\"200\"}}"
            )),
            "{route}: {text}"
        );
    }
}

#[tokio::test]
async fn a_batch_of_the_day_refreshes_its_hours_editors_and_top_lists_at_once() {
    let scope = TestScope::new();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    // An hour long cache: only the batch can make the answers change.
    let h = Harness::new(&scope, &lines, Duration::from_secs(3600)).await;
    let routes = pleiades::web::routes(&h.ctx, h.parts.clone());
    let day = *expected.days.keys().last().expect("a day");
    let paths = [
        format!("/api/hours/{day}"),
        format!("/api/editors/{day}?exclude=wikidata"),
        format!("/api/top/{day}?what=editors&limit=1"),
    ];
    let mut before = Vec::new();
    for path in &paths {
        before.push(get(&routes, path).await.2);
    }
    let reads =
        |h: &Harness| [StoreRead::Hours, StoreRead::Editors, StoreRead::Top].map(|r| h.reads(r));
    let read_once = reads(&h);
    for (path, body) in paths.iter().zip(&before) {
        assert_eq!(&get(&routes, path).await.2, body, "{path} from the cache");
    }
    assert_eq!(reads(&h), read_once, "answered from the cache");

    // 300 edits at 05:xx by 150 new editors, one of whom makes half of them.
    let date = chrono::DateTime::from_timestamp(day * 86_400 + 5 * 3600, 0).expect("a time");
    let more: Vec<String> = (0..300)
        .map(|i| {
            let user = if i % 2 == 0 { "Cache tester".to_owned() } else { format!("Cache tester {i}") };
            serde_json::json!({
                "meta": {"id": format!("cache-{i}"), "dt": date.to_rfc3339(), "domain": "en.wikipedia.org"},
                "wiki": "enwiki", "server_name": "en.wikipedia.org", "type": "edit",
                "title": "Cache", "user": user, "bot": false, "namespace": 0,
            })
            .to_string()
        })
        .collect();
    h.store
        .apply(&batch_of(&more, 1))
        .await
        .expect("the batch applies");
    let after: Vec<Value> = {
        let mut out = Vec::new();
        for path in &paths {
            out.push(get(&routes, path).await.2);
        }
        out
    };
    let humans = |body: &Value| {
        body["hours"][5]["counters"]["pleiades_human"]
            .as_i64()
            .unwrap_or(0)
    };
    assert_eq!(humans(&after[0]), humans(&before[0]) + 300);
    let editors = |body: &Value| body["editors"].as_f64().unwrap_or(0.0);
    let added = editors(&after[1]) - editors(&before[1]);
    assert!(
        (140.0..=160.0).contains(&added),
        "{added} editors more for 151"
    );
    assert_eq!(
        after[2]["entries"][0]["key"], "Cache tester",
        "{}",
        after[2]
    );
    assert_eq!(after[2]["entries"][0]["count"], 150);
}

fn want_is_empty(counters: &Value) -> bool {
    counters.as_object().is_none_or(|o| o.is_empty())
}

/// What the dashboard asks for when it loads: its files, the days, a bounded trend, the
/// selected day and the all-time numbers.
async fn dashboard_load(
    routes: &(impl warp::Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible>
          + Clone
          + Send
          + Sync
          + 'static),
    first: i64,
    last: i64,
) {
    for path in [
        "/".to_owned(),
        "/app.js".to_owned(),
        "/style.css".to_owned(),
        "/api/days".to_owned(),
        format!("/api/range?from={}&to={last}", first.max(last - 365)),
        format!("/api/coverage?from={}&to={last}", first.max(last - 365)),
        format!("/api/stats/{last}"),
        "/api/totals".to_owned(),
    ] {
        let response = warp::test::request().path(&path).reply(routes).await;
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_dashboards_loading_at_once_read_the_store_once_per_cache_period() {
    let scope = TestScope::new();
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let first = *expected.days.keys().next().unwrap();
    let last = *expected.days.keys().last().unwrap();
    // One cache period spans the whole test; what this process counts ends a period early.
    let h = Harness::new(&scope, &lines, Duration::from_secs(600)).await;
    let routes = pleiades::web::routes(&h.ctx, h.parts.clone());
    const SHOWN: [StoreRead; 5] = [
        StoreRead::Days,
        StoreRead::Range,
        StoreRead::Day,
        StoreRead::AllTime,
        StoreRead::Coverage,
    ];
    let before: Vec<u64> = SHOWN.iter().map(|q| h.reads(*q)).collect();
    assert_eq!(before, vec![0, 0, 0, 0, 0]);

    let loads = |n: usize| {
        let routes = routes.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let routes = routes.clone();
                    tokio::spawn(async move { dashboard_load(&routes, first, last).await })
                })
                .collect();
            for task in tasks {
                task.await.expect("a dashboard load");
            }
        }
    };
    loads(50).await;
    let reads = |h: &Harness| -> Vec<u64> { SHOWN.iter().map(|q| h.reads(*q)).collect() };
    // Coverage is read twice: for the trend's range and for the day shown.
    assert_eq!(
        reads(&h),
        vec![1, 1, 1, 1, 2],
        "one read of each per period"
    );
    let misses = h.metrics.web.cache_misses.get();
    let hits = h.metrics.web.cache_hits.get();
    println!(
        "50 concurrent dashboard loads: {hits} cache hits, {misses} misses, store reads {:?}",
        reads(&h)
    );

    // A batch counted by this process ends the period for what it changes: the next 50 loads
    // read each of those once more, and the days the batch did not touch not at all.
    let mut tally = OpenTally::default();
    let event = &lines[0];
    let head = pleiades::event::inspect(event).expect("valid");
    tally.count(&head, false);
    let touched = head.time_ms.div_euclid(86_400_000);
    assert_ne!(
        touched, last,
        "the batch must touch another day than the one shown"
    );
    h.store
        .apply(&Batch {
            source: "test".into(),
            start: 1,
            end: 2,
            tally: tally.seal().into(),
        })
        .await
        .expect("applied");
    loads(50).await;
    assert_eq!(
        reads(&h),
        vec![2, 2, 1, 2, 3],
        "days, range, coverage and all-time changed; the day shown did not"
    );
}

/// The file descriptor of this process's socket listening on `port`, from /proc.
fn listening_fd(port: u16) -> Option<i32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
        // State 0A is LISTEN.
        (local_port == port && *fields.get(3)? == "0A")
            .then(|| fields.get(9).map(|s| s.to_string()))?
    })?;
    let target = format!("socket:[{inode}]");
    std::fs::read_dir("/proc/self/fd").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let link = std::fs::read_link(entry.path()).ok()?;
        (link.to_string_lossy() == target)
            .then(|| entry.file_name().to_string_lossy().parse().ok())?
    })
}

#[test]
fn a_listener_that_fails_after_start_is_restarted_by_its_supervisor() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let system = actix_rt::System::with_tokio_rt(move || runtime);
    system.block_on(async {
        let scope = TestScope::new();
        let mut h = Harness::new(&scope, &recorded_lines()[..50], Duration::from_secs(1)).await;
        let port = TestScope::free_port();
        h.ctx.config.listen = loopback(port);
        let (ctx, parts) = (h.ctx.clone(), h.parts.clone());
        let running = pleiades::supervisor::start(
            Component::Web,
            Arc::new(move || {
                let (ctx, parts) = (ctx.clone(), parts.clone());
                Box::pin(async move { pleiades::web::run(ctx, parts).await.map_err(Into::into) })
            }),
            h.ctx.shutdown.clone(),
            h.metrics.supervisor.clone(),
            pleiades::supervisor::RestartPolicy {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(200),
                stable_after: Duration::from_secs(60),
            },
        );
        let healthz = format!("http://127.0.0.1:{port}/healthz");
        let answers = async || {
            reqwest::get(&healthz)
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        };
        wait_until(Duration::from_secs(10), "the web role to listen", answers).await;
        let restarts = || h.metrics.supervisor.restarts.get(Component::Web);
        assert_eq!(restarts(), 0);

        // The fault, for real: shutdown(2) on the listening socket makes accept(2) fail.
        let fd = listening_fd(port).expect("the listening socket of this process");
        // SAFETY: shutdown(2) on a descriptor this process owns; it stays open.
        assert_eq!(unsafe { libc::shutdown(fd, libc::SHUT_RD) }, 0);
        wait_until(
            Duration::from_secs(10),
            "a restart of the web role",
            async || (restarts() == 1).then_some(()),
        )
        .await;
        wait_until(
            Duration::from_secs(10),
            "the web role to listen again",
            answers,
        )
        .await;
        assert_eq!(restarts(), 1);
        h.ctx.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), running.done)
            .await
            .expect("the web role stops on shutdown")
            .expect("stopped");
    });
}
