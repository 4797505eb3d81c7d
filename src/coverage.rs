//! Coverage: which upstream offsets reached the counters, and each day's verdict on them.
//!
//! Upstream keeps the events of a topic-partition at consecutive offsets, so the offsets the
//! counters hold, as spans, say exactly what never arrived: a hole between two spans of one
//! topic-partition is that many missed events, in the time between the events on either side.
//! Everything here is pure: the tally fills [`DayCoverage`], the stores keep it, and
//! [`verdicts`] judges days from what the stores read back.

use crate::event::epoch_day;
use serde::Serialize;
use std::collections::BTreeMap;

/// Consecutive offsets `first..=last` of one topic-partition, with the event times of the
/// events at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub first: u64,
    pub last: u64,
    pub first_ms: i64,
    pub last_ms: i64,
}

impl Span {
    /// The span of one event.
    pub fn one(offset: u64, time_ms: i64) -> Span {
        Span {
            first: offset,
            last: offset,
            first_ms: time_ms,
            last_ms: time_ms,
        }
    }

    /// The stored form: four little-endian 64-bit integers.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[0..8].copy_from_slice(&self.first.to_le_bytes());
        out[8..16].copy_from_slice(&self.last.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_ms.to_le_bytes());
        out[24..32].copy_from_slice(&self.last_ms.to_le_bytes());
        out
    }

    /// Reads spans written by [`Span::to_bytes`]; a torn tail is ignored.
    pub fn from_bytes(bytes: &[u8]) -> Vec<Span> {
        bytes
            .chunks_exact(32)
            .map(|c| {
                let word = |i: usize| {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&c[i * 8..i * 8 + 8]);
                    w
                };
                Span {
                    first: u64::from_le_bytes(word(0)),
                    last: u64::from_le_bytes(word(1)),
                    first_ms: i64::from_le_bytes(word(2)),
                    last_ms: i64::from_le_bytes(word(3)),
                }
            })
            .collect()
    }
}

/// Sorts `spans` and merges those that overlap or touch, so that what is left are disjoint
/// spans with holes between them. The end times follow the offsets: a merged span's
/// `first_ms` is that of its lowest offset, its `last_ms` that of its highest.
pub fn coalesce(spans: &mut Vec<Span>) {
    if spans.len() < 2 {
        return;
    }
    spans.sort_unstable_by_key(|s| (s.first, s.last));
    let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
    for span in spans.drain(..) {
        match merged.last_mut() {
            Some(last) if span.first <= last.last.saturating_add(1) => {
                if span.last > last.last {
                    last.last = span.last;
                    last.last_ms = span.last_ms;
                }
            }
            _ => merged.push(span),
        }
    }
    *spans = merged;
}

/// A topic-partition of upstream's Kafka.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    /// The name the stores key it by: `<partition>|<topic>` (topics never hold `|`).
    pub fn key(&self) -> String {
        format!("{}|{}", self.partition, self.topic)
    }

    pub fn parse(key: &str) -> Option<TopicPartition> {
        let (partition, topic) = key.split_once('|')?;
        Some(TopicPartition {
            topic: topic.to_owned(),
            partition: partition.parse().ok()?,
        })
    }
}

/// What one day holds of coverage: the spans of each topic-partition its events came from, and
/// how many of its events carried no position.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DayCoverage {
    pub spans: BTreeMap<TopicPartition, Vec<Span>>,
    pub unpositioned: u64,
}

impl DayCoverage {
    /// Records that the event at `offset` of `topic`/`partition` arrived. Events mostly come in
    /// offset order, so this extends the last span; [`DayCoverage::coalesce`] tidies the rest.
    pub fn add(&mut self, topic: &str, partition: i32, offset: u64, time_ms: i64) {
        let spans = match self
            .spans
            .iter_mut()
            .find(|(tp, _)| tp.partition == partition && tp.topic == topic)
        {
            Some((_, spans)) => spans,
            None => self
                .spans
                .entry(TopicPartition {
                    topic: topic.to_owned(),
                    partition,
                })
                .or_default(),
        };
        match spans.last_mut() {
            Some(last) if last.last.checked_add(1) == Some(offset) => {
                last.last = offset;
                last.last_ms = time_ms;
            }
            Some(last) if (last.first..=last.last).contains(&offset) => {}
            _ => spans.push(Span::one(offset, time_ms)),
        }
    }

