//! The rebuild behind `pleiades reaggregate`: recount the bus into a fresh counter space while
//! the daemon keeps counting into the live one, catch up with the live positions, then switch
//! to the new space in one atomic step of the store (`store::space`).
//!
//! The rebuild reads every source only up to its live position, never beyond, so that the two
//! spaces can meet: after each round it asks the store to switch, which it does only when every
//! live position equals the rebuilt one (checked inside the switch itself, where no batch of the
//! daemon can come between); when the daemon moved on meanwhile, another short round reads
//! what it counted since. Days whose events the bus no longer holds (retention deleted their
//! segments, Kafka retention their messages), and days outside `--from`/`--to`, keep their live
//! counters, taken inside the same switch.

use super::batch::{BatchPolicy, Counting, Pending};
use super::{AggregateError, AggregateSettings};
use crate::bus::file::{event_times, segments, source_key, SegmentReader};
use crate::bus::kafka::{source_key as partition_key, TopicReader};
use crate::bus::Quarantine;
use crate::config::{BusSettings, FileConfig, KafkaConfig};
use crate::event::epoch_day;
use crate::store::space::{Kept, Lag, Lease, Positions, Switch};
use crate::store::{Applied, Store};
use crate::ComponentContext;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Bytes read from a segment at a time: a few thousand events, counted in parts on every core.
const READ_CHUNK: usize = 4 << 20;

/// Records per batch of the rebuild at least: a rebuild has no one waiting for its batches, so
/// they are as large as the store takes comfortably.
const BATCH_EVENTS: usize = 20_000;

/// How often the lease is renewed, well within its length.
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// Events on the bus arrive a little out of event-time order: a deleted segment may have held
/// events up to this much later than the first one still on the bus.
const DISORDER_MS: i64 = 3_600_000;

/// What to rebuild: the days from `from` to `to` (epoch days, inclusive); the others keep their
/// counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildOptions {
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// What a rebuild did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Records read from the bus, and the events among them that were counted.
    pub records: u64,
    pub events: u64,
    /// Days whose counters now come from the rebuild.
    pub rebuilt_days: Vec<i64>,
    /// Days in the range that kept their counters because the bus no longer holds all their
    /// events.
    pub lost_days: Vec<i64>,
    /// Days outside the range, which kept their counters.
    pub outside_days: usize,
    /// Sources the store has positions for that are no longer on the bus.
    pub lost_sources: Vec<String>,
    /// Rounds of catching up with the live positions, the first read included.
    pub rounds: usize,
    pub elapsed: Duration,
}

/// Why a rebuild stopped without switching.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    #[error("another rebuild holds the store's rebuild lease for {remaining_ms} ms more; wait for it to finish (a rebuild that died lets go within a minute)")]
    Busy { remaining_ms: u64 },
    #[error("stopped before the switch; the live counters are unchanged")]
    Stopped,
    #[error("the live position of {key} went back from {rebuilt} to {live} (the store lost acknowledged writes); run the rebuild again")]
    LiveWentBack {
        key: String,
        live: u64,
        rebuilt: u64,
    },
    #[error(
        "{key} ends at {length} before its live position {live}; the bus and the store disagree"
    )]
    ShortSource { key: String, length: u64, live: u64 },
}

impl From<crate::store::StoreError> for RebuildError {
    fn from(e: crate::store::StoreError) -> Self {
        RebuildError::Aggregate(e.into())
    }
}

impl From<crate::bus::file::FileBusError> for RebuildError {
    fn from(e: crate::bus::file::FileBusError) -> Self {
        RebuildError::Aggregate(e.into())
    }
}

impl From<crate::bus::kafka::KafkaBusError> for RebuildError {
    fn from(e: crate::bus::kafka::KafkaBusError) -> Self {
        RebuildError::Aggregate(e.into())
    }
}

