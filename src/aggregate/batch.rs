//! What every aggregator shares, whatever bus it reads: the batch policy, counting a record into
//! a batch (or quarantining it), and applying a batch with its position (`apply_batch`), with
//! the metrics and the handling of a batch the store refuses.

use super::AggregateError;
use crate::bus::{Quarantine, QuarantineRecord, Record, Source};
use crate::config::{AggregateConfig, Statistics};
use crate::counters::{OpenTally, Tally};
use crate::event::RejectReason;
use crate::metrics::{AggregateMetrics, Skip};
use crate::store::{Applied, Batch, Store, StoreError};
use std::time::{Duration, Instant};

/// When a batch is written: once it covers `events` records, or once its oldest record has
/// waited `delay`, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub events: usize,
    pub delay: Duration,
}

impl BatchPolicy {
    pub fn of(config: &AggregateConfig) -> Self {
        BatchPolicy {
            events: config.batch_events,
            delay: config.batch_delay,
        }
    }
}

/// The fewest records a thread of a rebuild's counting counts: below this, starting a thread
/// costs more than it saves.
const MIN_PART: usize = 256;

/// What one thread of a rebuild's counting counted: the sums, and the records (by index in
/// its part) that cannot be counted, with why.
struct Part {
    len: usize,
    tally: Tally,
    rejected: Vec<(usize, RejectReason, String)>,
}

