//! The aggregate role: read the bus, turn events into counter increments, and apply them to the
//! store in batches, each atomically with the bus position it covers.
//!
//! This module reads event files; `kafka` reads a topic as a consumer group. On files, worker
//! `i` of `n` owns the segments whose number is `i` modulo `n`. Where a segment resumes is
//! read from the store, never remembered locally, so a crash at any instant costs only a re-read
//! of the batch that was not applied.

pub mod counters;
pub mod kafka;

use crate::bus::file::{
    segment_number, segments, BusRecord, FileBusError, Quarantine, QuarantineRecord, SegmentReader,
};
use crate::metrics::AggregateMetrics;
use crate::store::{Applied, Batch, Store, StoreError};
use crate::ComponentContext;
use counters::{Deltas, Scratch, Tally};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Instant;

/// What stops an aggregator (its supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error(transparent)]
    Bus(#[from] FileBusError),
    #[error(transparent)]
    Kafka(#[from] crate::bus::kafka::KafkaBusError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 1 << 20;

/// One aggregator worker.
pub struct Aggregator {
    ctx: ComponentContext,
    store: Store,
    index: u64,
    workers: u64,
    metrics: AggregateMetrics,
    /// Segments this worker finished (a newer segment exists and every line is counted).
    finished: HashSet<u64>,
    /// The stored position of each segment as last seen. Only a hint to avoid a store round trip
    /// per poll: the store still refuses any batch that does not start at its real position.
    positions: HashMap<u64, u64>,
    quarantine: Quarantine,
    name: String,
}

impl Aggregator {
    /// Worker `index` of `aggregate.workers`.
    pub fn new(ctx: ComponentContext, store: Store, index: usize) -> Self {
        let workers = ctx.config.aggregate.workers.max(1) as u64;
        let metrics = ctx.metrics.aggregate.clone();
        let quarantine = Quarantine::new(&ctx.config.file.dir, &format!("aggregate-{index}.jsonl"));
        Aggregator {
            ctx,
            store,
            index: index as u64,
            workers,
            metrics,
            finished: HashSet::new(),
            positions: HashMap::new(),
            quarantine,
            name: String::new(),
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
        let all = segments(&self.ctx.config.file.dir)?;
        let newest = all.last().and_then(|p| segment_number(p));
        let mut progressed = false;
        for path in all {
            let Some(number) = segment_number(&path) else {
                continue;
            };
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
        let source = format!(
            "file:{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let length = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let stored = match self.positions.get(&number) {
            Some(known) => *known,
            None => self.store_call(self.store.position(&source)).await?,
        };
        self.positions.insert(number, stored);
        if stored >= length {
            return Ok(false);
        }
        let config = &self.ctx.config.aggregate;
        let (batch_events, batch_delay) = (config.batch_events, config.batch_delay);
        let mut reader = SegmentReader::open(path, stored)?;
        let mut batch = Batch {
            source,
            start: stored,
            end: stored,
            tally: Tally::default(),
        };
        let mut lines = 0usize;
        let mut opened = Instant::now();
        let mut progressed = false;
        loop {
            let chunk = tokio::task::block_in_place(|| reader.read_lines(READ_CHUNK))?;
            let got = !chunk.is_empty();
            if got {
                if lines == 0 {
                    opened = Instant::now();
                }
                lines += count_lines(
                    chunk,
                    &mut batch.tally,
                    &mut self.name,
                    &self.metrics,
                    &mut self.quarantine,
                )?;
                batch.end = reader.position();
            }
            let full = lines >= batch_events;
            let waited = lines > 0 && opened.elapsed() >= batch_delay;
            let idle = !got;
            if batch.end > batch.start
                && (full || waited || (idle && !live) || self.ctx.shutdown.is_cancelled())
            {
                match self.apply(&batch, lines).await? {
                    Applied::Counted => {
                        progressed = true;
                        self.positions.insert(number, batch.end);
                    }
                    Applied::Stale { stored } => {
                        self.positions.insert(number, stored);
                        self.metrics.stale_batches.inc();
                        tracing::warn!(source = %batch.source, batch_start = batch.start, stored, "store refused a batch that does not start at its stored position; re-reading from there");
                        reader = SegmentReader::open(path, stored)?;
                    }
                }
                batch.start = reader.position();
                batch.end = batch.start;
                batch.tally = Tally::default();
                lines = 0;
            }
            if self.ctx.shutdown.is_cancelled() || (idle && (!live || lines == 0)) {
                return Ok(progressed);
            }
            if idle {
                // The live segment has a partial batch: wait for more events or the deadline.
                tokio::select! {
                    _ = self.ctx.shutdown.cancelled() => {}
                    _ = tokio::time::sleep(self.ctx.config.aggregate.poll_interval.min(batch_delay)) => {}
                }
            }
        }
    }

    async fn apply(&mut self, batch: &Batch, lines: usize) -> Result<Applied, AggregateError> {
        let started = Instant::now();
        let applied = self.store_call(self.store.apply(batch)).await?;
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        if applied == Applied::Counted {
            self.metrics.batch_events.observe(lines as f64);
            self.metrics.events.inc_by(batch.tally.events);
            self.metrics.position_bytes.set(batch.end as i64);
            tracing::debug!(source = %batch.source, start = batch.start, end = batch.end, events = batch.tally.events, "batch counted");
        }
        Ok(applied)
    }

    async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, AggregateError> {
        store_call(&self.metrics, call).await
    }
}

/// Awaits a store operation, counting it in `pleiades_store_errors_total` when it fails.
pub(crate) async fn store_call<T>(
    metrics: &AggregateMetrics,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, AggregateError> {
    call.await.map_err(|e| {
        metrics.store_errors.inc();
        e.into()
    })
}

/// Counts complete bus lines into `tally`; returns how many lines were read.
fn count_lines(
    chunk: &[u8],
    tally: &mut Tally,
    name: &mut String,
    metrics: &AggregateMetrics,
    quarantine: &mut Quarantine,
) -> Result<usize, FileBusError> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut lines = 0;
    for line in chunk.split_inclusive(|&b| b == b'\n') {
        lines += 1;
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        let record = match serde_json::from_str::<BusRecord<'_>>(text) {
            Ok(record) => record,
            Err(e) => {
                reject(metrics, quarantine, "bad_record", &e.to_string(), "", text)?;
                continue;
            }
        };
        if let Err(invalid) = count_event(record.data.get(), tally, name, metrics, now_ms) {
            reject(
                metrics,
                quarantine,
                invalid.reason(),
                &invalid.to_string(),
                &record.id,
                record.data.get(),
            )?;
        }
    }
    Ok(lines)
}

/// Counts one event's data into `tally`, the one path from the bus to the counter rules for every
/// source. Canaries are skipped and counted as such; invalid data is returned for quarantine.
pub(crate) fn count_event(
    data: &str,
    tally: &mut Tally,
    name: &mut String,
    metrics: &AggregateMetrics,
    now_ms: i64,
) -> Result<(), crate::event::Invalid> {
    let head = crate::event::inspect(data)?;
    if head.canary {
        metrics.skipped.with_label_values(&["canary"]).inc();
        return Ok(());
    }
    metrics
        .lag_ms
        .observe((now_ms - head.time_ms).max(0) as f64);
    let mut scratch = Scratch::default();
    tally.add(&Deltas::of(&head, &mut scratch), name);
    Ok(())
}

/// Counts and logs an event the aggregators cannot count; the caller keeps it in quarantine.
pub(crate) fn note_rejected(metrics: &AggregateMetrics, reason: &str, error: &str, id: &str) {
    metrics
        .quarantined
        .with_label_values(&["aggregate", reason])
        .inc();
    tracing::warn!(
        reason,
        error,
        id,
        "an event on the bus cannot be counted; quarantined"
    );
}

fn reject(
    metrics: &AggregateMetrics,
    quarantine: &mut Quarantine,
    reason: &str,
    error: &str,
    id: &str,
    data: &str,
) -> Result<(), FileBusError> {
    note_rejected(metrics, reason, error, id);
    quarantine.write(&QuarantineRecord {
        time: chrono::Utc::now().to_rfc3339(),
        reason,
        error: error.to_owned(),
        id,
        data,
    })?;
    Ok(())
}

/// Builds and runs aggregator `index` on the configured bus: the supervised unit of the
/// aggregate role.
pub async fn run(ctx: ComponentContext, store: Store, index: usize) -> Result<(), AggregateError> {
    let source = ctx.config.aggregate.source_or(ctx.config.ingest.publisher);
    match source {
        crate::config::BusKind::File => Aggregator::new(ctx, store, index).run().await,
        crate::config::BusKind::Kafka => {
            kafka::KafkaAggregator::start(ctx, store, index)
                .await?
                .run()
                .await
        }
    }
}
