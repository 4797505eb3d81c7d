//! The bus between the ingester and its readers: event files in a directory (one host) or a
//! Kafka topic (many hosts). This module is the one way to touch it.
//!
//! Writers use a [`Publisher`] (publish, mark a resume point, quarantine, tick, close) and never
//! learn which bus they write to. Readers get [`Record`]s that say where they sit: a [`Source`]
//! (a file segment or a Kafka partition) and the positions `[start, end)` they cover there, the
//! positions the store records. `file` and `kafka` each implement the writer and the readers of
//! their bus; events that cannot be published or counted become one [`QuarantineRecord`] type.

pub mod file;
pub mod handoff;
pub mod kafka;
mod quarantine;

pub use quarantine::{
    QuarantineRecord, QUARANTINE_DATA_BYTES, QUARANTINE_ERROR_BYTES, QUARANTINE_ID_BYTES,
};

use crate::config::BusSettings;
use crate::metrics::Metrics;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A bus failure, naming the directory or the brokers.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(transparent)]
    File(#[from] file::FileBusError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaBusError),
}

/// What the bus remembers of its own tail: where to resume and which ids were delivered last.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tail {
    /// The SSE id of the newest event that is safely on the bus: the resume point.
    pub last_id: Option<String>,
    /// `meta.id`s of the newest events, oldest first, at most the requested number.
    pub recent_ids: Vec<String>,
    /// Records that could not be read back (reported, skipped).
    pub unreadable_lines: u64,
    /// The newest upstream offset among the tail's events, per (topic, partition): where the
    /// ingester's watch for holes resumes.
    pub upstream: std::collections::BTreeMap<(String, i32), u64>,
}

impl Tail {
    /// Notes the upstream position of an event of the tail.
    pub fn saw(&mut self, position: Option<&crate::event::Position<'_>>) {
        if let Some(at) = position {
            let newest = self
                .upstream
                .entry((at.topic.to_string(), at.partition))
                .or_insert(at.offset);
            *newest = (*newest).max(at.offset);
        }
    }
}

/// Where a record sits: a segment of the file bus, or a partition of the topic. Positions
/// within a source are byte offsets (segments) or message offsets (partitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Segment(u64),
    Partition(i32),
}

/// A record the bus holds but that is not an event record (a line that is not JSON, a message
/// without a value): kept in quarantine as it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord<'a> {
    pub error: String,
    pub raw: Cow<'a, str>,
}

/// One record read from the bus, covering positions `[start, end)` of its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub source: Source,
    pub start: u64,
    pub end: u64,
    /// The SSE id the event was received with (empty when the record carries none).
    pub sse_id: Cow<'a, str>,
    /// The event's data exactly as received, or what is wrong with the record.
    pub data: Result<&'a str, BadRecord<'a>>,
}

/// One event handed to a publisher.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// The SSE id it was received with.
    pub sse_id: &'a str,
    /// Its data, exactly as received.
    pub data: &'a str,
    /// `meta.id`, the message key on Kafka.
    pub key: Option<&'a str>,
    /// `meta.dt` in epoch milliseconds.
    pub time_ms: i64,
}

/// What one [`Publisher::publish`] call did.
#[derive(Debug, Default)]
pub struct Published {
    /// Events now on the bus (Kafka: queued; their resume point moves on acknowledgement).
    pub events: u64,
    /// Events the bus refused as too large, by index in the batch, with the reason; they
    /// belong in quarantine.
    pub too_large: Vec<(usize, String)>,
    /// Shutdown interrupted a wait for room: later events of the batch were not published.
    pub interrupted: bool,
}

/// The largest group of upstream bytes published together; see [`Publisher::group_bytes`].
const GROUP_BYTES: usize = 4 * 1024 * 1024;

/// The writer of the bus, whichever bus it is.
pub enum Publisher {
    /// Appended and synced (as `file.fsync` says) before `publish` returns.
    File(file::SegmentWriter),
    /// Handed to an idempotent producer; acknowledged later, in any order across partitions.
    Kafka(kafka::KafkaPublisher),
}

