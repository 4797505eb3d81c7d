//! The embedded store: one redb database file, for a single host.
//!
//! redb is a pure-Rust, crash-safe B-tree store with serialisable write transactions and
//! copy-on-write commits: a batch and its position commit together or not at all, with no server
//! to run and nothing to build from C. Tables: counters keyed by (day, name), all-time totals,
//! the set of days (so listing days reads an index, not the counters), and source positions.

use super::SketchKind;
use super::{Applied, Batch, Counters, StoreError};
use crate::counters::Tally;
use crate::coverage::{DayCoverage, Span, TopicPartition};
use crate::project::Family;
use crate::sketch::hll::{HyperLogLog, CHUNK};
use crate::sketch::top::{Bucket, TopSketch};
use prometheus::IntCounter;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const COUNTERS: TableDefinition<(i64, &str), i64> = TableDefinition::new("counters");
const ALL_TIME: TableDefinition<&str, i64> = TableDefinition::new("all_time");
const DAYS: TableDefinition<i64, u64> = TableDefinition::new("days");
const POSITIONS: TableDefinition<&str, u64> = TableDefinition::new("positions");

/// The tables of one counter space: the live one, or the one a rebuild fills before it takes
/// the live one's place (`super::space`).
#[derive(Clone, Copy)]
pub(super) struct Tables {
    pub counters: TableDefinition<'static, (i64, &'static str), i64>,
    pub all_time: TableDefinition<'static, &'static str, i64>,
    pub days: TableDefinition<'static, i64, u64>,
    pub positions: TableDefinition<'static, &'static str, u64>,
    /// Whether the per-hour counters and the sketches are written too. They have one space,
    /// the live one: a rebuild recounts the counters and leaves them as the aggregators keep
    /// them, so that nothing counts into them twice.
    pub dimensions: bool,
}

/// The space every reader and the daemon's aggregators use.
pub(super) const LIVE: Tables = Tables {
    counters: COUNTERS,
    all_time: ALL_TIME,
    days: DAYS,
    positions: POSITIONS,
    dimensions: true,
};

/// The space a rebuild counts into.
pub(super) const REBUILD: Tables = Tables {
    counters: TableDefinition::new("rebuild_counters"),
    all_time: TableDefinition::new("rebuild_all_time"),
    days: TableDefinition::new("rebuild_days"),
    positions: TableDefinition::new("rebuild_positions"),
    dimensions: false,
};

/// How soon after a failed reopen the store tries again.
const REOPEN_INTERVAL: Duration = Duration::from_millis(500);

/// A handle to the database file; cheap to clone.
///
/// redb latches an I/O error (a full or failing disk): every later call on that `Database`
/// fails with `PreviousIo`, reads included. So a call that fails that way drops the database,
/// and the next call opens the file again (redb repairs it from its last commit), at most once
/// per [`REOPEN_INTERVAL`]: counting resumes by itself once the disk takes writes again, with no
/// restart of the process.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<RwLock<Option<Arc<Database>>>>,
    path: Arc<PathBuf>,
    last_reopen: Arc<Mutex<Option<Instant>>>,
    reopens: IntCounter,
    /// Sketches of recent days, decoded ([`SketchCache`]).
    sketches: Arc<Mutex<SketchCache>>,
    /// The counter space this handle reads and writes.
    pub(super) tables: Tables,
}

/// True for errors after which redb refuses every call until the database is opened again.
fn latches(error: &redb::Error) -> bool {
    matches!(
        error,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

/// The database's page cache. redb's default (1 GiB) lets resident memory grow with the store,
/// day after day, for years; the pages counting touches (today's counters, the positions) and
/// the pages the API reads fit in a small fraction of this.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Opens (or creates) the database and every table, so that readers never meet a missing one.
fn open_database(path: &Path) -> Result<Database, redb::Error> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)?;
    let txn = db.begin_write()?;
    txn.open_table(COUNTERS)?;
    txn.open_table(ALL_TIME)?;
    txn.open_table(DAYS)?;
    txn.open_table(POSITIONS)?;
    txn.commit()?;
    Ok(db)
}

