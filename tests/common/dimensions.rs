//! The further dimensions as the tests compute them, from the rules README.md states and not
//! from the library's code: families and languages, namespaces, user classes, log types and
//! actions, patrolling, bytes, the Wikidata share, per-hour counters, the exact set of editors
//! and the exact counts of pages and editors. Also what the stores hold of them, and the
//! comparisons: exact where the rules are exact, within the stated bounds for the sketches,
//! and identical to a clean pass.
#![allow(dead_code)]

use super::Expected;
use pleiades::counters::TopList;
use pleiades::project::Family;
use pleiades::sketch::hll::HyperLogLog;
use pleiades::sketch::top::TopSketch;
use serde_json::Value;
use std::collections::BTreeMap;

/// The language families: (family, the domain of its wikis, the database-name suffix).
const LANGUAGE_FAMILIES: &[(&str, &str, &str)] = &[
    ("wiktionary", "wiktionary.org", "wiktionary"),
    ("wikibooks", "wikibooks.org", "wikibooks"),
    ("wikinews", "wikinews.org", "wikinews"),
    ("wikiquote", "wikiquote.org", "wikiquote"),
    ("wikisource", "wikisource.org", "wikisource"),
    ("wikiversity", "wikiversity.org", "wikiversity"),
    ("wikivoyage", "wikivoyage.org", "wikivoyage"),
    ("wikipedia", "wikipedia.org", "wiki"),
];

/// A host name as README.md says one is recognised: letters, digits, dots and hyphens.
fn host(v: &Value) -> Option<&str> {
    let s = v["server_name"].as_str()?;
    let ok = !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('.')
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    ok.then_some(s)
}

fn nonempty<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v[field].as_str().filter(|s| !s.is_empty())
}

/// The family from the host alone.
fn family_of_host(host: &str) -> &'static str {
    let named = [
        ("commons.wikimedia.org", "commons"),
        ("meta.wikimedia.org", "meta"),
        ("species.wikimedia.org", "species"),
        ("incubator.wikimedia.org", "incubator"),
        ("test.wikidata.org", "test"),
        ("test.wikipedia.org", "test"),
        ("test2.wikipedia.org", "test"),
        ("test-commons.wikimedia.org", "test"),
        ("www.mediawiki.org", "mediawiki"),
        ("www.wikifunctions.org", "wikifunctions"),
    ];
    if let Some((_, f)) = named.iter().find(|(h, _)| *h == host) {
        return f;
    }
    if host == "wikidata.org" || host.ends_with(".wikidata.org") {
        return "wikidata";
    }
    for (family, domain, _) in LANGUAGE_FAMILIES {
        if host == *domain || host.ends_with(&format!(".{domain}")) {
            return family;
        }
    }
    if host.ends_with(".wikimedia.org") {
        return "wikimedia";
    }
    "other"
}

/// The family and language of an event, by the rules of README.md.
pub fn project(v: &Value) -> (String, Option<String>) {
    let server = host(v);
    let Some(wiki) = nonempty(v, "wiki") else {
        let family = server.map_or("other", family_of_host);
        return (family.to_owned(), language(family, server, None));
    };
    let named = [
        ("wikidatawiki", "wikidata"),
        ("commonswiki", "commons"),
        ("wikifunctionswiki", "wikifunctions"),
        ("mediawikiwiki", "mediawiki"),
        ("metawiki", "meta"),
        ("specieswiki", "species"),
        ("incubatorwiki", "incubator"),
        ("sourceswiki", "wikisource"),
        ("testwiki", "test"),
        ("test2wiki", "test"),
        ("testwikidatawiki", "test"),
        ("testcommonswiki", "test"),
        ("labswiki", "wikimedia"),
        ("labtestwiki", "wikimedia"),
    ];
    if let Some((_, family)) = named.iter().find(|(w, _)| *w == wiki) {
        return ((*family).to_owned(), language(family, server, None));
    }
    for (family, _, suffix) in LANGUAGE_FAMILIES.iter().filter(|f| f.0 != "wikipedia") {
        if let Some(prefix) = wiki.strip_suffix(suffix).filter(|p| !p.is_empty()) {
            return ((*family).to_owned(), language(family, server, Some(prefix)));
        }
    }
    if wiki.len() > "wikimedia".len() && wiki.ends_with("wikimedia") {
        return ("wikimedia".to_owned(), None);
    }
    match wiki.strip_suffix("wiki").filter(|p| !p.is_empty()) {
        Some(prefix) if server == Some(&format!("{prefix}.wikimedia.org")) => {
            ("wikimedia".to_owned(), None)
        }
        Some(prefix) => (
            "wikipedia".to_owned(),
            language("wikipedia", server, Some(prefix)),
        ),
        None => (server.map_or("other", family_of_host).to_owned(), None),
    }
}

