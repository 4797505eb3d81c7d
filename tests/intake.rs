//! The intake (`POST /v1/events` on `intake.listen`) of the real daemon beside the public
//! stream: MediaWiki-shaped bodies get EventGate's statuses, and accepted events are counted
//! exactly once, even when the same body is posted twice.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "s3cret-intake-token";

/// Events of a private wiki, shaped as MediaWiki's EventBus sends them (recorded events with a
/// wiki of their own and fresh ids).
fn private_events(from: usize, count: usize) -> Vec<Value> {
    recorded_lines()
        .into_iter()
        .take(681)
        .cycle()
        .skip(from)
        .take(count)
        .enumerate()
        .map(|(i, line)| {
            let mut v: Value = serde_json::from_str(&line).unwrap();
            v["wiki"] = json!("privatewiki");
            v["meta"]["domain"] = json!("wiki.example.org");
            v["meta"]["id"] = json!(format!("private-{}", from + i));
            v
        })
        .collect()
}

struct Intake {
    http: reqwest::Client,
    url: String,
}

impl Intake {
    async fn post(&self, body: impl Into<reqwest::Body>, token: Option<&str>) -> (u16, Value) {
        let mut request = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("the intake answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn events(&self, events: &Value) -> (u16, Value) {
        self.post(events.to_string(), Some(TOKEN)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mediawiki_bodies_get_eventgate_statuses_and_count_once() {
    let mut scope = TestScope::new();
    // The public stream flows at the same time.
    let public: Vec<String> = recorded_lines().into_iter().take(300).collect();
    let events = scope.path("upstream.jsonl");
    std::fs::write(&events, public.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.rate = Some(200.0);
    let upstream = scope.replay(options).await.addr;
    let (metrics, web, port) = (
        TestScope::free_port(),
        TestScope::free_port(),
        TestScope::free_port(),
    );
    let mut config = all_roles_config(upstream, metrics, web);
    config.store.path = scope.path("counters.db");
    config.intake.listen = Some(loopback(port));
    config.intake.max_body_bytes = 256 * 1024;
    scope.write_config(&config);
    // The token comes from the environment, as operators are told to give it.
    scope.spawn_with_env(
        &["--config", "pleiades.toml"],
        &[("PLEIADES_INTAKE__TOKEN", TOKEN)],
    );
    let intake = Intake {
        http: reqwest::Client::new(),
        url: format!("http://127.0.0.1:{port}/v1/events"),
    };
    wait_until(
        Duration::from_secs(30),
        "the intake to listen",
        async || intake.http.get(&intake.url).send().await.ok().map(|_| ()),
    )
    .await;

    // One event, then an array of them: 201.
    let single = private_events(0, 1).remove(0);
    assert_eq!(intake.events(&single).await.0, 201);
    let batch = Value::from(private_events(1, 20));
    assert_eq!(intake.events(&batch).await.0, 201);
    // The same body again: 201, and nothing is published twice.
    assert_eq!(intake.events(&batch).await.0, 201);
    assert_eq!(intake.events(&single).await.0, 201);

    // Mixed: the valid ones are accepted, the others named with the rule they break.
    let mut mixed = private_events(21, 4);
    mixed[1]["bot"] = json!("yes");
    mixed[3]["meta"].as_object_mut().unwrap().remove("stream");
    let (status, body) = intake.events(&Value::from(mixed)).await;
    assert_eq!(status, 207, "{body}");
    let invalid = body["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 2, "{body}");
    assert_eq!(invalid[0]["index"], 1);
    assert_eq!(invalid[0]["event"], "private-22");
    assert_eq!(invalid[0]["context"]["errors"][0]["rule"], "type");
    assert_eq!(invalid[0]["context"]["errors"][0]["path"], "/bot");
    assert_eq!(invalid[1]["index"], 3);
    assert_eq!(invalid[1]["context"]["errors"][0]["rule"], "required");

    // None valid: 400, with the same detail.
    let mut bad = private_events(25, 2);
    bad[0]["meta"]["dt"] = json!("2024-05-01 10:00:00Z");
    bad[1].as_object_mut().unwrap().remove("$schema");
    let (status, body) = intake.events(&Value::from(bad)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["invalid"][0]["context"]["errors"][0]["rule"], "format");
    assert_eq!(
        body["invalid"][1]["context"]["errors"][0]["rule"],
        "required"
    );
    // Not an event at all, and no event.
    assert_eq!(intake.post("{\"meta\": ", Some(TOKEN)).await.0, 400);
    assert_eq!(intake.post("[]", Some(TOKEN)).await.0, 400);

    // Oversize: 413; the token missing or wrong: 401; other methods: 405.
    let big = Value::from(private_events(30, 400));
    assert!(big.to_string().len() > 256 * 1024);
    let (status, body) = intake.events(&big).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(intake.post(single.to_string(), None).await.0, 401);
    assert_eq!(intake.post(single.to_string(), Some("guess")).await.0, 401);
    let get = intake.http.get(&intake.url).send().await.unwrap();
    assert_eq!(get.status(), 405);

    // Accepted: 1 + 20 + 2 from the mixed body, each once, beside all of the public stream.
    let accepted = 23;
    let expected_events = oracle(&public).events + accepted;
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(60),
        |v| v >= expected_events as f64,
    )
    .await;
    let bus = bus_lines(&scope.path("events"));
    let private: Vec<&String> = bus
        .iter()
        .map(|(_, id)| id)
        .filter(|id| id.starts_with("private-"))
        .collect();
    assert_eq!(private.len(), accepted as usize, "{private:?}");
    let totals: Value = reqwest::get(format!("http://127.0.0.1:{web}/api/totals"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let counters = counters_of(&totals);
    assert_eq!(counters["pleiades_wiki_privatewiki"], accepted as i64);
    assert_eq!(counters["pleiades_total"], expected_events as i64);
    let scraped = scrape(metrics).await.expect("metrics");
    for (status, count) in [
        ("201", 4.0),
        ("207", 1.0),
        ("400", 3.0),
        ("401", 2.0),
        ("413", 1.0),
    ] {
        assert_eq!(
            scraped[&format!("pleiades_intake_requests_total{{status=\"{status}\"}}")],
            count,
            "{status}"
        );
    }
    assert_eq!(
        scraped["pleiades_intake_events_total{outcome=\"accepted\"}"],
        23.0
    );
    assert_eq!(
        scraped["pleiades_intake_events_total{outcome=\"repeat\"}"],
        21.0
    );
    assert_eq!(
        scraped["pleiades_intake_events_total{outcome=\"invalid\"}"],
        4.0
    );
}
