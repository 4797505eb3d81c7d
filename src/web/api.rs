//! The REST API of the original, plus all-time totals, day ranges, a day by hour, its distinct
//! editors and its busiest pages and editors: JSON bodies built from store readers, behind one
//! cache so that store reads do not grow with viewers.
//!
//! Every answer (a day, all-time, the list of days, a range, a day's hours, editors or top list)
//! is kept for at most `web.cache_ttl`,
//! and dropped at once when a batch counted by this process changes what it shows. A miss reads
//! the store once however many requests wait for it: the first one reads, the others wait on the
//! same entry and are served what it built.

use crate::counters::{description, split_hour_counter, TopList};
use crate::coverage::{self, Verdict};
use crate::event::DAY_MS;
use crate::metrics::WebMetrics;
use crate::project::{is_host_name, Family};
use crate::sketch::{hll, top};
use crate::store::{Counters, Store, StoreError, ALL_TIME_DAY};
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use warp::http::StatusCode;

/// Days a range query may span (ten years).
pub const MAX_RANGE_DAYS: i64 = 3660;
const CACHE_LIMIT: usize = 1024;

/// One counter as the original API shows it.
#[derive(Debug, Serialize)]
pub struct CounterView<'a> {
    pub name: &'a str,
    pub description: String,
    pub value: i64,
}

/// `GET /api/stats/{day}`: `since` is the day's first second, in epoch seconds; `coverage`
/// (a day's only, never all-time) says whether every upstream event of the day was counted.
#[derive(Debug, Serialize)]
pub struct StatsView<'a> {
    pub since: Option<i64>,
    pub counters: Vec<CounterView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Verdict>,
}

/// One day of `GET /api/coverage`.
#[derive(Debug, Serialize)]
struct CoverageDay {
    day: String,
    #[serde(flatten)]
    verdict: Verdict,
}

/// What a handler answers: a status and a JSON body.
#[derive(Debug, Clone)]
pub struct JsonReply {
    pub status: StatusCode,
    pub body: Bytes,
}

impl JsonReply {
    fn ok(body: Bytes) -> Self {
        JsonReply {
            status: StatusCode::OK,
            body,
        }
    }

    /// An error with a JSON body `{"error": message}`.
    pub fn error(status: StatusCode, message: &str) -> Self {
        JsonReply {
            status,
            body: Bytes::from(serde_json::json!({ "error": message }).to_string()),
        }
    }

    /// The store's error goes to the log; the answer, which anyone may read, names no
    /// address or path.
    fn store(error: &StoreError) -> Self {
        tracing::warn!(%error, "store read failed");
        JsonReply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the counter store cannot be read now",
        )
    }
}

/// What the cache holds answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Day(i64),
    AllTime,
    Days,
    Range(i64, i64),
    Coverage(i64, i64),
    Hours(i64),
    /// A day and the chosen families ([`Families`]).
    Editors(i64, Families),
    /// A day, the list, the family asked for (its name is in the answer), the chosen families
    /// and the number of entries.
    Top(i64, TopList, Option<Family>, Families, usize),
}

/// A set of families, one bit each in the order of [`Family::ALL`]: small and `Copy`, so it
/// can be part of a cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Families(u32);

impl Families {
    fn all() -> Families {
        Families((1 << Family::ALL.len()) - 1)
    }

    fn bit(family: Family) -> u32 {
        let index = Family::ALL.iter().position(|f| *f == family).unwrap_or(0);
        1 << index
    }

    fn list(self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.0 & Families::bit(*f) != 0)
            .collect()
    }

    /// The families a request chooses: `family` (one, or all when missing) less those of
    /// `exclude` (a comma list). An unknown name is the request's error, named.
    pub fn chosen(family: Option<&str>, exclude: Option<&str>) -> Result<Families, String> {
        let parse = |name: &str| {
            Family::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Family::ALL.iter().map(|f| f.as_str()).collect();
                format!(
                    "unknown family {name:?}; the families are {}",
                    known.join(", ")
                )
            })
        };
        let mut set = match family.filter(|f| !f.is_empty()) {
            None => Families::all(),
            Some(name) => Families(Families::bit(parse(name)?)),
        };
        for name in exclude.unwrap_or("").split(',').map(str::trim) {
            if !name.is_empty() {
                set.0 &= !Families::bit(parse(name)?);
            }
        }
        Ok(set)
    }
}