impl EmbeddedStore {
    /// Opens (or creates) the database at `path`; `reopens` counts reopenings after I/O errors.
    pub async fn open(path: &Path, reopens: IntCounter) -> Result<Self, StoreError> {
        let owned = path.to_owned();
        let err = |e: String| StoreError::Embedded {
            path: path.display().to_string(),
            message: e,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
        }
        let db = tokio::task::spawn_blocking(move || open_database(&owned))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()))?;
        Ok(EmbeddedStore {
            db: Arc::new(RwLock::new(Some(Arc::new(db)))),
            path: Arc::new(path.to_owned()),
            last_reopen: Arc::new(Mutex::new(None)),
            reopens,
            sketches: Arc::new(Mutex::new(SketchCache::default())),
            tables: LIVE,
        })
    }

    fn error(&self, message: String) -> StoreError {
        StoreError::Embedded {
            path: self.path.display().to_string(),
            message,
        }
    }

    /// The open database, reopening it when an I/O error made the last one unusable.
    async fn database(&self) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.db.read().ok().and_then(|slot| slot.clone()) {
            return Ok(db);
        }
        {
            let Ok(mut last) = self.last_reopen.lock() else {
                return Err(self.error("the store's state is poisoned".into()));
            };
            if last.is_some_and(|at| at.elapsed() < REOPEN_INTERVAL) {
                return Err(
                    self.error("an I/O error closed the database; it is reopened shortly".into())
                );
            }
            *last = Some(Instant::now());
        }
        let path = self.path.as_ref().clone();
        let opened = tokio::task::spawn_blocking(move || open_database(&path))
            .await
            .map_err(|e| self.error(e.to_string()))?;
        match opened {
            Ok(db) => {
                let db = Arc::new(db);
                if let Ok(mut slot) = self.db.write() {
                    *slot = Some(db.clone());
                }
                self.reopens.inc();
                tracing::info!(path = %self.path.display(), "reopened the embedded store after an I/O error");
                Ok(db)
            }
            Err(e) => Err(self.error(format!(
                "reopening after an I/O error failed (tried again shortly): {e}"
            ))),
        }
    }

    /// Drops `db` after an error that redb latches, so that the next call opens it again.
    fn discard(&self, db: &Arc<Database>, error: &redb::Error) {
        if let Ok(mut slot) = self.db.write() {
            if slot
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, db))
            {
                *slot = None;
                tracing::warn!(path = %self.path.display(), %error, "the embedded store hit an I/O error; it will be reopened");
            }
        }
    }

    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.database().await?;
        let worker = db.clone();
        let result = tokio::task::spawn_blocking(move || work(&worker)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if latches(&e) {
                    self.discard(&db, &e);
                }
                Err(self.error(e.to_string()))
            }
            Err(e) => Err(self.error(e.to_string())),
        }
    }

    /// A real read transaction: what `/readyz` checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(POSITIONS)?;
            table.get("")?;
            Ok(())
        })
        .await
    }

    pub async fn position(&self, source: &str) -> Result<u64, StoreError> {
        let source = source.to_owned();
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(tables.positions)?;
            Ok(table.get(source.as_str())?.map_or(0, |v| v.value()))
        })
        .await
    }

    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        // The tally is shared, not copied: a batch's sketches are large.
        let batch = batch.clone();
        let sketches = self.sketches.clone();
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let mut cache;
            {
                let mut positions = txn.open_table(tables.positions)?;
                let stored = positions
                    .get(batch.source.as_str())?
                    .map_or(0, |v| v.value());
                if stored != batch.start {
                    drop(positions);
                    txn.abort()?;
                    return Ok(Applied::Stale { stored });
                }
                positions.insert(batch.source.as_str(), batch.end)?;
                let mut counters = txn.open_table(tables.counters)?;
                let mut days = txn.open_table(tables.days)?;
                for (day, values) in &batch.tally.days {
                    let mut events = 0;
                    for (name, delta) in values {
                        let key = (*day, name.as_str());
                        let current = counters.get(key)?.map_or(0, |v| v.value());
                        counters.insert(key, current.saturating_add(*delta))?;
                        if name == crate::counters::TOTAL {
                            events = *delta;
                        }
                    }
                    let seen = days.get(*day)?.map_or(0, |v| v.value());
                    days.insert(*day, seen.saturating_add(events.max(0) as u64))?;
                }
                let mut all_time = txn.open_table(tables.all_time)?;
                for (name, delta) in &batch.tally.all_time() {
                    let current = all_time.get(name.as_str())?.map_or(0, |v| v.value());
                    all_time.insert(name.as_str(), current.saturating_add(*delta))?;
                }
                let Ok(guard) = sketches.lock() else {
                    return Err(redb::Error::DatabaseClosed);
                };
                cache = guard;
                let written = match tables.dimensions {
                    true => write_dimensions(&txn, &batch.tally, &mut cache)
                        .and_then(|()| write_coverage(&txn, &batch.tally)),
                    false => Ok(()),
                };
                if let Err(e) = written {
                    // Nothing of this batch reaches the file: neither may it stay in the cache.
                    *cache = SketchCache::default();
                    return Err(e);
                }
            }
            if let Err(e) = txn.commit() {
                *cache = SketchCache::default();
                return Err(e.into());
            }
            Ok(Applied::Counted)
        })
        .await
    }

    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(tables.days)?;
            let mut days = Vec::new();
            for entry in table.iter()? {
                days.push(entry?.0.value());
            }
            Ok(days)
        })
        .await
    }

    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(tables.counters)?;
            let mut counters = Counters::new();
            // Keys sort by day first, so one day is one contiguous range.
            for entry in table.range((day, "")..(day.saturating_add(1), ""))? {
                let (key, value) = entry?;
                counters.insert(key.value().1.to_owned(), value.value());
            }
            Ok((!counters.is_empty()).then_some(counters))
        })
        .await
    }

    pub async fn range(&self, from: i64, to: i64) -> Result<Vec<(i64, Counters)>, StoreError> {
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(tables.counters)?;
            let mut days: Vec<(i64, Counters)> = Vec::new();
            for entry in table.range((from, "")..(to.saturating_add(1), ""))? {
                let (key, value) = entry?;
                let (day, name) = key.value();
                match days.last_mut() {
                    Some((last, counters)) if *last == day => {
                        counters.insert(name.to_owned(), value.value());
                    }
                    _ => days.push((day, Counters::from([(name.to_owned(), value.value())]))),
                }
            }
            Ok(days)
        })
        .await
    }

    pub async fn all_time(&self) -> Result<Counters, StoreError> {
        let tables = self.tables;
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(tables.all_time)?;
            let mut counters = Counters::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                counters.insert(key.value().to_owned(), value.value());
            }
            Ok(counters)
        })
        .await
    }
}