    /// Merges `other` into this (the union of the offsets; unpositioned events add).
    pub fn merge(&mut self, other: &DayCoverage) {
        for (tp, spans) in &other.spans {
            let mine = self.spans.entry(tp.clone()).or_default();
            mine.extend_from_slice(spans);
            coalesce(mine);
        }
        self.unpositioned = self.unpositioned.saturating_add(other.unpositioned);
    }

    /// Coalesces every topic-partition's spans.
    pub fn coalesce(&mut self) {
        for spans in self.spans.values_mut() {
            coalesce(spans);
        }
    }

    pub fn is_positioned(&self) -> bool {
        self.spans.values().any(|s| !s.is_empty())
    }
}

/// A day's verdict (`GET /api/coverage`, and `coverage` in `GET /api/stats/{day}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every offset between the day's first and last positioned events arrived, and no hole
    /// touches the day.
    Complete,
    /// At least one hole touches the day.
    Partial,
    /// Nothing to judge by: the day has no positioned events and no hole touches it.
    Unknown,
}

/// Offsets of one topic-partition that never arrived, and the time they fall in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub topic: String,
    pub partition: i32,
    /// How many events are missing.
    pub missed: u64,
    pub first_offset: u64,
    pub last_offset: u64,
    /// The event times of the events delivered on either side of the hole (RFC 3339): the
    /// missing events were sent upstream between them.
    pub from: String,
    pub to: String,
    #[serde(skip)]
    pub from_ms: i64,
    #[serde(skip)]
    pub to_ms: i64,
}

/// A datacentre switch: events stop coming from one topic and start coming from another. Its
/// offsets start afresh, so it is recorded, never counted as missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Switch {
    pub from: String,
    pub to: String,
    /// The event time of the first event from the new topic (RFC 3339).
    pub at: String,
    #[serde(skip)]
    pub at_ms: i64,
}

/// One day's coverage, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub status: Status,
    /// The sum of the `missed` of the day's gaps. A gap over midnight is listed, whole, on
    /// every day its time range touches.
    pub missed: u64,
    /// The first [`GAPS_LISTED`] gaps by time.
    pub gaps: Vec<Gap>,
    /// Gaps left out of `gaps` (their events are in `missed`): a stream whose offsets are not
    /// a stream's, such as a sample of events, has a hole between every two events.
    #[serde(skip_serializing_if = "is_zero")]
    pub gaps_not_listed: usize,
    pub switches: Vec<Switch>,
    /// Events of the day that carried no upstream position, which coverage cannot judge.
    pub unpositioned: u64,
}