/// The language: the host's first label on `<language>.<family domain>`, else the database
/// name's prefix; a code of lowercase letters, digits and hyphens (`_` read as `-`).
fn language(family: &str, server: Option<&str>, prefix: Option<&str>) -> Option<String> {
    let (_, domain, _) = LANGUAGE_FAMILIES.iter().find(|f| f.0 == family)?;
    let from_host = server
        .and_then(|s| s.strip_suffix(&format!(".{domain}")))
        .filter(|label| !label.contains('.') && *label != "www");
    let code = from_host.or(prefix)?;
    let valid = !code.is_empty()
        && code.len() <= 24
        && code
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    valid.then(|| code.replace('_', "-"))
}

/// The user class of README.md.
pub fn user_class(v: &Value) -> Option<&'static str> {
    let user = nonempty(v, "user")?;
    Some(if v["bot"] == true {
        "bot"
    } else if user.starts_with('~') {
        "temporary"
    } else if user.parse::<std::net::IpAddr>().is_ok() {
        "anonymous"
    } else {
        "registered"
    })
}

/// Keys of the top lists are cut to 400 bytes, at a character boundary.
fn cut(key: &str) -> String {
    let mut end = key.len().min(400);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_owned()
}

/// Adds one delivered event's further dimensions to `expected`.
pub fn add(expected: &mut Expected, v: &Value, day: i64, time_ms: i64) {
    let (family, language) = project(v);
    let wikidata = family == "wikidata";
    // (name without `pleiades_`, delta, counted in the Wikidata share too)
    let mut counters: Vec<(String, i64, bool)> = Vec::new();
    // SPEC §5 counters the oracle counts already: only their Wikidata share is new.
    let mut original: Vec<(String, i64)> = Vec::new();
    counters.push((format!("family_{family}"), 1, false));
    if let Some(language) = language {
        counters.push((format!("language_{family}_{language}"), 1, false));
    }
    if let Some(n) = v["namespace"].as_i64() {
        counters.push((format!("namespace_{n}"), 1, true));
    }
    if let Some(class) = user_class(v) {
        counters.push((format!("user_{class}"), 1, true));
    }
    if let Some(log_type) = nonempty(v, "log_type") {
        counters.push((format!("log_type_{log_type}"), 1, true));
        if let Some(action) = nonempty(v, "log_action") {
            counters.push((format!("log_action_{log_type}/{action}"), 1, false));
        }
    }
    match v["patrolled"].as_bool() {
        Some(true) => counters.push(("patrolled".into(), 1, true)),
        Some(false) => counters.push(("unpatrolled".into(), 1, true)),
        None => {}
    }
    if let Some(length) = v["length"].as_object() {
        let old = length.get("old").and_then(|x| x.as_i64()).unwrap_or(0);
        let new = length.get("new").and_then(|x| x.as_i64()).unwrap_or(0);
        if new > old {
            counters.push(("bytes_added".into(), new - old, true));
            original.push(("length_inc".into(), 1));
        }
        if new < old {
            counters.push(("bytes_removed".into(), old - new, true));
            original.push(("length_dec".into(), 1));
        }
        original.push(("growth".into(), new - old));
    }
    match &v["type"] {
        Value::String(t) if !t.is_empty() => original.push((format!("type_{t}"), 1)),
        Value::Number(n) if n.is_i64() => original.push((format!("type_{n}"), 1)),
        _ => {}
    }
    if v["bot"] == true {
        original.push(("bot".into(), 1));
    }
    if v["minor"] == true {
        original.push(("minor".into(), 1));
    }
    for (name, delta, mirrored) in counters {
        bump(expected, day, &format!("pleiades_{name}"), delta);
        if mirrored && wikidata {
            bump(expected, day, &format!("pleiades_wikidata_{name}"), delta);
        }
    }
    if wikidata {
        for (name, delta) in original {
            bump(expected, day, &format!("pleiades_wikidata_{name}"), delta);
        }
    }
    let hour = time_ms.rem_euclid(86_400_000) / 3_600_000;
    let who = if v["bot"] == true { "bot" } else { "human" };
    let hours = expected.hours.entry(day).or_default();
    let mut hourly = vec![
        "pleiades_total".to_owned(),
        format!("pleiades_{who}"),
        format!("pleiades_family_{family}"),
    ];
    if wikidata {
        hourly.push(format!("pleiades_wikidata_{who}"));
    }
    for name in hourly {
        *hours.entry(format!("{hour:02}:{name}")).or_default() += 1;
    }
    if let Some(user) = nonempty(v, "user") {
        expected
            .editors
            .entry((day, family.clone()))
            .or_default()
            .insert(user.to_owned());
        *expected
            .top
            .entry((day, family.clone(), "editors".into()))
            .or_default()
            .entry(cut(user))
            .or_default() += 1;
    }
    if let (Some(wiki), Some(title)) = (nonempty(v, "wiki"), nonempty(v, "title")) {
        *expected
            .top
            .entry((day, family, "pages".into()))
            .or_default()
            .entry(cut(&format!("{wiki}\t{title}")))
            .or_default() += 1;
    }
}

