//! The counter rules of SPEC §5 as pure functions: an event in, its increments out. No I/O, no
//! clock, no metrics; every source (file bus, Kafka) feeds these and nothing else counts.
//!
//! This is the domain layer beside `event`: the store and the web role read counter names and
//! descriptions from here, so they never depend on the aggregate role.

use crate::event::{epoch_day, EventHead, DAY_MS};
use crate::project::{language_label, Family, Project};
use crate::sketch::top::event_hash;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

mod tally;
pub use tally::{OpenTally, Tally};

/// A map of the counting path: counter names, days and sketch keys, filled for every event of
/// a batch. foldhash rather than SipHash: the maps live for one batch and their hasher is
/// seeded at random, which is what resistance to crafted keys needs here, at a fraction of
/// SipHash's cost per key.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
/// Counter name → value.
pub type Counts = FastMap<String, i64>;

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

    /// Calls `f(counter, delta)` for every counter this event changes: the SPEC §5 rules.
    pub fn for_each_counter(&self, mut f: impl FnMut(Counter<'a>, i64)) {
        f(Counter::Total, 1);
        if let Some(wiki) = self.wiki {
            f(Counter::Wiki(wiki), 1);
        }
        if let Some(kind) = self.kind {
            f(Counter::Type(kind), 1);
        }
        if self.bot {
            f(Counter::Bot, 1);
        }
        if self.minor {
            f(Counter::Minor, 1);
        }
        if let Some((old, new)) = self.length {
            if new > old {
                f(Counter::LengthInc, 1);
            } else if new < old {
                f(Counter::LengthDec, 1);
            }
            f(Counter::Growth, new.saturating_sub(old));
        }
    }

    /// [`Deltas::for_each_counter`] by name: `f(name, delta)`, the name built in `name`.
    pub fn for_each(&self, name: &mut String, mut f: impl FnMut(&str, i64)) {
        self.for_each_counter(|counter, delta| {
            counter.write_name(Share::All, name);
            f(name, delta)
        });
    }
}

/// Whose events a counter counts: all of them, or the Wikidata events among them (the
/// `pleiades_wikidata_<x>` share of `pleiades_<x>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Share {
    All,
    Wikidata,
}

