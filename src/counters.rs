//! The counter rules of SPEC §5 as pure functions: an event in, its increments out. No I/O, no
//! clock, no metrics; every source (file bus, Kafka) feeds these and nothing else counts.
//!
//! This is the domain layer beside `event`: the store and the web role read counter names and
//! descriptions from here, so they never depend on the aggregate role.

use crate::event::{epoch_day, EventHead};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// `pleiades_total`.
pub const TOTAL: &str = "pleiades_total";
/// Prefix of `pleiades_wiki_<wiki>`.
pub const WIKI_PREFIX: &str = "pleiades_wiki_";
/// Prefix of `pleiades_type_<type>`.
pub const TYPE_PREFIX: &str = "pleiades_type_";
pub const BOT: &str = "pleiades_bot";
pub const MINOR: &str = "pleiades_minor";
pub const LENGTH_INC: &str = "pleiades_length_inc";
pub const LENGTH_DEC: &str = "pleiades_length_dec";
pub const GROWTH: &str = "pleiades_growth";

/// A human description of a counter, for the API and the dashboard.
pub fn description(name: &str) -> String {
    match name {
        TOTAL => "Total number of events".into(),
        BOT => "Events by bots".into(),
        MINOR => "Minor edits".into(),
        LENGTH_INC => "Edits that made a page longer".into(),
        LENGTH_DEC => "Edits that made a page shorter".into(),
        GROWTH => "Net change in page length, in bytes".into(),
        _ => {
            if let Some(wiki) = name.strip_prefix(WIKI_PREFIX) {
                format!("Events on {wiki}")
            } else if let Some(kind) = name.strip_prefix(TYPE_PREFIX) {
                format!("Events of type {kind}")
            } else {
                name.to_owned()
            }
        }
    }
}

/// The increments one event makes, in the bucket of its UTC day and in the all-time bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deltas<'a> {
    pub day: i64,
    pub wiki: Option<&'a str>,
    /// The type: a string, or an integer written in decimal.
    pub kind: Option<TypeName<'a>>,
    pub bot: bool,
    pub minor: bool,
    /// `(old, new)` when `length` is an object, missing or null sides as 0.
    pub length: Option<(i64, i64)>,
}

/// An event type as it appeared: a string or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeName<'a> {
    Text(&'a str),
    Number(i64),
}

#[derive(Deserialize)]
struct Length {
    #[serde(default)]
    old: Option<i64>,
    #[serde(default)]
    new: Option<i64>,
}

/// A string value without escapes, borrowed; strings with escapes are decoded by the caller.
fn raw_str(raw: &RawValue) -> Option<&str> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

impl<'a> Deltas<'a> {
    /// The increments of a valid, non-canary event (the caller filters canaries and repeats).
    /// Strings holding JSON escapes are rare in these fields; they are decoded into `scratch`.
    pub fn of(head: &EventHead<'a>, scratch: &'a mut Scratch) -> Deltas<'a> {
        let decode = |raw: &RawValue| serde_json::from_str::<String>(raw.get()).ok();
        scratch.wiki = head.wiki.filter(|r| raw_str(r).is_none()).and_then(decode);
        scratch.kind = head.kind.filter(|r| raw_str(r).is_none()).and_then(decode);
        let wiki = head
            .wiki
            .and_then(raw_str)
            .or(scratch.wiki.as_deref())
            .filter(|w| !w.is_empty());
        let kind = head.kind.and_then(|raw| {
            if let Some(text) = raw_str(raw).or(scratch.kind.as_deref()) {
                return (!text.is_empty()).then_some(TypeName::Text(text));
            }
            raw.get().parse::<i64>().ok().map(TypeName::Number)
        });
        let length = head
            .length
            .filter(|raw| raw.get().starts_with('{'))
            .and_then(|raw| serde_json::from_str::<Length>(raw.get()).ok())
            .map(|l| (l.old.unwrap_or(0), l.new.unwrap_or(0)));
        Deltas {
            day: epoch_day(head.time_ms),
            wiki,
            kind,
            bot: head.bot.is_some_and(|b| b.get() == "true"),
            minor: head.minor.is_some_and(|m| m.get() == "true"),
            length,
        }
    }

    /// Calls `f(name, delta)` for every counter this event changes. `name` is built in a reused
    /// buffer, so a caller that already knows the name allocates nothing.
    pub fn for_each(&self, name: &mut String, mut f: impl FnMut(&str, i64)) {
        f(TOTAL, 1);
        if let Some(wiki) = self.wiki {
            name.clear();
            name.push_str(WIKI_PREFIX);
            name.push_str(wiki);
            f(name, 1);
        }
        match self.kind {
            Some(TypeName::Text(kind)) => {
                name.clear();
                name.push_str(TYPE_PREFIX);
                name.push_str(kind);
                f(name, 1);
            }
            Some(TypeName::Number(n)) => {
                name.clear();
                name.push_str(TYPE_PREFIX);
                name.push_str(&n.to_string());
                f(name, 1);
            }
            None => {}
        }
        if self.bot {
            f(BOT, 1);
        }
        if self.minor {
            f(MINOR, 1);
        }
        if let Some((old, new)) = self.length {
            if new > old {
                f(LENGTH_INC, 1);
            } else if new < old {
                f(LENGTH_DEC, 1);
            }
            f(GROWTH, new.saturating_sub(old));
        }
    }
}