fn bump(expected: &mut Expected, day: i64, name: &str, delta: i64) {
    *expected
        .days
        .entry(day)
        .or_default()
        .entry(name.to_owned())
        .or_default() += delta;
    *expected.all_time.entry(name.to_owned()).or_default() += delta;
}

/// What a store holds of the further dimensions, day by day.
#[derive(Debug, Default, PartialEq)]
pub struct Sketches {
    pub hours: BTreeMap<i64, BTreeMap<String, i64>>,
    pub editors: BTreeMap<i64, BTreeMap<Family, HyperLogLog>>,
    pub top: BTreeMap<(i64, TopList), BTreeMap<Family, TopSketch>>,
}

/// Reads the further dimensions of every day of a store.
pub async fn stored_sketches(store: &pleiades::store::Store) -> Sketches {
    let mut found = Sketches::default();
    for day in store.days().await.expect("days") {
        if let Some(hours) = store.hours(day).await.expect("hours") {
            found.hours.insert(day, hours);
        }
        let editors = store.editors(day, &Family::ALL).await.expect("editors");
        found.editors.insert(day, editors);
        for list in TopList::ALL {
            let top = store.top(day, list, &Family::ALL).await.expect("top");
            found.top.insert((day, list), top);
        }
    }
    found
}

/// One clean pass: the delivered events (valid, non-canary, each `meta.id` once, as the
/// oracle says) counted in one batch into a fresh embedded store at `path`, by the library.
pub async fn clean_pass(path: &std::path::Path, lines: &[String]) -> pleiades::store::Store {
    use pleiades::counters::OpenTally;
    let settings = pleiades::config::StoreSettings::Embedded(pleiades::config::StoreConfig {
        kind: pleiades::config::StoreKind::Embedded,
        path: path.to_owned(),
    });
    let store = super::open_store(&settings).await;
    let mut open = OpenTally::default();
    for line in super::delivered(lines) {
        let head = pleiades::event::inspect(&line).expect("a delivered event is valid");
        open.cover(&head);
        open.count(&head, true);
    }
    let tally = open.seal();
    let batch = pleiades::store::Batch {
        source: "clean-pass".into(),
        start: 0,
        end: 1,
        tally: tally.into(),
    };
    store.apply(&batch).await.expect("the clean pass applies");
    store
}