/// The query of `GET /api/editors/{day}` and `GET /api/top/{day}`, as given.
#[derive(Debug, Default)]
pub struct SketchQuery<'a> {
    pub family: Option<&'a str>,
    pub exclude: Option<&'a str>,
    pub what: Option<&'a str>,
    pub limit: Option<&'a str>,
}

/// An answer built from the store: 200s and 404s are kept, store failures never are.
struct Cached {
    reply: JsonReply,
    built: Instant,
    generation: u64,
}

/// One cache entry; its lock is held while the answer is built, so that requests arriving
/// meanwhile wait for it instead of reading the store themselves.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// Serves the API from a store.
pub struct Api {
    store: Store,
    metrics: WebMetrics,
    ttl: Duration,
    cache: Mutex<HashMap<Key, Slot>>,
    /// The days with data, as read for `/api/days` and for every coverage verdict (which
    /// judges a day with its neighbours): one store read per cache period for all of them.
    day_list: tokio::sync::Mutex<Option<DayList>>,
}

/// The days with data, when read, and the batch generation they were read at.
struct DayList {
    days: Arc<Vec<i64>>,
    built: Instant,
    generation: u64,
}

/// Today's epoch day (UTC).
pub fn today() -> i64 {
    chrono::Utc::now().timestamp_millis().div_euclid(DAY_MS)
}

impl Api {
    pub fn new(store: Store, metrics: WebMetrics, ttl: Duration) -> Self {
        Api {
            store,
            metrics,
            ttl,
            cache: Mutex::new(HashMap::new()),
            day_list: tokio::sync::Mutex::new(None),
        }
    }

