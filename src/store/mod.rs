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
pub mod space;

use crate::config::StoreSettings;
use crate::counters::{Tally, TopList};
use crate::coverage::DayCoverage;
use crate::metrics::{StoreMetrics, StoreRead};
use crate::project::Family;
use crate::sketch::hll::HyperLogLog;
use crate::sketch::top::TopSketch;
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
    /// Shared, not copied: the embedded store applies it on a thread of its own.
    pub tally: std::sync::Arc<Tally>,
}

/// What a sketch of the further dimensions is, as both stores name it: each day has one of
/// each kind per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SketchKind {
    /// Distinct editors (`sketch::hll`).
    Distinct,
    /// A top list (`sketch::top`).
    Top(TopList),
}

impl SketchKind {
    pub const ALL: [SketchKind; 3] = [
        SketchKind::Distinct,
        SketchKind::Top(TopList::Pages),
        SketchKind::Top(TopList::Editors),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SketchKind::Distinct => "distinct",
            SketchKind::Top(list) => list.as_str(),
        }
    }

    pub fn parse(name: &str) -> Option<SketchKind> {
        SketchKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Every sketch of a batch in its stored form: (day, kind, family, bytes).
fn sketch_deltas(tally: &Tally) -> Vec<(i64, SketchKind, Family, Vec<u8>)> {
    let mut deltas: Vec<(i64, SketchKind, Family, Vec<u8>)> = tally
        .editors
        .iter()
        .map(|((day, family), hll)| (*day, SketchKind::Distinct, *family, hll.to_bytes()))
        .collect();
    deltas.extend(
        tally.top.iter().map(|((day, family, list), top)| {
            (*day, SketchKind::Top(*list), *family, top.to_bytes())
        }),
    );
    deltas
}

/// Merges stored forms of one kind of sketch into one stored form; `None` when one of them is
/// unreadable (the stores never write such bytes).
fn merge_stored<'b>(
    kind: SketchKind,
    parts: impl IntoIterator<Item = &'b [u8]>,
) -> Option<Vec<u8>> {
    match kind {
        SketchKind::Distinct => crate::sketch::hll::merge_stored(parts),
        SketchKind::Top(_) => crate::sketch::top::merge_stored(parts),
    }
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

    /// Whether a merge of sketch deltas that a batch started is still running (Redis only;
    /// the embedded store merges in the batch's transaction). A benchmark waits for it, so
    /// that its time includes the merges.
    pub fn merging(&self) -> bool {
        match &self.backend {
            Backend::Embedded(_) => false,
            Backend::Redis(s) => s.compacting(),
        }
    }

    /// Applies `batch` atomically with its position, or refuses it whole.
    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let applied = match &self.backend {
            Backend::Embedded(s) => s.apply(batch).await?,
            Backend::Redis(s) => {
                let (applied, due) = s.apply(batch).await?;
                if !due.is_empty() {
                    // The batch is counted whatever happens to the merge: readers merge
                    // the deltas still waiting, and a later batch finds them due again.
                    s.compact_in_background(due);
                }
                applied
            }
        };
        if applied == Applied::Counted && !batch.tally.is_empty() {
            self.changes
                .batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut days) = self.changes.days.lock() {
                // A day's coverage changes with its own offsets and, through the holes it
                // closes or opens, with its neighbours' verdicts (see `Store::coverage`).
                for day in batch
                    .tally
                    .days
                    .keys()
                    .chain(batch.tally.coverage.keys())
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

    /// The stored coverage of each of `days` that has any (`coverage::verdicts` judges it).
    pub async fn coverage(&self, days: &[i64]) -> Result<BTreeMap<i64, DayCoverage>, StoreError> {
        self.metrics.reads.inc(StoreRead::Coverage);
        match &self.backend {
            Backend::Embedded(s) => s.coverage(days.to_vec()).await,
            Backend::Redis(s) => s.coverage(days).await,
        }
    }

    /// One day's per-hour counters (`HH:<counter>` names); `None` when the day has none.
    pub async fn hours(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        self.metrics.reads.inc(StoreRead::Hours);
        let hours = match &self.backend {
            Backend::Embedded(s) => s.hours(day).await?,
            Backend::Redis(s) => s.hours(day).await?,
        };
        Ok((!hours.is_empty()).then_some(hours))
    }

    /// One day's distinct-editor sketches of `families` (those without editors are left out).
    pub async fn editors(
        &self,
        day: i64,
        families: &[Family],
    ) -> Result<BTreeMap<Family, HyperLogLog>, StoreError> {
        self.metrics.reads.inc(StoreRead::Editors);
        let mut sketches = BTreeMap::new();
        for (family, bytes) in self.sketches(day, SketchKind::Distinct, families).await? {
            sketches.insert(family, HyperLogLog::from_bytes(&bytes).unwrap_or_default());
        }
        Ok(sketches)
    }

    /// One day's `list` sketches of `families` (those without data are left out).
    pub async fn top(
        &self,
        day: i64,
        list: TopList,
        families: &[Family],
    ) -> Result<BTreeMap<Family, TopSketch>, StoreError> {
        self.metrics.reads.inc(StoreRead::Top);
        let mut sketches = BTreeMap::new();
        for (family, bytes) in self.sketches(day, SketchKind::Top(list), families).await? {
            sketches.insert(family, TopSketch::from_bytes(&bytes).unwrap_or_default());
        }
        Ok(sketches)
    }

    /// The stored form of one day's `kind` sketch of each of `families` that has one.
    async fn sketches(
        &self,
        day: i64,
        kind: SketchKind,
        families: &[Family],
    ) -> Result<Vec<(Family, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Embedded(s) => s.sketches(day, kind, families).await,
            Backend::Redis(s) => s.sketches(day, kind, families).await,
        }
    }

    /// A handle on the rebuild's counter space of the same store (`space`): it reads and applies
    /// like the live one, and nothing reads it until it takes the live one's place.
    pub fn rebuild_space(&self) -> Store {
        let backend = match &self.backend {
            Backend::Embedded(s) => Backend::Embedded(s.rebuild_space()),
            Backend::Redis(s) => Backend::Redis(s.rebuild_space()),
        };
        Store {
            backend,
            changes: Arc::default(),
            metrics: self.metrics.clone(),
        }
    }

    /// Every source's position in this handle's space.
    pub async fn positions(&self) -> Result<space::Positions, StoreError> {
        self.metrics.reads.inc(StoreRead::Position);
        match &self.backend {
            Backend::Embedded(s) => s.positions().await,
            Backend::Redis(s) => s.positions().await,
        }
    }

    /// Takes the rebuild lease (for [`space::LEASE`]) and empties the rebuild space, unless
    /// another rebuild holds the lease.
    pub async fn begin_rebuild(&self, now_ms: i64) -> Result<space::Lease, StoreError> {
        match &self.backend {
            Backend::Embedded(s) => s.begin_rebuild(now_ms).await,
            Backend::Redis(s) => s.begin_rebuild().await,
        }
    }

    /// Renews the rebuild lease for another [`space::LEASE`].
    pub async fn renew_lease(&self, now_ms: i64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(s) => s.renew_lease(now_ms).await,
            Backend::Redis(s) => s.renew_lease().await,
        }
    }

    /// Gives up a rebuild that will not switch: the lease goes (on Redis the space is emptied by
    /// the next rebuild; in the embedded store at once).
    pub async fn end_rebuild(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(s) => s.end_rebuild().await,
            Backend::Redis(s) => s.end_rebuild().await,
        }
    }

    /// The rebuild space's positions while a rebuild holds the lease: what retention must not
    /// delete from under it.
    pub async fn rebuild_hold(&self, now_ms: i64) -> Result<Option<space::Positions>, StoreError> {
        self.metrics.reads.inc(StoreRead::Position);
        match &self.backend {
            Backend::Embedded(s) => s.rebuild_hold(now_ms).await,
            Backend::Redis(s) => s.rebuild_hold().await,
        }
    }

    /// Makes the rebuild space the live one, atomically, when every live position equals the
    /// rebuilt one (the sources in `lost`, which the bus no longer holds, take the live
    /// position). The days `kept` names keep their live counters. Otherwise nothing changes
    /// and the answer lists the sources that differ.
    pub async fn switch_to_rebuild(
        &self,
        kept: space::Kept,
        lost: &[String],
    ) -> Result<space::Switch, StoreError> {
        let switched = match &self.backend {
            Backend::Embedded(s) => s.switch(kept, lost).await?,
            Backend::Redis(s) => s.switch(kept, lost).await?,
        };
        if switched == space::Switch::Switched {
            // Every day may have changed: readers in this process read again.
            self.changes
                .batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut days) = self.changes.days.lock() {
                for generation in days.values_mut() {
                    *generation += 1;
                }
            }
        }
        Ok(switched)
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
