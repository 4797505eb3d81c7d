//! Counting a batch in memory: an [`OpenTally`] places each counter the rules produce in a
//! cell by its structure, and seals into a [`Tally`], the named sums the stores apply.
//!
//! A counter's name is spelled once per batch, not once per event: an event's counters are
//! array increments, found by arithmetic for the counters of fixed number (families, user
//! classes, the per-hour buckets) and through a short key (the wiki, the namespace) for the
//! others. Building and hashing a name for each of an event's twenty-odd counters cost more
//! than parsing the event.

use super::{
    hour_counter, Counter, Counts, Deltas, DimensionScratch, Dimensions, FastMap, Scratch, Share,
    TopList, TypeName, UserClass,
};
use crate::coverage::DayCoverage;
use crate::event::{epoch_day, EventHead};
use crate::project::Family;
use crate::sketch::hll::{HyperLogLog, Registers};
use crate::sketch::top::{TopCount, TopSketch};

/// Increments merged in memory: per day, and all-time ([`Tally::all_time`]); what a batch
/// applies. Counted by an [`OpenTally`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub days: FastMap<i64, Counts>,
    /// Events counted into this tally.
    pub events: u64,
    /// The per-hour counters of each day, named `HH:<counter>` ([`hour_counter`]).
    pub hours: FastMap<i64, Counts>,
    /// The distinct-editor sketch of each day and family.
    pub editors: FastMap<(i64, Family), HyperLogLog>,
    /// The busiest-pages and busiest-editors sketches of each day and family.
    pub top: FastMap<(i64, Family, TopList), TopSketch>,
    /// The upstream offsets of each day's events, canaries included (`coverage`).
    pub coverage: FastMap<i64, DayCoverage>,
}

impl Tally {
    /// Adds another tally's day counters and events to this one: for tallies that hold sums
    /// only ([`OpenTally::count_days`]), where counting parts apart and adding them up is one
    /// pass. The per-hour buckets, sketches and coverage of `other` are not taken.
    pub fn add_sums(&mut self, other: Tally) {
        for (day, values) in other.days {
            let into = self.days.entry(day).or_default();
            if into.is_empty() {
                *into = values;
                continue;
            }
            for (name, delta) in values {
                add_named(into, name, delta);
            }
        }
        self.events += other.events;
    }

    /// The all-time increments: the sum of the days'. An event counts the same in its day and
    /// all-time, so each event is added to one map, and the days are summed once per batch.
    pub fn all_time(&self) -> Counts {
        let mut all = Counts::default();
        for values in self.days.values() {
            for (name, delta) in values {
                bump(&mut all, name, *delta);
            }
        }
        all
    }

    /// True when the tally neither counts an event nor covers one.
    pub fn is_empty(&self) -> bool {
        self.events == 0 && self.coverage.is_empty()
    }
}

/// Adds `delta` to the counter `name`, saturating at the bounds of i64: events are
/// range-checked (see `event::MAX_PAGE_LENGTH`), so only an absurd number of them could get
/// there, and a counter pinned at its bound is better than one that wraps or a batch that can
/// never be applied.
fn add_named(map: &mut Counts, name: String, delta: i64) {
    match map.get_mut(name.as_str()) {
        Some(value) => *value = value.saturating_add(delta),
        None => {
            map.insert(name, delta);
        }
    }
}

/// The counters with a place of their own in every day, for each share: those of fixed
/// number. The others are interned ([`Names`]).
const FIXED: usize = 15 + Family::ALL.len();

/// The place of a counter of fixed number among a share's [`FIXED`] cells.
fn fixed_cell(counter: Counter<'_>) -> Option<usize> {
    Some(match counter {
        Counter::Total => 0,
        Counter::Bot => 1,
        Counter::Minor => 2,
        Counter::LengthInc => 3,
        Counter::LengthDec => 4,
        Counter::Growth => 5,
        Counter::Patrolled => 6,
        Counter::Unpatrolled => 7,
        Counter::BytesAdded => 8,
        Counter::BytesRemoved => 9,
        Counter::Human => 10,
        Counter::User(class) => 11 + class.index(),
        Counter::Family(family) => 15 + family.index(),
        _ => return None,
    })
}

