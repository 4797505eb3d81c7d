//! The recentchange event as Pleiades sees it: validity, event time, canaries and SSE ids.
//!
//! Every role that looks inside an event goes through this module, so there is exactly one parser
//! for the event time and one for the SSE id.

use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// Milliseconds in one UTC day; `day = floor(epoch_ms / DAY_MS)` (SPEC §5).
pub const DAY_MS: i64 = 86_400_000;

/// Why an event cannot be counted. The reason strings are metric label values and quarantine
/// fields, so they are short, stable and lowercase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("data is not JSON: {0}")]
    NotJson(String),
    #[error("data is not a JSON object")]
    NotObject,
    #[error("meta is not an object or a field has the wrong type: {0}")]
    BadMeta(String),
    #[error("meta.dt is missing")]
    MissingTime,
    #[error("meta.dt {value:?} is not an RFC 3339 time: {reason}")]
    BadTime { value: String, reason: String },
    #[error(
        "length.{side} is {value}, not a page length (an integer from 0 to {MAX_PAGE_LENGTH})"
    )]
    OutOfRange { side: &'static str, value: String },
    #[error(
        "meta.dt is {ahead_ms} ms ahead of this host's clock, more than the {limit_ms} ms allowed"
    )]
    FutureTime { ahead_ms: i64, limit_ms: i64 },
}

/// The largest page length an event may carry, in bytes: MediaWiki stores page lengths as
/// unsigned 32-bit integers. Bounding both sides bounds every event's `pleiades_growth` to
/// ±2^32, so sums stay exact for billions of events (and saturate rather than wrap beyond).
pub const MAX_PAGE_LENGTH: u64 = u32::MAX as u64;

impl Invalid {
    /// The kind of problem, for metrics and quarantine records.
    pub fn reason(&self) -> RejectReason {
        match self {
            Invalid::NotJson(_) => RejectReason::NotJson,
            Invalid::NotObject => RejectReason::NotObject,
            Invalid::BadMeta(_) => RejectReason::BadMeta,
            Invalid::MissingTime => RejectReason::MissingTime,
            Invalid::BadTime { .. } => RejectReason::BadTime,
            Invalid::OutOfRange { .. } => RejectReason::OutOfRange,
            Invalid::FutureTime { .. } => RejectReason::FutureTime,
        }
    }
}

/// Why an event was kept in quarantine instead of being published or counted. The names are
/// metric label values and quarantine record fields, so they are short, stable and lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The data is not JSON.
    NotJson,
    /// The data is JSON but not an object.
    NotObject,
    /// `meta` is not an object, or one of its fields has the wrong type.
    BadMeta,
    /// `meta.dt` is missing.
    MissingTime,
    /// `meta.dt` is not an RFC 3339 time.
    BadTime,
    /// Larger than the bus accepts for one message.
    TooLarge,
    /// A bus record that is not a record at all (unreadable line, message without a value).
    BadRecord,
    /// A `length` side that is a number but not a page length ([`MAX_PAGE_LENGTH`]).
    OutOfRange,
    /// `meta.dt` further in the future than `ingest.max_future_skew`.
    FutureTime,
    /// Does not match the JSON Schema its `$schema` names (with `ingest.validate = "quarantine"`).
    Schema,
}

impl RejectReason {
    /// Every reason, so that each labelled series can exist from the first scrape.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::BadMeta,
        RejectReason::MissingTime,
        RejectReason::BadTime,
        RejectReason::TooLarge,
        RejectReason::BadRecord,
        RejectReason::OutOfRange,
        RejectReason::FutureTime,
        RejectReason::Schema,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::BadMeta => "bad_meta",
            RejectReason::MissingTime => "missing_dt",
            RejectReason::BadTime => "bad_dt",
            RejectReason::TooLarge => "too_large",
            RejectReason::BadRecord => "bad_record",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::FutureTime => "future_dt",
            RejectReason::Schema => "schema",
        }
    }
}

