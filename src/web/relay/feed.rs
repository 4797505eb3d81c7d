//! Reading the bus from a position, through `bus::file::BusReader` or `bus::kafka::TopicReader`:
//! for the relay's one reader, and for a client that resumes from further back than the relay
//! keeps in memory. Each record becomes an [`Entry`]: its place on the bus, its filter fields
//! and its event-stream frame, rendered once.

use super::filter::Fields;
use super::position::Position;
use crate::bus::file::{segments, BusReader, FileBusError};
use crate::bus::kafka::{KafkaBusError, TopicReader};
use crate::bus::{BusError, Record, Source};
use crate::config::BusSettings;
use futures_util::FutureExt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes of event files read at a time.
const READ_BYTES: usize = 256 * 1024;

/// One event of the bus, ready to send.
#[derive(Debug)]
pub struct Entry {
    pub source: Source,
    pub start: u64,
    pub end: u64,
    /// The reader's position right after this record: the id its frame carries.
    pub after: Position,
    pub fields: Fields,
    /// `event: message`, `id:` and `data:` lines and the blank line that ends the event.
    pub frame: Box<str>,
    /// Where the `\ndata:` part of `frame` begins, for a client whose id differs.
    pub data_at: usize,
}

/// The start of every frame, before the id.
pub const FRAME_HEAD: &str = "event: message\nid: ";

impl Entry {
    fn new(record: &Record<'_>, data: &str, after: Position, topic: &str) -> Entry {
        let mut frame = String::with_capacity(data.len() + 128);
        frame.push_str(FRAME_HEAD);
        after.render(topic, &mut frame);
        let data_at = frame.len();
        // Data lines as received; the client joins them with "\n" again.
        for line in data.split(['\n', '\r']) {
            frame.push_str("\ndata: ");
            frame.push_str(line);
        }
        frame.push_str("\n\n");
        Entry {
            source: record.source,
            start: record.start,
            end: record.end,
            after,
            fields: Fields::of(data),
            frame: frame.into(),
            data_at,
        }
    }
}

/// A reader of the bus that knows its position.
pub enum Feed {
    File {
        dir: PathBuf,
        /// Taken while a blocking read runs.
        reader: Option<BusReader>,
        position: Position,
    },
    Kafka {
        reader: TopicReader,
        topic: String,
        position: Position,
    },
}

fn task_failed(e: tokio::task::JoinError) -> BusError {
    BusError::File(FileBusError::Task(e.to_string()))
}

fn kafka_task_failed(brokers: &str, e: tokio::task::JoinError) -> BusError {
    BusError::Kafka(KafkaBusError::Broker {
        brokers: brokers.to_owned(),
        message: format!("a blocking task failed: {e}"),
    })
}

impl Feed {
    /// A reader of `bus` from `from`. On Kafka, partitions `from` does not name are read from
    /// their first offset.
    pub async fn open(bus: &BusSettings, from: &Position) -> Result<Feed, BusError> {
        match (bus, from) {
            (BusSettings::File(config), Position::File { segment, offset }) => {
                let dir = config.dir.clone();
                let (segment, offset) = (*segment, *offset);
                let opened = {
                    let dir = dir.clone();
                    tokio::task::spawn_blocking(move || BusReader::open(&dir, segment, offset))
                        .await
                        .map_err(task_failed)??
                };
                Ok(Feed::File {
                    dir,
                    reader: Some(opened),
                    position: from.clone(),
                })
            }
            (BusSettings::Kafka(config), Position::Kafka(next)) => {
                let owned = config.clone();
                let partitions =
                    tokio::task::spawn_blocking(move || TopicReader::partitions(&owned))
                        .await
                        .map_err(|e| kafka_task_failed(&config.brokers, e))??;
                let mut next = next.clone();
                for (partition, low, _) in partitions {
                    let at = next.entry(partition).or_insert(low);
                    *at = (*at).max(low);
                }
                let starts: Vec<(i32, i64)> = next.iter().map(|(p, o)| (*p, *o)).collect();
                let reader = TopicReader::open(config, &starts)?;
                Ok(Feed::Kafka {
                    reader,
                    topic: config.topic.clone(),
                    position: Position::Kafka(next),
                })
            }
            _ => Err(BusError::File(FileBusError::Task(
                "a position of another bus kind".into(),
            ))),
        }
    }

