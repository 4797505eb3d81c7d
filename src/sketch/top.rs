//! The busiest pages and editors of a day in bounded space, with a result that depends only on
//! the events counted, not on their order.
//!
//! A sketch is a Count-Min sketch of [`ROWS`] rows of [`WIDTH`] buckets over the keys (a page,
//! or an editor), where each bucket keeps, beside its count:
//!
//! - the smallest and largest fingerprint of the keys counted in it: when they are equal, the
//!   bucket holds one key only and its count is that key's exact count; when a key's
//!   fingerprint lies outside them, the key was never counted in this sketch;
//! - the sum of its events' fingerprints (modulo 2^52), a checksum: once the other keys of a
//!   bucket are known exactly, it proves (or refutes) that the remainder is one given key's;
//! - a sample: the key of the event with the smallest event hash among the bucket's events, a
//!   draw that picks each key with a probability equal to its share of the bucket, so a key
//!   that dominates its bucket is very likely the sample of one of its two buckets.
//!
//! Counts and checksums add, fingerprints take minimum and maximum, samples take the smallest
//! event hash: all commutative and associative, so the sketch of a set of events is the same
//! however they were batched, ordered, interrupted and re-read. Candidates for the top list are
//! the samples; each is ranked by its estimate:
//!
//! - exact (and marked so) when one of its buckets holds that key alone, or when the other
//!   keys of one of its buckets are known exactly and the checksum confirms the rest is its
//!   own (peeling, as in an invertible Bloom filter);
//! - otherwise an upper bound: the smallest count of its buckets less the exact counts of
//!   the other keys known there. It is above the true count by the events of unknown keys
//!   sharing its buckets: on average at most N / [`WIDTH`] per row, and at most e·N / [`WIDTH`]
//!   with probability 1 − e^−[`ROWS`] (N: the events of the sketch).
//!
//! A key missing from the samples is missing from the list: a key with a share q of the events
//! of each of its buckets is missed with probability (1 − q)^[`ROWS`].

use super::{cut, murmur64a};
use std::collections::HashMap;

/// Rows of the Count-Min sketch.
pub const ROWS: u32 = 2;
/// Buckets per row.
pub const WIDTH: u32 = 1024;
/// Entries in a top list.
pub const ENTRIES: usize = 50;
/// Keys are cut to this many bytes, which bounds a bucket's size.
pub const KEY_BYTES: usize = 400;

const KEY_SEED: u64 = 0x005e_ed0f_7011;
const EVENT_SEED: u64 = 0x005e_ed0f_e7e7;
/// Fingerprints, checksums and event hashes keep 52 bits, so that the apply script's numbers
/// (doubles) hold them, and the sum of two, exactly.
const HASH_BITS: u32 = 52;
/// The checksum's modulus.
pub const CHECKSUM_MODULUS: u64 = 1 << HASH_BITS;

/// One bucket: the number of events counted in it, the fingerprints of its keys (least,
/// greatest, sum), its sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub count: i64,
    pub key_min: u64,
    pub key_max: u64,
    pub key_sum: u64,
    pub sample_hash: u64,
    /// The sampled key, then a tab and the server name of the sampled event (for links).
    pub sample: String,
}

impl Bucket {
    /// A bucket no event was counted in: each part is the neutral element of its merge.
    fn empty() -> Bucket {
        Bucket {
            count: 0,
            key_min: u64::MAX,
            key_max: 0,
            key_sum: 0,
            sample_hash: u64::MAX,
            sample: String::new(),
        }
    }

    /// Counts one event of the key `hashed` (already cut), seen on `server`: the one rule of
    /// adding an event, whatever holds the bucket.
    fn count(&mut self, hashed: &Hashed, key: &str, server: &str, event_hash: u64) {
        self.count = self.count.saturating_add(1);
        self.key_min = self.key_min.min(hashed.fingerprint);
        self.key_max = self.key_max.max(hashed.fingerprint);
        self.key_sum = (self.key_sum + hashed.fingerprint) % CHECKSUM_MODULUS;
        // Event hashes keep 52 bits, so the first event of an empty bucket always wins.
        if event_hash < self.sample_hash {
            self.sample_hash = event_hash;
            // The old sample's buffer is reused: a new sample wins often in a busy bucket,
            // and an allocation per win showed in profiles.
            self.sample.clear();
            push_sample(&mut self.sample, key, server);
        }
    }