impl serde::Serialize for RejectReason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What Pleiades reads of an event, borrowed from its JSON text. The counted fields stay raw
/// JSON here; `aggregate::counters` decides what they mean.
#[derive(Debug, Clone)]
pub struct EventHead<'a> {
    /// `meta.id`, the key for dropping repeats; absent in a few malformed events.
    pub id: Option<Cow<'a, str>>,
    /// `meta.dt` in milliseconds since the epoch.
    pub time_ms: i64,
    /// True for Wikimedia's liveness heartbeats (`meta.domain == "canary"`), which are never counted.
    pub canary: bool,
    pub wiki: Option<&'a RawValue>,
    pub kind: Option<&'a RawValue>,
    pub bot: Option<&'a RawValue>,
    pub minor: Option<&'a RawValue>,
    pub length: Option<&'a RawValue>,
    /// The fields of the further dimensions (`counters::Dimensions`), raw like the others.
    pub namespace: Option<&'a RawValue>,
    pub user: Option<&'a RawValue>,
    pub title: Option<&'a RawValue>,
    pub server_name: Option<&'a RawValue>,
    pub log_type: Option<&'a RawValue>,
    pub log_action: Option<&'a RawValue>,
    pub patrolled: Option<&'a RawValue>,
    /// Where upstream's Kafka holds the event (`meta.topic`, `meta.partition`, `meta.offset`);
    /// `None` when one of them is missing or malformed. It never makes an event invalid: it
    /// only decides what `coverage` can say about the event's day.
    pub position: Option<Position<'a>>,
}

/// An event's place upstream: its topic-partition and its offset there. Within a
/// topic-partition, offsets are consecutive, so a hole between two is events never delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position<'a> {
    pub topic: Cow<'a, str>,
    pub partition: i32,
    pub offset: u64,
}

/// True for a name Kafka accepts as a topic: 1 to 249 of `[A-Za-z0-9._-]`. Checking it keeps
/// separators and control characters out of the store's coverage keys.
pub fn is_topic_name(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The largest upstream offset taken as a position: 2^53 - 1, the largest integer a double
/// (Lua's number, in the Redis apply script) holds exactly.
pub const MAX_OFFSET: u64 = (1 << 53) - 1;

/// Reads the position from `meta`'s raw fields, leniently: anything malformed gives `None`.
fn position<'a>(
    topic: Option<Cow<'a, str>>,
    partition: Option<&RawValue>,
    offset: Option<&RawValue>,
) -> Option<Position<'a>> {
    let topic = topic.filter(|t| is_topic_name(t))?;
    let partition = partition?.get().parse::<i32>().ok().filter(|p| *p >= 0)?;
    // Kafka offsets are far below 2^53 in practice; above it, Redis's Lua (doubles) could not
    // keep them exact, so such an offset is taken for no position at all.
    let offset = offset?
        .get()
        .parse::<u64>()
        .ok()
        .filter(|o| *o <= MAX_OFFSET)?;
    Some(Position {
        topic,
        partition,
        offset,
    })
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    meta: Option<Meta<'a>>,
    #[serde(borrow, default)]
    wiki: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "type")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default)]
    bot: Option<&'a RawValue>,
    #[serde(borrow, default)]
    minor: Option<&'a RawValue>,
    #[serde(borrow, default)]
    length: Option<&'a RawValue>,
    #[serde(borrow, default)]
    namespace: Option<&'a RawValue>,
    #[serde(borrow, default)]
    user: Option<&'a RawValue>,
    #[serde(borrow, default)]
    title: Option<&'a RawValue>,
    #[serde(borrow, default)]
    server_name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    log_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    log_action: Option<&'a RawValue>,
    #[serde(borrow, default)]
    patrolled: Option<&'a RawValue>,
}

/// The two sides of `length`, kept raw so that any number can be checked against the range.
#[derive(Deserialize)]
struct LengthSides<'a> {
    #[serde(borrow, default)]
    old: Option<&'a RawValue>,
    #[serde(borrow, default)]
    new: Option<&'a RawValue>,
}

/// The rule for `length`: a side that is a JSON number must be an integer from 0 to
/// [`MAX_PAGE_LENGTH`]; anything else numeric (negative, fractional, huge) makes the event
/// invalid, so no counter ever sees it. Sides of other types keep their SPEC §5 meaning.
fn check_length(raw: &RawValue) -> Result<(), Invalid> {
    if !raw.get().starts_with('{') {
        return Ok(());
    }
    let Ok(sides) = serde_json::from_str::<LengthSides<'_>>(raw.get()) else {
        return Ok(());
    };
    for (side, value) in [("old", sides.old), ("new", sides.new)] {
        let Some(text) = value.map(|v| v.get()) else {
            continue;
        };
        let numeric = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        if numeric && text.parse::<u64>().map_or(true, |n| n > MAX_PAGE_LENGTH) {
            return Err(Invalid::OutOfRange {
                side,
                value: text.chars().take(40).collect(),
            });
        }
    }
    Ok(())
}