/// The most gaps a verdict lists.
pub const GAPS_LISTED: usize = 100;

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// An epoch time in milliseconds as RFC 3339 with milliseconds, UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// The verdicts of the days `from..=to`, judged on `window`: the stored coverage of those days
/// and of the days with data on either side, so that a hole whose two sides fall on other days
/// still marks the days between them.
///
/// The spans of all the window's days are joined per topic-partition before holes are looked
/// for, never one day at a time: event times are not in offset order, so around midnight one
/// day's offsets interleave with the next day's and each day alone would show false holes.
pub fn verdicts(window: &BTreeMap<i64, DayCoverage>, from: i64, to: i64) -> Vec<(i64, Verdict)> {
    let mut union: BTreeMap<&TopicPartition, Vec<Span>> = BTreeMap::new();
    for day in window.values() {
        for (tp, spans) in &day.spans {
            union.entry(tp).or_default().extend_from_slice(spans);
        }
    }
    let mut gaps: Vec<Gap> = Vec::new();
    // Per topic, the event times of its first and last events in the window.
    let mut topics: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (tp, spans) in &mut union {
        coalesce(spans);
        for pair in spans.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            let (from_ms, to_ms) = (
                before.last_ms.min(after.first_ms),
                before.last_ms.max(after.first_ms),
            );
            gaps.push(Gap {
                topic: tp.topic.clone(),
                partition: tp.partition,
                missed: after.first - before.last - 1,
                first_offset: before.last + 1,
                last_offset: after.first - 1,
                from: rfc3339(from_ms),
                to: rfc3339(to_ms),
                from_ms,
                to_ms,
            });
        }
        for span in spans.iter() {
            let seen = topics
                .entry(tp.topic.as_str())
                .or_insert((span.first_ms, span.last_ms));
            seen.0 = seen.0.min(span.first_ms.min(span.last_ms));
            seen.1 = seen.1.max(span.last_ms.max(span.first_ms));
        }
    }
    gaps.sort_by_key(|g| (g.from_ms, g.topic.clone(), g.partition));
    let switches = switches(&topics);
    let mut out = Vec::new();
    // An inclusive range ends at `to` even when `to` is the largest day there is.
    for day in from..=to {
        let stored = window.get(&day);
        let mut touching: Vec<&Gap> = gaps
            .iter()
            .filter(|g| epoch_day(g.from_ms) <= day && day <= epoch_day(g.to_ms))
            .collect();
        let missed = touching.iter().map(|g| g.missed).sum();
        let gaps_not_listed = touching.len().saturating_sub(GAPS_LISTED);
        touching.truncate(GAPS_LISTED);
        let status = if !touching.is_empty() {
            Status::Partial
        } else if stored.is_some_and(DayCoverage::is_positioned) {
            Status::Complete
        } else {
            Status::Unknown
        };
        out.push((
            day,
            Verdict {
                status,
                missed,
                gaps: touching.into_iter().cloned().collect(),
                gaps_not_listed,
                switches: switches
                    .iter()
                    .filter(|s| epoch_day(s.at_ms) == day)
                    .cloned()
                    .collect(),
                unpositioned: stored.map_or(0, |d| d.unpositioned),
            },
        ));
    }
    out
}

/// The switches among `topics` (each with its first and last event time): a topic whose first
/// event comes after another's last one took over from the latest such.
fn switches(topics: &BTreeMap<&str, (i64, i64)>) -> Vec<Switch> {
    let mut found = Vec::new();
    for (to, (first, _)) in topics {
        let from = topics
            .iter()
            .filter(|(other, (_, last))| other != &to && *last <= *first)
            .max_by_key(|(_, (_, last))| *last);
        if let Some((from, _)) = from {
            found.push(Switch {
                from: (*from).to_owned(),
                to: (*to).to_owned(),
                at: rfc3339(*first),
                at_ms: *first,
            });
        }
    }
    found.sort_by_key(|s| s.at_ms);
    found
}

/// The first day of a window for the days `from..=to`: the last day with data before `from`.
pub fn window_start(days_with_data: &[i64], from: i64) -> i64 {
    days_with_data
        .iter()
        .rev()
        .find(|d| **d < from)
        .copied()
        .unwrap_or(from)
}

/// The last day of a window for the days `from..=to`: the first day with data after `to`.
pub fn window_end(days_with_data: &[i64], to: i64) -> i64 {
    days_with_data
        .iter()
        .find(|d| **d > to)
        .copied()
        .unwrap_or(to)
}

/// The newest offset seen of each topic-partition, for the ingester to notice holes as they
/// happen (`pleiades_upstream_missed_events_total`); the stores' spans remain the record.
#[derive(Debug, Default)]
pub struct Watermarks {
    newest: BTreeMap<TopicPartition, u64>,
}

/// What one more offset says about the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The next offset, or one already seen (a re-delivered overlap).
    InOrder,
    /// This many offsets were skipped just before it.
    Missed(u64),
    /// The first offset of a topic-partition; `switched_from` names another topic seen
    /// before, if there is one (a datacentre switch; the log line says which it came from).
    First { switched_from: Option<String> },
}

