//! Relay ids: positions on this deployment's bus. On event files an id is the segment and byte
//! offset of the next record, `[{"segment":12,"offset":34567}]`; on Kafka it is KafkaSSE's
//! assignment array with the next offset of every partition,
//! `[{"topic":"pleiades-events","partition":0,"offset":1234},…]`. Resuming from an id reads
//! exactly what follows it; an id whose entries carry a `timestamp` instead of a position (as
//! Wikimedia's do) resumes from that time.

use crate::bus::Source;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Everything before a position has been read (or, for a client, sent or filtered out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// The next record of the file bus: a segment and a byte offset in it.
    File { segment: u64, offset: u64 },
    /// The next offset of each partition of the topic.
    Kafka(BTreeMap<i32, i64>),
}

/// Where a request asks to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Only what arrives from now on.
    Live,
    /// Right after an id the relay gave out.
    At(Position),
    /// At the first event whose time is at or after this (epoch milliseconds).
    Since(i64),
}

/// An id or `since` the relay cannot resume from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} {reason}")]
pub struct BadStart {
    pub what: &'static str,
    pub value: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdEntry {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    partition: Option<i32>,
    #[serde(default)]
    segment: Option<u64>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    timestamp: Option<i64>,
    /// Wikimedia's ids name a datacenter's topic and may carry other fields.
    #[serde(flatten)]
    _other: BTreeMap<String, serde_json::Value>,
}

impl Position {
    /// True when the record at `[start, end)` of `source` lies before this position.
    pub fn covers(&self, source: Source, start: u64, end: u64) -> bool {
        match (self, source) {
            (Position::File { segment, offset }, Source::Segment(n)) => {
                n < *segment || (n == *segment && end <= *offset)
            }
            (Position::Kafka(next), Source::Partition(p)) => {
                next.get(&p).is_some_and(|&n| (start as i64) < n)
            }
            _ => false,
        }
    }

    /// Moves past the record at `[start, end)` of `source`.
    pub fn advance(&mut self, source: Source, start: u64, end: u64) {
        match (self, source) {
            (Position::File { segment, offset }, Source::Segment(n)) => {
                *segment = n;
                *offset = end;
            }
            (Position::Kafka(next), Source::Partition(p)) => {
                let n = next.entry(p).or_insert(0);
                *n = (*n).max(start as i64 + 1);
            }
            _ => {}
        }
    }

    /// True when nothing at or after `self` lies before `other`: a reader at `other` has read
    /// at least what one at `self` has.
    pub fn at_or_before(&self, other: &Position) -> bool {
        match (self, other) {
            (
                Position::File { segment, offset },
                Position::File {
                    segment: s,
                    offset: o,
                },
            ) => (segment, offset) <= (s, o),
            (Position::Kafka(mine), Position::Kafka(theirs)) => mine
                .iter()
                .all(|(p, n)| theirs.get(p).is_some_and(|t| t >= n)),
            _ => false,
        }
    }

    /// The SSE id of this position; `topic` names the Kafka topic.
    pub fn render(&self, topic: &str, out: &mut String) {
        use std::fmt::Write;
        match self {
            Position::File { segment, offset } => {
                let _ = write!(out, "[{{\"segment\":{segment},\"offset\":{offset}}}]");
            }
            Position::Kafka(next) => {
                let topic = serde_json::Value::from(topic).to_string();
                out.push('[');
                for (n, (partition, offset)) in next.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    let _ = write!(
                        out,
                        "{{\"topic\":{topic},\"partition\":{partition},\"offset\":{offset}}}"
                    );
                }
                out.push(']');
            }
        }
    }
}

/// Reads a `Last-Event-ID` for a bus of the given kind (`kafka` true for Kafka).
pub fn parse_id(id: &str, kafka: bool, topic: &str) -> Result<Start, BadStart> {
    let bad = |reason: String| BadStart {
        what: "Last-Event-ID",
        value: id.chars().take(200).collect(),
        reason,
    };
    let entries: Vec<IdEntry> = serde_json::from_str(id).map_err(|e| {
        bad(format!(
            "is not a relay id (a JSON array of positions): {e}"
        ))
    })?;
    if entries.is_empty() {
        return Err(bad("names no position".into()));
    }
    let positioned = entries.iter().any(|e| e.offset.is_some());
    if !positioned {
        // Timestamps only (a Wikimedia id, or KafkaSSE's timestamp assignment): resume by time.
        return entries
            .iter()
            .filter_map(|e| e.timestamp)
            .max()
            .map(Start::Since)
            .ok_or_else(|| bad("has neither offsets nor timestamps".into()));
    }
    if kafka {
        let mut next = BTreeMap::new();
        for entry in &entries {
            match (&entry.topic, entry.partition, entry.offset) {
                (Some(t), Some(p), Some(o)) if t == topic && o >= 0 => {
                    next.insert(p, o);
                }
                (Some(t), _, _) if t != topic => {
                    return Err(bad(format!("names topic {t:?}, not this bus's {topic:?}")))
                }
                _ => {
                    return Err(bad(
                        "needs topic, partition and offset in every entry".into()
                    ))
                }
            }
        }
        Ok(Start::At(Position::Kafka(next)))
    } else {
        match entries.as_slice() {
            [IdEntry {
                segment: Some(segment),
                offset: Some(offset),
                ..
            }] if *offset >= 0 => Ok(Start::At(Position::File {
                segment: *segment,
                offset: *offset as u64,
            })),
            _ => Err(bad(
                "is not a position on event files ([{\"segment\":N,\"offset\":N}])".into(),
            )),
        }
    }
}