/// A counter before it has a name: what the counter rules produce, so that counting can
/// place it by structure (`tally`), and [`Counter::write_name`] spells it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter<'a> {
    Total,
    Wiki(&'a str),
    Type(TypeName<'a>),
    Bot,
    Minor,
    LengthInc,
    LengthDec,
    Growth,
    Family(Family),
    /// A family and its language code, as the event spells it ([`language_label`] names it).
    Language(Family, &'a str),
    Namespace(i64),
    User(UserClass),
    LogType(&'a str),
    /// A log type and its action.
    LogAction(&'a str, &'a str),
    Patrolled,
    Unpatrolled,
    BytesAdded,
    BytesRemoved,
    /// Per hour only: events not made by bots.
    Human,
}

impl Counter<'_> {
    /// Writes the counter's name for `share` into `name` (cleared first).
    pub fn write_name(self, share: Share, name: &mut String) {
        use std::fmt::Write;
        name.clear();
        name.push_str(match share {
            Share::All => "pleiades_",
            Share::Wikidata => WIKIDATA_PREFIX,
        });
        let fixed = match self {
            Counter::Total => "total",
            Counter::Bot => "bot",
            Counter::Minor => "minor",
            Counter::LengthInc => "length_inc",
            Counter::LengthDec => "length_dec",
            Counter::Growth => "growth",
            Counter::Patrolled => "patrolled",
            Counter::Unpatrolled => "unpatrolled",
            Counter::BytesAdded => "bytes_added",
            Counter::BytesRemoved => "bytes_removed",
            Counter::Human => "human",
            Counter::Wiki(wiki) => {
                name.push_str("wiki_");
                wiki
            }
            Counter::Type(TypeName::Text(kind)) => {
                name.push_str("type_");
                kind
            }
            Counter::Type(TypeName::Number(n)) => {
                // Writing into a String cannot fail.
                let _ = write!(name, "type_{n}");
                ""
            }
            Counter::Family(family) => {
                name.push_str("family_");
                family.as_str()
            }
            Counter::Language(family, language) => {
                name.push_str("language_");
                name.push_str(family.as_str());
                name.push('_');
                name.push_str(&language_label(language));
                ""
            }
            Counter::Namespace(n) => {
                let _ = write!(name, "namespace_{n}");
                ""
            }
            Counter::User(class) => {
                name.push_str("user_");
                class.as_str()
            }
            Counter::LogType(log_type) => {
                name.push_str("log_type_");
                log_type
            }
            Counter::LogAction(log_type, action) => {
                name.push_str("log_action_");
                name.push_str(log_type);
                name.push('/');
                action
            }
        };
        name.push_str(fixed);
    }
}

/// Owned copies of the rare escaped strings, kept by the caller and reused across events.
#[derive(Debug, Default)]
pub struct Scratch {
    wiki: Option<String>,
    kind: Option<String>,
}

// The further dimensions (SPEC §5 welcomes them under new names; the counters above never
// change meaning): who edits, where, when and what.

/// Prefix of `pleiades_family_<family>`: every event counts in exactly one family.
pub const FAMILY_PREFIX: &str = "pleiades_family_";
/// Prefix of `pleiades_language_<family>_<language>`, for the families with a wiki per language.
pub const LANGUAGE_PREFIX: &str = "pleiades_language_";
/// Prefix of `pleiades_namespace_<n>`, when `namespace` is an integer.
pub const NAMESPACE_PREFIX: &str = "pleiades_namespace_";
/// Prefix of `pleiades_user_<class>`, when `user` is a non-empty string ([`UserClass`]).
pub const USER_PREFIX: &str = "pleiades_user_";
/// Prefix of `pleiades_log_type_<type>`, when `log_type` is a non-empty string.
pub const LOG_TYPE_PREFIX: &str = "pleiades_log_type_";
/// Prefix of `pleiades_log_action_<type>/<action>`, when both are non-empty strings.
pub const LOG_ACTION_PREFIX: &str = "pleiades_log_action_";
pub const PATROLLED: &str = "pleiades_patrolled";
pub const UNPATROLLED: &str = "pleiades_unpatrolled";
/// `+ (new - old)` when a page grew (the `pleiades_length_inc` events).
pub const BYTES_ADDED: &str = "pleiades_bytes_added";
/// `+ (old - new)` when a page shrank (the `pleiades_length_dec` events).
pub const BYTES_REMOVED: &str = "pleiades_bytes_removed";
/// Per hour only: the events not made by bots (`bot` is not `true`).
pub const HUMAN: &str = "pleiades_human";
/// Prefix of the Wikidata share of a counter: `pleiades_wikidata_<x>` counts the Wikidata
/// events among those of `pleiades_<x>`, so that any panel can leave Wikidata out by
/// subtraction.
pub const WIKIDATA_PREFIX: &str = "pleiades_wikidata_";

/// Who made an edit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserClass {
    /// `bot` is `true`.
    Bot,
    /// A named account.
    Registered,
    /// A temporary account: Wikimedia names them starting with `~` (`~2026-12881-95`).
    Temporary,
    /// No account: the user is an IPv4 or IPv6 address.
    Anonymous,
}

impl UserClass {
    pub const ALL: [UserClass; 4] = [
        UserClass::Bot,
        UserClass::Registered,
        UserClass::Temporary,
        UserClass::Anonymous,
    ];

    /// Its place in [`UserClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UserClass::Bot => "bot",
            UserClass::Registered => "registered",
            UserClass::Temporary => "temporary",
            UserClass::Anonymous => "anonymous",
        }
    }

    /// The class of a non-empty `user`; `bot` is the event's `bot` flag.
    pub fn of(user: &str, bot: bool) -> UserClass {
        if bot {
            UserClass::Bot
        } else if user.starts_with('~') {
            UserClass::Temporary
        } else if user.parse::<core::net::IpAddr>().is_ok() {
            UserClass::Anonymous
        } else {
            UserClass::Registered
        }
    }
}