    /// Merges `other` in: what one bucket would hold after both sets of events.
    pub fn merge(&mut self, other: &Bucket) {
        self.count = self.count.saturating_add(other.count);
        self.key_min = self.key_min.min(other.key_min);
        self.key_max = self.key_max.max(other.key_max);
        self.key_sum = (self.key_sum + other.key_sum) % CHECKSUM_MODULUS;
        if (other.sample_hash, other.sample.as_str()) < (self.sample_hash, self.sample.as_str()) {
            self.sample_hash = other.sample_hash;
            self.sample.clone_from(&other.sample);
        }
    }

    /// One bucket's stored form: its count, least, greatest and summed fingerprint, sample hash
    /// (8 bytes each), the sample's length (2 bytes) and the sample; little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(42 + self.sample.len());
        self.write(&mut out);
        out
    }

    /// A bucket's stored form read back; `None` when the bytes are not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Bucket> {
        match Bucket::read(bytes)? {
            (bucket, used) if used == bytes.len() => Some(bucket),
            _ => None,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        self.view().write(out);
    }

    fn view(&self) -> StoredBucket<'_> {
        StoredBucket {
            count: self.count,
            key_min: self.key_min,
            key_max: self.key_max,
            key_sum: self.key_sum,
            sample_hash: self.sample_hash,
            sample: &self.sample,
        }
    }

    /// A bucket at the start of `bytes`, and the bytes it took.
    pub fn read(bytes: &[u8]) -> Option<(Bucket, usize)> {
        let (view, used) = StoredBucket::read(bytes)?;
        let bucket = Bucket {
            count: view.count,
            key_min: view.key_min,
            key_max: view.key_max,
            key_sum: view.key_sum,
            sample_hash: view.sample_hash,
            sample: view.sample.to_owned(),
        };
        Some((bucket, used))
    }

    fn is_pure(&self, fingerprint: u64) -> bool {
        self.key_min == fingerprint && self.key_max == fingerprint
    }
}

/// A bucket as it lies in a stored sketch, its sample borrowed from the stored bytes: what
/// [`merge_stored`] merges without building a [`TopSketch`].
#[derive(Debug, Clone, Copy)]
struct StoredBucket<'a> {
    count: i64,
    key_min: u64,
    key_max: u64,
    key_sum: u64,
    sample_hash: u64,
    sample: &'a str,
}

