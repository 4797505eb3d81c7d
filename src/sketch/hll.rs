//! HyperLogLog, for distinct editors per day: Redis's own algorithm (MurmurHash64A with Redis's
//! seed, 2^14 registers, Ertl's estimator as in Redis 5 and later), so that a sketch here holds
//! the registers `PFADD` would set for the same names and counts what `PFCOUNT` would answer.
//!
//! Registers merge by maximum, so a sketch depends only on the set of names added. It is stored
//! in chunks of [`CHUNK`] registers, and only chunks with a non-zero register are kept: a
//! family with few editors costs little, and a full sketch is 17 KiB whatever the number of
//! names.

use super::murmur64a;
use std::collections::BTreeMap;

/// log2 of the number of registers, as in Redis.
pub const PRECISION: u32 = 14;
/// Registers per sketch.
pub const REGISTERS: usize = 1 << PRECISION;
/// Registers per stored chunk.
pub const CHUNK: usize = 32;
/// Chunks per sketch.
pub const CHUNKS: usize = REGISTERS / CHUNK;
/// The relative standard error of a count: 1.04 / sqrt(2^14).
pub const STANDARD_ERROR: f64 = 0.0081;

/// Redis's seed for the HyperLogLog hash.
const SEED: u64 = 0xadc8_3b19;
/// Hash bits left after the register index.
const Q: u32 = 64 - PRECISION;
/// 0.5 / ln 2, the estimator's constant for an infinite number of registers.
const ALPHA_INF: f64 = 0.721_347_520_444_481_7;

/// The register an element falls in and the value it offers there: one plus the number of
/// trailing zero bits of the hash above the index (at most `Q + 1`).
pub fn register_of(element: &[u8]) -> (usize, u8) {
    let hash = murmur64a(element, SEED);
    let index = (hash & (REGISTERS as u64 - 1)) as usize;
    let rest = (hash >> PRECISION) | (1u64 << Q);
    (index, rest.trailing_zeros() as u8 + 1)
}

/// A sketch, or the register updates of one batch: the chunks with a non-zero register.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HyperLogLog {
    chunks: BTreeMap<u16, [u8; CHUNK]>,
}

/// A sketch being counted, every register in place: adding an element is one array update.
/// For a batch, which adds many; [`Registers::into_sketch`] keeps the chunks that hold
/// something. Empty (and without memory) until the first element.
#[derive(Debug, Clone, Default)]
pub struct Registers {
    registers: Vec<u8>,
}

impl Registers {
    /// Adds one element, as [`HyperLogLog::add`] does.
    pub fn add(&mut self, element: &[u8]) {
        if self.registers.is_empty() {
            self.registers = vec![0; REGISTERS];
        }
        let (register, value) = register_of(element);
        if let Some(slot) = self.registers.get_mut(register) {
            *slot = (*slot).max(value);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.registers.is_empty()
    }

    /// The sketch of the elements added.
    pub fn into_sketch(self) -> HyperLogLog {
        let mut sketch = HyperLogLog::default();
        for (index, chunk) in self.registers.chunks_exact(CHUNK).enumerate() {
            if let Ok(chunk) = <&[u8; CHUNK]>::try_from(chunk) {
                sketch.merge_chunk(index as u16, chunk);
            }
        }
        sketch
    }
}

impl HyperLogLog {
    /// Adds one element (a user name).
    pub fn add(&mut self, element: &[u8]) {
        let (register, value) = register_of(element);
        let chunk = self
            .chunks
            .entry((register / CHUNK) as u16)
            .or_insert([0; CHUNK]);
        let slot = &mut chunk[register % CHUNK];
        *slot = (*slot).max(value);
    }

    /// Takes the larger value of each register: the sketch of the union of both sets.
    pub fn merge(&mut self, other: &HyperLogLog) {
        for (index, chunk) in &other.chunks {
            self.merge_chunk(*index, chunk);
        }
    }

    /// Merges one stored chunk; indexes beyond the sketch are ignored.
    pub fn merge_chunk(&mut self, index: u16, chunk: &[u8; CHUNK]) {
        if usize::from(index) >= CHUNKS || chunk.iter().all(|v| *v == 0) {
            return;
        }
        let mine = self.chunks.entry(index).or_insert([0; CHUNK]);
        for (slot, value) in mine.iter_mut().zip(chunk) {
            *slot = (*slot).max(*value);
        }
    }