impl Watermarks {
    /// Starts from the newest offsets the bus already holds.
    pub fn from_newest(newest: &BTreeMap<(String, i32), u64>) -> Watermarks {
        Watermarks {
            newest: newest
                .iter()
                .map(|((topic, partition), offset)| {
                    let tp = TopicPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    };
                    (tp, *offset)
                })
                .collect(),
        }
    }

    pub fn observe(&mut self, topic: &str, partition: i32, offset: u64) -> Seen {
        if let Some((_, newest)) = self
            .newest
            .iter_mut()
            .find(|(tp, _)| tp.partition == partition && tp.topic == topic)
        {
            let skipped = offset.saturating_sub(newest.saturating_add(1));
            *newest = (*newest).max(offset);
            return match skipped {
                0 => Seen::InOrder,
                n => Seen::Missed(n),
            };
        }
        let switched_from = self
            .newest
            .keys()
            .find(|tp| tp.topic != topic)
            .map(|tp| tp.topic.clone());
        self.newest.insert(
            TopicPartition {
                topic: topic.to_owned(),
                partition,
            },
            offset,
        );
        Seen::First { switched_from }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::DAY_MS as DAY;

    const T: &str = "eqiad.mediawiki.recentchange";

    fn day_of(events: &[(u64, i64)]) -> DayCoverage {
        let mut day = DayCoverage::default();
        for (offset, ms) in events {
            day.add(T, 0, *offset, *ms);
        }
        day.coalesce();
        day
    }

    #[test]
    fn coalesces_overlapping_and_touching_spans() {
        let mut spans = vec![
            Span {
                first: 10,
                last: 12,
                first_ms: 10,
                last_ms: 12,
            },
            Span {
                first: 1,
                last: 4,
                first_ms: 1,
                last_ms: 4,
            },
            Span {
                first: 5,
                last: 6,
                first_ms: 5,
                last_ms: 6,
            },
            Span {
                first: 3,
                last: 4,
                first_ms: 3,
                last_ms: 4,
            },
        ];
        coalesce(&mut spans);
        assert_eq!(
            spans,
            vec![
                Span {
                    first: 1,
                    last: 6,
                    first_ms: 1,
                    last_ms: 6
                },
                Span {
                    first: 10,
                    last: 12,
                    first_ms: 10,
                    last_ms: 12
                },
            ]
        );
        let bytes: Vec<u8> = spans.iter().flat_map(|s| s.to_bytes()).collect();
        assert_eq!(Span::from_bytes(&bytes), spans);
    }

    #[test]
    fn judges_holes_on_every_day_they_touch_and_not_at_midnight_interleaving() {
        let d = 20_000;
        let at = |day: i64, ms: i64| day * DAY + ms;
        // Day d: offsets 0..=9, then a hole of 3 (10..=12), then 13..=19, the last event just
        // before midnight. Offset 20 has a time on day d + 1, offset 21 one on day d again:
        // interleaved, not a hole. Then a hole of 5 (31..=35) over the midnight between days
        // d + 1 and d + 2.
        let mut first: Vec<(u64, i64)> = (0..10).map(|o| (o, at(d, 1000 + o as i64))).collect();
        first.extend((13..20).map(|o| (o, at(d, 5000 + o as i64))));
        first.push((21, at(d, DAY - 1)));
        let mut second: Vec<(u64, i64)> = vec![(20, at(d + 1, 1))];
        second.extend((22..30).map(|o| (o, at(d + 1, 100 + o as i64))));
        second.push((30, at(d + 1, DAY - 10)));
        let third: Vec<(u64, i64)> = (36..40).map(|o| (o, at(d + 2, 10 + o as i64))).collect();
        let window: BTreeMap<i64, DayCoverage> = [
            (d, day_of(&first)),
            (d + 1, day_of(&second)),
            (d + 2, day_of(&third)),
        ]
        .into();
        let verdicts = verdicts(&window, d - 1, d + 3);
        type Seen = (i64, Status, u64, Vec<(u64, u64)>);
        let view: Vec<Seen> = verdicts
            .iter()
            .map(|(day, v)| {
                let gaps = v
                    .gaps
                    .iter()
                    .map(|g| (g.first_offset, g.last_offset))
                    .collect();
                (*day, v.status, v.missed, gaps)
            })
            .collect();
        assert_eq!(
            view,
            vec![
                (d - 1, Status::Unknown, 0, vec![]),
                (d, Status::Partial, 3, vec![(10, 12)]),
                (d + 1, Status::Partial, 5, vec![(31, 35)]),
                (d + 2, Status::Partial, 5, vec![(31, 35)]),
                (d + 3, Status::Unknown, 0, vec![]),
            ]
        );
        let gap = &verdicts[1].1.gaps[0];
        assert_eq!((gap.from_ms, gap.to_ms), (at(d, 1009), at(d, 5013)));
        assert_eq!(gap.from, "2024-10-04T00:00:01.009Z");
    }

    #[test]
    fn a_new_topic_is_a_switch_not_a_hole() {
        let d = 20_000;
        let mut day = day_of(&[(100, d * DAY + 1), (101, d * DAY + 2)]);
        day.add("codfw.mediawiki.recentchange", 0, 7, d * DAY + 3);
        day.add("codfw.mediawiki.recentchange", 0, 8, d * DAY + 4);
        let window: BTreeMap<i64, DayCoverage> = [(d, day)].into();
        let verdicts = verdicts(&window, d, d);
        let verdict = &verdicts[0].1;
        assert_eq!((verdict.status, verdict.missed), (Status::Complete, 0));
        assert_eq!(verdict.switches.len(), 1);
        assert_eq!(verdict.switches[0].from, T);
        assert_eq!(verdict.switches[0].to, "codfw.mediawiki.recentchange");
        assert_eq!(verdict.switches[0].at_ms, d * DAY + 3);
    }

    #[test]
    fn watermarks_notice_holes_and_switches() {
        let mut marks = Watermarks::default();
        assert_eq!(
            marks.observe(T, 0, 10),
            Seen::First {
                switched_from: None
            }
        );
        assert_eq!(marks.observe(T, 0, 11), Seen::InOrder);
        assert_eq!(marks.observe(T, 0, 15), Seen::Missed(3));
        assert_eq!(marks.observe(T, 0, 12), Seen::InOrder);
        assert_eq!(marks.observe(T, 0, 16), Seen::InOrder);
        assert_eq!(
            marks.observe("codfw.mediawiki.recentchange", 0, 3),
            Seen::First {
                switched_from: Some(T.to_owned())
            }
        );
    }

    #[test]
    fn a_sample_of_events_lists_its_first_gaps_and_counts_all() {
        let d = 20_000;
        // Every other offset: 150 holes of one event each.
        let events: Vec<(u64, i64)> = (0..151).map(|n| (2 * n, d * DAY + n as i64)).collect();
        let window: BTreeMap<i64, DayCoverage> = [(d, day_of(&events))].into();
        let verdict = &verdicts(&window, d, d)[0].1;
        assert_eq!(verdict.status, Status::Partial);
        assert_eq!(verdict.missed, 150);
        assert_eq!(verdict.gaps.len(), GAPS_LISTED);
        assert_eq!(verdict.gaps_not_listed, 150 - GAPS_LISTED);
        assert_eq!(verdict.gaps[0].first_offset, 1);
    }

    #[test]
    fn the_last_day_there_is_ends_the_range() {
        let window = BTreeMap::new();
        let found = verdicts(&window, i64::MAX - 2, i64::MAX);
        assert_eq!(found.len(), 3);
        assert_eq!(found[2].0, i64::MAX);
        assert!(found.iter().all(|(_, v)| v.status == Status::Unknown));
    }

    #[test]
    fn a_day_without_positions_is_unknown() {
        let d = 20_000;
        let day = DayCoverage {
            unpositioned: 4,
            ..DayCoverage::default()
        };
        let window: BTreeMap<i64, DayCoverage> = [(d, day)].into();
        let verdict = &verdicts(&window, d, d)[0].1;
        assert_eq!((verdict.status, verdict.unpositioned), (Status::Unknown, 4));
        assert_eq!(window_start(&[d - 3, d, d + 2], d), d - 3);
        assert_eq!(window_end(&[d - 3, d, d + 2], d), d + 2);
    }
}