/// The two top lists of a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TopList {
    /// Pages, keyed by `wiki` and `title` (a tab between them).
    Pages,
    /// Editors, keyed by `user`.
    Editors,
}

impl TopList {
    pub const ALL: [TopList; 2] = [TopList::Pages, TopList::Editors];

    /// Its place in [`TopList::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TopList::Pages => "pages",
            TopList::Editors => "editors",
        }
    }

    pub fn parse(name: &str) -> Option<TopList> {
        TopList::ALL.into_iter().find(|l| l.as_str() == name)
    }
}

/// A per-hour counter's name: `HH:<counter>` (hours of the UTC day, `00` to `23`).
pub fn hour_counter(hour: u32, counter: &str) -> String {
    format!("{hour:02}:{counter}")
}

/// The counters each hour may have (without their `HH:`): the total, bots, humans, the
/// Wikidata share of bots and humans, and every family.
pub fn hourly_counters() -> Vec<String> {
    let mut names: Vec<String> = [TOTAL, BOT, HUMAN]
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
    names.push(format!("{WIKIDATA_PREFIX}bot"));
    names.push(format!("{WIKIDATA_PREFIX}human"));
    names.extend(
        Family::ALL
            .iter()
            .map(|f| format!("{FAMILY_PREFIX}{}", f.as_str())),
    );
    names
}

/// The hour and counter of a per-hour counter's name.
pub fn split_hour_counter(name: &str) -> Option<(u32, &str)> {
    let (hour, counter) = name.split_once(':')?;
    let hour: u32 = hour.parse().ok().filter(|h| *h < 24)?;
    Some((hour, counter))
}

/// What an event says beyond the SPEC §5 counters, decoded from its head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dimensions<'a> {
    pub project: Project<'a>,
    pub namespace: Option<i64>,
    /// `user` when it is a non-empty string, and its class.
    pub user: Option<(&'a str, UserClass)>,
    pub title: Option<&'a str>,
    /// `server_name` when it is a host name (it becomes a link).
    pub server: Option<&'a str>,
    pub log_type: Option<&'a str>,
    pub log_action: Option<&'a str>,
    pub patrolled: Option<bool>,
    /// The hour of the UTC day, 0 to 23.
    pub hour: u32,
    /// Orders the event for the top lists' samples ([`event_hash`]).
    pub event_hash: u64,
}

/// Owned copies of the escaped strings of the further dimensions, reused across events.
#[derive(Debug, Default)]
pub struct DimensionScratch {
    user: Option<String>,
    title: Option<String>,
    server: Option<String>,
    log_type: Option<String>,
    log_action: Option<String>,
}

/// A non-empty string field, borrowed when it holds no escape, else decoded into `slot`.
fn text<'a>(raw: Option<&'a RawValue>, slot: &'a mut Option<String>) -> Option<&'a str> {
    let raw = raw?;
    if let Some(text) = raw_str(raw) {
        return (!text.is_empty()).then_some(text);
    }
    if !raw.get().starts_with('"') {
        return None;
    }
    *slot = serde_json::from_str::<String>(raw.get()).ok();
    slot.as_deref().filter(|t| !t.is_empty())
}

impl<'a> Dimensions<'a> {
    /// The further dimensions of a valid, non-canary event; `deltas` are its SPEC §5
    /// increments (for the wiki and the bot flag, decoded once).
    pub fn of(
        head: &EventHead<'a>,
        deltas: &Deltas<'a>,
        scratch: &'a mut DimensionScratch,
    ) -> Dimensions<'a> {
        let DimensionScratch {
            user,
            title,
            server,
            log_type,
            log_action,
        } = scratch;
        let server = text(head.server_name, server).filter(|s| crate::project::is_host_name(s));
        let user = text(head.user, user).map(|u| (u, UserClass::of(u, deltas.bot)));
        let namespace = head.namespace.and_then(|raw| raw.get().parse::<i64>().ok());
        let patrolled = head.patrolled.and_then(|raw| match raw.get() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
        let event_hash = match head.id.as_deref() {
            Some(id) => event_hash(id),
            // Events without `meta.id` are rare; their time orders them as well as anything.
            None => event_hash(&head.time_ms.to_string()),
        };
        Dimensions {
            project: Project::of(deltas.wiki, server),
            namespace,
            user,
            title: text(head.title, title),
            server,
            log_type: text(head.log_type, log_type),
            log_action: text(head.log_action, log_action),
            patrolled,
            hour: (head.time_ms.rem_euclid(DAY_MS) / 3_600_000) as u32,
            event_hash,
        }
    }