    /// Where the next record will come from: everything before it has been read.
    pub fn position(&self) -> &Position {
        match self {
            Feed::File { position, .. } | Feed::Kafka { position, .. } => position,
        }
    }

    /// Moves past the records that arrived, at most about `max`, as [`Feed::next`] would, but
    /// without building their entries: for a reader nobody is listening to. Returns how many
    /// records it passed over; 0 when none came within `wait`.
    pub async fn pass_over(&mut self, max: usize, wait: Duration) -> Result<usize, BusError> {
        match self {
            Feed::File {
                dir,
                reader,
                position,
            } => {
                let (passed, reached) = read_blocking(dir, reader, pass_over_file).await?;
                *position = reached;
                if passed == 0 {
                    tokio::time::sleep(wait).await;
                }
                Ok(passed)
            }
            Feed::Kafka {
                reader, position, ..
            } => {
                let first = match tokio::time::timeout(wait, reader.recv()).await {
                    Err(_) => return Ok(0),
                    Ok(message) => message?,
                };
                let mut advance = |message: crate::bus::kafka::Message<'_>| {
                    let record = message.record();
                    position.advance(record.source, record.start, record.end);
                };
                advance(first);
                let mut passed = 1;
                while passed < max {
                    match reader.recv().now_or_never() {
                        Some(message) => advance(message?),
                        None => break,
                    }
                    passed += 1;
                }
                Ok(passed)
            }
        }
    }

    /// The records that arrived, at most about `max`; empty when none came within `wait`.
    pub async fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<Entry>, BusError> {
        match self {
            Feed::File {
                dir,
                reader,
                position,
            } => {
                let (entries, reached) = read_blocking(dir, reader, read_file).await?;
                *position = reached;
                if entries.is_empty() {
                    tokio::time::sleep(wait).await;
                }
                Ok(entries)
            }
            Feed::Kafka {
                reader,
                topic,
                position,
            } => {
                let mut entries = Vec::new();
                let first = match tokio::time::timeout(wait, reader.recv()).await {
                    Err(_) => return Ok(entries),
                    Ok(message) => message?,
                };
                let take = |message: crate::bus::kafka::Message<'_>,
                            position: &mut Position,
                            entries: &mut Vec<Entry>| {
                    let record = message.record();
                    position.advance(record.source, record.start, record.end);
                    if let Ok(data) = record.data {
                        entries.push(Entry::new(&record, data, position.clone(), topic));
                    }
                };
                take(first, position, &mut entries);
                while entries.len() < max {
                    match reader.recv().now_or_never() {
                        Some(message) => take(message?, position, &mut entries),
                        None => break,
                    }
                }
                Ok(entries)
            }
        }
    }
}

/// Runs `read` on the event files' reader on a blocking thread, and puts the reader back.
async fn read_blocking<T: Send + 'static>(
    dir: &Path,
    reader: &mut Option<BusReader>,
    read: fn(&mut BusReader) -> Result<T, BusError>,
) -> Result<T, BusError> {
    let Some(mut taken) = reader.take() else {
        return Err(BusError::File(FileBusError::Task(format!(
            "the reader of {} was lost",
            dir.display()
        ))));
    };
    let (taken, result) = tokio::task::spawn_blocking(move || {
        let result = read(&mut taken);
        (taken, result)
    })
    .await
    .map_err(task_failed)?;
    *reader = Some(taken);
    result
}

/// One read of event files that builds no entries: the records passed over, and the position
/// after them.
fn pass_over_file(reader: &mut BusReader) -> Result<(usize, Position), BusError> {
    let passed = reader.read(READ_BYTES)?.lines_left();
    let (segment, offset) = reader.position();
    Ok((passed, Position::File { segment, offset }))
}

/// One read of event files: the entries of the complete lines available, and the position
/// after them (records that are not events are passed over).
fn read_file(reader: &mut BusReader) -> Result<(Vec<Entry>, Position), BusError> {
    let mut entries = Vec::new();
    for record in reader.read(READ_BYTES)? {
        if let Ok(data) = record.data {
            let Source::Segment(segment) = record.source else {
                continue;
            };
            let after = Position::File {
                segment,
                offset: record.end,
            };
            entries.push(Entry::new(&record, data, after, ""));
        }
    }
    let (segment, offset) = reader.position();
    Ok((entries, Position::File { segment, offset }))
}