impl Publisher {
    /// Opens the bus for writing and reads its tail back: the resume point and the newest
    /// `window` event ids. With `resume` off, the resume point the bus holds is not carried
    /// into what is written next.
    pub async fn open(
        settings: &BusSettings,
        metrics: &Metrics,
        window: usize,
        resume: bool,
    ) -> Result<(Publisher, Tail), BusError> {
        match settings {
            BusSettings::File(config) => {
                let config = config.clone();
                let bus_metrics = metrics.file_bus.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    let writer = file::SegmentWriter::open(&config, bus_metrics)?;
                    let tail = file::read_tail(&config.dir, window)?;
                    Ok::<_, file::FileBusError>((writer, tail))
                })
                .await
                .map_err(|e| file::FileBusError::Task(e.to_string()))??;
                Ok((Publisher::File(opened.0), opened.1))
            }
            BusSettings::Kafka(config) => {
                let (mut publisher, tail) =
                    kafka::KafkaPublisher::open(config, metrics.kafka.clone(), window).await?;
                if !resume {
                    publisher.forget_cursor();
                }
                Ok((Publisher::Kafka(publisher), tail))
            }
        }
    }

    /// Publishes `events` in order. Returns when they are on the bus (files: written and synced
    /// as the policy says; Kafka: queued, waiting for room under `kafka.buffer_bytes` first).
    pub async fn publish(
        &mut self,
        events: &[Outgoing<'_>],
        shutdown: &CancellationToken,
    ) -> Result<Published, BusError> {
        match self {
            Publisher::File(writer) => Ok(tokio::task::block_in_place(|| writer.publish(events))?),
            Publisher::Kafka(publisher) => Ok(publisher.publish_all(events, shutdown).await?),
        }
    }

    /// Records that every event published so far is covered by `sse_id`: it becomes the resume
    /// point once they are all safe (files: at once, the tail is the cursor; Kafka: when the
    /// brokers have acknowledged them).
    pub fn mark(&mut self, sse_id: &str) {
        if let Publisher::Kafka(publisher) = self {
            publisher.mark(sse_id);
        }
    }

    /// Keeps an event that cannot be published, with its reason.
    pub async fn quarantine(
        &mut self,
        record: &QuarantineRecord<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        match self {
            Publisher::File(writer) => {
                Ok(tokio::task::block_in_place(|| writer.quarantine(record))?)
            }
            Publisher::Kafka(publisher) => Ok(publisher.quarantine(record, shutdown).await?),
        }
    }

    /// The most upstream bytes the ingester groups into one publication when a backlog has
    /// arrived: enough to make a backlog cheap (one sync or one round of acknowledgements per
    /// group), few enough events to hold in memory. A group never straddles event segments, so
    /// on files it is an eighth of a segment at most, which keeps segments near their size. On
    /// Kafka the ingester holds up to three groups while it waits for room under
    /// `kafka.buffer_bytes` (one being published, one checked and waiting, one being read), on
    /// top of them, so each is a twelfth of that cap at most: the ingester's memory stays near
    /// the cap the operator chose, even while a backlog arrives after a broker outage.
    pub fn group_bytes(&self) -> usize {
        match self {
            Publisher::File(writer) => writer.segment_bytes().div_ceil(8).min(GROUP_BYTES),
            Publisher::Kafka(publisher) => usize::try_from(publisher.buffer_bytes() / 12)
                .unwrap_or(usize::MAX)
                .min(GROUP_BYTES),
        }
    }

    /// How often [`Publisher::tick`] wants to run while nothing is published, if at all.
    pub fn tick_interval(&self) -> Option<Duration> {
        match self {
            Publisher::File(writer) => writer.sync_interval(),
            Publisher::Kafka(_) => Some(kafka::ACK_INTERVAL),
        }
    }

    /// Timed work: files sync what has waited long enough; Kafka takes acknowledgements.
    pub async fn tick(&mut self) -> Result<(), BusError> {
        match self {
            Publisher::File(writer) => Ok(tokio::task::block_in_place(|| writer.sync_if_due())?),
            Publisher::Kafka(publisher) => Ok(publisher.collect_acks()?),
        }
    }

    /// Waits until everything published so far is safe: at once on files (written and synced
    /// as `file.fsync` says before `publish` returned); on Kafka, until the brokers acknowledged
    /// it. False when `limit` passed first.
    pub async fn settle(&mut self, limit: Duration) -> Result<bool, BusError> {
        match self {
            Publisher::File(_) => Ok(true),
            Publisher::Kafka(publisher) => Ok(publisher.settle_all(limit).await?),
        }
    }

    /// Makes everything published durable before the writer goes away: files are synced;
    /// Kafka waits (a few seconds at most) for the brokers' acknowledgements.
    pub async fn close(&mut self) -> Result<(), BusError> {
        match self {
            Publisher::File(writer) => Ok(tokio::task::block_in_place(|| writer.sync())?),
            Publisher::Kafka(publisher) => Ok(publisher.flush(kafka::FLUSH_LIMIT).await?),
        }
    }
}

/// Where a reader keeps the records it cannot count: a file of its own, or the quarantine topic.
pub enum Quarantine {
    File(file::QuarantineFile),
    Kafka(kafka::QuarantineProducer),
}

impl Quarantine {
    /// The quarantine of a rebuild (`pleiades reaggregate`) on this bus.
    pub fn for_rebuild(settings: &BusSettings) -> Quarantine {
        match settings {
            BusSettings::File(config) => Quarantine::File(file::QuarantineFile::new(
                &config.dir,
                "reaggregate.jsonl",
                file::QuarantinePolicy::of(config),
            )),
            BusSettings::Kafka(config) => {
                Quarantine::Kafka(kafka::QuarantineProducer::new(config.clone()))
            }
        }
    }

