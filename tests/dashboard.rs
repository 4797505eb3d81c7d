//! The dashboard in a real browser: Debian's headless Chromium, driven through chromedriver over
//! the WebDriver protocol, loads the page the daemon serves, shows the stored numbers, receives
//! live updates without a reload, follows the relay's live feed (the browser's own EventSource)
//! with a wiki filter, and leaves a screenshot in `target/test-artifacts/`. On past days it
//! draws the day by hour, the busiest pages and the distinct editors the API answers, with and
//! without Wikidata, at desktop and at phone width.

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

    /// Sets the browser window's size in CSS pixels.
    async fn resize(&self, width: u32, height: u32) {
        self.command(
            reqwest::Method::POST,
            "window/rect",
            json!({ "width": width, "height": height }),
        )
        .await;
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

/// Upstream events of the second past day that never arrived.
const SECOND_DAY_MISSED: u64 = 4;

/// Recorded events moved to two past days (`first`, `first + 1`, alternately): event `i` at
/// hour `(i / 2 * 7) % 24` of its day, so every hour has some; a fifth are the recorded Wikidata edits
/// (bots and humans). Each keeps its own fields and gets a new id, and an upstream position:
/// partition 0 for the first day, without a hole; partition 1 for the second, where the 4
/// offsets after its 100th event never arrived ([`SECOND_DAY_MISSED`]).
fn events_on_past_days(first: i64) -> Vec<String> {
    let recorded = delivered(&recorded_lines());
    let (wikidata, others): (Vec<&String>, Vec<&String>) = recorded
        .iter()
        .partition(|l| l.contains("\"wikidatawiki\""));
    let picked: Vec<&String> = others
        .iter()
        .take(480)
        .chain(wikidata.iter().take(120))
        .copied()
        .collect();
    picked
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut v: Value = serde_json::from_str(line).expect("JSON");
            let day = first + (i % 2) as i64;
            let at = day * 86_400 + ((i / 2 * 7) % 24) as i64 * 3600 + (i % 3600) as i64;
            let dt = chrono::DateTime::from_timestamp(at, 0).expect("a time");
            v["meta"]["id"] = json!(format!("past-{i}"));
            v["meta"]["dt"] = json!(dt.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            let (partition, n) = ((i % 2) as u64, (i / 2) as u64);
            let skipped = if partition == 1 && n >= 100 {
                SECOND_DAY_MISSED
            } else {
                0
            };
            v["meta"]["topic"] = json!("eqiad.mediawiki.recentchange");
            v["meta"]["partition"] = json!(partition);
            v["meta"]["offset"] = json!(1_000 + n + skipped);
            v.to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "service-tests"),
    ignore = "needs chromium and chromium-driver (scripts/test)"
)]
async fn a_past_day_without_wikidata_shows_what_the_api_answers() {
    let scope = TestScope::new();
    let today = chrono::Utc::now().timestamp().div_euclid(86_400);
    let (first, second) = (today - 3, today - 2);
    let lines = events_on_past_days(first);
    let expected = oracle(&lines);
    assert_eq!(
        expected.days.keys().copied().collect::<Vec<_>>(),
        vec![first, second]
    );
    let store = common::dimensions::clean_pass(&scope.path("counters.db"), &lines).await;

    // The web role in-process on a loopback port, serving the filled store.
    let metrics = std::sync::Arc::new(pleiades::metrics::Metrics::new(1).expect("metrics"));
    let (_live_tx, live) = tokio::sync::watch::channel(String::new());
    let ctx = pleiades::ComponentContext {
        config: pleiades::config::WebConfig {
            listen: loopback(0),
            ..pleiades::config::WebConfig::default()
        },
        metrics,
        shutdown: tokio_util::sync::CancellationToken::new(),
    };
    let shutdown = ctx.shutdown.clone();
    let parts = pleiades::web::WebParts {
        store: store.clone(),
        readiness: pleiades::health::Readiness::default(),
        live,
        relay: None,
    };
    let (addr, _server) = pleiades::web::serve(ctx, parts)
        .await
        .expect("the web role");
    let base = format!("http://{addr}");

    let browser = Browser::start(&scope).await;
    browser.open(&format!("{base}/")).await;
    // Without today's data the page opens on the last day on record; pick the one before.
    browser
        .wait_for(
            "the last day to load",
            &format!("return document.body.dataset.panels === '{second}:with-wikidata'"),
            Duration::from_secs(30),
        )
        .await;
    let options = browser
        .eval("return [...document.getElementById('day').options].map(o => o.value)")
        .await;
    assert!(
        options
            .as_array()
            .is_some_and(|o| o.contains(&json!(first.to_string()))),
        "the picker offers {first}: {options}"
    );
    // The second day lost events upstream: the API says so, and so do the picker, the trend
    // and the note above the day's numbers; the first day is complete and unmarked.
    let coverage = api(&base, &format!("/api/coverage?from={first}&to={second}")).await;
    let statuses: Vec<&str> = coverage["days"]
        .as_array()
        .expect("days")
        .iter()
        .map(|d| d["status"].as_str().expect("a status"))
        .collect();
    assert_eq!(statuses, vec!["complete", "partial"], "{coverage}");
    assert_eq!(coverage["days"][1]["missed"], json!(SECOND_DAY_MISSED));
    let marks = browser
        .eval(&format!("const o = d => document.querySelector(`#day option[value='${{d}}']`); const c = d => document.querySelector(`#trend circle[data-day='${{d}}']`); return [{first}, {second}].map(d => [o(d).dataset.coverage, o(d).textContent.includes('incomplete'), c(d).dataset.coverage, c(d).classList.contains('partial')])"))
        .await;
    assert_eq!(
        marks,
        json!([
            ["complete", false, "complete", false],
            ["partial", true, "partial", true]
        ]),
        "the picker and the trend mark the partial day"
    );
    let note = browser
        .eval("const n = document.getElementById('coverage'); return [n.hidden, Number(n.dataset.missed), n.textContent]")
        .await;
    assert_eq!(note[0], json!(false), "{note}");
    assert_eq!(note[1], json!(SECOND_DAY_MISSED), "{note}");
    browser
        .eval(&format!("const s = document.getElementById('day'); s.value = '{first}'; s.dispatchEvent(new Event('change')); return true"))
        .await;
    browser
        .wait_for(
            "the picked day",
            &format!("return document.body.dataset.panels === '{first}:with-wikidata' && document.body.dataset.loadedDay === '{first}'"),
            Duration::from_secs(30),
        )
        .await;
    let note = browser
        .eval("return document.getElementById('coverage').hidden")
        .await;
    assert_eq!(
        note,
        Value::Bool(true),
        "a complete day has no coverage note"
    );
    let with_wikidata = browser
        .eval("return Number(document.getElementById('stat-total').dataset.value)")
        .await;
    assert_eq!(
        with_wikidata.as_i64(),
        expected.days[&first].get("pleiades_total").copied()
    );
    browser
        .eval("document.getElementById('no-wikidata').click(); return true")
        .await;
    browser
        .wait_for(
            "the panels without Wikidata",
            &format!("return document.body.dataset.panels === '{first}:without-wikidata'"),
            Duration::from_secs(30),
        )
        .await;

    // The key numbers: the day's counters less their Wikidata share.
    let stats = api(&base, &format!("/api/stats/{first}")).await;
    let wikidata_events = counter(&stats, "pleiades_family_wikidata");
    assert!(wikidata_events > 0, "the day has Wikidata edits");
    let numbers = browser
        .eval("return ['total', 'bot', 'added', 'removed', 'editors'].map(n => Number(document.getElementById('stat-' + n).dataset.value))")
        .await;
    let numbers: Vec<i64> = numbers
        .as_array()
        .expect("numbers")
        .iter()
        .map(|v| v.as_i64().expect("a number"))
        .collect();
    let share = |name: &str| {
        counter(&stats, name)
            - counter(
                &stats,
                &format!("pleiades_wikidata_{}", &name["pleiades_".len()..]),
            )
    };
    assert_eq!(
        numbers[0],
        counter(&stats, "pleiades_total") - wikidata_events
    );
    assert_eq!(numbers[1], share("pleiades_bot"));
    assert_eq!(numbers[2], share("pleiades_bytes_added"));
    assert_eq!(numbers[3], share("pleiades_bytes_removed"));

    // The by-hour chart: what it draws, hour by hour, against the API and the events.
    let hours = api(&base, &format!("/api/hours/{first}")).await;
    let drawn = browser
        .eval("return [...document.querySelectorAll('#hours g.hour')].map(g => [Number(g.dataset.hour), Number(g.dataset.human), Number(g.dataset.bot)])")
        .await;
    let drawn: Vec<(i64, i64, i64)> = serde_json::from_value(drawn).expect("24 hours of numbers");
    assert_eq!(drawn.len(), 24);
    let by_events = &expected.hours[&first];
    let mut events_drawn = 0;
    for (hour, human, bot) in &drawn {
        let c = &hours["hours"][*hour as usize]["counters"];
        let value = |name: &str| c[name].as_i64().unwrap_or(0);
        let from_api = (
            value("pleiades_human") - value("pleiades_wikidata_human"),
            value("pleiades_bot") - value("pleiades_wikidata_bot"),
        );
        assert_eq!((*human, *bot), from_api, "hour {hour}");
        let exact = |name: &str| {
            by_events
                .get(&format!("{hour:02}:{name}"))
                .copied()
                .unwrap_or(0)
        };
        let from_events = (
            exact("pleiades_human") - exact("pleiades_wikidata_human"),
            exact("pleiades_bot") - exact("pleiades_wikidata_bot"),
        );
        assert_eq!((*human, *bot), from_events, "hour {hour}");
        events_drawn += human + bot;
    }
    assert_eq!(events_drawn, numbers[0], "the hours add up to the day");
    assert!(
        drawn.iter().all(|(_, h, b)| h + b > 0),
        "every hour has events"
    );

    // The busiest pages: the API's list without Wikidata, each linking to its page.
    let top = api(
        &base,
        &format!("/api/top/{first}?what=pages&limit=15&exclude=wikidata"),
    )
    .await;
    let want: Vec<(String, i64, String)> = top["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["key"].as_str().expect("a key").to_owned(),
                e["count"].as_i64().expect("a count"),
                e["url"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert!(want.len() >= 10, "{top}");
    assert!(want
        .iter()
        .all(|(key, _, _)| !key.starts_with("wikidatawiki\t")));
    let listed = browser
        .eval("return [...document.querySelectorAll('#top-pages li')].map(li => [li.dataset.name, Number(li.dataset.value), (li.querySelector('a') || {href: ''}).href])")
        .await;
    let listed: Vec<(String, i64, String)> = serde_json::from_value(listed).expect("rows");
    assert_eq!(listed, want);

    // The distinct editors, as the API counts them without Wikidata.
    let editors = api(&base, &format!("/api/editors/{first}?exclude=wikidata")).await;
    assert_eq!(Some(numbers[4]), editors["editors"].as_i64(), "{editors}");
    let with_all = api(&base, &format!("/api/editors/{first}")).await;
    assert!(with_all["editors"].as_i64() > editors["editors"].as_i64());

    // Desktop and phone width: nothing wider than the screen, the chart redrawn to fit.
    let clean = browser
        .eval("return document.getElementById('message').hidden")
        .await;
    assert_eq!(clean, Value::Bool(true), "the dashboard shows an error");
    let desktop = browser.screenshot("dashboard-past-day-desktop.png").await;
    browser.resize(390, 2400).await;
    browser
        .wait_for(
            "the chart at phone width",
            "const svg = document.querySelector('#hours svg'); return window.innerWidth <= 390 && svg && svg.viewBox.baseVal.width <= window.innerWidth && document.documentElement.scrollWidth <= window.innerWidth",
            Duration::from_secs(10),
        )
        .await;
    let phone = browser.screenshot("dashboard-past-day-phone.png").await;
    for path in [&desktop, &phone] {
        assert!(std::fs::metadata(path).is_ok_and(|m| m.len() > 10_000));
        println!("dashboard screenshot: {}", path.display());
    }
    shutdown.cancel();
}
