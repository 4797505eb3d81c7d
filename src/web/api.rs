//! The REST API of the original, plus all-time totals and day ranges: JSON bodies built from
//! store readers, with a per-day cache so a busy dashboard costs the store little.

use crate::aggregate::counters::description;
use crate::event::DAY_MS;
use crate::metrics::WebMetrics;
use crate::store::{Counters, Store, StoreError, ALL_TIME_DAY};
use bytes::Bytes;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Mutex;
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

    fn store(error: &StoreError) -> Self {
        tracing::warn!(%error, "store read failed");
        JsonReply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the counter store cannot be read: {error}"),
        )
    }
}

struct Cached {
    body: Bytes,
    built: Instant,
    generation: u64,
}

/// Serves the API from a store.
pub struct Api {
    store: Store,
    metrics: WebMetrics,
    ttl: Duration,
    cache: Mutex<HashMap<i64, Cached>>,
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
        match self.store.days().await {
            Ok(days) => {
                let days: Vec<String> = days.iter().map(i64::to_string).collect();
                JsonReply::ok(Bytes::from(serde_json::to_vec(&days).unwrap_or_default()))
            }
            Err(e) => JsonReply::store(&e),
        }
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
        if let Some(body) = self.cached(day) {
            return JsonReply::ok(body);
        }
        let generation = self.store.generation(day);
        match self.store.day(day).await {
            Ok(Some(counters)) => {
                let body = self.marshal(Some(day.saturating_mul(86_400)), &counters);
                self.remember(day, &body, generation);
                JsonReply::ok(body)
            }
            Ok(None) => JsonReply::error(StatusCode::NOT_FOUND, &format!("no data for day {day}")),
            Err(e) => JsonReply::store(&e),
        }
    }

    /// `GET /api/totals`: all-time counters, `since` null.
    pub async fn totals(&self) -> JsonReply {
        if let Some(body) = self.cached(ALL_TIME_DAY) {
            return JsonReply::ok(body);
        }
        let generation = self.store.generation(ALL_TIME_DAY);
        match self.store.all_time().await {
            Ok(counters) => {
                let body = self.marshal(None, &counters);
                self.remember(ALL_TIME_DAY, &body, generation);
                JsonReply::ok(body)
            }
            Err(e) => JsonReply::store(&e),
        }
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
        match self.store.range(from, to).await {
            Ok(days) => {
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
                JsonReply::ok(body)
            }
            Err(e) => JsonReply::store(&e),
        }
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

    fn cached(&self, day: i64) -> Option<Bytes> {
        let cache = self.cache.lock().ok()?;
        let entry = cache.get(&day)?;
        let fresh =
            entry.built.elapsed() < self.ttl && entry.generation == self.store.generation(day);
        if fresh {
            self.metrics.cache_hits.inc();
            Some(entry.body.clone())
        } else {
            self.metrics.cache_misses.inc();
            None
        }
    }

    fn remember(&self, day: i64, body: &Bytes, generation: u64) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, e| e.built.elapsed() < self.ttl);
            }
            if cache.len() < CACHE_LIMIT {
                cache.insert(
                    day,
                    Cached {
                        body: body.clone(),
                        built: Instant::now(),
                        generation,
                    },
                );
            }
        }
    }
}