/// The counters of fixed number, in cell order: [`fixed_cell`] inverted.
fn fixed_counters() -> impl Iterator<Item = Counter<'static>> {
    [
        Counter::Total,
        Counter::Bot,
        Counter::Minor,
        Counter::LengthInc,
        Counter::LengthDec,
        Counter::Growth,
        Counter::Patrolled,
        Counter::Unpatrolled,
        Counter::BytesAdded,
        Counter::BytesRemoved,
        Counter::Human,
    ]
    .into_iter()
    .chain(UserClass::ALL.into_iter().map(Counter::User))
    .chain(Family::ALL.into_iter().map(Counter::Family))
}

/// The per-hour counters of a day: [`HOURLY`] cells per hour.
const HOURLY: usize = 5 + Family::ALL.len();

/// The place of a per-hour counter among an hour's [`HOURLY`] cells, in the order of
/// [`super::hourly_counters`].
fn hourly_cell(share: Share, counter: Counter<'_>) -> Option<usize> {
    Some(match (share, counter) {
        (Share::All, Counter::Total) => 0,
        (Share::All, Counter::Bot) => 1,
        (Share::All, Counter::Human) => 2,
        (Share::Wikidata, Counter::Bot) => 3,
        (Share::Wikidata, Counter::Human) => 4,
        (Share::All, Counter::Family(family)) => 5 + family.index(),
        _ => return None,
    })
}

/// The names of the cells: fixed, then interned in pairs (every event's, Wikidata's share).
/// Kept from one batch to the next, so that a batch spells only the names it meets first.
#[derive(Debug)]
struct Names {
    /// By cell.
    names: Vec<String>,
    /// `HH:<counter>` by hour × [`HOURLY`] + per-hour cell.
    hourly: Vec<String>,
    /// The first cell of each interned counter, by its key.
    wiki: FastMap<Box<str>, usize>,
    kind: FastMap<Box<str>, usize>,
    kind_number: FastMap<i64, usize>,
    namespace: FastMap<i64, usize>,
    /// By family.
    language: [FastMap<Box<str>, usize>; Family::ALL.len()],
    log_type: FastMap<Box<str>, usize>,
    /// By `<type>/<action>`.
    log_action: FastMap<Box<str>, usize>,
    /// Where a log action's key is built.
    key: String,
}

/// More cells than this and the names start afresh at the next seal: a stream of ever new
/// wikis, types or log actions (a hostile one) cannot grow them from batch to batch. Within
/// a batch they grow at most with its events (a dozen cells each).
const MAX_CELLS: usize = 1 << 16;

impl Names {
    fn new() -> Names {
        let mut name = String::new();
        let mut names = Vec::with_capacity(2 * FIXED);
        for share in [Share::All, Share::Wikidata] {
            for counter in fixed_counters() {
                counter.write_name(share, &mut name);
                names.push(name.clone());
            }
        }
        let per_hour = super::hourly_counters();
        let hourly = (0..24)
            .flat_map(|hour| per_hour.iter().map(move |c| hour_counter(hour, c)))
            .collect();
        Names {
            names,
            hourly,
            wiki: FastMap::default(),
            kind: FastMap::default(),
            kind_number: FastMap::default(),
            namespace: FastMap::default(),
            language: Default::default(),
            log_type: FastMap::default(),
            log_action: FastMap::default(),
            key: String::new(),
        }
    }

    /// The cell of `counter` for `share`.
    fn cell(&mut self, share: Share, counter: Counter<'_>) -> usize {
        let wikidata = usize::from(share == Share::Wikidata);
        if let Some(cell) = fixed_cell(counter) {
            return wikidata * FIXED + cell;
        }
        let names = &mut self.names;
        let first = match counter {
            Counter::Wiki(wiki) => by_text(&mut self.wiki, names, wiki, counter),
            Counter::Type(TypeName::Text(kind)) => by_text(&mut self.kind, names, kind, counter),
            Counter::Type(TypeName::Number(n)) => {
                by_number(&mut self.kind_number, names, n, counter)
            }
            Counter::Namespace(n) => by_number(&mut self.namespace, names, n, counter),
            Counter::Language(family, language) => {
                by_text(&mut self.language[family.index()], names, language, counter)
            }
            Counter::LogType(log_type) => by_text(&mut self.log_type, names, log_type, counter),
            Counter::LogAction(log_type, action) => {
                self.key.clear();
                self.key.push_str(log_type);
                self.key.push('/');
                self.key.push_str(action);
                by_text(&mut self.log_action, names, &self.key, counter)
            }
            // Every other counter has a fixed cell.
            _ => 0,
        };
        first + wikidata
    }
}