impl<'a> StoredBucket<'a> {
    /// The same rule as [`Bucket::merge`].
    fn merge(&mut self, other: &StoredBucket<'a>) {
        self.count = self.count.saturating_add(other.count);
        self.key_min = self.key_min.min(other.key_min);
        self.key_max = self.key_max.max(other.key_max);
        self.key_sum = (self.key_sum + other.key_sum) % CHECKSUM_MODULUS;
        if (other.sample_hash, other.sample) < (self.sample_hash, self.sample) {
            self.sample_hash = other.sample_hash;
            self.sample = other.sample;
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        for number in [
            self.count as u64,
            self.key_min,
            self.key_max,
            self.key_sum,
            self.sample_hash,
        ] {
            out.extend_from_slice(&number.to_le_bytes());
        }
        let sample = cut(self.sample, usize::from(u16::MAX));
        out.extend_from_slice(&(sample.len() as u16).to_le_bytes());
        out.extend_from_slice(sample.as_bytes());
    }

    fn read(bytes: &'a [u8]) -> Option<(StoredBucket<'a>, usize)> {
        let mut numbers = [0u64; 5];
        for (i, number) in numbers.iter_mut().enumerate() {
            *number = u64::from_le_bytes(bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?);
        }
        let length = usize::from(u16::from_le_bytes(bytes.get(40..42)?.try_into().ok()?));
        let sample = std::str::from_utf8(bytes.get(42..42 + length)?).ok()?;
        let [count, key_min, key_max, key_sum, sample_hash] = numbers;
        if key_min > key_max {
            return None;
        }
        let bucket = StoredBucket {
            count: i64::try_from(count).ok()?,
            key_min,
            key_max,
            key_sum: key_sum % CHECKSUM_MODULUS,
            sample_hash,
            sample,
        };
        Some((bucket, 42 + length))
    }
}

/// Merges stored sketches into the stored form of their merge, the same bytes as reading each
/// with [`TopSketch::from_bytes`], merging and writing with [`TopSketch::to_bytes`] would give,
/// without building a sketch: the buckets are read in place, sorted by id and folded, so no
/// sample is copied but the winners' into the output. `None` when a part is not a sketch.
/// A compaction merges a base with many deltas; this keeps it off the allocator.
pub fn merge_stored<'b>(parts: impl IntoIterator<Item = &'b [u8]>) -> Option<Vec<u8>> {
    let mut buckets: Vec<(u32, StoredBucket<'b>)> = Vec::new();
    let mut bytes = 1;
    for part in parts {
        let (&version, mut rest) = part.split_first()?;
        if version != FORMAT {
            return None;
        }
        bytes += rest.len();
        while !rest.is_empty() {
            let id = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
            let (bucket, used) = StoredBucket::read(rest.get(4..)?)?;
            if id >= ROWS * WIDTH {
                return None;
            }
            buckets.push((id, bucket));
            rest = &rest[4 + used..];
        }
    }
    buckets.sort_unstable_by_key(|(id, _)| *id);
    let mut out = Vec::with_capacity(bytes.min(1 + (ROWS * WIDTH) as usize * 100));
    out.push(FORMAT);
    let mut rest = buckets.as_slice();
    while let Some(((id, first), more)) = rest.split_first() {
        let same = more.iter().take_while(|(other, _)| other == id).count();
        let mut merged = *first;
        for (_, bucket) in &more[..same] {
            merged.merge(bucket);
        }
        out.extend_from_slice(&id.to_le_bytes());
        merged.write(&mut out);
        rest = &more[same..];
    }
    Some(out)
}

/// What a key hashes to: its fingerprint and its bucket in each row.
#[derive(Debug, Clone, Copy)]
struct Hashed {
    fingerprint: u64,
    buckets: [u32; ROWS as usize],
}

fn hashed(key: &str) -> Hashed {
    let hash = murmur64a(cut(key, KEY_BYTES).as_bytes(), KEY_SEED);
    Hashed {
        fingerprint: hash >> (64 - HASH_BITS),
        // Ten bits per row from the low end: independent of each other.
        buckets: [
            (hash % u64::from(WIDTH)) as u32,
            WIDTH + ((hash >> 10) % u64::from(WIDTH)) as u32,
        ],
    }
}

/// The hash that orders an event for sampling: from its `meta.id`, which no other event shares.
pub fn event_hash(id: &str) -> u64 {
    murmur64a(id.as_bytes(), EVENT_SEED) >> (64 - HASH_BITS)
}

/// The version byte that starts a stored sketch.
const FORMAT: u8 = 1;

/// A sketch, or what one batch adds to it: the buckets that hold something, by id (row ×
/// [`WIDTH`] + column).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopSketch {
    /// foldhash, not SipHash: a bucket is looked up twice per event, and its id is a hash of
    /// the key already.
    buckets: HashMap<u32, Bucket, foldhash::fast::RandomState>,
}

/// A sketch being counted: where each bucket lies is found by its id in an array, not by a
/// hash lookup, so counting an event is two array updates. For a batch, which counts many;
/// [`TopCount::into_sketch`] gives the sketch. Empty (and without memory) until the first event.
#[derive(Debug, Clone, Default)]
pub struct TopCount {
    /// By bucket id: 0 for none yet, else the bucket's place in `buckets` plus one.
    places: Vec<u32>,
    buckets: Vec<(u32, Bucket)>,
}