    fn wikidata(&self) -> bool {
        self.project.family == Family::Wikidata
    }

    /// Calls `f(share, counter, delta)` for every further counter of the event's day and of all
    /// time: its family and language, namespace, user class, log type and action, patrol state,
    /// bytes added or removed, and the Wikidata share of these and of the SPEC §5 counters.
    pub fn for_each_counter(
        &self,
        deltas: &Deltas<'a>,
        mut f: impl FnMut(Share, Counter<'a>, i64),
    ) {
        let wikidata = self.wikidata();
        // Every event's, and for a mirrored counter of a Wikidata event, Wikidata's share.
        let mut put = |counter: Counter<'a>, delta: i64, mirrored: bool| {
            f(Share::All, counter, delta);
            if mirrored && wikidata {
                f(Share::Wikidata, counter, delta);
            }
        };
        let family = self.project.family;
        put(Counter::Family(family), 1, false);
        if let Some(language) = self.project.language {
            put(Counter::Language(family, language), 1, false);
        }
        if let Some(namespace) = self.namespace {
            put(Counter::Namespace(namespace), 1, true);
        }
        if let Some((_, class)) = self.user {
            put(Counter::User(class), 1, true);
        }
        if let Some(log_type) = self.log_type {
            put(Counter::LogType(log_type), 1, true);
            if let Some(action) = self.log_action {
                put(Counter::LogAction(log_type, action), 1, false);
            }
        }
        match self.patrolled {
            Some(true) => put(Counter::Patrolled, 1, true),
            Some(false) => put(Counter::Unpatrolled, 1, true),
            None => {}
        }
        if let Some((old, new)) = deltas.length {
            if new > old {
                put(Counter::BytesAdded, new.saturating_sub(old), true);
            } else if new < old {
                put(Counter::BytesRemoved, old.saturating_sub(new), true);
            }
        }
        if wikidata {
            // The Wikidata share of the SPEC §5 counters but the total (that is
            // pleiades_family_wikidata) and the wiki (wikidatawiki is all Wikidata).
            deltas.for_each_counter(|counter, delta| {
                if !matches!(counter, Counter::Total | Counter::Wiki(_)) {
                    f(Share::Wikidata, counter, delta);
                }
            });
        }
    }

    /// [`Dimensions::for_each_counter`] by name: `f(name, delta)`, the name built in `name`.
    pub fn for_each(&self, deltas: &Deltas<'a>, name: &mut String, mut f: impl FnMut(&str, i64)) {
        self.for_each_counter(deltas, |share, counter, delta| {
            counter.write_name(share, name);
            f(name, delta)
        });
    }