/// The first of the two cells of `counter`, keyed by `key`; named when first met.
fn by_text(
    map: &mut FastMap<Box<str>, usize>,
    names: &mut Vec<String>,
    key: &str,
    counter: Counter<'_>,
) -> usize {
    if let Some(first) = map.get(key) {
        return *first;
    }
    let first = new_pair(names, counter);
    map.insert(key.into(), first);
    first
}

/// [`by_text`] for a counter keyed by a number.
fn by_number(
    map: &mut FastMap<i64, usize>,
    names: &mut Vec<String>,
    key: i64,
    counter: Counter<'_>,
) -> usize {
    *map.entry(key).or_insert_with(|| new_pair(names, counter))
}

/// Names the two cells of a newly met counter.
fn new_pair(names: &mut Vec<String>, counter: Counter<'_>) -> usize {
    let first = names.len();
    for share in [Share::All, Share::Wikidata] {
        let mut name = String::new();
        counter.write_name(share, &mut name);
        names.push(name);
    }
    first
}

/// A counter's value in a day, and whether any event counted in it (a counter counted with
/// a net change of zero, as `pleiades_growth` may be, still exists).
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    value: i64,
    counted: bool,
}

/// The days of a batch counted in cells: a batch of live or backfilled events spans one or
/// two. Further days (events of many days in one batch, as a hostile peer may send) are
/// counted by name into maps ([`count_named`]), so that a batch's memory grows with what it
/// counts, never with days × cells (a day's cells cost 16 bytes for every name met, and its
/// sketches up to 40 KiB per family).
const DENSE_DAYS: usize = 8;

/// What a batch counted in one day.
#[derive(Debug)]
struct Day {
    day: i64,
    cells: Vec<Cell>,
    /// By hour × [`HOURLY`] + per-hour cell; empty until an event counts in them.
    hours: Vec<i64>,
    /// By family.
    editors: [Registers; Family::ALL.len()],
    /// By family, then [`TopList`].
    top: [[TopCount; 2]; Family::ALL.len()],
}

impl Day {
    fn new(day: i64) -> Day {
        Day {
            day,
            cells: Vec::new(),
            hours: Vec::new(),
            editors: Default::default(),
            top: Default::default(),
        }
    }

    fn add(&mut self, cell: usize, delta: i64, cells: usize) {
        if cell >= self.cells.len() {
            self.cells.resize(cells.max(cell + 1), Cell::default());
        }
        let slot = &mut self.cells[cell];
        slot.value = slot.value.saturating_add(delta);
        slot.counted = true;
    }
}

/// A tally being counted: the events of a batch, counted as they are read, sealed into a
/// [`Tally`] when the batch is applied. Every source of events (the aggregators, a rebuild's
/// counting, tests, benchmarks) counts through this, and it counts through the rules of
/// [`Deltas`] and [`Dimensions`].
#[derive(Debug)]
pub struct OpenTally {
    names: Names,
    days: Vec<Day>,
    /// Day → its place in `days`.
    by_day: FastMap<i64, usize>,
    /// The place of the day counted last: the next event is most likely of the same day.
    last: usize,
    events: u64,
    coverage: FastMap<i64, DayCoverage>,
    /// The days beyond [`DENSE_DAYS`], counted by name.
    overflow: Tally,
    /// Sums counted elsewhere and added ([`OpenTally::add_sums`]).
    sums: Tally,
    scratch: Scratch,
    dimensions: DimensionScratch,
    /// Where a page's key is built.
    key: String,
    /// Where a counter's name is built ([`count_named`]).
    name: String,
}

impl Default for OpenTally {
    fn default() -> Self {
        OpenTally {
            names: Names::new(),
            days: Vec::new(),
            by_day: FastMap::default(),
            last: 0,
            events: 0,
            coverage: FastMap::default(),
            overflow: Tally::default(),
            sums: Tally::default(),
            scratch: Scratch::default(),
            dimensions: DimensionScratch::default(),
            key: String::new(),
            name: String::new(),
        }
    }
}