/// Checks the further dimensions of `store` against the oracle's exact answers (within the
/// sketches' bounds) and against one clean pass over the same events, counted into a fresh
/// embedded store at `clean_path` (identical).
pub async fn check(store: &pleiades::store::Store, lines: &[String], clean_path: &std::path::Path) {
    let expected = super::oracle(lines);
    let found = stored_sketches(store).await;
    assert_sketches_answer(&found, &expected);
    let clean = clean_pass(clean_path, lines).await;
    assert_sketches_identical(&found, &stored_sketches(&clean).await);
}

/// Asserts that two stores hold the same further dimensions: per-hour counters, editor
/// sketches register by register, top-list sketches bucket by bucket.
pub fn assert_sketches_identical(found: &Sketches, clean: &Sketches) {
    assert_eq!(found.hours, clean.hours, "per-hour counters differ");
    assert_eq!(
        found.editors.keys().collect::<Vec<_>>(),
        clean.editors.keys().collect::<Vec<_>>()
    );
    for (day, families) in &clean.editors {
        assert_eq!(
            &found.editors[day], families,
            "day {day}: the distinct-editor sketches differ"
        );
    }
    for (key, families) in &clean.top {
        assert_eq!(
            found.top.get(key),
            Some(families),
            "{key:?}: the top-list sketches differ"
        );
    }
    assert_eq!(found.top.len(), clean.top.len());
}

/// Asserts that the sketches answer what the exact sets say, within the bounds README.md
/// states. Per-hour counters: exactly. Distinct editors: within three standard errors (at
/// least one). Top lists: every sketch holds exactly its events; every count is at or above
/// the true count and equals it where marked exact; for each list's ten truly busiest keys
/// the estimate exceeds the true count by more than e·N/width in no more than a third of the
/// lists' keys (the bound holds for each key with probability 1 − e^−2); and a key that
/// dominates its buckets (four times the average load) is in the list.
pub fn assert_sketches_answer(found: &Sketches, expected: &Expected) {
    use pleiades::sketch::{hll, top};
    assert_eq!(found.hours, expected.hours, "per-hour counters");
    for ((day, family), names) in &expected.editors {
        let family = Family::parse(family).expect("a known family");
        let count = found.editors[day][&family].count() as f64;
        let exact = names.len() as f64;
        let bound = (3.0 * hll::STANDARD_ERROR * exact).max(1.0);
        assert!(
            (count - exact).abs() <= bound,
            "day {day} {family:?}: {count} editors estimated for {exact}"
        );
    }
    let (mut entries_checked, mut keys_checked, mut over_bound) = (0, 0, 0);
    for ((day, family, list), counts) in &expected.top {
        let list = TopList::parse(list).expect("a list");
        let family = Family::parse(family).expect("a family");
        let what = format!("day {day} {family:?} {list:?}");
        let sketch = &found.top[&(*day, list)][&family];
        let events: i64 = counts.values().sum();
        assert_eq!(sketch.events(), events, "{what}");
        let load = events as f64 / f64::from(top::WIDTH);
        let bound = (std::f64::consts::E * load).ceil() as i64;
        let entries = top::top(&[sketch], top::ENTRIES);
        for entry in &entries {
            let truth = counts.get(&entry.key).copied().unwrap_or(0);
            assert!(entry.count >= truth, "{what}: {entry:?} under {truth}");
            if entry.exact {
                assert_eq!(entry.count, truth, "{what}: {entry:?} is marked exact");
            }
            entries_checked += 1;
        }
        let mut busiest: Vec<(&String, &i64)> = counts.iter().collect();
        busiest.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (key, truth) in busiest.iter().take(10) {
            let estimate = top::estimate(&[sketch], key);
            assert!(estimate.count >= **truth, "{what}: {key:?} under {truth}");
            keys_checked += 1;
            over_bound += usize::from(estimate.count - **truth > bound);
        }
        if let Some((key, truth)) = busiest.first() {
            if **truth as f64 >= 4.0 * load.max(1.0) {
                assert!(
                    entries.iter().any(|e| &e.key == *key),
                    "{what}: the dominant key {key:?} ({truth} events) is not in {entries:?}"
                );
            }
        }
    }
    assert!(entries_checked > 0, "no top-list entry was checked");
    assert!(
        over_bound * 3 <= keys_checked,
        "{over_bound} of {keys_checked} busiest keys over e·N/width"
    );
}