/// Checks an event time against the clock: at most `max_future_ms` ahead of `now_ms`. Past
/// times are always accepted (history may be replayed).
pub fn check_not_future(time_ms: i64, now_ms: i64, max_future_ms: i64) -> Result<(), Invalid> {
    let ahead_ms = time_ms.saturating_sub(now_ms);
    if ahead_ms > max_future_ms {
        return Err(Invalid::FutureTime {
            ahead_ms,
            limit_ms: max_future_ms,
        });
    }
    Ok(())
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    dt: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    domain: Option<Cow<'a, str>>,
    /// Raw, so that a topic of the wrong type leaves the event valid and merely unpositioned.
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    partition: Option<&'a RawValue>,
    #[serde(borrow, default)]
    offset: Option<&'a RawValue>,
}

/// Checks that `data` is a valid event (a JSON object with a parsable `meta.dt`, SPEC §4) and
/// returns its head. Nothing is copied unless a string holds escapes; other fields are skipped.
pub fn inspect(data: &str) -> Result<EventHead<'_>, Invalid> {
    // serde would happily read a struct from a JSON array, so the object check comes first.
    if !data.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(data) {
            Ok(_) => Invalid::NotObject,
            Err(e) => Invalid::NotJson(e.to_string()),
        });
    }
    let envelope: Envelope<'_> = serde_json::from_str(data).map_err(|e| {
        if e.is_data() {
            Invalid::BadMeta(e.to_string())
        } else {
            Invalid::NotJson(e.to_string())
        }
    })?;
    let meta = envelope.meta.ok_or(Invalid::MissingTime)?;
    let dt = meta.dt.ok_or(Invalid::MissingTime)?;
    let time_ms = parse_time_ms(&dt)?;
    if let Some(length) = envelope.length {
        check_length(length)?;
    }
    let canary = meta.domain.as_deref() == Some("canary");
    // A topic without escapes (every real one) is borrowed, not copied.
    let topic = meta.topic.and_then(|raw| {
        serde_json::from_str::<&str>(raw.get())
            .map(Cow::Borrowed)
            .or_else(|_| serde_json::from_str::<String>(raw.get()).map(Cow::Owned))
            .ok()
    });
    let position = position(topic, meta.partition, meta.offset);
    Ok(EventHead {
        id: meta.id,
        time_ms,
        canary,
        wiki: envelope.wiki,
        kind: envelope.kind,
        bot: envelope.bot,
        minor: envelope.minor,
        length: envelope.length,
        namespace: envelope.namespace,
        user: envelope.user,
        title: envelope.title,
        server_name: envelope.server_name,
        log_type: envelope.log_type,
        log_action: envelope.log_action,
        patrolled: envelope.patrolled,
        position,
    })
}

/// Parses an event time (`2022-12-11T04:27:02Z`, `…:48.988Z`, `…+00:00`) into epoch milliseconds.
pub fn parse_time_ms(dt: &str) -> Result<i64, Invalid> {
    chrono::DateTime::parse_from_rfc3339(dt)
        .map(|t| t.timestamp_millis())
        .map_err(|e| Invalid::BadTime {
            value: dt.to_owned(),
            reason: e.to_string(),
        })
}

/// The UTC epoch day of an event time in milliseconds.
pub fn epoch_day(time_ms: i64) -> i64 {
    time_ms.div_euclid(DAY_MS)
}

/// An SSE `id:` that is not the JSON array of Kafka positions EventStreams sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SSE id {id:?} is not a JSON array of positions: {reason}")]
pub struct BadStreamId {
    pub id: String,
    pub reason: String,
}