impl TopCount {
    /// Counts one event, as [`TopSketch::add`] does.
    pub fn add(&mut self, key: &str, server: &str, event_hash: u64) {
        if self.places.is_empty() {
            self.places = vec![0; (ROWS * WIDTH) as usize];
        }
        let key = cut(key, KEY_BYTES);
        let hashed = hashed(key);
        for id in hashed.buckets {
            let Some(place) = self.places.get_mut(id as usize) else {
                continue;
            };
            if *place == 0 {
                self.buckets.push((id, Bucket::empty()));
                *place = self.buckets.len() as u32;
            }
            if let Some((_, bucket)) = self.buckets.get_mut(*place as usize - 1) {
                bucket.count(&hashed, key, server, event_hash);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The sketch of the events counted.
    pub fn into_sketch(self) -> TopSketch {
        let mut buckets = HashMap::with_capacity_and_hasher(self.buckets.len(), Default::default());
        buckets.extend(self.buckets);
        TopSketch { buckets }
    }
}

/// One key's estimate in a set of sketches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub count: i64,
    pub exact: bool,
}

/// An entry of a top list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// The server name of the sampled event, for a link; may be empty.
    pub server: String,
    pub count: i64,
    pub exact: bool,
}

impl TopSketch {
    /// Counts one event of `key` (cut to [`KEY_BYTES`]), seen on `server`, with `event_hash`.
    pub fn add(&mut self, key: &str, server: &str, event_hash: u64) {
        let key = cut(key, KEY_BYTES);
        let hashed = hashed(key);
        for id in hashed.buckets {
            self.buckets
                .entry(id)
                .or_insert_with(Bucket::empty)
                .count(&hashed, key, server, event_hash);
        }
    }

    /// Merges one stored bucket; ids beyond the sketch are ignored.
    pub fn merge_bucket(&mut self, id: u32, bucket: &Bucket) {
        if id >= ROWS * WIDTH {
            return;
        }
        match self.buckets.get_mut(&id) {
            Some(mine) => mine.merge(bucket),
            None => {
                self.buckets.insert(id, bucket.clone());
            }
        }
    }

    /// The stored form: a version byte, then each bucket in id order as its id (4 bytes) and
    /// its [`Bucket::to_bytes`]; little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut ids: Vec<&u32> = self.buckets.keys().collect();
        ids.sort_unstable();
        let mut out = Vec::with_capacity(1 + self.buckets.len() * 80);
        out.push(FORMAT);
        for id in ids {
            out.extend_from_slice(&id.to_le_bytes());
            self.buckets[id].write(&mut out);
        }
        out
    }