/// The place of `day` in `days`, added when new; `None` for a day beyond [`DENSE_DAYS`].
fn day_of(
    days: &mut Vec<Day>,
    by_day: &mut FastMap<i64, usize>,
    last: &mut usize,
    day: i64,
) -> Option<usize> {
    if days.get(*last).is_some_and(|d| d.day == day) {
        return Some(*last);
    }
    let at = *by_day.entry(day).or_insert_with(|| {
        if days.len() >= DENSE_DAYS {
            return usize::MAX;
        }
        days.push(Day::new(day));
        days.len() - 1
    });
    if at == usize::MAX {
        return None;
    }
    *last = at;
    Some(at)
}

/// Adds `delta` to the counter `name` of `map`.
fn bump(map: &mut Counts, name: &str, delta: i64) {
    match map.get_mut(name) {
        Some(value) => *value = value.saturating_add(delta),
        None => {
            map.insert(name.to_owned(), delta);
        }
    }
}

/// Counts an event of a day beyond [`DENSE_DAYS`] into `tally` by name, through the same
/// rules as the cells. Rare, and kept out of the counting path's code.
#[allow(clippy::too_many_arguments)]
#[cold]
#[inline(never)]
fn count_named<'a>(
    tally: &mut Tally,
    head: &EventHead<'a>,
    deltas: &Deltas<'a>,
    more: &'a mut DimensionScratch,
    dimensions: bool,
    hours_and_sketches: bool,
    name: &mut String,
    key: &mut String,
) {
    let day = tally.days.entry(deltas.day).or_default();
    deltas.for_each(name, |counter, delta| bump(day, counter, delta));
    if !dimensions {
        return;
    }
    let dims = Dimensions::of(head, deltas, more);
    dims.for_each(deltas, name, |counter, delta| bump(day, counter, delta));
    if !hours_and_sketches {
        return;
    }
    let hours = tally.hours.entry(deltas.day).or_default();
    dims.for_each_hourly(deltas, name, |counter| bump(hours, counter, 1));
    let family = dims.project.family;
    let server = dims.server.unwrap_or("");
    if let Some((user, _)) = dims.user {
        let editors = tally.editors.entry((deltas.day, family)).or_default();
        editors.add(user.as_bytes());
        let top = tally.top.entry((deltas.day, family, TopList::Editors));
        top.or_default().add(user, server, dims.event_hash);
    }
    if let (Some(wiki), Some(title)) = (deltas.wiki, dims.title) {
        key.clear();
        key.push_str(wiki);
        key.push('\t');
        key.push_str(title);
        let top = tally.top.entry((deltas.day, family, TopList::Pages));
        top.or_default().add(key, server, dims.event_hash);
    }
}

impl OpenTally {
    /// Counts one event: the SPEC §5 counters, and the further dimensions when `dimensions` is
    /// set (their day counters, the per-hour buckets, the distinct editors and the top lists).
    pub fn count(&mut self, head: &EventHead<'_>, dimensions: bool) {
        self.count_with(head, dimensions, dimensions);
    }

    /// Counts one event into the day counters only, the original ones and the further
    /// dimensions' alike, without the per-hour buckets and the sketches: what a rebuild writes
    /// (`store::space`), which leaves those two to the aggregators that keep them.
    pub fn count_days(&mut self, head: &EventHead<'_>) {
        self.count_with(head, true, false);
    }