/// Counts a part of a rebuild's records as a rebuild counts them (`Counting::for_rebuild`).
fn count_part(
    records: &[Record<'_>],
    full: bool,
    metrics: &AggregateMetrics,
    tally: &mut OpenTally,
) -> Part {
    let mut rejected = Vec::new();
    for (index, record) in records.iter().enumerate() {
        match &record.data {
            Ok(data) => match crate::event::inspect(data) {
                Ok(head) if head.canary => metrics.skipped.inc(Skip::Canary),
                Ok(head) if full => tally.count_days(&head),
                Ok(head) => tally.count(&head, false),
                Err(invalid) => rejected.push((index, invalid.reason(), invalid.to_string())),
            },
            Err(bad) => rejected.push((index, RejectReason::BadRecord, bad.error.clone())),
        }
    }
    Part {
        len: records.len(),
        tally: tally.seal(),
        rejected,
    }
}

/// The batch being built for one source (a segment, a partition): the positions it covers
/// and what their events count so far.
#[derive(Debug)]
pub struct Pending {
    /// The store's key of the source.
    pub source: String,
    pub start: u64,
    pub end: u64,
    pub tally: OpenTally,
    /// Records covered (counted, skipped or quarantined).
    pub records: usize,
    opened: Instant,
    /// When the latest record joined.
    last_added: Instant,
}

impl Pending {
    /// An empty batch for the store's source `key`, starting at `position`.
    pub fn new(key: String, position: u64) -> Self {
        Pending {
            source: key,
            start: position,
            end: position,
            tally: OpenTally::default(),
            records: 0,
            opened: Instant::now(),
            last_added: Instant::now(),
        }
    }

    /// True when the batch covers no position yet.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The position the next record must start at.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Full by count.
    pub fn is_full(&self, policy: &BatchPolicy) -> bool {
        self.records >= policy.events
    }

    /// Its oldest record has waited long enough.
    pub fn is_due(&self, policy: &BatchPolicy) -> bool {
        self.records > 0 && self.opened.elapsed() >= policy.delay
    }

    /// Notes that records just joined (once per read, not per record).
    pub fn touch(&mut self) {
        self.last_added = Instant::now();
    }

    /// It holds at least a hundredth of a full batch and filled at least as fast as a full
    /// batch per `delay`: it is part of a backlog, not of a live stream. A backlog's last batch
    /// need not wait out the delay once the backlog has ended (nothing new for a poll): waiting
    /// would save no store write, only show the last events later. A live stream's batches
    /// never fill this fast, and the few events of a quiet moment, read at once, are too few to
    /// tell a rate: their store writes stay what the policy says.
    pub fn is_backlog(&self, policy: &BatchPolicy) -> bool {
        let filling = self.last_added.saturating_duration_since(self.opened);
        self.records > 0
            && self.records >= policy.events / 100
            && (self.records as u128) * policy.delay.as_micros()
                >= (policy.events as u128) * filling.as_micros().max(1)
    }

    /// The batch to apply: its positions and what it counted, sealed. The open tally starts
    /// afresh; the positions do once the store has answered ([`Pending::restart`]: at the
    /// batch's end when counted, at the stored position when refused).
    fn seal(&mut self) -> Batch {
        Batch {
            source: self.source.clone(),
            start: self.start,
            end: self.end,
            tally: self.tally.seal().into(),
        }
    }

    /// Starts afresh at `position` (after an apply, or after a refusal).
    fn restart(&mut self, position: u64) {
        self.start = position;
        self.end = position;
        // Empty already after a seal; a restart never keeps counts of another range.
        self.tally.seal();
        self.records = 0;
    }
}

/// Counts records into batches and applies them: the one path from bus records to the counter
/// rules and the store.
pub struct Counting {
    store: Store,
    metrics: AggregateMetrics,
    quarantine: Quarantine,
    /// The tally of a rebuild's records too few to count in parts.
    small_part: OpenTally,
    statistics: Statistics,
    /// Counting for a rebuild: only what the rebuild space holds ([`Counting::for_rebuild`]).
    rebuild: bool,
}

impl Counting {
    pub fn new(store: Store, metrics: AggregateMetrics, quarantine: Quarantine) -> Self {
        Counting {
            store,
            metrics,
            quarantine,
            small_part: OpenTally::default(),
            statistics: Statistics::Full,
            rebuild: false,
        }
    }

    /// Counts what `statistics` says (`aggregate.statistics`; the default is everything).
    pub fn with_statistics(mut self, statistics: Statistics) -> Self {
        self.statistics = statistics;
        self
    }

    /// Counts only what a rebuild writes: the day counters. Coverage, the per-hour buckets and
    /// the sketches have one space, the live one, which the aggregators keep; computing them
    /// for a rebuild would only be thrown away by the store. Nor is the lag of an event read
    /// back from history a lag worth observing.
    pub fn for_rebuild(mut self) -> Self {
        self.rebuild = true;
        self
    }

    /// The store, for position lookups.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Adds one record to `pending`: counted when it is a valid event, skipped when it is a
    /// canary, quarantined otherwise. The batch then covers the record's positions.
    pub async fn add(
        &mut self,
        pending: &mut Pending,
        record: &Record<'_>,
        now_ms: i64,
    ) -> Result<(), AggregateError> {
        if self.rebuild {
            return self
                .count_in_parts(pending, std::slice::from_ref(record))
                .await;
        }
        if pending.records == 0 {
            pending.opened = Instant::now();
        }
        pending.end = record.end;
        pending.records += 1;
        let rejected = match &record.data {
            Ok(data) => match crate::event::inspect(data) {
                Ok(head) if head.canary => {
                    self.metrics.skipped.inc(Skip::Canary);
                    pending.tally.cover(&head);
                    None
                }
                Ok(head) => {
                    pending.tally.cover(&head);
                    self.metrics
                        .lag_ms
                        .observe((now_ms - head.time_ms).max(0) as f64);
                    let full = self.statistics == Statistics::Full;
                    pending.tally.count(&head, full);
                    None
                }
                Err(invalid) => Some((invalid.reason(), invalid.to_string(), *data)),
            },
            Err(bad) => Some((RejectReason::BadRecord, bad.error.clone(), bad.raw.as_ref())),
        };
        if let Some((reason, error, data)) = rejected {
            self.quarantine_record(record, reason, error, data).await?;
        }
        Ok(())
    }

    /// Counts `records` into `pending` as [`Counting::add`] counts each. For a rebuild, which
    /// has nobody waiting and only sums to keep (the day counters), they are counted in parts on
    /// every core and the sums added up, which is exactly one pass over them; the records that
    /// cannot be counted are quarantined afterwards, in bus order. Outside a rebuild, where
    /// sketches are counted too, this is [`Counting::add`] record by record.
    pub async fn add_all(
        &mut self,
        pending: &mut Pending,
        records: &[Record<'_>],
        now_ms: i64,
    ) -> Result<(), AggregateError> {
        if self.rebuild {
            return self.count_in_parts(pending, records).await;
        }
        for record in records {
            self.add(pending, record, now_ms).await?;
        }
        Ok(())
    }

    /// A rebuild's counting of `records` ([`Counting::for_rebuild`]), in parts on every core.
    async fn count_in_parts(
        &mut self,
        pending: &mut Pending,
        records: &[Record<'_>],
    ) -> Result<(), AggregateError> {
        let Some(last) = records.last() else {
            return Ok(());
        };
        if pending.records == 0 {
            pending.opened = Instant::now();
        }
        let full = self.statistics == Statistics::Full;
        let metrics = &self.metrics;
        let parts = match records.len() < 2 * MIN_PART {
            // Too few to split (a Kafka rebuild's one message): counted here, with the
            // counting's own tally rather than a fresh one per call.
            true => vec![count_part(records, full, metrics, &mut self.small_part)],
            false => crate::parts::in_parts(records, MIN_PART, |part| {
                count_part(part, full, metrics, &mut OpenTally::default())
            }),
        };
        let mut offset = 0;
        for part in parts {
            pending.tally.add_sums(part.tally);
            for (index, reason, error) in part.rejected {
                let record = &records[offset + index];
                let data = match &record.data {
                    Ok(data) => *data,
                    Err(bad) => bad.raw.as_ref(),
                };
                self.quarantine_record(record, reason, error, data).await?;
            }
            offset += part.len;
        }
        pending.end = last.end;
        pending.records += records.len();
        Ok(())
    }

    /// Quarantines a record that cannot be counted, naming where on the bus it was found.
    async fn quarantine_record(
        &mut self,
        record: &Record<'_>,
        reason: RejectReason,
        error: String,
        data: &str,
    ) -> Result<(), AggregateError> {
        self.metrics.quarantined(reason);
        // Bus content came from upstream: logged escaped (`?`), never verbatim.
        tracing::warn!(
            %reason,
            error = ?error.chars().take(200).collect::<String>(),
            id = ?record.sse_id.chars().take(200).collect::<String>(),
            "an event on the bus cannot be counted; quarantined"
        );
        let at = match record.source {
            Source::Segment(n) => format!("segment {n} byte {}", record.start),
            Source::Partition(p) => format!("partition {p} offset {}", record.start),
        };
        // Found at a place on the bus: read again after a crash, it is kept once.
        self.quarantine
            .write(&QuarantineRecord::new(reason, error, &record.sse_id, data).found_at(at))
            .await?;
        Ok(())
    }

    /// Applies `pending` with its position (`apply_batch`). Counted: the batch starts afresh
    /// at its end. Refused because the store's position for the source is elsewhere (a replay
    /// after a crash, a stale owner after a rebalance): nothing is changed, the refusal is
    /// counted, and the batch starts afresh at the stored position, where its reader must go.
    /// An error leaves the batch without its counts: it ends the aggregator, whose successor
    /// reads again from the stored position, as after a crash.
    pub async fn apply(&mut self, pending: &mut Pending) -> Result<Applied, AggregateError> {
        if pending.is_empty() {
            return Ok(Applied::Counted);
        }
        // The batch's quarantined records must be on disk before the store moves past them.
        self.quarantine.sync().await?;
        let started = Instant::now();
        let batch = pending.seal();
        let applied = self.store_call(self.store.apply(&batch)).await?;
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        match applied {
            Applied::Counted => {
                self.metrics.batch_events.observe(pending.records as f64);
                self.metrics.events.inc_by(batch.tally.events);
                tracing::debug!(source = %batch.source, start = batch.start, end = batch.end, events = batch.tally.events, "batch counted");
                let end = batch.end;
                pending.restart(end);
            }
            Applied::Stale { stored } => {
                self.metrics.stale_batches.inc();
                if stored < batch.start {
                    // Positions only move forward: the store lost writes it acknowledged.
                    self.metrics.rewound_batches.inc();
                    tracing::warn!(source = %batch.source, batch_start = batch.start, stored, "the store's position is behind a batch: it lost acknowledged writes (a Redis failover or restart); counting again from the stored position");
                } else {
                    tracing::warn!(source = %batch.source, batch_start = batch.start, stored, "store refused a batch that does not start at its stored position; reading again from there");
                }
                pending.restart(stored);
            }
        }
        Ok(applied)
    }

    /// Awaits a store operation, counting it in `pleiades_store_errors_total` when it fails.
    pub async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, AggregateError> {
        call.await.map_err(|e| {
            self.metrics.store_errors.inc();
            e.into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of `records` that took `filling` to fill, under the default policy.
    fn filled(records: usize, filling: Duration) -> Pending {
        let mut pending = Pending::new("segment".into(), 0);
        pending.records = records;
        pending.opened = Instant::now() - filling;
        pending.touch();
        pending
    }

    #[test]
    fn only_a_batch_filled_at_a_backlogs_rate_is_a_backlog() {
        let policy = BatchPolicy {
            events: 20_000,
            delay: Duration::from_millis(500),
        };
        // A backlog: 10,000 events in 100 ms fills a batch in 200 ms, sooner than the delay.
        assert!(filled(10_000, Duration::from_millis(100)).is_backlog(&policy));
        // The edge: exactly a full batch per delay.
        assert!(filled(20_000, Duration::from_millis(500)).is_backlog(&policy));
        // A live stream: 40 events in 400 ms would take minutes to fill one.
        assert!(!filled(40, Duration::from_millis(400)).is_backlog(&policy));
        assert!(!filled(9_000, Duration::from_millis(400)).is_backlog(&policy));
        assert!(!filled(0, Duration::ZERO).is_backlog(&policy));
        // A quiet stream's one event, read the moment it came, tells no rate.
        assert!(!filled(1, Duration::ZERO).is_backlog(&policy));
        assert!(!filled(199, Duration::from_micros(50)).is_backlog(&policy));
        assert!(filled(200, Duration::from_micros(50)).is_backlog(&policy));
        // Waiting after the last record does not change how fast the batch filled.
        let mut waited = filled(10_000, Duration::from_millis(100));
        waited.opened -= Duration::from_secs(1);
        waited.last_added -= Duration::from_secs(1);
        assert!(waited.is_backlog(&policy));
    }
}