/// Rebuilds the counters of `store` from the bus of `ctx` and switches to them. On an error or
/// a shutdown before the switch, the live counters are untouched and the lease is let go.
pub async fn run(
    ctx: ComponentContext<AggregateSettings>,
    store: Store,
    options: RebuildOptions,
) -> Result<Report, RebuildError> {
    let now = chrono::Utc::now().timestamp_millis();
    if let Lease::HeldElsewhere { remaining_ms } = store.begin_rebuild(now).await? {
        return Err(RebuildError::Busy { remaining_ms });
    }
    let result = Rebuild::new(&ctx, store.clone()).run(options).await;
    if result.is_err() {
        // What was rebuilt is dropped by the next rebuild; the lease goes now.
        if let Err(e) = store.end_rebuild().await {
            tracing::warn!(error = %e, "could not let go of the rebuild lease; it runs out by itself");
        }
    }
    result
}

/// One rebuild in progress.
struct Rebuild<'a> {
    ctx: &'a ComponentContext<AggregateSettings>,
    live: Store,
    counting: Counting,
    policy: BatchPolicy,
    /// Where the rebuild space is, by source (also the start of sources not read yet).
    rebuilt: Positions,
    progress: Progress,
    renewed: Instant,
    events: u64,
    /// The newest day that keeps its live counters because the bus lost some of its events.
    lost_through: Option<i64>,
}

impl<'a> Rebuild<'a> {
    fn new(ctx: &'a ComponentContext<AggregateSettings>, live: Store) -> Self {
        let quarantine = Quarantine::for_rebuild(&ctx.config.bus);
        let metrics = ctx.metrics.aggregate.clone();
        Rebuild {
            // The counters the aggregators keep, `aggregate.statistics` included, and nothing
            // the rebuild space does not hold.
            counting: Counting::new(live.rebuild_space(), metrics, quarantine)
                .with_statistics(ctx.config.aggregate.statistics)
                .for_rebuild(),
            policy: BatchPolicy {
                events: ctx.config.aggregate.batch_events.max(BATCH_EVENTS),
                delay: ctx.config.aggregate.batch_delay,
            },
            ctx,
            live,
            rebuilt: Positions::new(),
            progress: Progress::new(),
            renewed: Instant::now(),
            events: 0,
            lost_through: None,
        }
    }

    async fn run(mut self, options: RebuildOptions) -> Result<Report, RebuildError> {
        let started = Instant::now();
        let days_before = self.live.days().await?;
        let mut rounds = 0;
        let mut kept = Kept {
            from: options.from.unwrap_or(i64::MIN),
            to: options.to.unwrap_or(i64::MAX),
            lost_through: None,
        };
        tracing::info!(from = ?options.from, to = ?options.to, "reaggregate starting: counting the bus into a fresh counter space");
        let lost = loop {
            if self.ctx.shutdown.is_cancelled() {
                return Err(RebuildError::Stopped);
            }
            rounds += 1;
            let targets = self.live.positions().await?;
            let lost = match self.ctx.config.bus.clone() {
                BusSettings::File(files) => self.files_round(&files, &targets).await?,
                BusSettings::Kafka(kafka) => self.kafka_round(&kafka, &targets).await?,
            };
            kept.lost_through = self.lost_through;
            match self.live.switch_to_rebuild(kept, &lost).await? {
                Switch::Switched => break lost,
                Switch::Behind(lags) => {
                    if let Some(Lag {
                        source,
                        live,
                        rebuilt,
                    }) = lags.into_iter().find(|lag| lag.rebuilt > lag.live)
                    {
                        return Err(RebuildError::LiveWentBack {
                            key: source,
                            live,
                            rebuilt,
                        });
                    }
                    tracing::debug!(
                        round = rounds,
                        "the daemon counted more meanwhile; catching up"
                    );
                }
            }
        };
        let days_after = self.live.days().await?;
        let mut report = Report {
            records: self.progress.records(),
            events: self.events,
            rebuilt_days: days_after
                .iter()
                .copied()
                .filter(|day| !kept.keeps(*day))
                .collect(),
            lost_days: days_before
                .iter()
                .copied()
                .filter(|day| *day >= kept.from && *day <= kept.to && kept.keeps(*day))
                .collect(),
            outside_days: days_after
                .iter()
                .filter(|day| **day < kept.from || **day > kept.to)
                .count(),
            lost_sources: lost,
            rounds,
            elapsed: started.elapsed(),
        };
        report.lost_sources.sort();
        tracing::info!(
            records = report.records,
            events = report.events,
            rebuilt_days = report.rebuilt_days.len(),
            lost_days = report.lost_days.len(),
            rounds,
            seconds = report.elapsed.as_secs_f64(),
            "reaggregate switched to the rebuilt counters"
        );
        Ok(report)
    }