/// Where the relay's reader starts: at the newest segment's first record (what it holds is
/// kept as history), or `history` messages back on each partition.
pub async fn history_start(bus: &BusSettings, history: usize) -> Result<Position, BusError> {
    match bus {
        BusSettings::File(config) => {
            let dir = config.dir.clone();
            let newest = tokio::task::spawn_blocking(move || segments(&dir))
                .await
                .map_err(task_failed)??
                .last()
                .map_or(0, |(seq, _)| *seq);
            Ok(Position::File {
                segment: newest,
                offset: 0,
            })
        }
        BusSettings::Kafka(config) => {
            let owned = config.clone();
            let partitions = tokio::task::spawn_blocking(move || TopicReader::partitions(&owned))
                .await
                .map_err(|e| kafka_task_failed(&config.brokers, e))??;
            if partitions.is_empty() {
                // Not created yet (the ingester creates it): the reader's supervisor tries
                // again, rather than reading an assignment of nothing forever.
                return Err(BusError::Kafka(KafkaBusError::Broker {
                    brokers: config.brokers.clone(),
                    message: format!("topic {} has no partitions yet", config.topic),
                }));
            }
            let each = (history / partitions.len().max(1)) as i64;
            Ok(Position::Kafka(
                partitions
                    .into_iter()
                    .map(|(p, low, high)| (p, low.max(high - each)))
                    .collect::<BTreeMap<_, _>>(),
            ))
        }
    }
}

/// The position of the first event at or after `time_ms`: on event files by `meta.dt` (the
/// segment found by each one's first event, then the first event in bus order at or after the
/// time), on Kafka by the time each message reached the topic.
pub async fn position_at(bus: &BusSettings, time_ms: i64) -> Result<Position, BusError> {
    match bus {
        BusSettings::File(config) => {
            let dir = config.dir.clone();
            tokio::task::spawn_blocking(move || file_position_at(&dir, time_ms))
                .await
                .map_err(task_failed)?
        }
        BusSettings::Kafka(config) => {
            let owned = config.clone();
            let offsets =
                tokio::task::spawn_blocking(move || TopicReader::offsets_for_time(&owned, time_ms))
                    .await
                    .map_err(|e| kafka_task_failed(&config.brokers, e))??;
            Ok(Position::Kafka(offsets.into_iter().collect()))
        }
    }
}

fn event_time(record: &Record<'_>) -> Option<i64> {
    record
        .data
        .as_ref()
        .ok()
        .and_then(|data| crate::event::inspect(data).ok())
        .map(|head| head.time_ms)
}

/// The time of a segment's first event, if it has one.
fn first_time(dir: &Path, segment: u64) -> Result<Option<i64>, BusError> {
    let mut reader = BusReader::open(dir, segment, 0)?;
    if reader.position().0 != segment {
        return Ok(None);
    }
    let records = reader.read(64 * 1024)?;
    Ok(records.filter_map(|r| event_time(&r)).next())
}

fn file_position_at(dir: &Path, time_ms: i64) -> Result<Position, BusError> {
    let all = segments(dir)?;
    // The last segment that starts before the time: earlier ones end before it (give or take
    // the disorder of event times, which a scan of that segment absorbs).
    let (mut low, mut high) = (0usize, all.len());
    while low < high {
        let mid = (low + high) / 2;
        match first_time(dir, all[mid].0)? {
            Some(t) if t < time_ms => low = mid + 1,
            _ => high = mid,
        }
    }
    let from = all.get(low.saturating_sub(1)).map_or(0, |(seq, _)| *seq);
    let mut reader = BusReader::open(dir, from, 0)?;
    loop {
        let records: Vec<(u64, u64, Option<i64>)> = reader
            .read(READ_BYTES)?
            .map(|r| {
                let segment = match r.source {
                    Source::Segment(s) => s,
                    Source::Partition(_) => 0,
                };
                (segment, r.start, event_time(&r))
            })
            .collect();
        if records.is_empty() {
            // The end of what is written: everything from here on is later.
            let (segment, offset) = reader.position();
            return Ok(Position::File { segment, offset });
        }
        if let Some((segment, start, _)) = records
            .iter()
            .find(|(_, _, t)| t.is_some_and(|t| t >= time_ms))
        {
            return Ok(Position::File {
                segment: *segment,
                offset: *start,
            });
        }
    }
}