// Coverage: the upstream offsets each day's events came from, written in the batch's
// transaction, in the live space only (a rebuild reads events the live space has covered, and
// the union of offsets is the same however often an event is seen). The tables are created by
// the first write.

/// The spans of (day, `<partition>|<topic>`), as [`Span::to_bytes`] one after another.
const COVERAGE: TableDefinition<(i64, &str), &[u8]> = TableDefinition::new("coverage");
/// Events of a day that carried no upstream position.
const UNPOSITIONED: TableDefinition<i64, u64> = TableDefinition::new("coverage_unpositioned");

/// Joins the batch's spans to the stored ones of each day and topic-partition.
fn write_coverage(txn: &redb::WriteTransaction, tally: &Tally) -> Result<(), redb::Error> {
    if tally.coverage.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(COVERAGE)?;
    let mut unpositioned = txn.open_table(UNPOSITIONED)?;
    for (day, coverage) in &tally.coverage {
        for (tp, spans) in &coverage.spans {
            let key = tp.key();
            let mut joined = table
                .get((*day, key.as_str()))?
                .map_or_else(Vec::new, |v| Span::from_bytes(v.value()));
            joined.extend_from_slice(spans);
            crate::coverage::coalesce(&mut joined);
            let bytes: Vec<u8> = joined.iter().flat_map(|s| s.to_bytes()).collect();
            table.insert((*day, key.as_str()), bytes.as_slice())?;
        }
        if coverage.unpositioned > 0 {
            let current = unpositioned.get(*day)?.map_or(0, |v| v.value());
            unpositioned.insert(*day, current.saturating_add(coverage.unpositioned))?;
        }
    }
    Ok(())
}

impl EmbeddedStore {
    /// The stored coverage of each of `days` that has any.
    pub async fn coverage(&self, days: Vec<i64>) -> Result<BTreeMap<i64, DayCoverage>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let mut out: BTreeMap<i64, DayCoverage> = BTreeMap::new();
            let table = match txn.open_table(COVERAGE) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(out),
                Err(e) => return Err(e.into()),
            };
            let unpositioned = match txn.open_table(UNPOSITIONED) {
                Ok(table) => Some(table),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            for day in days {
                let mut coverage = DayCoverage::default();
                for entry in table.range((day, "")..(day.saturating_add(1), ""))? {
                    let (key, value) = entry?;
                    if let Some(tp) = TopicPartition::parse(key.value().1) {
                        coverage.spans.insert(tp, Span::from_bytes(value.value()));
                    }
                }
                if let Some(table) = &unpositioned {
                    coverage.unpositioned = table.get(day)?.map_or(0, |v| v.value());
                }
                if coverage != DayCoverage::default() {
                    out.insert(day, coverage);
                }
            }
            Ok(out)
        })
        .await
    }
}