/// Reads `?since=`: an RFC 3339 time or epoch milliseconds.
pub fn parse_since(since: &str) -> Result<Start, BadStart> {
    crate::config::parse_since(since)
        .map(Start::Since)
        .ok_or_else(|| BadStart {
            what: "since",
            value: since.chars().take(200).collect(),
            reason: "is neither an ISO 8601 time nor epoch milliseconds".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(p: &Position) -> String {
        let mut out = String::new();
        p.render("pleiades-events", &mut out);
        out
    }

    #[test]
    fn ids_round_trip_on_both_buses() {
        let file = Position::File {
            segment: 12,
            offset: 34567,
        };
        assert_eq!(render(&file), r#"[{"segment":12,"offset":34567}]"#);
        assert_eq!(
            parse_id(&render(&file), false, "t"),
            Ok(Start::At(file.clone()))
        );
        let kafka = Position::Kafka(BTreeMap::from([(0, 5), (1, 9)]));
        let id = render(&kafka);
        assert_eq!(
            id,
            r#"[{"topic":"pleiades-events","partition":0,"offset":5},{"topic":"pleiades-events","partition":1,"offset":9}]"#
        );
        assert_eq!(parse_id(&id, true, "pleiades-events"), Ok(Start::At(kafka)));
        assert!(parse_id(&id, true, "other").is_err());
        assert!(parse_id(&render(&file), true, "pleiades-events").is_err());
        assert!(parse_id("nope", false, "t").is_err());
        assert!(parse_id("[]", false, "t").is_err());
    }

    #[test]
    fn wikimedia_ids_resume_by_time() {
        let id = r#"[{"topic":"eqiad.mediawiki.recentchange","partition":0,"timestamp":1781970588989},{"topic":"codfw.mediawiki.recentchange","partition":0,"offset":-1}]"#;
        // An offset of -1 is "latest" in KafkaSSE; with a timestamp beside it, time decides.
        let only_time =
            r#"[{"topic":"eqiad.mediawiki.recentchange","partition":0,"timestamp":1781970588989}]"#;
        assert_eq!(
            parse_id(only_time, false, "t"),
            Ok(Start::Since(1_781_970_588_989))
        );
        assert!(parse_id(id, false, "t").is_err());
        assert_eq!(parse_since("0"), Ok(Start::Since(0)));
        assert_eq!(
            parse_since("2022-12-11T04:27:02Z"),
            Ok(Start::Since(1_670_732_822_000))
        );
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn positions_cover_what_lies_before_them() {
        let at = Position::File {
            segment: 3,
            offset: 100,
        };
        assert!(at.covers(Source::Segment(2), 5000, 6000));
        assert!(at.covers(Source::Segment(3), 50, 100));
        assert!(!at.covers(Source::Segment(3), 100, 180));
        assert!(!at.covers(Source::Segment(4), 0, 10));
        let mut kafka = Position::Kafka(BTreeMap::from([(0, 10)]));
        assert!(kafka.covers(Source::Partition(0), 9, 10));
        assert!(!kafka.covers(Source::Partition(0), 10, 11));
        assert!(
            !kafka.covers(Source::Partition(1), 0, 1),
            "an unknown partition is unread"
        );
        kafka.advance(Source::Partition(1), 4, 5);
        assert_eq!(kafka, Position::Kafka(BTreeMap::from([(0, 10), (1, 5)])));
        let front = Position::Kafka(BTreeMap::from([(0, 8), (1, 5)]));
        assert!(front.at_or_before(&kafka));
        assert!(!kafka.at_or_before(&Position::Kafka(BTreeMap::from([(0, 10)]))));
    }
}