    /// The quarantine of aggregator `worker` on this bus.
    pub fn for_aggregator(settings: &BusSettings, worker: usize) -> Quarantine {
        match settings {
            BusSettings::File(config) => Quarantine::File(file::QuarantineFile::new(
                &config.dir,
                &format!("aggregate-{worker}.jsonl"),
                file::QuarantinePolicy::of(config),
            )),
            BusSettings::Kafka(config) => {
                Quarantine::Kafka(kafka::QuarantineProducer::new(config.clone()))
            }
        }
    }

    /// Keeps one record.
    pub async fn write(&mut self, record: &QuarantineRecord<'_>) -> Result<(), BusError> {
        match self {
            Quarantine::File(file) => {
                tokio::task::block_in_place(|| file.write(record))?;
                Ok(())
            }
            Quarantine::Kafka(producer) => Ok(producer.write(record).await?),
        }
    }

    /// Makes the records kept so far durable as `file.fsync` says for the end of a batch: a
    /// reader calls it before the store moves past them. (Kafka records are acknowledged as
    /// they are written.)
    pub async fn sync(&mut self) -> Result<(), BusError> {
        match self {
            Quarantine::File(file) => Ok(tokio::task::block_in_place(|| file.sync_batch())?),
            Quarantine::Kafka(_) => Ok(()),
        }
    }
}

impl BusError {
    /// True when the bus is there but refuses data (a full or failing disk): the writer pauses
    /// and tries again instead of starting over.
    pub fn is_write_failure(&self) -> bool {
        matches!(self, BusError::File(e) if e.is_write_failure())
    }
}

/// Something wrong with the bus now, and what: set by the component that finds it (the ingester
/// while the disk refuses its writes, retention while uncounted segments keep the bus over its
/// limits), read by `/readyz`. Cheap to clone; every clone is the same state.
#[derive(Debug, Clone, Default)]
pub struct Trouble(Arc<Mutex<Option<String>>>);

impl Trouble {
    /// Records what is wrong; true when nothing was before (a change of state).
    pub fn set(&self, reason: String) -> bool {
        match self.0.lock() {
            Ok(mut state) => state.replace(reason).is_none(),
            Err(_) => false,
        }
    }

    /// Records that all is well; true when something was wrong before.
    pub fn clear(&self) -> bool {
        match self.0.lock() {
            Ok(mut state) => state.take().is_some(),
            Err(_) => false,
        }
    }

    /// What is wrong now, if anything.
    pub fn reason(&self) -> Option<String> {
        self.0.lock().ok().and_then(|state| state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;
    use crate::event::RejectReason;

    fn event(n: usize) -> String {
        format!(r#"{{"meta":{{"id":"m{n}","dt":"2024-01-01T00:00:00Z"}}}}"#)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_publisher_leaves_its_resume_point_and_window_in_the_bus() {
        let dir = tempfile::tempdir().unwrap();
        let settings = BusSettings::File(FileConfig {
            dir: dir.path().to_owned(),
            ..FileConfig::default()
        });
        let metrics = Metrics::new(1).unwrap();
        let shutdown = CancellationToken::new();
        let (mut publisher, tail) = Publisher::open(&settings, &metrics, 10, true)
            .await
            .unwrap();
        assert_eq!(tail, Tail::default());
        let data: Vec<String> = (0..5).map(event).collect();
        let ids: Vec<String> = (0..5).map(|n| format!("[{n}]")).collect();
        let outgoing: Vec<Outgoing<'_>> = (0..5)
            .map(|n| Outgoing {
                sse_id: &ids[n],
                data: &data[n],
                key: None,
                time_ms: 0,
            })
            .collect();
        let published = publisher.publish(&outgoing, &shutdown).await.unwrap();
        assert_eq!(published.events, 5);
        assert!(published.too_large.is_empty() && !published.interrupted);
        publisher.mark("[4]");
        publisher
            .quarantine(
                &QuarantineRecord::new(RejectReason::NotJson, "e", "[5]", "junk"),
                &shutdown,
            )
            .await
            .unwrap();
        publisher.tick().await.unwrap();
        publisher.close().await.unwrap();
        drop(publisher);

        let (_, tail) = Publisher::open(&settings, &metrics, 3, true).await.unwrap();
        assert_eq!(tail.last_id.as_deref(), Some("[4]"));
        assert_eq!(tail.recent_ids, vec!["m2", "m3", "m4"]);
        let quarantine =
            std::fs::read_to_string(dir.path().join("quarantine/quarantine.jsonl")).unwrap();
        assert!(
            quarantine.contains("\"reason\":\"not_json\""),
            "{quarantine}"
        );
        assert_eq!(metrics.file_bus.events.get(), 5);
    }
}