    /// Reads every segment up to its live position; returns the sources the bus lost.
    async fn files_round(
        &mut self,
        files: &FileConfig,
        targets: &Positions,
    ) -> Result<Vec<String>, RebuildError> {
        let listed: BTreeMap<String, (u64, PathBuf)> =
            tokio::task::block_in_place(|| segments(&files.dir))?
                .into_iter()
                .map(|(number, path)| (source_key(number), (number, path)))
                .collect();
        // Gone before the rebuild read them to their live positions (retention may delete what
        // the rebuild has read, and that is no loss).
        let lost: Vec<String> = targets
            .iter()
            .filter(|(source, live)| {
                source.starts_with("file:")
                    && !listed.contains_key(*source)
                    && self.rebuilt.get(*source).copied().unwrap_or(0) < **live
            })
            .map(|(source, _)| source.clone())
            .collect();
        if !lost.is_empty() && self.lost_through.is_none() {
            // Every day up to the first event still on the bus (and an hour of disorder) may
            // have had events in a deleted segment.
            let first = match listed.values().next() {
                Some((_, path)) => tokio::task::block_in_place(|| event_times(path))?.0,
                None => None,
            };
            self.lost_through =
                Some(first.map_or(i64::MAX, |ms| epoch_day(ms.saturating_add(DISORDER_MS))));
        }
        for (source, (_, path)) in &listed {
            let target = targets.get(source).copied().unwrap_or(0);
            let from = self.rebuilt.get(source).copied().unwrap_or(0);
            if from < target {
                self.count_segment(source, path, from, target).await?;
            }
            if self.ctx.shutdown.is_cancelled() {
                return Err(RebuildError::Stopped);
            }
        }
        Ok(lost)
    }

    /// Counts one segment from `from` to exactly `target`.
    async fn count_segment(
        &mut self,
        source: &str,
        path: &std::path::Path,
        from: u64,
        target: u64,
    ) -> Result<(), RebuildError> {
        let mut reader = SegmentReader::open(path, from)?;
        let mut pending = Pending::new(source.to_owned(), from);
        while pending.end() < target {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let refused = {
                let records: Vec<_> = tokio::task::block_in_place(|| reader.read(READ_CHUNK))?
                    .take_while(|record| record.start < target)
                    .collect();
                if records.is_empty() {
                    return Err(RebuildError::ShortSource {
                        key: source.to_owned(),
                        length: pending.end(),
                        live: target,
                    });
                }
                self.counting
                    .add_all(&mut pending, &records, now_ms)
                    .await?;
                self.progress.read(records.len());
                pending.is_full(&self.policy) && self.apply(&mut pending).await?
            };
            if refused {
                reader = SegmentReader::open(path, pending.end())?;
            }
        }
        // Refused, the rebuild space is elsewhere: the next round reads from there.
        self.apply(&mut pending).await?;
        Ok(())
    }

