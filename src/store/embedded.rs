//! The embedded store: one redb database file, for a single host.
//!
//! redb is a pure-Rust, crash-safe B-tree store with serialisable write transactions and
//! copy-on-write commits: a batch and its position commit together or not at all, with no server
//! to run and nothing to build from C. Tables: counters keyed by (day, name), all-time totals,
//! the set of days (so listing days reads an index, not the counters), and source positions.

use super::{Applied, Batch, Counters, StoreError};
use prometheus::IntCounter;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

const COUNTERS: TableDefinition<(i64, &str), i64> = TableDefinition::new("counters");
const ALL_TIME: TableDefinition<&str, i64> = TableDefinition::new("all_time");
const DAYS: TableDefinition<i64, u64> = TableDefinition::new("days");
const POSITIONS: TableDefinition<&str, u64> = TableDefinition::new("positions");

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

    async fn blocking<T: Send + 'static>(
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
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(POSITIONS)?;
            Ok(table.get(source.as_str())?.map_or(0, |v| v.value()))
        })
        .await
    }

    pub async fn apply(&self, batch: &Batch) -> Result<Applied, StoreError> {
        let batch = batch.clone();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            {
                let mut positions = txn.open_table(POSITIONS)?;
                let stored = positions
                    .get(batch.source.as_str())?
                    .map_or(0, |v| v.value());
                if stored != batch.start {
                    drop(positions);
                    txn.abort()?;
                    return Ok(Applied::Stale { stored });
                }
                positions.insert(batch.source.as_str(), batch.end)?;
                let mut counters = txn.open_table(COUNTERS)?;
                let mut days = txn.open_table(DAYS)?;
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
                let mut all_time = txn.open_table(ALL_TIME)?;
                for (name, delta) in &batch.tally.all_time {
                    let current = all_time.get(name.as_str())?.map_or(0, |v| v.value());
                    all_time.insert(name.as_str(), current.saturating_add(*delta))?;
                }
            }
            txn.commit()?;
            Ok(Applied::Counted)
        })
        .await
    }

    pub async fn days(&self) -> Result<Vec<i64>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(DAYS)?;
            let mut days = Vec::new();
            for entry in table.iter()? {
                days.push(entry?.0.value());
            }
            Ok(days)
        })
        .await
    }

    pub async fn day(&self, day: i64) -> Result<Option<Counters>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(COUNTERS)?;
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
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(COUNTERS)?;
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
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ALL_TIME)?;
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
