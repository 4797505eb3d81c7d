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
pub mod redis_link;

use crate::config::StoreSettings;
use crate::counters::Tally;
use crate::metrics::{StoreMetrics, StoreRead};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// The key [`Store::generation`] uses for the all-time counters.
pub const ALL_TIME_DAY: i64 = i64::MIN;

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

/// The configured store, and what this process changed in it.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    changes: Arc<Changes>,
    metrics: StoreMetrics,
}

#[derive(Clone)]
enum Backend {
    Embedded(embedded::EmbeddedStore),
    Redis(redis::RedisStore),
}

/// Change counters for the days this process's batches touched, so that readers in the same
/// process (the web role's cache) see their own writes at once. Writes from other hosts are not
/// seen here; readers bound their staleness by time for those.
#[derive(Default)]
struct Changes {
    days: Mutex<HashMap<i64, u64>>,
    /// Batches applied by this process, whatever days they touched.
    batches: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens the store the settings name.
    pub async fn open(
        settings: &StoreSettings,
        metrics: StoreMetrics,
    ) -> Result<Store, StoreError> {
        let backend = match settings {
            StoreSettings::Embedded(config) => Backend::Embedded(
                embedded::EmbeddedStore::open(&config.path, metrics.reopens.clone()).await?,
            ),
            StoreSettings::Redis(config) => {
                Backend::Redis(redis::RedisStore::open(config, metrics.clone())?)
            }
        };
        Ok(Store {
            backend,
            changes: Arc::default(),
            metrics,
        })
    }

    /// A number that moves whenever the store may have lost writes it acknowledged: with
    /// Redis, each new connection (after a failure, a failover, a moved cluster slot) starts a
    /// new epoch, because the server behind it may be a promoted replica that never received
    /// the last writes. A position remembered under an older epoch must be read again; the
    /// embedded store never loses a committed write and stays at 0. At most once a second this
    /// also checks that the connection still reaches the master.
    pub async fn epoch(&self) -> u64 {
        match &self.backend {
            Backend::Embedded(_) => 0,
            Backend::Redis(s) => s.epoch().await,
        }
    }

    /// How many batches this process applied, whatever days they touched: a generation for
    /// answers that depend on every day (the list of days, ranges).
    pub fn batches(&self) -> u64 {
        self.changes
            .batches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many batches of this process touched `day`; all-time is [`ALL_TIME_DAY`].
    pub fn generation(&self, day: i64) -> u64 {
        self.changes
            .days
            .lock()
            .map(|days| days.get(&day).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The next position to read from `source` (0 when it was never read).
    pub async fn position(&self, source: &str) -> Result<u64, StoreError> {
        self.metrics.reads.inc(StoreRead::Position);
        match &self.backend {
            Backend::Embedded(s) => s.position(source).await,
            Backend::Redis(s) => s.position(source).await,
        }
    }

    /// Applies `batch` atomically with its position, or refuses it whole.
    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let applied = match &self.backend {
            Backend::Embedded(s) => s.apply(batch).await?,
            Backend::Redis(s) => s.apply(batch).await?,
        };
        if applied == Applied::Counted && !batch.tally.is_empty() {
            self.changes
                .batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut days) = self.changes.days.lock() {
                for day in batch
                    .tally
                    .days
                    .keys()
                    .chain(std::iter::once(&ALL_TIME_DAY))
                {
                    *days.entry(*day).or_default() += 1;
                }
            }
        }
        Ok(applied)
    }

    /// The epoch days that have data, ascending.
    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        self.metrics.reads.inc(StoreRead::Days);
        match &self.backend {
            Backend::Embedded(s) => s.days().await,
            Backend::Redis(s) => s.days().await,
        }
    }

    /// One day's counters; `None` when the day has no data.
    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        self.metrics.reads.inc(StoreRead::Day);
        match &self.backend {
            Backend::Embedded(s) => s.day(day).await,
            Backend::Redis(s) => s.day(day).await,
        }
    }

    /// The counters of every day with data in `from..=to`, ascending.
    pub async fn range(&self, from: i64, to: i64) -> Result<Vec<(i64, Counters)>, StoreError> {
        self.metrics.reads.inc(StoreRead::Range);
        match &self.backend {
            Backend::Embedded(s) => s.range(from, to).await,
            Backend::Redis(s) => s.range(from, to).await,
        }
    }

    /// All-time counters.
    pub async fn all_time(&self) -> Result<Counters, StoreError> {
        self.metrics.reads.inc(StoreRead::AllTime);
        match &self.backend {
            Backend::Embedded(s) => s.all_time().await,
            Backend::Redis(s) => s.all_time().await,
        }
    }

    /// Checks that the store answers: a real read (the embedded store's read transaction,
    /// Redis' PING).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(s) => s.ping().await,
            Backend::Redis(s) => s.ping().await,
        }
    }
}
