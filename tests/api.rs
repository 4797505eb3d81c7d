//! The web role in-process, on a store filled beforehand: every route through `warp::test`
//! against an independent recomputation, the store read once per cache period however many
//! dashboards load at once, and a listener that fails after start being restarted by its
//! supervisor. Needs no outside service.

mod common;

use common::*;
use pleiades::config::{StoreConfig, StoreKind, StoreSettings, WebConfig};
use pleiades::counters::{Deltas, Scratch, Tally};
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
    let mut tally = Tally::default();
    let mut name = String::new();
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
        let mut scratch = Scratch::default();
        tally.add(&Deltas::of(&head, &mut scratch), &mut name);
    }
    let batch = Batch {
        source: "test".into(),
        start: 0,
        end: 1,
        tally,
    };
    store.apply(&batch).await.expect("the batch applies");
    store
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
        assert_eq!(object.keys().collect::<Vec<_>>(), vec!["counters", "since"]);
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
    const SHOWN: [StoreRead; 4] = [
        StoreRead::Days,
        StoreRead::Range,
        StoreRead::Day,
        StoreRead::AllTime,
    ];
    let before: Vec<u64> = SHOWN.iter().map(|q| h.reads(*q)).collect();
    assert_eq!(before, vec![0, 0, 0, 0]);

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
    assert_eq!(reads(&h), vec![1, 1, 1, 1], "one read of each per period");
    let misses = h.metrics.web.cache_misses.get();
    let hits = h.metrics.web.cache_hits.get();
    println!(
        "50 concurrent dashboard loads: {hits} cache hits, {misses} misses, store reads {:?}",
        reads(&h)
    );

    // A batch counted by this process ends the period for what it changes: the next 50 loads
    // read each of those once more, and the days the batch did not touch not at all.
    let mut tally = Tally::default();
    let event = &lines[0];
    let head = pleiades::event::inspect(event).expect("valid");
    let mut scratch = Scratch::default();
    tally.add(&Deltas::of(&head, &mut scratch), &mut String::new());
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
            tally,
        })
        .await
        .expect("applied");
    loads(50).await;
    assert_eq!(
        reads(&h),
        vec![2, 2, 1, 2],
        "days, range and all-time changed; the day shown did not"
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
