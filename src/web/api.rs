//! The REST API of the original, plus all-time totals and day ranges: JSON bodies built from
//! store readers, behind one cache so that store reads do not grow with viewers.
//!
//! Every answer (a day, all-time, the list of days, a range) is kept for at most `web.cache_ttl`,
//! and dropped at once when a batch counted by this process changes what it shows. A miss reads
//! the store once however many requests wait for it: the first one reads, the others wait on the
//! same entry and are served what it built.

use crate::counters::description;
use crate::event::DAY_MS;
use crate::metrics::WebMetrics;
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

/// `GET /api/stats/{day}`: `since` is the day's first second, in epoch seconds.
#[derive(Debug, Serialize)]
pub struct StatsView<'a> {
    pub since: Option<i64>,
    pub counters: Vec<CounterView<'a>>,
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
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `GET /api/days`: the days with data, as strings, ascending.
    pub async fn days(&self) -> JsonReply {
        self.cached(Key::Days, async {
            let days = self.store.days().await?;
            let days: Vec<String> = days.iter().map(i64::to_string).collect();
            Ok(JsonReply::ok(Bytes::from(
                serde_json::to_vec(&days).unwrap_or_default(),
            )))
        })
        .await
    }

    /// `GET /api/stats/{day}`, with `day` as given in the path.
    pub async fn stats(&self, day: &str) -> JsonReply {
        match day.parse::<i64>() {
            Ok(day) => self.day(day).await,
            Err(_) => JsonReply::error(
                StatusCode::BAD_REQUEST,
                &format!("day {day:?} is not a number of days since 1970-01-01"),
            ),
        }
    }

    /// `GET /api/stats/{day}` for a parsed day.
    pub async fn day(&self, day: i64) -> JsonReply {
        self.cached(Key::Day(day), async {
            Ok(match self.store.day(day).await? {
                Some(counters) => {
                    JsonReply::ok(self.marshal(Some(day.saturating_mul(86_400)), &counters))
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
            Ok(JsonReply::ok(self.marshal(None, &counters)))
        })
        .await
    }

    /// `GET /api/range?from=D&to=D`: `[{"day": "D", "since": s, "counters": {name: value}}]`.
    pub async fn range(&self, from: Option<&str>, to: Option<&str>) -> JsonReply {
        let parse = |value: Option<&str>, default: i64, what: &str| match value {
            None => Ok(default),
            Some(v) => v.parse::<i64>().map_err(|_| {
                JsonReply::error(
                    StatusCode::BAD_REQUEST,
                    &format!("{what} {v:?} is not a number of days since 1970-01-01"),
                )
            }),
        };
        let to = match parse(to, today(), "to") {
            Ok(v) => v,
            Err(reply) => return reply,
        };
        let from = match parse(from, to.saturating_sub(29), "from") {
            Ok(v) => v,
            Err(reply) => return reply,
        };
        if from > to || to.saturating_sub(from) >= MAX_RANGE_DAYS {
            return JsonReply::error(
                StatusCode::BAD_REQUEST,
                &format!("a range runs from a day to a later one, at most {MAX_RANGE_DAYS} days"),
            );
        }
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

    /// What invalidates `key` when this process counts a batch.
    fn generation(&self, key: Key) -> u64 {
        match key {
            Key::Day(day) => self.store.generation(day),
            Key::AllTime => self.store.generation(ALL_TIME_DAY),
            Key::Days | Key::Range(..) => self.store.batches(),
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

    fn marshal(&self, since: Option<i64>, counters: &Counters) -> Bytes {
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
        };
        let body = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
        self.metrics
            .marshal
            .observe(started.elapsed().as_secs_f64());
        body
    }
}