    /// The chunks with a non-zero register, by index.
    pub fn chunks(&self) -> impl Iterator<Item = (u16, &[u8; CHUNK])> {
        self.chunks.iter().map(|(index, chunk)| (*index, chunk))
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The estimated number of distinct elements, as Redis's `hllCount` computes it.
    pub fn count(&self) -> u64 {
        let mut histogram = [0u32; 64];
        let mut stored = 0usize;
        for chunk in self.chunks.values() {
            for value in chunk {
                histogram[usize::from(*value).min(63)] += 1;
            }
            stored += CHUNK;
        }
        histogram[0] += (REGISTERS - stored) as u32;
        let m = REGISTERS as f64;
        let q = Q as usize;
        let mut z = m * tau((m - f64::from(histogram[q + 1])) / m);
        for j in (1..=q).rev() {
            z += f64::from(histogram[j]);
            z *= 0.5;
        }
        z += m * sigma(f64::from(histogram[0]) / m);
        (ALPHA_INF * m * m / z).round() as u64
    }
}

/// Ertl's sigma function (Redis's `hllSigma`).
fn sigma(mut x: f64) -> f64 {
    if x == 1.0 {
        return f64::INFINITY;
    }
    let mut y = 1.0;
    let mut z = x;
    loop {
        x *= x;
        let previous = z;
        z += x * y;
        y += y;
        if previous == z {
            return z;
        }
    }
}

/// Ertl's tau function (Redis's `hllTau`).
fn tau(mut x: f64) -> f64 {
    if x == 0.0 || x == 1.0 {
        return 0.0;
    }
    let mut y = 1.0;
    let mut z = 1.0 - x;
    loop {
        x = x.sqrt();
        let previous = z;
        y *= 0.5;
        z -= (1.0 - x) * (1.0 - x) * y;
        if previous == z {
            return z / 3.0;
        }
    }
}

/// The version byte that starts a stored sketch.
const FORMAT: u8 = 1;

impl HyperLogLog {
    /// The stored form: a version byte, then each chunk with a non-zero register as its index
    /// (two bytes, little-endian) and its [`CHUNK`] register values.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.chunks.len() * (2 + CHUNK));
        out.push(FORMAT);
        for (index, chunk) in &self.chunks {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A stored sketch read back; `None` when the bytes are not one (another version, a
    /// truncated chunk, an index or a register value out of range).
    pub fn from_bytes(bytes: &[u8]) -> Option<HyperLogLog> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT || rest.len() % (2 + CHUNK) != 0 {
            return None;
        }
        let mut sketch = HyperLogLog::default();
        for entry in rest.chunks_exact(2 + CHUNK) {
            let index = u16::from_le_bytes([entry[0], entry[1]]);
            let mut chunk = [0u8; CHUNK];
            chunk.copy_from_slice(&entry[2..]);
            if usize::from(index) >= CHUNKS || chunk.iter().any(|v| u32::from(*v) > Q + 1) {
                return None;
            }
            sketch.merge_chunk(index, &chunk);
        }
        Some(sketch)
    }
}

/// Merges stored sketches into the stored form of their merge, the same bytes as reading,
/// merging and writing [`HyperLogLog`]s would give, on one flat array of registers. `None`
/// when a part is not a sketch.
pub fn merge_stored<'b>(parts: impl IntoIterator<Item = &'b [u8]>) -> Option<Vec<u8>> {
    let mut registers = vec![0u8; REGISTERS];
    for part in parts {
        let (&version, rest) = part.split_first()?;
        if version != FORMAT || rest.len() % (2 + CHUNK) != 0 {
            return None;
        }
        for entry in rest.chunks_exact(2 + CHUNK) {
            let index = usize::from(u16::from_le_bytes([entry[0], entry[1]]));
            let values = &entry[2..];
            if index >= CHUNKS || values.iter().any(|v| u32::from(*v) > Q + 1) {
                return None;
            }
            let mine = &mut registers[index * CHUNK..(index + 1) * CHUNK];
            for (slot, value) in mine.iter_mut().zip(values) {
                *slot = (*slot).max(*value);
            }
        }
    }
    let mut out = vec![FORMAT];
    for (index, chunk) in registers.chunks_exact(CHUNK).enumerate() {
        if chunk.iter().any(|v| *v != 0) {
            out.extend_from_slice(&(index as u16).to_le_bytes());
            out.extend_from_slice(chunk);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch_of(names: impl IntoIterator<Item = String>) -> HyperLogLog {
        let mut sketch = HyperLogLog::default();
        for name in names {
            sketch.add(name.as_bytes());
        }
        sketch
    }

    #[test]
    fn registers_in_place_give_the_sketch_adding_gives() {
        let mut registers = Registers::default();
        assert!(registers.is_empty());
        assert_eq!(Registers::default().into_sketch(), HyperLogLog::default());
        for i in 0..3_000 {
            registers.add(format!("editor-{i}").as_bytes());
        }
        let added = sketch_of((0..3_000).map(|i| format!("editor-{i}")));
        let counted = registers.into_sketch();
        assert_eq!(counted, added);
        assert_eq!(counted.to_bytes(), added.to_bytes());
    }

    #[test]
    fn an_empty_sketch_counts_zero_and_one_name_counts_one() {
        assert_eq!(HyperLogLog::default().count(), 0);
        assert_eq!(sketch_of(["Chuck Entz".to_owned()]).count(), 1);
        let twice = sketch_of(["a".to_owned(), "a".to_owned()]);
        assert_eq!(twice.count(), 1);
    }

    #[test]
    fn counts_stay_within_three_standard_errors() {
        for n in [100usize, 1_000, 20_000, 200_000] {
            let count = sketch_of((0..n).map(|i| format!("editor-{i}"))).count() as f64;
            let error = (count - n as f64).abs() / n as f64;
            assert!(error < 3.0 * STANDARD_ERROR, "{n} names counted as {count}");
        }
    }

    #[test]
    fn small_sets_are_counted_exactly() {
        // Below a few hundred names almost every name has a register of its own.
        for n in [2usize, 10, 50, 150] {
            let count = sketch_of((0..n).map(|i| format!("user {i}"))).count();
            assert_eq!(count, n as u64);
        }
    }

    #[test]
    fn merging_is_the_union_whatever_the_order_and_grouping() {
        let names: Vec<String> = (0..5_000).map(|i| format!("n{}", i % 3_000)).collect();
        let whole = sketch_of(names.clone());
        let mut parts = HyperLogLog::default();
        for chunk in names.chunks(333).rev() {
            parts.merge(&sketch_of(chunk.iter().cloned()));
        }
        assert_eq!(parts, whole);
        let reversed = sketch_of(names.clone().into_iter().rev());
        assert_eq!(reversed, whole);
        // Stored forms merged in place give the bytes of the merged sketch.
        let stored: Vec<Vec<u8>> = names
            .chunks(700)
            .map(|chunk| sketch_of(chunk.iter().cloned()).to_bytes())
            .collect();
        let merged = merge_stored(stored.iter().map(Vec::as_slice));
        assert_eq!(merged, Some(whole.to_bytes()));
        let empty = HyperLogLog::default().to_bytes();
        assert_eq!(merge_stored([&empty[..]]), Some(empty.clone()));
    }

    #[test]
    fn sketches_survive_storage_and_refuse_garbage() {
        let sketch = sketch_of((0..300).map(|i| format!("x{i}")));
        let bytes = sketch.to_bytes();
        assert_eq!(bytes.len(), 1 + sketch.chunks().count() * (2 + CHUNK));
        assert_eq!(HyperLogLog::from_bytes(&bytes), Some(sketch.clone()));
        assert_eq!(
            HyperLogLog::from_bytes(&HyperLogLog::default().to_bytes()),
            Some(HyperLogLog::default())
        );
        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        let mut out_of_range = bytes.clone();
        out_of_range[3] = 52;
        let mut far_chunk = bytes.clone();
        far_chunk[1..3].copy_from_slice(&(CHUNKS as u16).to_le_bytes());
        for bad in [
            &b""[..],
            &bytes[..bytes.len() - 1],
            &wrong_version,
            &out_of_range,
            &far_chunk,
        ] {
            assert_eq!(HyperLogLog::from_bytes(bad), None);
            assert_eq!(merge_stored([&bytes[..], bad]), None);
        }
        // Chunks out of range are ignored rather than trusted.
        let mut ignored = HyperLogLog::default();
        ignored.merge_chunk(CHUNKS as u16, &[1; CHUNK]);
        assert!(ignored.is_empty());
    }
}