// The further dimensions: per-hour counters and sketches, written in the batch's transaction.
// Their tables are created by the first write; a reader that finds one missing reads nothing.

/// Per-hour counters by (day, `HH:<counter>`).
const HOURS: TableDefinition<(i64, &str), i64> = TableDefinition::new("hours");
/// Sketches by (day, kind, family, page): a page holds [`PAGE_PARTS`] parts (chunks of 32
/// HyperLogLog registers, or top-list buckets) as (part number, part) pairs, so a batch writes
/// only the pages its events touch, however large the day's sketch has grown.
const SKETCH_PAGES: TableDefinition<(i64, &str, &str, u32), &[u8]> =
    TableDefinition::new("sketch_pages");
/// Parts per page.
const PAGE_PARTS: u32 = 64;
/// Parts (buckets, register chunks) the store keeps decoded in memory, about 100 bytes each,
/// so that a batch merges into them instead of decoding what it stored before: the sketches of
/// the last days counted. A day beyond them is read again from its pages when a late event
/// touches it.
const CACHED_PARTS: usize = 300_000;

/// A decoded sketch.
#[derive(Debug, Clone)]
enum Decoded {
    Distinct(HyperLogLog),
    Top(TopSketch),
}

impl Decoded {
    fn parts(&self) -> usize {
        match self {
            Decoded::Distinct(hll) => hll.chunks().count(),
            Decoded::Top(top) => top.len(),
        }
    }
}

/// Which sketch: (day, kind, family).
type SketchKey = (i64, SketchKind, Family);

/// The sketches of recent days as the store holds them, decoded. It is changed only inside a
/// write transaction and dropped whole when that transaction does not commit, so it never
/// holds anything the file does not.
#[derive(Debug, Default)]
pub struct SketchCache {
    sketches: HashMap<SketchKey, Decoded>,
}

impl SketchCache {
    /// Keeps the cache within [`CACHED_PARTS`] by dropping the oldest days first (never the
    /// newest day).
    fn trim(&mut self) {
        while self.sketches.values().map(Decoded::parts).sum::<usize>() > CACHED_PARTS {
            let days: BTreeSet<i64> = self.sketches.keys().map(|k| k.0).collect();
            if days.len() < 2 {
                return;
            }
            let Some(oldest) = days.first().copied() else {
                return;
            };
            self.sketches.retain(|key, _| key.0 != oldest);
        }
    }
}

/// Merges the batch's further dimensions: counters add (saturating), each sketch merges into
/// its decoded form (the transaction is the only writer, so the merge happens here, in Rust,
/// through the sketches' own merge rules) and the pages the batch touched are written.
fn write_dimensions(
    txn: &redb::WriteTransaction,
    tally: &Tally,
    cache: &mut SketchCache,
) -> Result<(), redb::Error> {
    if !tally.hours.is_empty() {
        let mut hours = txn.open_table(HOURS)?;
        for (day, counters) in &tally.hours {
            for (name, delta) in counters {
                let key = (*day, name.as_str());
                let current = hours.get(key)?.map_or(0, |v| v.value());
                hours.insert(key, current.saturating_add(*delta))?;
            }
        }
    }
    if tally.editors.is_empty() && tally.top.is_empty() {
        return Ok(());
    }
    let mut pages = txn.open_table(SKETCH_PAGES)?;
    for ((day, family), delta) in &tally.editors {
        let key = (*day, SketchKind::Distinct, *family);
        let touched: BTreeSet<u32> = delta
            .chunks()
            .map(|(index, _)| u32::from(index) / PAGE_PARTS)
            .collect();
        let sketch = cached(&pages, cache, key)?;
        if let Decoded::Distinct(sketch) = sketch {
            sketch.merge(delta);
        }
        write_pages(&mut pages, key, sketch, &touched)?;
    }
    for ((day, family, list), delta) in &tally.top {
        let key = (*day, SketchKind::Top(*list), *family);
        let touched: BTreeSet<u32> = delta.buckets().map(|(id, _)| id / PAGE_PARTS).collect();
        let sketch = cached(&pages, cache, key)?;
        if let Decoded::Top(sketch) = sketch {
            sketch.merge(delta);
        }
        write_pages(&mut pages, key, sketch, &touched)?;
    }
    cache.trim();
    Ok(())
}

