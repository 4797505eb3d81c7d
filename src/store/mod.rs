//! The counter store: counters per day and all-time, and each source's position, applied
//! together atomically so that every event is counted exactly once.
//!
//! A batch covers the positions `[start, end)` of one source (an event segment, or a Kafka
//! partition). It is applied only when `start` equals the stored position of that source, and
//! the position moves to `end` in the same atomic write. A batch that does not line up (a replay
//! after a crash, a stale owner after a rebalance) is refused whole; its reader restarts from the
//! stored position. The store, not the bus, decides where each source resumes.

pub mod embedded;
pub mod redis;

use crate::aggregate::counters::Tally;
use crate::config::{Config, StoreKind};
use std::collections::BTreeMap;

/// Counters by name, in name order.
pub type Counters = BTreeMap<String, i64>;

/// Increments covering positions `[start, end)` of `source`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub source: String,
    pub start: u64,
    pub end: u64,
    pub tally: Tally,
}

/// The outcome of applying a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Counted; the source's position is now the batch's end.
    Counted,
    /// Refused, nothing changed: the source's stored position is `stored`, not the batch start.
    Stale { stored: u64 },
}

/// A store failure, naming the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis at {url}: {message}")]
    Redis { url: String, message: String },
    #[error("embedded store {path}: {message}")]
    Embedded { path: String, message: String },
}

/// The configured store.
#[derive(Clone)]
pub enum Store {
    Embedded(embedded::EmbeddedStore),
    Redis(redis::RedisStore),
}

impl Store {
    /// Opens the store `config.store.kind` names.
    pub async fn open(config: &Config) -> Result<Store, StoreError> {
        Ok(match config.store.kind {
            StoreKind::Embedded => {
                Store::Embedded(embedded::EmbeddedStore::open(&config.store.path).await?)
            }
            StoreKind::Redis => Store::Redis(redis::RedisStore::open(&config.redis.url)?),
        })
    }

    /// The next position to read from `source` (0 when it was never read).
    pub async fn position(&self, source: &str) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => s.position(source).await,
            Store::Redis(s) => s.position(source).await,
        }
    }

    /// Applies `batch` atomically with its position, or refuses it whole.
    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        match self {
            Store::Embedded(s) => s.apply(batch).await,
            Store::Redis(s) => s.apply(batch).await,
        }
    }

    /// The epoch days that have data, ascending.
    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        match self {
            Store::Embedded(s) => s.days().await,
            Store::Redis(s) => s.days().await,
        }
    }

    /// One day's counters; `None` when the day has no data.
    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        match self {
            Store::Embedded(s) => s.day(day).await,
            Store::Redis(s) => s.day(day).await,
        }
    }

    /// All-time counters.
    pub async fn all_time(&self) -> Result<Counters, StoreError> {
        match self {
            Store::Embedded(s) => s.all_time().await,
            Store::Redis(s) => s.all_time().await,
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(_) => Ok(()),
            Store::Redis(s) => s.ping().await,
        }
    }
}