    /// A stored sketch read back; `None` when the bytes are not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<TopSketch> {
        let (&version, mut rest) = bytes.split_first()?;
        if version != FORMAT {
            return None;
        }
        let mut sketch = TopSketch::default();
        while !rest.is_empty() {
            let id = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
            let (bucket, used) = Bucket::read(rest.get(4..)?)?;
            if id >= ROWS * WIDTH {
                return None;
            }
            sketch.merge_bucket(id, &bucket);
            rest = &rest[4 + used..];
        }
        Some(sketch)
    }

    /// Merges a whole sketch.
    pub fn merge(&mut self, other: &TopSketch) {
        for (id, bucket) in &other.buckets {
            self.merge_bucket(*id, bucket);
        }
    }

    /// The buckets that hold something.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// The bucket `id`, when it holds something.
    pub fn bucket(&self, id: u32) -> Option<&Bucket> {
        self.buckets.get(&id)
    }

    pub fn buckets(&self) -> impl Iterator<Item = (u32, &Bucket)> {
        self.buckets.iter().map(|(id, bucket)| (*id, bucket))
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// The number of events counted: each event adds one to exactly one bucket of the first row.
    pub fn events(&self) -> i64 {
        self.buckets
            .iter()
            .filter(|(id, _)| **id < WIDTH)
            .fold(0i64, |sum, (_, bucket)| sum.saturating_add(bucket.count))
    }

    /// True unless the buckets prove the key was never counted here.
    fn may_hold(&self, hashed: &Hashed) -> bool {
        hashed.buckets.iter().all(|id| {
            self.buckets
                .get(id)
                .is_some_and(|b| (b.key_min..=b.key_max).contains(&hashed.fingerprint))
        })
    }

    /// What the buckets prove about their own samples: every exact count that pure buckets
    /// and peeling give.
    fn resolve(&self) -> Resolved<'_> {
        let mut keys: Vec<(&str, Hashed)> = Vec::new();
        let mut seen: HashMap<&str, ()> = HashMap::new();
        for bucket in self.buckets.values() {
            let key = sample_key(&bucket.sample).0;
            if seen.insert(key, ()).is_none() {
                keys.push((key, hashed(key)));
            }
        }
        let mut exact: Vec<Option<i64>> = vec![None; keys.len()];
        let mut members: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, (_, h)) in keys.iter().enumerate() {
            for id in h.buckets {
                if let Some(bucket) = self.buckets.get(&id) {
                    members.entry(id).or_default().push(i);
                    if bucket.is_pure(h.fingerprint) {
                        exact[i] = Some(bucket.count);
                    }
                }
            }
        }
        // Peeling: a bucket whose other keys are all known leaves a remainder; the checksum says
        // whether that remainder is the one unknown key's alone.
        let modulus = u128::from(CHECKSUM_MODULUS);
        loop {
            let mut progressed = false;
            for (id, list) in &members {
                let mut unknown = list.iter().filter(|i| exact[**i].is_none());
                let (Some(&u), None) = (unknown.next(), unknown.next()) else {
                    continue;
                };
                let bucket = &self.buckets[id];
                let mut count = bucket.count;
                let mut sum = u128::from(bucket.key_sum);
                for i in list {
                    if let Some(c) = exact[*i] {
                        count -= c;
                        let part =
                            (c.max(0) as u128 * u128::from(keys[*i].1.fingerprint)) % modulus;
                        sum = (sum + modulus - part) % modulus;
                    }
                }
                let own = u128::from(keys[u].1.fingerprint);
                if count > 0 && (count as u128 * own) % modulus == sum {
                    exact[u] = Some(count);
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        let mut known: HashMap<u32, i64> = HashMap::new();
        let mut counts = HashMap::new();
        for (i, (key, h)) in keys.iter().enumerate() {
            if let Some(c) = exact[i] {
                counts.insert(*key, c);
                for id in h.buckets {
                    *known.entry(id).or_default() += c;
                }
            }
        }
        Resolved {
            sketch: self,
            exact: counts,
            known,
        }
    }
}

/// A sketch with the exact counts its buckets prove.
struct Resolved<'s> {
    sketch: &'s TopSketch,
    exact: HashMap<&'s str, i64>,
    /// Per bucket, the sum of the exact counts known in it.
    known: HashMap<u32, i64>,
}