/// The decoded sketch `key` from the cache, read from its pages first when it is not there.
fn cached<'c>(
    pages: &impl ReadableTable<(i64, &'static str, &'static str, u32), &'static [u8]>,
    cache: &'c mut SketchCache,
    key: SketchKey,
) -> Result<&'c mut Decoded, redb::Error> {
    use std::collections::hash_map::Entry;
    Ok(match cache.sketches.entry(key) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(assemble(pages, key)?),
    })
}

fn empty(kind: SketchKind) -> Decoded {
    match kind {
        SketchKind::Distinct => Decoded::Distinct(HyperLogLog::default()),
        SketchKind::Top(_) => Decoded::Top(TopSketch::default()),
    }
}

/// Writes the pages `touched` of `sketch`.
fn write_pages(
    pages: &mut redb::Table<(i64, &'static str, &'static str, u32), &'static [u8]>,
    (day, kind, family): SketchKey,
    sketch: &Decoded,
    touched: &BTreeSet<u32>,
) -> Result<(), redb::Error> {
    let mut page = Vec::new();
    for number in touched {
        page.clear();
        let parts = number * PAGE_PARTS..(number + 1) * PAGE_PARTS;
        match sketch {
            Decoded::Distinct(hll) => {
                for (index, chunk) in hll.chunks() {
                    if parts.contains(&u32::from(index)) {
                        page.extend_from_slice(&u32::from(index).to_le_bytes());
                        page.extend_from_slice(chunk);
                    }
                }
            }
            Decoded::Top(top) => {
                for id in parts {
                    if let Some(bucket) = top.bucket(id) {
                        page.extend_from_slice(&id.to_le_bytes());
                        page.extend_from_slice(&bucket.to_bytes());
                    }
                }
            }
        }
        pages.insert(
            (day, kind.as_str(), family.as_str(), *number),
            page.as_slice(),
        )?;
    }
    Ok(())
}

/// One day's `kind` sketch of `family` put together from its pages (empty when it has none).
/// A part that does not read back is left out, with a warning: the stores never write one.
fn assemble(
    pages: &impl ReadableTable<(i64, &'static str, &'static str, u32), &'static [u8]>,
    (day, kind, family): SketchKey,
) -> Result<Decoded, redb::Error> {
    let (name, family_name) = (kind.as_str(), family.as_str());
    let mut sketch = empty(kind);
    for entry in pages.range((day, name, family_name, 0)..=(day, name, family_name, u32::MAX))? {
        let (_, value) = entry?;
        let mut page = value.value();
        while page.len() >= 4 {
            let part = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
            let rest = &page[4..];
            let used = match &mut sketch {
                Decoded::Distinct(hll) => match (u16::try_from(part), rest.get(..CHUNK)) {
                    (Ok(index), Some(chunk)) => {
                        let mut registers = [0u8; CHUNK];
                        registers.copy_from_slice(chunk);
                        hll.merge_chunk(index, &registers);
                        Some(CHUNK)
                    }
                    _ => None,
                },
                Decoded::Top(top) => Bucket::read(rest).map(|(bucket, used)| {
                    top.merge_bucket(part, &bucket);
                    used
                }),
            };
            let Some(used) = used else {
                tracing::warn!(
                    day,
                    kind = name,
                    family = family_name,
                    "a stored sketch page is unreadable; the rest of it is left out"
                );
                break;
            };
            page = &rest[used..];
        }
    }
    Ok(sketch)
}

/// Opens a table of the further dimensions for reading; `None` when nothing created it yet.
fn readable<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<'static, K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::Error> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl EmbeddedStore {
    pub async fn hours(&self, day: i64) -> Result<Counters, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let mut hours = Counters::new();
            let Some(table) = readable(&txn, HOURS)? else {
                return Ok(hours);
            };
            for entry in table.range((day, "")..(day.saturating_add(1), ""))? {
                let (key, value) = entry?;
                hours.insert(key.value().1.to_owned(), value.value());
            }
            Ok(hours)
        })
        .await
    }

    pub async fn sketches(
        &self,
        day: i64,
        kind: SketchKind,
        families: &[Family],
    ) -> Result<Vec<(Family, Vec<u8>)>, StoreError> {
        let families = families.to_vec();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let mut found = Vec::new();
            let Some(table) = readable(&txn, SKETCH_PAGES)? else {
                return Ok(found);
            };
            for family in families {
                let bytes = match assemble(&table, (day, kind, family))? {
                    Decoded::Distinct(hll) if !hll.is_empty() => hll.to_bytes(),
                    Decoded::Top(top) if !top.is_empty() => top.to_bytes(),
                    _ => continue,
                };
                found.push((family, bytes));
            }
            Ok(found)
        })
        .await
    }
}