/// Returns `id` with every position's `timestamp` moved back by `rewind_ms`, keeping every other
/// field (topic, partition, offset) as it was. EventStreams resumes at the earliest message whose
/// timestamp is at or after the one asked for, and timestamps are not monotonic, so resuming
/// exactly at the last id could skip messages (SPEC §8).
pub fn rewind_stream_id(id: &str, rewind_ms: i64) -> Result<String, BadStreamId> {
    let bad = |reason: String| BadStreamId {
        id: id.to_owned(),
        reason,
    };
    let mut positions: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(id).map_err(|e| bad(e.to_string()))?;
    for position in &mut positions {
        if let Some(ts) = position.get_mut("timestamp") {
            let millis = ts
                .as_i64()
                .ok_or_else(|| bad(format!("timestamp {ts} is not an integer")))?;
            *ts = serde_json::Value::from(millis.saturating_sub(rewind_ms).max(0));
        }
    }
    serde_json::to_string(&positions).map_err(|e| bad(e.to_string()))
}

/// The largest position timestamp in an SSE id, if it carries any.
pub fn stream_id_timestamp_ms(id: &str) -> Option<i64> {
    let positions: Vec<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(id).ok()?;
    positions
        .iter()
        .filter_map(|p| p.get("timestamp").and_then(|t| t.as_i64()))
        .max()
}

/// The recorded events of `../shared/data/events/`, for the unit tests of every module.
#[cfg(test)]
pub(crate) mod recorded {
    /// Both recorded files: the current event format and the 2018 one.
    pub const FILES: [&str; 2] = [
        "recentchange-2022-2026.jsonl",
        "recentchange-2018-wikidata.jsonl",
    ];

