//! The quarantine record: an event that cannot be published or counted, kept with the reason.
//! Every writer of quarantine (the ingester and the aggregators, on files and on Kafka) writes
//! this one type, cut by this one rule.

use crate::event::RejectReason;
use serde::Serialize;

/// The most bytes of an event's data a record keeps. A record too large for the events topic
/// must still fit the quarantine topic, and one hostile line must not cost megabytes per copy.
pub const QUARANTINE_DATA_BYTES: usize = 256 * 1024;
/// The most bytes of an SSE id a record keeps.
pub const QUARANTINE_ID_BYTES: usize = 1024;
/// The most bytes of the error text a record keeps.
pub const QUARANTINE_ERROR_BYTES: usize = 4096;

/// One invalid event kept with the reason it was refused.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineRecord<'a> {
    /// When it was quarantined (RFC 3339, UTC).
    pub time: String,
    /// Short, stable reason (a metric label value too).
    pub reason: RejectReason,
    /// The detailed error; says so when `id` or `data` were cut.
    pub error: String,
    /// The SSE id it came with, at most [`QUARANTINE_ID_BYTES`].
    pub id: &'a str,
    /// The data exactly as received (as a string), at most [`QUARANTINE_DATA_BYTES`].
    pub data: &'a str,
    /// Where on the bus a reader found it (`segment <n> byte <p>`, `partition <n> offset <o>`);
    /// absent for the ingester's records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl<'a> QuarantineRecord<'a> {
    /// A record of `data` (received with `id`) refused for `reason`, stamped now. `id`, `data`
    /// and `error` are cut at character boundaries to their limits, and the error says what was
    /// cut, so no writer can be made to store or send an unbounded record.
    pub fn new(reason: RejectReason, error: impl Into<String>, id: &'a str, data: &'a str) -> Self {
        let mut error = error.into();
        cut_string(&mut error, QUARANTINE_ERROR_BYTES);
        let (kept_id, id_cut) = cut(id, QUARANTINE_ID_BYTES);
        let (kept_data, data_cut) = cut(data, QUARANTINE_DATA_BYTES);
        if id_cut {
            error.push_str(&format!(
                " (id cut to {} of {} bytes)",
                kept_id.len(),
                id.len()
            ));
        }
        if data_cut {
            error.push_str(&format!(
                " (data cut to {} of {} bytes)",
                kept_data.len(),
                data.len()
            ));
        }
        QuarantineRecord {
            time: chrono::Utc::now().to_rfc3339(),
            reason,
            error,
            id: kept_id,
            data: kept_data,
            at: None,
        }
    }

    /// The same record, found by a reader at `at` on the bus.
    pub fn found_at(mut self, at: String) -> Self {
        self.at = Some(at);
        self
    }

    /// What makes two records the same: where a reader found it, its id and its data, not when
    /// or why. A resume overlap repeats the id and data; a batch read again repeats the place.
    pub fn key(&self) -> u64 {
        record_key(self.at.as_deref(), self.id, self.data)
    }

    /// The [`QuarantineRecord::key`] of one written line; `None` when it is not a record.
    pub fn key_of_line(line: &[u8]) -> Option<u64> {
        #[derive(serde::Deserialize)]
        struct Written<'a> {
            #[serde(borrow)]
            id: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            data: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            at: Option<std::borrow::Cow<'a, str>>,
        }
        let written: Written<'_> = serde_json::from_slice(line).ok()?;
        Some(record_key(
            written.at.as_deref(),
            &written.id,
            &written.data,
        ))
    }

    /// The record as one JSON line, without the newline.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn record_key(at: Option<&str>, id: &str, data: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same in every run, so keys read back from a file match.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (at, id, data).hash(&mut hasher);
    hasher.finish()
}

/// `text` cut to at most `limit` bytes at a character boundary, and whether it was cut.
fn cut(text: &str, limit: usize) -> (&str, bool) {
    if text.len() <= limit {
        return (text, false);
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

fn cut_string(text: &mut String, limit: usize) {
    let len = cut(text, limit).0.len();
    text.truncate(len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_ids_and_data_are_cut_at_character_boundaries_and_said_so() {
        let id = "é".repeat(QUARANTINE_ID_BYTES); // two bytes each
        let data = "ü".repeat(QUARANTINE_DATA_BYTES);
        let record = QuarantineRecord::new(RejectReason::NotJson, "bad", &id, &data);
        assert!(record.id.len() <= QUARANTINE_ID_BYTES);
        assert!(record.data.len() <= QUARANTINE_DATA_BYTES);
        assert!(record.error.contains("id cut to"), "{}", record.error);
        assert!(record.error.contains("data cut to"), "{}", record.error);
        let v: serde_json::Value = serde_json::from_slice(&record.to_json()).unwrap();
        assert_eq!(v["reason"], "not_json");
    }

    #[test]
    fn a_record_read_back_has_the_key_it_was_written_with() {
        let record = QuarantineRecord::new(RejectReason::NotJson, "e", "[1]", "x\"y");
        assert_eq!(
            QuarantineRecord::key_of_line(&record.to_json()),
            Some(record.key())
        );
        let placed = record.clone().found_at("segment 3 byte 10".into());
        assert_ne!(placed.key(), record.key());
        assert_eq!(
            QuarantineRecord::key_of_line(&placed.to_json()),
            Some(placed.key())
        );
        let later = QuarantineRecord::new(RejectReason::BadTime, "other", "[1]", "x\"y");
        assert_eq!(
            later.key(),
            record.key(),
            "time and reason do not make a new record"
        );
    }

    #[test]
    fn short_records_are_kept_whole() {
        let record = QuarantineRecord::new(RejectReason::BadTime, "e", "[1]", "{}");
        assert_eq!(
            (record.id, record.data, record.error.as_str()),
            ("[1]", "{}", "e")
        );
    }
}