    fn count_with(&mut self, head: &EventHead<'_>, dimensions: bool, hours_and_sketches: bool) {
        let OpenTally {
            names,
            days,
            by_day,
            last,
            events,
            scratch,
            dimensions: more,
            key,
            overflow,
            name,
            ..
        } = self;
        let deltas = Deltas::of(head, scratch);
        *events += 1;
        let Some(at) = day_of(days, by_day, last, deltas.day) else {
            let (full, hours) = (dimensions, hours_and_sketches);
            count_named(overflow, head, &deltas, more, full, hours, name, key);
            return;
        };
        let day = &mut days[at];
        deltas.for_each_counter(|counter, delta| {
            let cell = names.cell(Share::All, counter);
            day.add(cell, delta, names.names.len());
        });
        if !dimensions {
            return;
        }
        let dims = Dimensions::of(head, &deltas, more);
        dims.for_each_counter(&deltas, |share, counter, delta| {
            let cell = names.cell(share, counter);
            day.add(cell, delta, names.names.len());
        });
        if !hours_and_sketches {
            return;
        }
        if day.hours.is_empty() {
            day.hours = vec![0; 24 * HOURLY];
        }
        let hour = dims.hour.min(23) as usize;
        dims.for_each_hourly_counter(&deltas, |share, counter| {
            if let Some(cell) = hourly_cell(share, counter) {
                let slot = &mut day.hours[hour * HOURLY + cell];
                *slot = slot.saturating_add(1);
            }
        });
        let family = dims.project.family.index();
        let server = dims.server.unwrap_or("");
        if let Some((user, _)) = dims.user {
            day.editors[family].add(user.as_bytes());
            day.top[family][TopList::Editors.index()].add(user, server, dims.event_hash);
        }
        if let (Some(wiki), Some(title)) = (deltas.wiki, dims.title) {
            key.clear();
            key.push_str(wiki);
            key.push('\t');
            key.push_str(title);
            day.top[family][TopList::Pages.index()].add(key, server, dims.event_hash);
        }
    }

    /// Records where upstream held an event (or that it carried no position), for coverage.
    /// Every delivered valid event is covered, canaries too: they take offsets like any other.
    pub fn cover(&mut self, head: &EventHead<'_>) {
        let day = self.coverage.entry(epoch_day(head.time_ms)).or_default();
        match &head.position {
            Some(at) => day.add(&at.topic, at.partition, at.offset, head.time_ms),
            None => day.unpositioned = day.unpositioned.saturating_add(1),
        }
    }

    /// Adds the day counters and events of a tally counted elsewhere ([`Tally::add_sums`]).
    pub fn add_sums(&mut self, other: Tally) {
        self.sums.add_sums(other);
    }

    /// Events counted since the last seal.
    pub fn events(&self) -> u64 {
        self.events + self.sums.events
    }