    /// The days with data, from the store at most once per cache period (and again after a
    /// batch of this process), however many answers need them at once.
    async fn day_list(&self) -> Result<Arc<Vec<i64>>, StoreError> {
        let mut list = self.day_list.lock().await;
        if let Some(cached) = list.as_ref() {
            if cached.built.elapsed() < self.ttl && cached.generation == self.store.batches() {
                return Ok(cached.days.clone());
            }
        }
        let generation = self.store.batches();
        let days = Arc::new(self.store.days().await?);
        *list = Some(DayList {
            days: days.clone(),
            built: Instant::now(),
            generation,
        });
        Ok(days)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `GET /api/days`: the days with data, as strings, ascending.
    pub async fn days(&self) -> JsonReply {
        self.cached(Key::Days, async {
            let days = self.day_list().await?;
            let days: Vec<String> = days.iter().map(i64::to_string).collect();
            Ok(JsonReply::ok(Bytes::from(
                serde_json::to_vec(&days).unwrap_or_default(),
            )))
        })
        .await
    }

    /// `GET /api/stats/{day}`, with `day` as given in the path.
    pub async fn stats(&self, day: &str) -> JsonReply {
        match parse_day(day) {
            Ok(day) => self.day(day).await,
            Err(reply) => reply,
        }
    }

    /// `GET /api/hours/{day}`: the day's 24 hours, each with its `HH:` counters (without the
    /// prefix; `{}` for an hour without events); 404 when the day has none.
    pub async fn hours(&self, day: &str) -> JsonReply {
        let day = match parse_day(day) {
            Ok(day) => day,
            Err(reply) => return reply,
        };
        self.cached(Key::Hours(day), async {
            let Some(counters) = self.store.hours(day).await? else {
                return Ok(JsonReply::error(
                    StatusCode::NOT_FOUND,
                    &format!("no data by hour for day {day}"),
                ));
            };
            let mut hours: Vec<serde_json::Map<String, serde_json::Value>> =
                vec![serde_json::Map::new(); 24];
            for (name, value) in &counters {
                if let Some((hour, counter)) = split_hour_counter(name) {
                    hours[hour as usize].insert(counter.to_owned(), (*value).into());
                }
            }
            let since = day.saturating_mul(86_400);
            let hours: Vec<serde_json::Value> = hours
                .into_iter()
                .enumerate()
                .map(|(hour, counters)| {
                    serde_json::json!({
                        "hour": hour,
                        "since": since.saturating_add(hour as i64 * 3600),
                        "counters": counters,
                    })
                })
                .collect();
            let view =
                serde_json::json!({ "day": day.to_string(), "since": since, "hours": hours });
            Ok(JsonReply::ok(Bytes::from(view.to_string())))
        })
        .await
    }

    /// `GET /api/editors/{day}?family=&exclude=`: the distinct editors of the chosen families
    /// (their sketches merged: an editor of two families counts once), and of each.
    pub async fn editors(&self, day: &str, query: &SketchQuery<'_>) -> JsonReply {
        let (day, families) = match parse_day(day).and_then(|day| Ok((day, families(query)?))) {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        self.cached(Key::Editors(day, families), async {
            let sketches = self.store.editors(day, &families.list()).await?;
            let mut merged = hll::HyperLogLog::default();
            let mut each = serde_json::Map::new();
            for (family, sketch) in &sketches {
                merged.merge(sketch);
                each.insert(family.as_str().to_owned(), sketch.count().into());
            }
            let view = serde_json::json!({
                "day": day.to_string(),
                "editors": merged.count(),
                "standard_error": hll::STANDARD_ERROR,
                "families": each,
            });
            Ok(JsonReply::ok(Bytes::from(view.to_string())))
        })
        .await
    }

    /// `GET /api/top/{day}?what=pages|editors&family=&exclude=&limit=`: the busiest pages or
    /// editors of the chosen families, at most `limit` (default and most: 50).
    pub async fn top(&self, day: &str, query: &SketchQuery<'_>) -> JsonReply {
        let parsed = parse_day(day).and_then(|day| {
            let list = query.what.and_then(TopList::parse).ok_or_else(|| {
                JsonReply::error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "what={:?}: ask for what=pages or what=editors",
                        query.what.unwrap_or("")
                    ),
                )
            })?;
            let limit = match query.limit {
                None => top::ENTRIES,
                Some(text) => text
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=top::ENTRIES).contains(n))
                    .ok_or_else(|| {
                        JsonReply::error(
                            StatusCode::BAD_REQUEST,
                            &format!("limit={text:?}: a number from 1 to {}", top::ENTRIES),
                        )
                    })?,
            };
            Ok((day, list, families(query)?, limit))
        });
        let (day, list, families, limit) = match parsed {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        // Known to be valid: `families` parsed it.
        let family = query
            .family
            .filter(|f| !f.is_empty())
            .and_then(Family::parse);
        self.cached(Key::Top(day, list, family, families, limit), async {
            let sketches = self.store.top(day, list, &families.list()).await?;
            let sketches: Vec<&top::TopSketch> = sketches.values().collect();
            let entries: Vec<serde_json::Value> = top::top(&sketches, limit)
                .iter()
                .map(|entry| entry_view(list, entry))
                .collect();
            let view = serde_json::json!({
                "day": day.to_string(),
                "what": list.as_str(),
                "family": family.map_or("all", Family::as_str),
                "entries": entries,
            });
            Ok(JsonReply::ok(Bytes::from(view.to_string())))
        })
        .await
    }

    /// `GET /api/stats/{day}` for a parsed day.
    pub async fn day(&self, day: i64) -> JsonReply {
        self.cached(Key::Day(day), async {
            Ok(match self.store.day(day).await? {
                Some(counters) => {
                    // The counters are the answer; a coverage that cannot be read now leaves
                    // them served without it rather than not at all.
                    let verdict = match self.verdicts(day, day).await {
                        Ok(mut verdicts) => verdicts.pop().map(|(_, v)| v),
                        Err(error) => {
                            tracing::warn!(%error, day, "coverage cannot be read: the day's counters are served without it");
                            None
                        }
                    };
                    JsonReply::ok(self.marshal(
                        Some(day.saturating_mul(86_400)),
                        &counters,
                        verdict,
                    ))
                }
                None => JsonReply::error(StatusCode::NOT_FOUND, &format!("no data for day {day}")),
            })
        })
        .await
    }

    /// `GET /api/totals`: all-time counters, `since` null.
    pub async fn totals(&self) -> JsonReply {
        self.cached(Key::AllTime, async {
            let counters = self.store.all_time().await?;
            Ok(JsonReply::ok(self.marshal(None, &counters, None)))
        })
        .await
    }

    /// `GET /api/range?from=D&to=D`: `[{"day": "D", "since": s, "counters": {name: value}}]`.
    pub async fn range(&self, from: Option<&str>, to: Option<&str>) -> JsonReply {
        let (from, to) = match parse_range(from, to) {
            Ok(range) => range,
            Err(reply) => return reply,
        };
        self.cached(Key::Range(from, to), async {
            let days = self.store.range(from, to).await?;
            let started = Instant::now();
            let view: Vec<serde_json::Value> = days
                .iter()
                .map(|(day, counters)| {
                    serde_json::json!({
                        "day": day.to_string(),
                        "since": day.saturating_mul(86_400),
                        "counters": counters,
                    })
                })
                .collect();
            let body = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
            self.metrics
                .marshal
                .observe(started.elapsed().as_secs_f64());
            Ok(JsonReply::ok(body))
        })
        .await
    }

    /// `GET /api/coverage?from=D&to=D`: every day of the range (30 days to today by default)
    /// with its verdict, days without data included: a day lost whole is `partial` when the
    /// hole around it is known, else `unknown`.
    pub async fn coverage(&self, from: Option<&str>, to: Option<&str>) -> JsonReply {
        let (from, to) = match parse_range(from, to) {
            Ok(range) => range,
            Err(reply) => return reply,
        };
        self.cached(Key::Coverage(from, to), async {
            let days: Vec<CoverageDay> = self
                .verdicts(from, to)
                .await?
                .into_iter()
                .map(|(day, verdict)| CoverageDay {
                    day: day.to_string(),
                    verdict,
                })
                .collect();
            let view = serde_json::json!({
                "from": from.to_string(),
                "to": to.to_string(),
                "days": days,
            });
            Ok(JsonReply::ok(Bytes::from(view.to_string())))
        })
        .await
    }

    /// The verdicts of `from..=to`, judged with the days with data on either side, so that a
    /// hole that starts or ends outside the range still marks the days it covers.
    async fn verdicts(&self, from: i64, to: i64) -> Result<Vec<(i64, Verdict)>, StoreError> {
        let days = self.day_list().await?;
        let (start, end) = (
            coverage::window_start(&days, from),
            coverage::window_end(&days, to),
        );
        let read: Vec<i64> = days
            .iter()
            .copied()
            .filter(|day| (start..=end).contains(day))
            .collect();
        let window = self.store.coverage(&read).await?;
        Ok(coverage::verdicts(&window, from, to))
    }

    /// What invalidates `key` when this process counts a batch.
    fn generation(&self, key: Key) -> u64 {
        match key {
            // A day's coverage also changes with the holes its neighbours open or close.
            Key::Day(day) => (day.saturating_sub(1)..=day.saturating_add(1))
                .map(|d| self.store.generation(d))
                .sum(),
            Key::Hours(day) | Key::Editors(day, _) | Key::Top(day, ..) => {
                self.store.generation(day)
            }
            Key::AllTime => self.store.generation(ALL_TIME_DAY),
            Key::Days | Key::Range(..) | Key::Coverage(..) => self.store.batches(),
        }
    }

    /// The answer for `key`: from the cache while it is fresh, else built by `build` (once,
    /// however many requests wait) and kept.
    async fn cached(
        &self,
        key: Key,
        build: impl Future<Output = Result<JsonReply, StoreError>>,
    ) -> JsonReply {
        let Some(slot) = self.slot(key) else {
            // The cache is full of entries being built: answer without keeping.
            self.metrics.cache_misses.inc();
            return build.await.unwrap_or_else(|e| JsonReply::store(&e));
        };
        let mut entry = slot.lock().await;
        if let Some(cached) = entry.as_ref() {
            if cached.built.elapsed() < self.ttl && cached.generation == self.generation(key) {
                self.metrics.cache_hits.inc();
                return cached.reply.clone();
            }
        }
        self.metrics.cache_misses.inc();
        // Read before the store, so that a batch counted during the read makes the entry stale.
        let generation = self.generation(key);
        match build.await {
            Ok(reply) => {
                *entry = Some(Cached {
                    reply: reply.clone(),
                    built: Instant::now(),
                    generation,
                });
                reply
            }
            Err(e) => JsonReply::store(&e),
        }
    }

    /// The entry for `key`, made if needed; `None` when the cache is full and nothing in it can
    /// be dropped.
    fn slot(&self, key: Key) -> Option<Slot> {
        let mut cache = self.cache.lock().ok()?;
        if let Some(slot) = cache.get(&key) {
            return Some(slot.clone());
        }
        if cache.len() >= CACHE_LIMIT {
            // Drop entries that are stale and not being built.
            let ttl = self.ttl;
            cache.retain(|_, slot| match slot.try_lock() {
                Ok(entry) => entry.as_ref().is_some_and(|c| c.built.elapsed() < ttl),
                Err(_) => true,
            });
            if cache.len() >= CACHE_LIMIT {
                return None;
            }
        }
        Some(cache.entry(key).or_default().clone())
    }

    fn marshal(&self, since: Option<i64>, counters: &Counters, coverage: Option<Verdict>) -> Bytes {
        let started = Instant::now();
        let view = StatsView {
            since,
            counters: counters
                .iter()
                .map(|(name, value)| CounterView {
                    name,
                    description: description(name),
                    value: *value,
                })
                .collect(),
            coverage,
        };
        let body = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
        self.metrics
            .marshal
            .observe(started.elapsed().as_secs_f64());
        body
    }
}

