//! The web role against a real store filled by the pipeline: every endpoint, every error status,
//! and the exact JSON shape of SPEC §6; readiness follows the store.

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
async fn filled(scope: &mut TestScope, store_toml: &str) -> (Web, u16, Expected) {
    let lines = recorded_lines();
    let expected = oracle(&lines);
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let upstream = scope.replay(replay_options(vec![events])).await.addr;
    let metrics = TestScope::free_port();
    let web = TestScope::free_port();
    let config = all_roles_config(upstream, metrics, web, "") + store_toml;
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
    let (web, metrics, expected) = filled(&mut scope, "[store]\npath = \"counters.db\"\n").await;

    // GET /api/days: the days with data, ascending, as strings.
    let (status, days) = web.get("/api/days").await;
    assert_eq!(status, 200);
    let want: Vec<String> = expected.days.keys().map(|d| d.to_string()).collect();
    assert_eq!(days, serde_json::json!(want));

    // GET /api/stats/{day}: exactly {"since", "counters": [{"name","description","value"}]}.
    for (day, counters) in &expected.days {
        let (status, body) = web.get(&format!("/api/stats/{day}")).await;
        assert_eq!(status, 200);
        let object = body.as_object().expect("an object");
        assert_eq!(
            object.keys().collect::<Vec<_>>(),
            vec!["counters", "since"],
            "day {day}"
        );
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
    let all: std::collections::BTreeMap<String, i64> = totals["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["value"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(all, expected.all_time);

    // A range for trends.
    let first = *expected.days.keys().next().unwrap();
    let last = *expected.days.keys().last().unwrap();
    let (status, range) = web.get(&format!("/api/range?from={first}&to={last}")).await;
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

    // Errors: JSON bodies with the right status.
    for (path, want) in [
        ("/api/stats/abc", 400),
        ("/api/stats/12.5", 400),
        ("/api/stats/1", 404),
        ("/api/stats", 404), // nothing counted today: the recorded events are older
        ("/api/range?from=x", 400),
        ("/api/range?from=20&to=10", 400),
        ("/api/range?from=0&to=99999", 400),
        ("/api/nothing", 404),
    ] {
        let (status, body) = web.get(path).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{path}: {body}"
        );
    }

    let posted = reqwest::Client::new()
        .post(format!("{}/api/days", web.base))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 405);

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
    assert_eq!(
        scraped["pleiades_web_http_response_total{path=\"/api/stats/{day}\",status=\"400\"}"],
        2.0
    );
    assert!(scraped.contains_key("pleiades_web_counter_marshal_duration_seconds_count"));
    assert!(scraped.contains_key("pleiades_web_http_duration_seconds_count{path=\"/api/days\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backed_api_and_readiness_follow_the_store() {
    let mut scope = TestScope::new();
    let mut redis = RedisServer::start(&scope, true).await;
    let (web, _metrics, expected) = filled(
        &mut scope,
        &format!(
            "[store]\nkind = \"redis\"\n[redis]\nurl = \"{}\"\n",
            redis.url()
        ),
    )
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

    // Redis goes away: not ready, and reads say why with 503; it comes back: ready again.
    let port = redis.port;
    redis.stop();
    let (status, ready) = web.get("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["checks"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains(&port.to_string()),
        "{ready}"
    );
    let (status, body) = web
        .get(&format!(
            "/api/stats/{}",
            expected.days.keys().next().unwrap()
        ))
        .await;
    assert!(status == 503 || status == 200, "{status}: {body}"); // a cached day may still be served
    redis.start_again().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while web.get("/readyz").await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
