//! The dashboard in a real browser: Debian's headless Chromium, driven through chromedriver over
//! the WebDriver protocol, loads the page the daemon serves, shows the stored numbers, receives
//! live updates without a reload, follows the relay's live feed (the browser's own EventSource)
//! with a wiki filter, and leaves a screenshot in `target/test-artifacts/`.

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

struct Browser {
    driver: std::process::Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start(scope: &TestScope) -> Browser {
        let port = TestScope::free_port();
        // Its own process group, so that the browser it starts goes with it (see Drop).
        let driver = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts (apt-get install chromium chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_until(
            Duration::from_secs(30),
            "chromedriver to answer",
            async || {
                http.get(format!("{base}/status"))
                    .send()
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        let profile = scope.path("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.display()), "--window-size=1280,1400"]
        }}}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("session")
            .json()
            .await
            .expect("JSON");
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
            http,
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let mut request = self.http.request(method, url);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response: Value = request
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("JSON");
        response["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "url", json!({ "url": url }))
            .await;
    }

    /// Runs `script` in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    async fn wait_for(&self, what: &str, script: &str, limit: Duration) -> Value {
        wait_until(limit, what, async || {
            let value = self.eval(script).await;
            (!value.is_null() && value != json!(false)).then_some(value)
        })
        .await
    }

    async fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let data = self
            .command(reqwest::Method::GET, "screenshot", Value::Null)
            .await;
        let encoded = data
            .as_str()
            .unwrap_or_else(|| panic!("no screenshot: {data}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("PNG");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
        std::fs::create_dir_all(&dir).expect("artifact dir");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("screenshot saved");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver's whole group: chromedriver and the Chromium processes it started.
        // SAFETY: killpg(2) on the group this test created for the driver.
        unsafe {
            libc::killpg(self.driver.id() as i32, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// Recorded events re-stamped to now, so that they count for today and show live.
fn events_for_today(count: usize) -> Vec<String> {
    let now = chrono::Utc::now();
    recorded_lines()
        .into_iter()
        .take(count)
        .enumerate()
        .map(|(i, line)| {
            let mut v: Value = serde_json::from_str(&line).expect("JSON");
            v["meta"]["id"] = json!(format!("today-{i}"));
            v["meta"]["dt"] = json!(now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            v.to_string()
        })
        .collect()
}

async fn api(base: &str, path: &str) -> Value {
    reqwest::get(format!("{base}{path}"))
        .await
        .expect("api")
        .json()
        .await
        .expect("JSON")
}

fn counter(stats: &Value, name: &str) -> i64 {
    stats["counters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["value"].as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs chromium and chromium-driver (scripts/test)"
)]
async fn the_dashboard_shows_the_stored_numbers_and_updates_live() {
    let mut scope = TestScope::new();
    let mut lines = events_for_today(600);
    // One event dated 1970: past events are accepted as they are, and must not break the page
    // (the trend it asks for stays within the range limit).
    let mut epoch: Value = serde_json::from_str(&lines[0]).expect("JSON");
    epoch["meta"]["id"] = json!("epoch");
    epoch["meta"]["dt"] = json!("1970-01-01T00:00:00Z");
    lines.insert(0, epoch.to_string());
    let events = scope.path("today.jsonl");
    std::fs::write(&events, lines.join("\n")).unwrap();
    let mut options = replay_options(vec![events]);
    options.rate = Some(40.0);
    let upstream = scope.replay(options).await.addr;
    let metrics = TestScope::free_port();
    let web_port = TestScope::free_port();
    let mut config = all_roles_config(upstream, metrics, web_port);
    config.web.live_interval = ms(300);
    scope.write_config(&config);
    scope.spawn(&["--config", "pleiades.toml"]);
    let base = format!("http://127.0.0.1:{web_port}");
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(60),
        |v| v >= 40.0,
    )
    .await;

    let browser = Browser::start(&scope).await;
    browser.open(&format!("{base}/")).await;
    browser
        .wait_for(
            "the day to load",
            "return document.body.dataset.loadedDay || null",
            Duration::from_secs(30),
        )
        .await;
    let first: i64 = browser
        .wait_for("a number", "const v = document.getElementById('stat-total').dataset.value; return v ? Number(v) : null", Duration::from_secs(10))
        .await
        .as_i64()
        .expect("a number");
    assert!(first > 0, "today's events are shown");

    // More events arrive; the page follows without a reload.
    let later: i64 = browser
        .wait_for(
            "a live update",
            &format!("const v = Number(document.getElementById('stat-total').dataset.value); return (v > {first} && Number(document.body.dataset.liveUpdates || 0) > 0) ? v : null"),
            Duration::from_secs(30),
        )
        .await
        .as_i64()
        .expect("a number");
    assert!(later > first);

    // The live feed shows the changes arriving, read by the browser's EventSource from the
    // relay; each row is the event it says it is.
    browser
        .wait_for(
            "the live feed",
            "return Number(document.body.dataset.feedEvents || 0) >= 5",
            Duration::from_secs(30),
        )
        .await;
    let by_id: std::collections::HashMap<String, Value> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["meta"]["id"].as_str().unwrap().to_owned(), v)
        })
        .collect();
    let rows = browser
        .eval("return [...document.querySelectorAll('#feed li')].map(li => ({id: li.dataset.id, wiki: li.dataset.wiki, title: li.querySelector('.title').textContent, user: li.querySelector('.user').textContent}))")
        .await;
    let rows = rows.as_array().expect("feed rows");
    assert!(rows.len() >= 5, "{rows:?}");
    for row in rows {
        let event = &by_id[row["id"].as_str().expect("an id")];
        assert_eq!(row["wiki"], event["wiki"], "{row}");
        if let Some(title) = event["title"].as_str() {
            assert_eq!(row["title"], title, "{row}");
        }
        assert!(row["user"]
            .as_str()
            .unwrap()
            .starts_with(event["user"].as_str().unwrap_or("")));
    }
    // Filtered by wiki on the server: only that wiki's changes are shown.
    let mut wikis: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for event in by_id.values() {
        *wikis
            .entry(event["wiki"].as_str().unwrap_or(""))
            .or_default() += 1;
    }
    let wiki = wikis
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap()
        .0
        .to_owned();
    browser
        .eval(&format!("document.getElementById('feed-wiki').value = '{wiki}'; document.getElementById('feed-form').requestSubmit(); return true"))
        .await;
    browser
        .wait_for(
            "the feed filtered by wiki",
            &format!("const rows = [...document.querySelectorAll('#feed li')]; return document.body.dataset.feedFilter === '{wiki}' && rows.length >= 2 && rows.every(li => li.dataset.wiki === '{wiki}')"),
            Duration::from_secs(30),
        )
        .await;

    // Once everything is counted, the page shows exactly what the API (the store) holds.
    wait_for_metric(
        metrics,
        "pleiades_aggregator_event_count_total",
        Duration::from_secs(60),
        |v| v >= 601.0,
    )
    .await;
    let stats = api(&base, "/api/stats").await;
    let total = counter(&stats, "pleiades_total");
    assert_eq!(total, 600);
    browser
        .wait_for(
            "the final total",
            &format!("return document.getElementById('stat-total').dataset.value === '{total}'"),
            Duration::from_secs(10),
        )
        .await;
    let shown: Value = browser
        .eval("return Object.fromEntries([...document.querySelectorAll('#wikis li, #types li')].map(li => [li.dataset.name, Number(li.dataset.value)]))")
        .await;
    let shown = shown.as_object().expect("bars");
    assert!(shown.len() >= 5, "bars are drawn: {shown:?}");
    for (name, value) in shown {
        assert_eq!(value.as_i64(), Some(counter(&stats, name)), "{name}");
    }
    let bot: i64 = browser
        .eval("return Number(document.getElementById('stat-bot').dataset.value)")
        .await
        .as_i64()
        .unwrap_or(-1);
    assert_eq!(bot, counter(&stats, "pleiades_bot"));
    let alltime: i64 = browser
        .eval("return Number(document.getElementById('alltime-total').dataset.value)")
        .await
        .as_i64()
        .unwrap_or(-1);
    assert_eq!(alltime, 601);
    // The page shows no error, and its trend (under the content security policy) is drawn.
    let clean: Value = browser
        .eval("return document.getElementById('message').hidden && document.querySelectorAll('#trend circle').length > 0")
        .await;
    assert_eq!(
        clean,
        Value::Bool(true),
        "the dashboard shows an error or no trend"
    );
    let path = browser.screenshot("dashboard.png").await;
    assert!(std::fs::metadata(&path)
        .map(|m| m.len() > 10_000)
        .unwrap_or(false));
    println!("dashboard screenshot: {}", path.display());
}
