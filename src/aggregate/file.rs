//! An aggregator worker on event files. Worker `i` of `n` owns the segments whose number is `i`
//! modulo `n`; each segment is read from the position the store records for it, never from one
//! remembered locally, so a crash at any instant costs only a re-read of the batch that was not
//! applied.

use super::batch::{BatchPolicy, Counting, Pending};
use super::{AggregateError, AggregateSettings};
use crate::bus::file::compressed::compressed_path;
use crate::bus::file::{segment_len, segments, source_key, SegmentReader};
use crate::bus::Quarantine;
use crate::config::FileConfig;
use crate::metrics::AggregateMetrics;
use crate::store::{Applied, Store};
use crate::ComponentContext;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 1 << 20;

/// One aggregator worker on the file bus.
pub struct FileAggregator {
    ctx: ComponentContext<AggregateSettings>,
    files: FileConfig,
    counting: Counting,
    policy: BatchPolicy,
    metrics: AggregateMetrics,
    index: u64,
    workers: u64,
    /// Segments this worker finished (a newer segment exists and every line is counted).
    finished: HashSet<u64>,
    /// The stored position of each segment as last seen. Only a hint to avoid a store round trip
    /// per poll: the store still refuses any batch that does not start at its real position.
    positions: HashMap<u64, u64>,
    /// The store's epoch when `positions` and `finished` were last trusted. When it moves, the
    /// store may have lost acknowledged writes (a Redis failover), so both are forgotten: a
    /// segment remembered as counted may have to be counted again from where the store is.
    epoch: Option<u64>,
}

impl FileAggregator {
    /// Worker `index` of `aggregate.workers`, reading the event files of `files`.
    pub fn new(
        ctx: ComponentContext<AggregateSettings>,
        files: FileConfig,
        store: Store,
        index: usize,
    ) -> Self {
        let workers = ctx.config.aggregate.workers.max(1) as u64;
        let metrics = ctx.metrics.aggregate.clone();
        let quarantine = Quarantine::for_aggregator(&ctx.config.bus, index);
        FileAggregator {
            counting: Counting::new(store, metrics.clone(), quarantine)
                .with_statistics(ctx.config.aggregate.statistics),
            policy: BatchPolicy::of(&ctx.config.aggregate),
            files,
            metrics,
            index: index as u64,
            workers,
            finished: HashSet::new(),
            positions: HashMap::new(),
            epoch: None,
            ctx,
        }
    }

    /// Counts until shutdown.
    pub async fn run(mut self) -> Result<(), AggregateError> {
        tracing::info!(
            worker = self.index,
            workers = self.workers,
            "aggregator starting"
        );
        let poll = self.ctx.config.aggregate.poll_interval;
        while !self.ctx.shutdown.is_cancelled() {
            let progressed = self.pass().await?;
            if !progressed {
                tokio::select! {
                    _ = self.ctx.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
        tracing::info!(worker = self.index, "aggregator stopped");
        Ok(())
    }

    /// One look at every segment this worker owns; true when anything was counted.
    async fn pass(&mut self) -> Result<bool, AggregateError> {
        let started = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
        let epoch = self.counting.store().epoch().await;
        if self.epoch != Some(epoch) {
            if self.epoch.is_some() {
                tracing::info!(
                    worker = self.index,
                    epoch,
                    "new store connection; every segment's position is read again"
                );
            }
            self.positions.clear();
            self.finished.clear();
            self.epoch = Some(epoch);
        }
        let all = segments(&self.files.dir)?;
        let newest = all.last().map(|(number, _)| *number);
        let mut progressed = false;
        for (number, path) in all {
            if number % self.workers != self.index || self.finished.contains(&number) {
                continue;
            }
            let live = Some(number) == newest;
            progressed |= self.drain(&path, number, live).await?;
            if !live && !self.ctx.shutdown.is_cancelled() {
                // A newer segment exists, so this one is complete and now fully counted.
                self.finished.insert(number);
            }
            if self.ctx.shutdown.is_cancelled() {
                return Ok(progressed);
            }
        }
        // Every owned segment was read to its last complete line: all that was on the bus when
        // this pass began is counted.
        self.metrics
            .caught_up
            .with_label_values(&[&self.index.to_string()])
            .set(started);
        Ok(progressed)
    }

    /// Counts everything available in one segment, from its stored position.
    async fn drain(
        &mut self,
        path: &Path,
        number: u64,
        live: bool,
    ) -> Result<bool, AggregateError> {
        let key = source_key(number);
        // The content's length, whichever form the segment is in (compressed or not).
        let length = match segment_len(path) {
            Ok(length) => length,
            // Deleted by retention since it was listed: it was counted.
            Err(_) if !path.exists() && !compressed_path(path).exists() => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let stored = match self.positions.get(&number) {
            Some(known) => *known,
            None => {
                self.counting
                    .store_call(self.counting.store().position(&key))
                    .await?
            }
        };
        self.positions.insert(number, stored);
        if stored >= length {
            return Ok(false);
        }
        let mut reader = SegmentReader::open(path, stored)?;
        let mut pending = Pending::new(key, stored);
        let mut progressed = false;
        // Reads in a row that found nothing new.
        let mut idle_reads = 0;
        loop {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let records = tokio::task::block_in_place(|| reader.read(READ_CHUNK))?;
            let got = !records.is_empty();
            for record in records {
                self.counting.add(&mut pending, &record, now_ms).await?;
            }
            if got {
                pending.touch();
                idle_reads = 0;
            } else {
                idle_reads += 1;
            }
            let idle = !got;
            // A backlog that has ended: nothing new since a read a poll interval ago.
            let backlog_ended = idle_reads >= 2 && pending.is_backlog(&self.policy);
            let shutdown = self.ctx.shutdown.is_cancelled();
            if !pending.is_empty()
                && (pending.is_full(&self.policy)
                    || pending.is_due(&self.policy)
                    || backlog_ended
                    || (idle && !live)
                    || shutdown)
            {
                match self.counting.apply(&mut pending).await? {
                    Applied::Counted => {
                        progressed = true;
                        self.metrics.position_bytes.set(pending.end() as i64);
                    }
                    Applied::Stale { .. } => reader = SegmentReader::open(path, pending.end())?,
                }
                self.positions.insert(number, pending.end());
            }
            if shutdown || (idle && (!live || pending.records == 0)) {
                return Ok(progressed);
            }
            if idle {
                // The live segment has a partial batch: wait for more events or the deadline.
                tokio::select! {
                    _ = self.ctx.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.ctx.config.aggregate.poll_interval.min(self.policy.delay)) => {}
                }
            }
        }
    }
}