    /// Reads every partition from its first retained offset up to its live position; returns
    /// the sources the bus lost entirely.
    async fn kafka_round(
        &mut self,
        kafka: &KafkaConfig,
        targets: &Positions,
    ) -> Result<Vec<String>, RebuildError> {
        let partitions = tokio::task::block_in_place(|| TopicReader::partitions(kafka))?;
        let mut pending: BTreeMap<i32, (Pending, u64)> = BTreeMap::new();
        let mut first_unseen: BTreeSet<i32> = BTreeSet::new();
        for (partition, low, _high) in &partitions {
            let source = partition_key(&kafka.topic, *partition);
            let target = targets.get(&source).copied().unwrap_or(0);
            let low = (*low).max(0) as u64;
            let from = match self.rebuilt.get(&source) {
                Some(at) => *at,
                None if low > 0 => {
                    // Deleted by retention: the rebuild space starts where the topic does, as
                    // an aggregator records such a loss.
                    let gap = crate::store::Batch {
                        source: source.clone(),
                        start: 0,
                        end: low,
                        tally: Default::default(),
                    };
                    self.counting.store().apply(&gap).await?;
                    self.rebuilt.insert(source.clone(), low);
                    first_unseen.insert(*partition);
                    low
                }
                None => 0,
            };
            if from < target {
                pending.insert(*partition, (Pending::new(source, from), target));
            } else if first_unseen.contains(partition) {
                // Nothing to read to learn which days the loss reached: every day keeps.
                self.lost_through = Some(i64::MAX);
            }
        }
        if pending.is_empty() {
            return Ok(Vec::new());
        }
        let starts: Vec<(i32, i64)> = pending
            .iter()
            .map(|(p, (batch, _))| (*p, batch.end() as i64))
            .collect();
        let reader = tokio::task::block_in_place(|| TopicReader::open(kafka, &starts))?;
        let mut open: BTreeSet<i32> = pending.keys().copied().collect();
        while !open.is_empty() {
            let message = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return Err(RebuildError::Stopped),
                message = reader.recv() => message?,
            };
            let p = message.partition();
            let Some((batch, target)) = pending.get_mut(&p) else {
                continue;
            };
            let record = message.record();
            if record.start < batch.end() || batch.end() >= *target {
                continue;
            }
            if first_unseen.remove(&p) {
                if let Ok(Ok(head)) = record.data.as_ref().map(|d| crate::event::inspect(d)) {
                    let day = epoch_day(head.time_ms.saturating_add(DISORDER_MS));
                    self.lost_through = Some(self.lost_through.map_or(day, |d| d.max(day)));
                }
            }
            let now_ms = chrono::Utc::now().timestamp_millis();
            self.counting.add(batch, &record, now_ms).await?;
            self.progress.read(1);
            let done = batch.end() >= *target;
            if done || batch.is_full(&self.policy) {
                let (mut batch_now, target) = match pending.remove(&p) {
                    Some(entry) => entry,
                    None => continue,
                };
                let refused = self.apply(&mut batch_now).await?;
                if refused || done {
                    // Refused: the next round reads this partition again from the store.
                    open.remove(&p);
                } else {
                    pending.insert(p, (batch_now, target));
                }
            }
        }
        Ok(Vec::new())
    }

    /// Applies a batch to the rebuild space; true when the store refused it. Either way the
    /// batch then starts where the rebuild space is, which is remembered. Renews the lease on
    /// the way.
    async fn apply(&mut self, pending: &mut Pending) -> Result<bool, RebuildError> {
        if self.renewed.elapsed() >= RENEW_EVERY {
            self.live
                .renew_lease(chrono::Utc::now().timestamp_millis())
                .await?;
            self.renewed = Instant::now();
        }
        let events = pending.tally.events();
        let source = pending.source.clone();
        let applied = self.counting.apply(pending).await?;
        if applied == Applied::Counted {
            self.events += events;
        }
        self.rebuilt.insert(source, pending.end());
        Ok(matches!(applied, Applied::Stale { .. }))
    }
}

/// Progress of a rebuild: the records read, counted by the shared display (a bar on a
/// terminal, periodic log lines elsewhere).
struct Progress {
    display: crate::progress::Progress,
}

impl Progress {
    fn new() -> Self {
        Progress {
            display: crate::progress::Progress::events("reaggregate", None),
        }
    }

    fn read(&mut self, count: usize) {
        self.display.inc(count as u64);
    }

    /// Records read so far.
    fn records(&self) -> u64 {
        self.display.count()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.display.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_days_are_outside_the_range_or_lost() {
        let kept = Kept {
            from: 10,
            to: 20,
            lost_through: Some(12),
        };
        assert!(kept.keeps(9));
        assert!(kept.keeps(12));
        assert!(!kept.keeps(13));
        assert!(!kept.keeps(20));
        assert!(kept.keeps(21));
        let all = Kept {
            from: i64::MIN,
            to: i64::MAX,
            lost_through: None,
        };
        assert!(!all.keeps(i64::MIN) && !all.keeps(0) && !all.keeps(i64::MAX));
    }
}