impl Resolved<'_> {
    /// `key`'s estimate here; `None` when it was never counted here.
    fn estimate(&self, key: &str, hashed: &Hashed) -> Option<Estimate> {
        if let Some(count) = self.exact.get(key) {
            return Some(Estimate {
                count: *count,
                exact: true,
            });
        }
        if !self.sketch.may_hold(hashed) {
            return None;
        }
        let count = hashed
            .buckets
            .iter()
            .map(|id| {
                let bucket = &self.sketch.buckets[id];
                bucket.count - self.known.get(id).copied().unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        (count > 0).then_some(Estimate {
            count,
            exact: false,
        })
    }
}

fn push_sample(text: &mut String, key: &str, server: &str) {
    text.reserve(key.len() + 1 + server.len());
    text.push_str(key);
    text.push('\t');
    text.push_str(server);
}

/// A sample's key and server (the server is after the last tab; keys may hold tabs).
fn sample_key(sample: &str) -> (&str, &str) {
    sample.rsplit_once('\t').unwrap_or((sample, ""))
}

/// The estimate of `key` over several sketches (a family each): the sum of its estimates in
/// those that may hold it, exact when each of those is exact.
pub fn estimate(sketches: &[&TopSketch], key: &str) -> Estimate {
    let resolved: Vec<Resolved<'_>> = sketches.iter().map(|s| s.resolve()).collect();
    estimate_in(&resolved, cut(key, KEY_BYTES))
}

fn estimate_in(resolved: &[Resolved<'_>], key: &str) -> Estimate {
    let hashed = hashed(key);
    let mut total = Estimate {
        count: 0,
        exact: true,
    };
    for sketch in resolved {
        if let Some(found) = sketch.estimate(key, &hashed) {
            total.count = total.count.saturating_add(found.count);
            total.exact &= found.exact;
        }
    }
    total
}

/// The `n` busiest keys over several sketches: every sample is a candidate, ranked by its
/// estimate (ties: exact ones first, then by key), so the list is a function of the sketches.
pub fn top(sketches: &[&TopSketch], n: usize) -> Vec<Entry> {
    let resolved: Vec<Resolved<'_>> = sketches.iter().map(|s| s.resolve()).collect();
    let mut candidates: HashMap<&str, &str> = HashMap::new();
    for sketch in sketches {
        for bucket in sketch.buckets.values() {
            let (key, server) = sample_key(&bucket.sample);
            candidates
                .entry(key)
                .and_modify(|known| *known = (*known).min(server))
                .or_insert(server);
        }
    }
    let mut entries: Vec<Entry> = candidates
        .into_iter()
        .map(|(key, server)| {
            let found = estimate_in(&resolved, key);
            Entry {
                key: key.to_owned(),
                server: server.to_owned(),
                count: found.count,
                exact: found.exact,
            }
        })
        .filter(|entry| entry.count > 0)
        .collect();
    entries.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.exact.cmp(&a.exact))
            .then_with(|| a.key.cmp(&b.key))
    });
    entries.truncate(n);
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch_of(events: &[(String, String)]) -> TopSketch {
        let mut sketch = TopSketch::default();
        for (id, key) in events {
            sketch.add(key, "en.wikipedia.org", event_hash(id));
        }
        sketch
    }

    /// `heavy` keys with 40 down to 21 events, then `light` keys with one each.
    fn events(light: usize) -> Vec<(String, String)> {
        let mut events = Vec::new();
        for k in 0..20 {
            for e in 0..(40 - k) {
                events.push((format!("h{k}-{e}"), format!("enwiki\tHeavy {k}")));
            }
        }
        for k in 0..light {
            events.push((format!("l{k}"), format!("enwiki\tLight {k}")));
        }
        events
    }

    #[test]
    fn counting_in_place_gives_the_sketch_adding_gives() {
        let events = events(5_000);
        let mut counted = TopCount::default();
        assert!(counted.is_empty());
        for (i, (id, key)) in events.iter().enumerate() {
            // Servers differ, so that the samples' servers are checked too.
            counted.add(key, &format!("s{}", i % 3), event_hash(id));
        }
        let mut added = TopSketch::default();
        for (i, (id, key)) in events.iter().enumerate() {
            added.add(key, &format!("s{}", i % 3), event_hash(id));
        }
        assert!(!counted.is_empty());
        let counted = counted.into_sketch();
        assert_eq!(counted, added);
        assert_eq!(counted.to_bytes(), added.to_bytes());
        assert_eq!(TopCount::default().into_sketch(), TopSketch::default());
    }

    #[test]
    fn a_small_day_is_exact() {
        let events = events(100);
        let sketch = sketch_of(&events);
        assert_eq!(sketch.events(), events.len() as i64);
        let list = top(&[&sketch], ENTRIES);
        assert_eq!(list.len(), ENTRIES);
        for (rank, entry) in list.iter().take(20).enumerate() {
            assert_eq!(entry.key, format!("enwiki\tHeavy {rank}"));
            assert_eq!(entry.count, 40 - rank as i64);
            assert!(entry.exact, "{entry:?}");
            assert_eq!(entry.server, "en.wikipedia.org");
        }
    }

    #[test]
    fn estimates_never_undercount_and_heavy_keys_are_found_in_a_crowd() {
        let events = events(60_000);
        let sketch = sketch_of(&events);
        let list = top(&[&sketch], ENTRIES);
        let bound = (std::f64::consts::E * events.len() as f64 / f64::from(WIDTH)) as i64;
        let mut found = 0;
        for entry in &list {
            let truth = match entry.key.strip_prefix("enwiki\tHeavy ") {
                Some(k) => 40 - k.parse::<i64>().expect("a number"),
                None => 1,
            };
            assert!(entry.count >= truth, "{entry:?} under {truth}");
            assert!(
                entry.count - truth <= bound,
                "{entry:?} over {truth} by more than {bound}"
            );
            if entry.exact {
                assert_eq!(entry.count, truth);
            }
            found += usize::from(entry.key.contains("Heavy"));
        }
        assert!(found >= 5, "only {found} heavy keys found: {list:?}");
    }

    #[test]
    fn the_sketch_depends_only_on_the_set_of_events() {
        let mut events = events(3_000);
        let whole = sketch_of(&events);
        events.reverse();
        let mut batched = TopSketch::default();
        for chunk in events.chunks(97) {
            batched.merge(&sketch_of(chunk));
        }
        assert_eq!(batched, whole);
        assert_eq!(top(&[&batched], ENTRIES), top(&[&whole], ENTRIES));
    }

    #[test]
    fn keys_absent_from_a_family_cost_it_nothing() {
        let wiki = sketch_of(&[("a".into(), "Ann".into()), ("b".into(), "Ann".into())]);
        let data = sketch_of(&[("c".into(), "Bob".into())]);
        let both = top(&[&wiki, &data], ENTRIES);
        let ann = both.iter().find(|e| e.key == "Ann").expect("Ann");
        assert_eq!((ann.count, ann.exact), (2, true));
        assert_eq!(estimate(&[&data], "Ann").count, 0);
    }

    #[test]
    fn sketches_survive_storage_and_refuse_garbage() {
        let sketch = sketch_of(&events(300));
        let bytes = sketch.to_bytes();
        assert_eq!(TopSketch::from_bytes(&bytes), Some(sketch.clone()));
        assert_eq!(bytes, TopSketch::from_bytes(&bytes).unwrap().to_bytes());
        assert_eq!(TopSketch::from_bytes(&[FORMAT]), Some(TopSketch::default()));
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 2;
        let mut far_bucket = bytes.clone();
        far_bucket[1..5].copy_from_slice(&(ROWS * WIDTH).to_le_bytes());
        for bad in [
            &b""[..],
            &bytes[..bytes.len() - 1],
            &wrong_version,
            &far_bucket,
        ] {
            assert_eq!(TopSketch::from_bytes(bad), None);
        }
        let mut ignored = TopSketch::default();
        let bucket = sketch.buckets().next().expect("one").1.clone();
        ignored.merge_bucket(ROWS * WIDTH, &bucket);
        assert!(ignored.is_empty());
        for bad in [
            &b""[..],
            &bytes[..bytes.len() - 1],
            &wrong_version,
            &far_bucket,
        ] {
            assert_eq!(merge_stored([&bytes[..], bad]), None);
        }
    }

    #[test]
    fn merging_stored_forms_gives_the_bytes_of_merged_sketches() {
        let all = events(2_000);
        // Uneven parts that share keys and buckets, as a base and its deltas do.
        let parts: Vec<Vec<u8>> = [0..700, 700..720, 720..1_500, 1_500..1_501, 1_501..all.len()]
            .into_iter()
            .map(|range| sketch_of(&all[range]).to_bytes())
            .collect();
        let mut merged = TopSketch::default();
        for part in &parts {
            merged.merge(&TopSketch::from_bytes(part).expect("a sketch"));
        }
        let stored = merge_stored(parts.iter().map(Vec::as_slice)).expect("sketches");
        assert_eq!(stored, merged.to_bytes());
        assert_eq!(stored, sketch_of(&all).to_bytes());
        assert_eq!(merge_stored([&[FORMAT][..]]), Some(vec![FORMAT]));
    }
}