/// Owned copies of the rare escaped strings, kept by the caller and reused across events.
#[derive(Debug, Default)]
pub struct Scratch {
    wiki: Option<String>,
    kind: Option<String>,
}

/// Increments merged in memory: per day, and all-time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub days: HashMap<i64, HashMap<String, i64>>,
    pub all_time: HashMap<String, i64>,
    /// Events counted into this tally.
    pub events: u64,
}

impl Tally {
    /// Adds one event's increments.
    pub fn add(&mut self, deltas: &Deltas<'_>, name: &mut String) {
        let day = self.days.entry(deltas.day).or_default();
        let all_time = &mut self.all_time;
        deltas.for_each(name, |counter, delta| {
            bump(day, counter, delta);
            bump(all_time, counter, delta);
        });
        self.events += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }
}

/// Adds `delta`, saturating at the bounds of i64: events are range-checked (see
/// `event::MAX_PAGE_LENGTH`), so only an absurd number of them could get there, and a counter
/// pinned at its bound is better than one that wraps or a batch that can never be applied.
fn bump(map: &mut HashMap<String, i64>, counter: &str, delta: i64) {
    match map.get_mut(counter) {
        Some(value) => *value = value.saturating_add(delta),
        None => {
            map.insert(counter.to_owned(), delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::inspect;

    fn counts(data: &str) -> Vec<(String, i64)> {
        let head = inspect(data).unwrap();
        let mut scratch = Scratch::default();
        let deltas = Deltas::of(&head, &mut scratch);
        let mut out = Vec::new();
        deltas.for_each(&mut String::new(), |n, d| out.push((n.to_owned(), d)));
        out.sort();
        out
    }

    fn c(name: &str, d: i64) -> (String, i64) {
        (name.to_owned(), d)
    }

    #[test]
    fn an_edit_counts_everything() {
        let data = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"wiki":"enwiki","type":"edit","bot":true,"minor":true,"length":{"old":10,"new":25}}"#;
        let mut expected = vec![
            c(TOTAL, 1),
            c("pleiades_wiki_enwiki", 1),
            c("pleiades_type_edit", 1),
            c(BOT, 1),
            c(MINOR, 1),
            c(LENGTH_INC, 1),
            c(GROWTH, 15),
        ];
        expected.sort();
        assert_eq!(counts(data), expected);
    }

    #[test]
    fn length_rules() {
        let shrink = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"length":{"old":30,"new":5}}"#;
        assert!(counts(shrink).contains(&c(LENGTH_DEC, 1)));
        assert!(counts(shrink).contains(&c(GROWTH, -25)));
        let new_page = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"length":{"new":7}}"#;
        assert!(counts(new_page).contains(&c(LENGTH_INC, 1)));
        assert!(counts(new_page).contains(&c(GROWTH, 7)));
        let nulls = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"length":{"old":null,"new":null}}"#;
        assert_eq!(counts(nulls), vec![c(GROWTH, 0), c(TOTAL, 1)]);
        let equal = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"length":{"old":4,"new":4}}"#;
        assert_eq!(counts(equal), vec![c(GROWTH, 0), c(TOTAL, 1)]);
        let not_object = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"length":12}"#;
        assert_eq!(counts(not_object), vec![c(TOTAL, 1)]);
    }

    #[test]
    fn type_may_be_an_integer_and_empty_strings_do_not_count() {
        let numeric = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"type":3,"wiki":""}"#;
        assert_eq!(counts(numeric), vec![c(TOTAL, 1), c("pleiades_type_3", 1)]);
        let odd =
            r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"type":true,"wiki":7,"bot":"true","minor":1}"#;
        assert_eq!(counts(odd), vec![c(TOTAL, 1)]);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let escaped =
            r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"wiki":"\u0065nwiki","type":"e\"dit"}"#;
        assert_eq!(
            counts(escaped),
            vec![
                c(TOTAL, 1),
                c("pleiades_type_e\"dit", 1),
                c("pleiades_wiki_enwiki", 1)
            ]
        );
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut day = HashMap::new();
        bump(&mut day, GROWTH, i64::MAX - 1);
        bump(&mut day, GROWTH, 5);
        assert_eq!(day[GROWTH], i64::MAX);
        bump(&mut day, LENGTH_DEC, i64::MIN);
        bump(&mut day, LENGTH_DEC, -1);
        assert_eq!(day[LENGTH_DEC], i64::MIN);
    }

    #[test]
    fn tally_merges_by_day_and_all_time() {
        let mut tally = Tally::default();
        let mut name = String::new();
        for data in [
            r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"wiki":"enwiki"}"#,
            r#"{"meta":{"dt":"2022-12-11T23:59:59Z"},"wiki":"enwiki"}"#,
            r#"{"meta":{"dt":"2022-12-12T00:00:00Z"},"wiki":"dewiki"}"#,
        ] {
            let head = inspect(data).unwrap();
            let mut scratch = Scratch::default();
            tally.add(&Deltas::of(&head, &mut scratch), &mut name);
        }
        assert_eq!(tally.events, 3);
        assert_eq!(tally.days[&19337]["pleiades_wiki_enwiki"], 2);
        assert_eq!(tally.days[&19338]["pleiades_wiki_dewiki"], 1);
        assert_eq!(tally.all_time[TOTAL], 3);
    }
}