/// A range's `from` and `to` as given in a query: days since 1970-01-01, `to` today and `from`
/// 29 days before `to` by default, at most [`MAX_RANGE_DAYS`] days; else a 400 that says why.
fn parse_range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), JsonReply> {
    let parse = |value: Option<&str>, default: i64, what: &str| match value {
        None => Ok(default),
        Some(v) => v.parse::<i64>().map_err(|_| {
            JsonReply::error(
                StatusCode::BAD_REQUEST,
                &format!("{what} {v:?} is not a number of days since 1970-01-01"),
            )
        }),
    };
    let to = parse(to, today(), "to")?;
    let from = parse(from, to.saturating_sub(29), "from")?;
    if from > to || to.saturating_sub(from) >= MAX_RANGE_DAYS {
        return Err(JsonReply::error(
            StatusCode::BAD_REQUEST,
            &format!("a range runs from a day to a later one, at most {MAX_RANGE_DAYS} days"),
        ));
    }
    Ok((from, to))
}

/// A day as given in a path: a number of days since 1970-01-01, else a 400 that says so.
fn parse_day(day: &str) -> Result<i64, JsonReply> {
    day.parse::<i64>().map_err(|_| {
        JsonReply::error(
            StatusCode::BAD_REQUEST,
            &format!("day {day:?} is not a number of days since 1970-01-01"),
        )
    })
}