    /// The lines of the recorded file `file`.
    pub fn lines(file: &str) -> Vec<String> {
        let path = format!(
            "{}/../shared/data/events/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("recorded events");
        text.lines().map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspects_all_three_time_formats() {
        for (dt, ms) in [
            ("2022-12-11T04:27:02Z", 1_670_732_822_000),
            ("2026-06-20T15:49:48.988Z", 1_781_970_588_988),
            ("2018-03-07T16:16:17+00:00", 1_520_439_377_000),
        ] {
            let data =
                format!(r#"{{"meta":{{"id":"x","dt":"{dt}","domain":"en.wikipedia.org"}}}}"#);
            let head = inspect(&data).unwrap();
            assert_eq!(head.time_ms, ms, "{dt}");
            assert!(!head.canary);
            assert_eq!(head.id.as_deref(), Some("x"));
        }
    }

    #[test]
    fn classifies_invalid_events() {
        let reason = |data: &str| inspect(data).unwrap_err().reason().as_str();
        assert_eq!(reason("not json"), "not_json");
        assert_eq!(reason("[1,2]"), "not_object");
        assert_eq!(reason("42"), "not_object");
        assert_eq!(reason("{}"), "missing_dt");
        assert_eq!(reason(r#"{"meta":5}"#), "bad_meta");
        assert_eq!(reason(r#"{"meta":{"dt":"yesterday"}}"#), "bad_dt");
        assert_eq!(
            reason(r#"{"meta":{"dt":"2022-12-11T04:27:02Z"}"#),
            "not_json"
        );
    }

    #[test]
    fn lengths_outside_a_page_length_are_out_of_range() {
        let reason = |length: &str| {
            inspect(&format!(
                r#"{{"meta":{{"dt":"2022-12-11T04:27:02Z"}},"length":{length}}}"#
            ))
            .err()
            .map(|e| e.reason().as_str())
        };
        assert_eq!(reason(r#"{"old":10,"new":4294967295}"#), None);
        assert_eq!(reason(r#"{"old":null,"new":7}"#), None);
        assert_eq!(reason(r#"{"new":"12"}"#), None);
        assert_eq!(reason("12"), None);
        for bad in [
            r#"{"old":0,"new":4294967296}"#,
            r#"{"old":-1,"new":3}"#,
            r#"{"old":1,"new":9223372036854775807}"#,
            r#"{"old":-9223372036854775808}"#,
            r#"{"new":1e30}"#,
            r#"{"new":12.5}"#,
        ] {
            assert_eq!(reason(bad), Some("out_of_range"), "{bad}");
        }
    }

    #[test]
    fn only_times_too_far_ahead_of_the_clock_are_refused() {
        let now = 1_700_000_000_000;
        assert!(check_not_future(now + 1000, now, 1000).is_ok());
        assert!(check_not_future(0, now, 1000).is_ok());
        assert!(check_not_future(i64::MIN, now, 0).is_ok());
        let far = check_not_future(i64::MAX, now, 1000).unwrap_err();
        assert_eq!(far.reason(), RejectReason::FutureTime);
    }

    #[test]
    fn recognises_canaries() {
        let data = r#"{"meta":{"id":"c","dt":"2024-01-01T00:00:00Z","domain":"canary"}}"#;
        assert!(inspect(data).unwrap().canary);
    }

    #[test]
    fn reads_positions_leniently() {
        let at = |meta: &str| {
            let data = format!(r#"{{"meta":{{"dt":"2024-01-01T00:00:00Z"{meta}}}}}"#);
            inspect(&data)
                .unwrap()
                .position
                .map(|p| (p.topic.into_owned(), p.partition, p.offset))
        };
        let topic = r#","topic":"eqiad.mediawiki.recentchange""#;
        assert_eq!(
            at(&format!(r#"{topic},"partition":0,"offset":5349423871"#)),
            Some(("eqiad.mediawiki.recentchange".into(), 0, 5349423871))
        );
        assert_eq!(
            at(&format!(
                r#"{topic},"partition":3,"offset":9007199254740991"#
            )),
            Some(("eqiad.mediawiki.recentchange".into(), 3, MAX_OFFSET))
        );
        // Each malformed field leaves the event valid and unpositioned.
        for bad in [
            r#","partition":0,"offset":1"#.to_owned(),
            format!(r#"{topic},"offset":1"#),
            format!(r#"{topic},"partition":0"#),
            format!(r#"{topic},"partition":0,"offset":-1"#),
            format!(r#"{topic},"partition":0,"offset":1.5"#),
            format!(r#"{topic},"partition":0,"offset":9007199254740992"#),
            format!(r#"{topic},"partition":0,"offset":18446744073709551615"#),
            format!(r#"{topic},"partition":"0","offset":1"#),
            r#","topic":"a|b","partition":0,"offset":1"#.to_owned(),
            r#","topic":7,"partition":0,"offset":1"#.to_owned(),
            r#","topic":"","partition":0,"offset":1"#.to_owned(),
        ] {
            assert_eq!(at(&bad), None, "{bad}");
        }
    }

    #[test]
    fn the_recorded_capture_steps_by_one_offset() {
        let path = format!(
            "{}/../shared/data/sse/pdm-g10_wikimedia-recentchange-sample_2026-06-20.sse.txt",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let positions: Vec<Position<'_>> = text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| inspect(data).unwrap().position.expect("a position"))
            .collect();
        assert_eq!(positions.len(), 384);
        for pair in positions.windows(2) {
            assert_eq!(pair[0].topic, pair[1].topic);
            assert_eq!(pair[0].partition, pair[1].partition);
            assert_eq!(pair[1].offset, pair[0].offset + 1, "{:?}", pair);
        }
    }

    #[test]
    fn every_recorded_event_is_valid() {
        for file in recorded::FILES {
            for (n, line) in recorded::lines(file).iter().enumerate() {
                let head = inspect(line).unwrap_or_else(|e| panic!("{file}:{}: {e}", n + 1));
                assert!(head.id.is_some(), "{file}:{} has no meta.id", n + 1);
            }
        }
    }

    #[test]
    fn epoch_day_floors_before_1970_too() {
        assert_eq!(epoch_day(1_670_732_822_000), 19_337);
        assert_eq!(epoch_day(-1), -1);
    }

    #[test]
    fn rewinds_timestamps_and_keeps_offsets() {
        let id = r#"[{"topic":"eqiad.mediawiki.recentchange","partition":0,"timestamp":1781970588989},{"topic":"codfw.mediawiki.recentchange","partition":0,"offset":-1}]"#;
        let rewound = rewind_stream_id(id, 10_000).unwrap();
        let v: serde_json::Value = serde_json::from_str(&rewound).unwrap();
        assert_eq!(v[0]["timestamp"], 1_781_970_578_989_i64);
        assert_eq!(v[0]["topic"], "eqiad.mediawiki.recentchange");
        assert_eq!(v[1]["offset"], -1);
        assert_eq!(stream_id_timestamp_ms(id), Some(1_781_970_588_989));
        assert!(rewind_stream_id("nope", 1).is_err());
        assert!(rewind_stream_id(r#"[{"timestamp":"x"}]"#, 1).is_err());
    }
}