    /// Calls `f(share, counter)` for every per-hour counter of the event (each counts 1 in the
    /// event's hour): the total, bots or humans, its family, and the Wikidata share of bots and
    /// humans.
    pub fn for_each_hourly_counter(
        &self,
        deltas: &Deltas<'_>,
        mut f: impl FnMut(Share, Counter<'static>),
    ) {
        f(Share::All, Counter::Total);
        let who = if deltas.bot {
            Counter::Bot
        } else {
            Counter::Human
        };
        f(Share::All, who);
        f(Share::All, Counter::Family(self.project.family));
        if self.wikidata() {
            f(Share::Wikidata, who);
        }
    }

    /// [`Dimensions::for_each_hourly_counter`] by name ([`hour_counter`] names): `f(name)`.
    pub fn for_each_hourly(&self, deltas: &Deltas<'_>, name: &mut String, mut f: impl FnMut(&str)) {
        let hour = self.hour.min(23);
        let mut counter_name = String::new();
        self.for_each_hourly_counter(deltas, |share, counter| {
            counter.write_name(share, &mut counter_name);
            name.clear();
            name.push_str(&hour_counter(hour, &counter_name));
            f(name)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::inspect;
    use crate::event::recorded::lines as recorded;

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
    fn tally_merges_by_day_and_all_time() {
        let mut open = OpenTally::default();
        for data in [
            r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"wiki":"enwiki"}"#,
            r#"{"meta":{"dt":"2022-12-11T23:59:59Z"},"wiki":"enwiki"}"#,
            r#"{"meta":{"dt":"2022-12-12T00:00:00Z"},"wiki":"dewiki"}"#,
        ] {
            open.count(&inspect(data).unwrap(), false);
        }
        let tally = open.seal();
        assert_eq!(tally.events, 3);
        assert_eq!(tally.days[&19337]["pleiades_wiki_enwiki"], 2);
        assert_eq!(tally.days[&19338]["pleiades_wiki_dewiki"], 1);
        assert_eq!(tally.all_time()[TOTAL], 3);
    }

    /// The further counters (day and all-time) and the per-hour ones of one event.
    fn dimensions(data: &str) -> (Vec<(String, i64)>, Vec<String>) {
        let head = inspect(data).unwrap();
        let mut scratch = Scratch::default();
        let mut more = DimensionScratch::default();
        let deltas = Deltas::of(&head, &mut scratch);
        let dims = Dimensions::of(&head, &deltas, &mut more);
        let mut counters = Vec::new();
        dims.for_each(&deltas, &mut String::new(), |n, d| {
            counters.push((n.to_owned(), d))
        });
        counters.sort();
        let mut hourly = Vec::new();
        dims.for_each_hourly(&deltas, &mut String::new(), |n| hourly.push(n.to_owned()));
        hourly.sort();
        (counters, hourly)
    }

    /// A recorded event changed by `edit`, as JSON text.
    fn variant(line: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        edit(&mut v);
        v.to_string()
    }

    #[test]
    fn an_edit_counts_its_project_namespace_user_and_bytes() {
        let line = &recorded("recentchange-2022-2026.jsonl")[1];
        // en.wiktionary.org, namespace 0, "Chuck Entz", patrolled, 14664 -> 14626 bytes, 04:27Z.
        let (counters, hourly) = dimensions(line);
        let mut want = vec![
            c("pleiades_family_wiktionary", 1),
            c("pleiades_language_wiktionary_en", 1),
            c("pleiades_namespace_0", 1),
            c("pleiades_user_registered", 1),
            c(PATROLLED, 1),
            c(BYTES_REMOVED, 38),
        ];
        want.sort();
        assert_eq!(counters, want);
        assert_eq!(
            hourly,
            vec![
                "04:pleiades_family_wiktionary",
                "04:pleiades_human",
                "04:pleiades_total"
            ]
        );
    }

    #[test]
    fn a_wikidata_event_also_counts_in_the_wikidata_share() {
        let line = &recorded("recentchange-2022-2026.jsonl")[2];
        // www.wikidata.org, bot Cewbot, namespace 0, 28614 -> 26784 bytes.
        let (counters, hourly) = dimensions(line);
        let mut want = vec![
            c("pleiades_family_wikidata", 1),
            c("pleiades_namespace_0", 1),
            c("pleiades_wikidata_namespace_0", 1),
            c("pleiades_user_bot", 1),
            c("pleiades_wikidata_user_bot", 1),
            c(PATROLLED, 1),
            c("pleiades_wikidata_patrolled", 1),
            c(BYTES_REMOVED, 1830),
            c("pleiades_wikidata_bytes_removed", 1830),
            // The Wikidata share of the SPEC §5 counters.
            c("pleiades_wikidata_type_edit", 1),
            c("pleiades_wikidata_bot", 1),
            c("pleiades_wikidata_length_dec", 1),
            c("pleiades_wikidata_growth", -1830),
        ];
        want.sort();
        assert_eq!(counters, want);
        assert_eq!(
            hourly,
            vec![
                "04:pleiades_bot",
                "04:pleiades_family_wikidata",
                "04:pleiades_total",
                "04:pleiades_wikidata_bot"
            ]
        );
    }

    #[test]
    fn user_classes_of_the_recorded_editors() {
        let class = |line: &str| {
            let (counters, _) = dimensions(line);
            counters
                .into_iter()
                .find_map(|(n, _)| n.strip_prefix(USER_PREFIX).map(str::to_owned))
        };
        let lines = recorded("recentchange-2022-2026.jsonl");
        let find = |pattern: &str| {
            lines
                .iter()
                .find(|l| l.contains(pattern))
                .unwrap_or_else(|| panic!("no recorded event with {pattern}"))
        };
        // A temporary account, an IPv6 editor and an IPv4 editor, as recorded.
        assert_eq!(
            class(find(r#""user":"~2026-"#)).as_deref(),
            Some("temporary")
        );
        assert_eq!(
            class(find("2600:8801:8A00:980:8549:C495:5501:6623")).as_deref(),
            Some("anonymous")
        );
        assert_eq!(class(find("87.12.215.232")).as_deref(), Some("anonymous"));
        // The 2018 format has IPv6 editors too.
        let old = recorded("recentchange-2018-wikidata.jsonl");
        let v6 = old
            .iter()
            .find(|l| l.contains("2A02:120B:C3E3:BA50:71B5:4541:38D:F08"))
            .expect("an IPv6 editor in 2018");
        assert_eq!(class(v6).as_deref(), Some("anonymous"));
        // A bot is a bot whatever its name; no user, no class.
        let bot_ip = variant(find("87.12.215.232"), |v| v["bot"] = true.into());
        assert_eq!(class(&bot_ip).as_deref(), Some("bot"));
        for missing in [
            serde_json::Value::Null,
            "".into(),
            7.into(),
            serde_json::json!(["a"]),
        ] {
            let odd = variant(&lines[1], |v| v["user"] = missing.clone());
            assert_eq!(class(&odd), None, "{odd}");
        }
        for (index, class) in UserClass::ALL.into_iter().enumerate() {
            assert_eq!(class.index(), index);
        }
        for (index, list) in TopList::ALL.into_iter().enumerate() {
            assert_eq!(list.index(), index);
        }
        assert_eq!(UserClass::of("~", false), UserClass::Temporary);
        assert_eq!(UserClass::of("::1", false), UserClass::Anonymous);
        assert_eq!(UserClass::of("1.2.3", false), UserClass::Registered);
    }

    #[test]
    fn log_events_count_their_type_and_action_even_without_a_namespace() {
        let lines = recorded("recentchange-2022-2026.jsonl");
        let log = lines
            .iter()
            .find(|l| l.contains(r#""log_type":"block""#))
            .expect("a recorded block");
        let (counters, _) = dimensions(log);
        assert!(
            counters.contains(&c("pleiades_log_type_block", 1)),
            "{counters:?}"
        );
        assert!(counters.contains(&c("pleiades_log_action_block/reblock", 1)));
        assert!(counters
            .iter()
            .any(|(n, _)| n.starts_with(NAMESPACE_PREFIX)));
        // The same event without a namespace (as log events may come): no namespace counted.
        let bare = variant(log, |v| {
            v.as_object_mut().unwrap().remove("namespace");
        });
        let (counters, _) = dimensions(&bare);
        assert!(!counters
            .iter()
            .any(|(n, _)| n.starts_with(NAMESPACE_PREFIX)));
        assert!(counters.contains(&c("pleiades_log_type_block", 1)));
        // A namespace that is not an integer does not count either.
        for odd in [
            serde_json::json!("0"),
            serde_json::json!(1.5),
            serde_json::json!(null),
        ] {
            let line = variant(log, |v| v["namespace"] = odd.clone());
            let (counters, _) = dimensions(&line);
            assert!(
                !counters
                    .iter()
                    .any(|(n, _)| n.starts_with(NAMESPACE_PREFIX)),
                "{line}"
            );
        }
    }

    #[test]
    fn numeric_types_missing_lengths_and_escapes() {
        let lines = recorded("recentchange-2022-2026.jsonl");
        // A Wikidata event with a numeric type: the Wikidata share carries it as SPEC §5 does.
        let numeric = variant(&lines[2], |v| v["type"] = 3.into());
        let (counters, _) = dimensions(&numeric);
        assert!(
            counters.contains(&c("pleiades_wikidata_type_3", 1)),
            "{counters:?}"
        );
        // A categorize event has no length: no bytes either way.
        let categorize = lines
            .iter()
            .find(|l| l.contains(r#""type":"categorize""#))
            .expect("a categorize event");
        let (counters, _) = dimensions(categorize);
        assert!(!counters
            .iter()
            .any(|(n, _)| n.starts_with("pleiades_bytes_")));
        // A new page (only length.new) adds all its bytes.
        let new_page = lines
            .iter()
            .find(|l| l.contains(r#""type":"new""#))
            .expect("a new page");
        let v: serde_json::Value = serde_json::from_str(new_page).unwrap();
        let (counters, _) = dimensions(new_page);
        assert!(counters.contains(&c(BYTES_ADDED, v["length"]["new"].as_i64().unwrap())));
        // Escaped strings are decoded: the same user and host, written with escapes.
        let escaped = lines[1]
            .replace(r#""user":"Chuck Entz""#, r#""user":"\u0043huck Entz""#)
            .replace(
                r#""server_name":"en.wiktionary.org""#,
                r#""server_name":"en.wiktionary\u002eorg""#,
            );
        assert_ne!(escaped, lines[1]);
        assert_eq!(dimensions(&escaped), dimensions(&lines[1]));
    }

    #[test]
    fn the_recorded_events_add_up() {
        for (file, users, logs, bytes) in [
            (
                "recentchange-2022-2026.jsonl",
                [
                    ("bot", 258),
                    ("registered", 370),
                    ("temporary", 23),
                    ("anonymous", 30),
                ],
                &[
                    ("block", 13),
                    ("delete", 13),
                    ("upload", 8),
                    ("abusefilter", 4),
                ][..],
                (301_786, 25_829),
            ),
            (
                "recentchange-2018-wikidata.jsonl",
                [
                    ("bot", 4580),
                    ("registered", 1079),
                    ("temporary", 0),
                    ("anonymous", 30),
                ],
                &[("abusefilter", 17), ("patrol", 8), ("tag", 2)][..],
                (975_218, 37_722),
            ),
        ] {
            let mut open = OpenTally::default();
            for line in recorded(file) {
                open.count(&inspect(&line).unwrap(), true);
            }
            let tally = open.seal();
            let all = tally.all_time();
            let get = |n: &str| all.get(n).copied().unwrap_or(0);
            for (class, want) in users {
                assert_eq!(
                    get(&format!("{USER_PREFIX}{class}")),
                    want,
                    "{file} {class}"
                );
            }
            for (kind, want) in logs {
                assert_eq!(
                    get(&format!("{LOG_TYPE_PREFIX}{kind}")),
                    *want,
                    "{file} {kind}"
                );
            }
            assert_eq!((get(BYTES_ADDED), get(BYTES_REMOVED)), bytes, "{file}");
            assert_eq!(get(BYTES_ADDED) - get(BYTES_REMOVED), get(GROWTH), "{file}");
            // Every event is in exactly one family, and Wikidata's share never exceeds a whole.
            let families: i64 = all
                .iter()
                .filter(|(n, _)| n.starts_with(FAMILY_PREFIX))
                .map(|(_, v)| v)
                .sum();
            assert_eq!(families, get(TOTAL), "{file}");
            for (n, v) in all.iter().filter(|(n, _)| n.starts_with(WIKIDATA_PREFIX)) {
                let whole = get(&format!("pleiades_{}", &n[WIKIDATA_PREFIX.len()..]));
                assert!(v.abs() <= whole.abs(), "{file}: {n} {v} > {whole}");
            }
            // Each day's hours add up to the day; humans and bots make up every hour.
            for (day, hours) in &tally.hours {
                let sum = |counter: &str| -> i64 {
                    hours
                        .iter()
                        .filter(|(n, _)| split_hour_counter(n).is_some_and(|(_, c)| c == counter))
                        .map(|(_, v)| v)
                        .sum()
                };
                assert_eq!(sum(TOTAL), tally.days[day][TOTAL], "{file} {day}");
                assert_eq!(sum(HUMAN) + sum(BOT), sum(TOTAL), "{file} {day}");
                assert_eq!(sum(BOT), tally.days[day].get(BOT).copied().unwrap_or(0));
            }
            // Sketches: one per day and family, each holding that day's events.
            for ((day, family, list), sketch) in &tally.top {
                assert!(!sketch.is_empty(), "{file} {day} {family:?} {list:?}");
            }
            // Distinct editors: the union of a day's family sketches, against the exact count.
            let mut users: HashMap<i64, std::collections::HashSet<String>> = HashMap::new();
            for line in recorded(file) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let day = inspect(&line).unwrap().time_ms.div_euclid(DAY_MS);
                users
                    .entry(day)
                    .or_default()
                    .insert(v["user"].as_str().unwrap().to_owned());
            }
            for (day, names) in users {
                let mut union = crate::sketch::hll::HyperLogLog::default();
                for ((d, _), sketch) in &tally.editors {
                    if *d == day {
                        union.merge(sketch);
                    }
                }
                let (count, exact) = (union.count() as f64, names.len() as f64);
                let bound = (3.0 * crate::sketch::hll::STANDARD_ERROR * exact).max(1.0);
                assert!(
                    (count - exact).abs() <= bound,
                    "{file} {day}: {count} for {exact}"
                );
            }
        }
    }

    #[test]
    fn hour_counter_names_round_trip() {
        assert_eq!(hour_counter(7, BOT), "07:pleiades_bot");
        assert_eq!(split_hour_counter("07:pleiades_bot"), Some((7, BOT)));
        assert_eq!(split_hour_counter("24:pleiades_bot"), None);
        assert_eq!(split_hour_counter("pleiades_bot"), None);
        let midnight = r#"{"meta":{"dt":"2022-12-11T23:59:59.999Z"},"wiki":"enwiki"}"#;
        assert!(dimensions(midnight)
            .1
            .contains(&"23:pleiades_total".to_owned()));
        let before_1970 = r#"{"meta":{"dt":"1969-12-31T22:10:00Z"},"wiki":"enwiki"}"#;
        assert!(dimensions(before_1970)
            .1
            .contains(&"22:pleiades_total".to_owned()));
    }
    #[test]
    fn a_rebuild_counts_the_same_days_without_hours_or_sketches() {
        for file in crate::event::recorded::FILES {
            let (mut everything, mut days) = (OpenTally::default(), OpenTally::default());
            for line in recorded(file) {
                let head = inspect(&line).unwrap();
                if head.canary {
                    continue;
                }
                everything.count(&head, true);
                days.count_days(&head);
            }
            let (everything, days) = (everything.seal(), days.seal());
            assert!(
                everything.events > 0 && !everything.hours.is_empty(),
                "{file}"
            );
            assert_eq!(days.days, everything.days, "{file}");
            assert_eq!(days.events, everything.events, "{file}");
            assert!(days.hours.is_empty() && days.editors.is_empty() && days.top.is_empty());
            // Counted in three parts and added up, the sums are those of one pass.
            let lines = recorded(file);
            let mut summed = OpenTally::default();
            for part in lines.chunks(lines.len().div_ceil(3)) {
                let mut tally = OpenTally::default();
                for line in part {
                    let head = inspect(line).unwrap();
                    if !head.canary {
                        tally.count_days(&head);
                    }
                }
                summed.add_sums(tally.seal());
            }
            let summed = summed.seal();
            assert_eq!(summed.days, days.days, "{file}");
            assert_eq!(summed.events, days.events, "{file}");
        }
    }
}