/// The families a query chooses, or a 400 naming the unknown one.
fn families(query: &SketchQuery<'_>) -> Result<Families, JsonReply> {
    Families::chosen(query.family, query.exclude)
        .map_err(|message| JsonReply::error(StatusCode::BAD_REQUEST, &message))
}

/// One entry of a top list: a page's key is `wiki<TAB>title`, and it links to the page when the
/// server it was seen on is known.
fn entry_view(list: TopList, entry: &top::Entry) -> serde_json::Value {
    let mut view = serde_json::json!({
        "key": entry.key,
        "server": entry.server,
        "count": entry.count,
        "exact": entry.exact,
    });
    if list == TopList::Pages {
        let (wiki, title) = entry.key.split_once('\t').unwrap_or(("", &entry.key));
        view["wiki"] = wiki.into();
        view["title"] = title.into();
        if is_host_name(&entry.server) {
            view["url"] = format!("https://{}/wiki/{}", entry.server, title_path(title)).into();
        }
    }
    view
}

/// A title as MediaWiki writes it in a link: spaces as underscores, and every byte outside the
/// characters its `wfUrlencode` leaves alone percent-encoded.
pub fn title_path(title: &str) -> String {
    let mut out = String::with_capacity(title.len());
    for byte in title.bytes() {
        match byte {
            b' ' => out.push('_'),
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'.'
            | b'_'
            | b'~'
            | b';'
            | b':'
            | b'@'
            | b'$'
            | b'!'
            | b'*'
            | b'('
            | b')'
            | b','
            | b'/' => out.push(char::from(byte)),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_encoded_as_mediawiki_links_write_them() {
        assert_eq!(title_path("Main Page"), "Main_Page");
        assert_eq!(title_path("AC/DC: Live?"), "AC/DC:_Live%3F");
        assert_eq!(title_path("Zürich #1&2"), "Z%C3%BCrich_%231%262");
        assert_eq!(title_path("50% \"off\""), "50%25_%22off%22");
    }

    #[test]
    fn families_are_chosen_and_unknown_ones_named() {
        let all = Families::chosen(None, None).unwrap();
        assert_eq!(all.list(), Family::ALL.to_vec());
        let no_wikidata = Families::chosen(None, Some("wikidata")).unwrap();
        assert_eq!(no_wikidata.list().len(), Family::ALL.len() - 1);
        assert!(!no_wikidata.list().contains(&Family::Wikidata));
        let one = Families::chosen(Some("commons"), Some("wikidata, test")).unwrap();
        assert_eq!(one.list(), vec![Family::Commons]);
        let none = Families::chosen(Some("wikidata"), Some("wikidata")).unwrap();
        assert!(none.list().is_empty());
        let error = Families::chosen(None, Some("wikidata,wikipdia")).unwrap_err();
        assert!(error.contains("\"wikipdia\""), "{error}");
        let error = Families::chosen(Some("Wikipedia"), None).unwrap_err();
        assert!(error.contains("\"Wikipedia\""), "{error}");
    }
}