    /// What was counted since the last seal, named; the open tally starts afresh.
    pub fn seal(&mut self) -> Tally {
        let mut tally = std::mem::take(&mut self.sums);
        tally.events += std::mem::take(&mut self.events);
        tally.coverage = std::mem::take(&mut self.coverage);
        // The overflow's days are none of the cells' days: their hours and sketches join as
        // they are, their counters by name (sums added elsewhere may hold the same days).
        let overflow = std::mem::take(&mut self.overflow);
        tally.hours.extend(overflow.hours);
        tally.editors.extend(overflow.editors);
        tally.top.extend(overflow.top);
        tally.add_sums(Tally {
            days: overflow.days,
            ..Tally::default()
        });
        self.by_day.clear();
        self.last = 0;
        for day in self.days.drain(..) {
            let Day {
                day,
                cells,
                hours,
                editors,
                top,
            } = day;
            let counts = tally.days.entry(day).or_default();
            for (cell, slot) in cells.iter().enumerate() {
                // Two counters may share a name (type "3" and type 3): one sum.
                if let (true, Some(name)) = (slot.counted, self.names.names.get(cell)) {
                    bump(counts, name, slot.value);
                }
            }
            if counts.is_empty() {
                tally.days.remove(&day);
            }
            if !hours.is_empty() {
                let named = tally.hours.entry(day).or_default();
                for (cell, value) in hours.iter().enumerate() {
                    if let (true, Some(name)) = (*value != 0, self.names.hourly.get(cell)) {
                        named.insert(name.clone(), *value);
                    }
                }
            }
            for (family, sketch) in Family::ALL.into_iter().zip(editors) {
                if !sketch.is_empty() {
                    tally.editors.insert((day, family), sketch.into_sketch());
                }
            }
            for (family, lists) in Family::ALL.into_iter().zip(top) {
                for (list, sketch) in TopList::ALL.into_iter().zip(lists) {
                    if !sketch.is_empty() {
                        tally.top.insert((day, family, list), sketch.into_sketch());
                    }
                }
            }
        }
        if self.names.names.len() > MAX_CELLS {
            self.names = Names::new();
        }
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::{hourly_counters, BOT, GROWTH, LENGTH_DEC, TOTAL};
    use crate::event::inspect;
    use crate::event::recorded::lines as recorded;

    /// The tally of `lines` as the rules name their counters, one counter at a time: what
    /// the cells must add up to.
    fn by_name(lines: &[String], dimensions: bool) -> Tally {
        let mut tally = Tally::default();
        let (mut scratch, mut more, mut name) = (
            Scratch::default(),
            DimensionScratch::default(),
            String::new(),
        );
        let add =
            |counts: &mut Counts, name: &str, delta: i64| add_named(counts, name.to_owned(), delta);
        for line in lines {
            let head = inspect(line).unwrap();
            if head.canary {
                continue;
            }
            let deltas = Deltas::of(&head, &mut scratch);
            let day = tally.days.entry(deltas.day).or_default();
            deltas.for_each(&mut name, |n, d| add(day, n, d));
            tally.events += 1;
            if dimensions {
                let dims = Dimensions::of(&head, &deltas, &mut more);
                dims.for_each(&deltas, &mut name, |n, d| add(day, n, d));
                let hours = tally.hours.entry(deltas.day).or_default();
                dims.for_each_hourly(&deltas, &mut name, |n| add(hours, n, 1));
                // The sketches, added one event at a time through their own `add`.
                let family = dims.project.family;
                let server = dims.server.unwrap_or("");
                if let Some((user, _)) = dims.user {
                    let editors = tally.editors.entry((deltas.day, family)).or_default();
                    editors.add(user.as_bytes());
                    let top = (deltas.day, family, TopList::Editors);
                    let top = tally.top.entry(top).or_default();
                    top.add(user, server, dims.event_hash);
                }
                if let (Some(wiki), Some(title)) = (deltas.wiki, dims.title) {
                    let top = (deltas.day, family, TopList::Pages);
                    let top = tally.top.entry(top).or_default();
                    top.add(&format!("{wiki}\t{title}"), server, dims.event_hash);
                }
            }
        }
        tally
    }

    fn open(lines: &[String], dimensions: bool) -> Tally {
        let mut open = OpenTally::default();
        for line in lines {
            let head = inspect(line).unwrap();
            if !head.canary {
                open.count(&head, dimensions);
            }
        }
        open.seal()
    }

    /// Recorded events, and odd variants of them: numeric types (also spelled as the same
    /// text), escapes, missing lengths, log events without a namespace, other days.
    fn recorded_and_odd() -> Vec<String> {
        let mut lines: Vec<String> = crate::event::recorded::FILES
            .iter()
            .flat_map(|file| recorded(file))
            .collect();
        let edit = |line: &str, f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            f(&mut v);
            v.to_string()
        };
        let first = lines[2].clone();
        lines.push(edit(&first, &|v| v["type"] = 3.into()));
        lines.push(edit(&first, &|v| v["type"] = "3".into()));
        lines.push(edit(&first, &|v| v["length"] = serde_json::Value::Null));
        lines.push(edit(&first, &|v| {
            v["length"] = serde_json::json!({"old": 5, "new": 5})
        }));
        lines.push(edit(&first, &|v| v["wiki"] = "zh_min_nanwiki".into()));
        lines.push(edit(&first, &|v| {
            v.as_object_mut().unwrap().remove("namespace");
            v["log_type"] = "move".into();
            v["log_action"] = "move_redir".into();
        }));
        lines.push(edit(&first, &|v| {
            v["meta"]["dt"] = "1969-12-31T22:10:00Z".into()
        }));
        lines.push(first.replace(r#""wiki":"wikidatawiki""#, r#""wiki":"wikidata\u0077iki""#));
        // Recorded events moved to ten more days, so that days beyond DENSE_DAYS count too.
        for k in 0..40 {
            let line = lines[k * 7].clone();
            let day = 1 + k % 10;
            lines.push(edit(&line, &|v| {
                v["meta"]["dt"] = format!("2020-01-{day:02}T12:00:00Z").into()
            }));
        }
        lines
    }

    #[test]
    fn cells_add_up_to_the_named_counters_of_the_rules() {
        let lines = recorded_and_odd();
        for dimensions in [false, true] {
            let want = by_name(&lines, dimensions);
            let got = open(&lines, dimensions);
            // Days beyond the first DENSE_DAYS are counted by name: both ways are held to the
            // rules.
            assert!(want.days.len() > DENSE_DAYS, "{} days", want.days.len());
            assert_eq!(got.days, want.days, "dimensions: {dimensions}");
            assert_eq!(got.hours, want.hours, "dimensions: {dimensions}");
            assert_eq!(got.events, want.events);
            assert_eq!(got.editors.is_empty(), !dimensions);
            assert_eq!(got.top.is_empty(), !dimensions);
            assert_eq!(got.editors, want.editors, "dimensions: {dimensions}");
            assert_eq!(got.top, want.top, "dimensions: {dimensions}");
        }
        // A type counted as a number and as text of the same digits is one counter.
        let got = open(&lines, false);
        let all = got.all_time();
        assert_eq!(all["pleiades_type_3"], 2);
        // A growth of zero still makes the counter exist, as the rules say.
        let same = lines
            .iter()
            .find(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["length"] == serde_json::json!({"old": 5, "new": 5})
            })
            .unwrap();
        let got = open(std::slice::from_ref(same), false);
        assert_eq!(got.days.values().next().unwrap()[GROWTH], 0);
    }

    #[test]
    fn a_sealed_tally_starts_afresh_and_names_stay_bounded() {
        let lines = recorded_and_odd();
        let mut tally = OpenTally::default();
        for line in &lines {
            tally.count(&inspect(line).unwrap(), true);
        }
        // However many days a batch holds, only DENSE_DAYS of them have cells.
        assert_eq!(tally.days.len(), DENSE_DAYS);
        assert!(!tally.overflow.days.is_empty());
        let first = tally.seal();
        assert!(tally.overflow.days.is_empty() && tally.days.is_empty());
        assert_eq!(tally.events(), 0);
        assert_eq!(tally.seal(), Tally::default());
        for line in &lines {
            tally.count(&inspect(line).unwrap(), true);
        }
        assert_eq!(tally.seal(), first, "the second batch counts as the first");
        // Ever new wikis: the names start afresh past the bound, and counting stays right.
        for n in 0..(MAX_CELLS / 2 + 10) {
            let line = format!(r#"{{"meta":{{"dt":"2022-12-11T04:27:02Z"}},"wiki":"w{n}wiki"}}"#);
            tally.count(&inspect(&line).unwrap(), false);
        }
        let many = tally.seal();
        assert_eq!(many.all_time()[TOTAL], (MAX_CELLS / 2 + 10) as i64);
        assert!(tally.names.names.len() <= 2 * FIXED, "names start afresh");
        let line = r#"{"meta":{"dt":"2022-12-11T04:27:02Z"},"wiki":"w7wiki","bot":true}"#;
        tally.count(&inspect(line).unwrap(), false);
        let after = tally.seal();
        assert_eq!(after.all_time()["pleiades_wiki_w7wiki"], 1);
        assert_eq!(after.all_time()[BOT], 1);
    }

    #[test]
    fn the_cell_layouts_name_every_counter_once() {
        let names = Names::new();
        let mut seen = std::collections::HashSet::new();
        for (cell, counter) in fixed_counters().enumerate() {
            assert_eq!(fixed_cell(counter), Some(cell));
            assert!(seen.insert(names.names[cell].clone()));
            assert!(seen.insert(names.names[FIXED + cell].clone()));
        }
        assert_eq!(seen.len(), 2 * FIXED);
        let per_hour = hourly_counters();
        assert_eq!(per_hour.len(), HOURLY);
        let mut name = String::new();
        for (share, counter) in [
            (Share::All, Counter::Total),
            (Share::All, Counter::Bot),
            (Share::All, Counter::Human),
            (Share::Wikidata, Counter::Bot),
            (Share::Wikidata, Counter::Human),
        ]
        .into_iter()
        .chain(Family::ALL.map(|f| (Share::All, Counter::Family(f))))
        {
            counter.write_name(share, &mut name);
            assert_eq!(per_hour[hourly_cell(share, counter).unwrap()], name);
        }
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let mut day = Day::new(0);
        day.add(5, i64::MAX - 1, 0);
        day.add(5, 5, 0);
        assert_eq!(day.cells[5].value, i64::MAX);
        day.add(4, i64::MIN, 0);
        day.add(4, -1, 0);
        assert_eq!(day.cells[4].value, i64::MIN);
        let mut counts = Counts::default();
        add_named(&mut counts, LENGTH_DEC.into(), i64::MIN);
        add_named(&mut counts, LENGTH_DEC.into(), -1);
        assert_eq!(counts[LENGTH_DEC], i64::MIN);
    }
}
