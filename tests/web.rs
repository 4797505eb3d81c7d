//! The web role of the real daemon over HTTP, on a store filled by the pipeline: the exact JSON
//! shape of SPEC §6, and readiness following the store. Every route and error status is also
//! checked in-process by `tests/api.rs`.

mod common;

use common::*;
use std::time::Duration;

struct Web {
    base: String,
}

impl Web {
    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("the web role answers");
        let status = response.status().as_u16();
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.expect("a body");
        assert!(
            kind.starts_with("application/json"),
            "{path}: content-type {kind:?}"
        );
        (
            status,
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")),
        )
    }
}

/// Starts replay → daemon (all roles) and waits until every event is counted.
async fn filled(
    scope: &mut TestScope,
    store: impl FnOnce(&mut pleiades::config::Config),
) -> (Web, u16, Expected) {
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let upstream = scope.replay(replay_options(vec![events])).await.addr;
    let metrics = TestScope::free_port();
    let web = TestScope::free_port();
    let mut config = all_roles_config(upstream, metrics, web);
    store(&mut config);
    scope.write_config(&config);
    scope.spawn(&["--config", "pleiades.toml"]);
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(120),
        |v| v >= expected.events as f64,
    )
    .await;
    (
        Web {
            base: format!("http://127.0.0.1:{web}"),
        },
        metrics,
        expected,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_exactly_what_was_counted() {
    let mut scope = TestScope::new();
    let (web, metrics, expected) =
        filled(&mut scope, |c| c.store.path = "counters.db".into()).await;

    // GET /api/days: the days with data, ascending, as strings.
    let (status, days) = web.get("/api/days").await;
    assert_eq!(status, 200);
    let want: Vec<String> = expected.days.keys().map(|d| d.to_string()).collect();
    assert_eq!(days, serde_json::json!(want));

    // GET /api/stats/{day}: exactly {"since", "counters": [{"name","description","value"}]},
    // and the day's coverage beside them (a new field).
    for (day, counters) in &expected.days {
        let (status, body) = web.get(&format!("/api/stats/{day}")).await;
        assert_eq!(status, 200);
        let object = body.as_object().expect("an object");
        assert_eq!(
            object.keys().collect::<Vec<_>>(),
            vec!["counters", "coverage", "since"],
            "day {day}"
        );
        assert!(body["coverage"]["status"].is_string(), "day {day}: {body}");
        assert_eq!(body["since"], serde_json::json!(day * 86_400));
        let list = body["counters"].as_array().expect("a list");
        assert_eq!(list.len(), counters.len(), "day {day}");
        for counter in list {
            let c = counter.as_object().expect("a counter object");
            assert_eq!(
                c.keys().collect::<Vec<_>>(),
                vec!["description", "name", "value"]
            );
            let name = c["name"].as_str().expect("name");
            assert!(!c["description"].as_str().expect("description").is_empty());
            assert_eq!(
                c["value"].as_i64(),
                counters.get(name).copied(),
                "day {day} {name}"
            );
        }
    }

    // All-time totals, same shape, since null.
    let (status, totals) = web.get("/api/totals").await;
    assert_eq!(status, 200);
    assert_eq!(totals["since"], serde_json::Value::Null);
    let all = counters_of(&totals);
    assert_eq!(all, expected.all_time);

    // Health.
    assert_eq!(web.get("/healthz").await.0, 200);
    let (status, ready) = web.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);

    // The dashboard is served from the binary.
    let page = reqwest::get(format!("{}/", web.base)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<title>Pleiades"));

    let scraped = scrape(metrics).await.expect("metrics");
    assert!(
        scraped["pleiades_web_http_response_total{path=\"/api/stats/{day}\",status=\"200\"}"]
            >= expected.days.len() as f64
    );
    assert!(scraped.contains_key("pleiades_web_counter_marshal_duration_seconds_count"));
    assert!(scraped.contains_key("pleiades_web_http_duration_seconds_count{path=\"/api/days\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs redis-server (scripts/test)"
)]
async fn redis_backed_api_and_readiness_follow_the_store() {
    let mut scope = TestScope::new();
    let mut redis = RedisServer::start(&scope, true).await;
    let url = redis.url();
    let (web, metrics, expected) = filled(&mut scope, |c| {
        c.store.kind = pleiades::config::StoreKind::Redis;
        c.redis.url = url;
    })
    .await;
    let (status, totals) = web.get("/api/totals").await;
    assert_eq!(status, 200);
    let total = totals["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "pleiades_total")
        .unwrap()["value"]
        .as_i64();
    assert_eq!(total, expected.all_time.get("pleiades_total").copied());
    assert_eq!(web.get("/readyz").await.0, 200);

    // Redis goes away: not ready, with 503; the public listener names the failing check, the
    // operator's metrics listener says why. It comes back: ready again.
    let port = redis.port;
    redis.stop();
    let (status, ready) = web.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"][0]["name"], "store", "{ready}");
    assert_eq!(ready["checks"][0]["ok"], false, "{ready}");
    assert!(!ready.to_string().contains(&port.to_string()), "{ready}");
    let operator = Web {
        base: format!("http://127.0.0.1:{metrics}"),
    };
    let (status, detail) = operator.get("/readyz").await;
    assert_eq!(status, 503, "{detail}");
    assert!(
        detail["checks"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains(&port.to_string()),
        "{detail}"
    );
    let (status, body) = web
        .get(&format!(
            "/api/stats/{}",
            expected.days.keys().next().unwrap()
        ))
        .await;
    assert!(status == 503 || status == 200, "{status}: {body}"); // a cached day may still be served
    redis.start_again().await;
    wait_until(
        Duration::from_secs(20),
        "ready again after Redis came back",
        async || (web.get("/readyz").await.0 == 200).then_some(()),
    )
    .await;
}
