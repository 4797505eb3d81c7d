//! Sketches that answer "how many distinct" and "which are busiest" in bounded space, and whose
//! result depends only on the set of events counted: never on their order, on where batches
//! begin and end, or on which worker counted what.
//!
//! Every stored value merges by addition, minimum or maximum, which are commutative and
//! associative, so applying the same events in any grouping and any order gives the same
//! state: after a crash, a re-read batch or a rebalance the sketches equal one clean pass,
//! exactly as the counters do. This is the domain layer: no I/O, no clock, no metrics.

pub mod hll;
pub mod top;

/// MurmurHash64A, the hash Redis uses for its HyperLogLog (`hllPatLen`), on little-endian
/// words: with Redis's seed it maps every element to the same register as `PFADD` does.
pub fn murmur64a(data: &[u8], seed: u64) -> u64 {
    const M: u64 = 0xc6a4_a793_5bd1_e995;
    const R: u32 = 47;
    let mut h = seed ^ (data.len() as u64).wrapping_mul(M);
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let mut k = u64::from_le_bytes(bytes).wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h ^= k;
        h = h.wrapping_mul(M);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate() {
            h ^= u64::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> R;
    h = h.wrapping_mul(M);
    h ^= h >> R;
    h
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur_matches_the_reference_implementation() {
        // Computed with Austin Appleby's C MurmurHash64A and Redis's HyperLogLog seed, for
        // every tail length (0 to 7 bytes after whole words).
        const WANT: [u64; 18] = [
            0xd8df_ea65_85bc_9732,
            0x53d2_470a_9b43_b1a7,
            0x0eae_d676_4371_42cf,
            0x77ec_90ae_b374_e502,
            0xb079_ee3d_4420_2b3e,
            0x52a7_daa2_324a_0e8e,
            0x3a4f_3a74_f538_b54f,
            0x22fe_613b_b08c_9602,
            0xf3a6_5df5_5991_4567,
            0x834f_ba4d_9152_daf7,
            0xce00_afbf_dbd6_efc4,
            0x0f85_070a_21c5_7729,
            0x197f_9775_ba8c_25df,
            0x2890_4e1b_bb89_63c5,
            0x4311_344e_4c26_9641,
            0x1035_0863_b35a_3059,
            0xd006_e2f8_8c34_e470,
            0x876e_d29f_b39e_50af,
        ];
        for (n, want) in WANT.iter().enumerate() {
            assert_eq!(
                murmur64a(&b"abcdefghijklmnopq"[..n], 0xadc8_3b19),
                *want,
                "{n} bytes"
            );
        }
        assert_eq!(murmur64a(b"Chuck Entz", 0xadc8_3b19), 0xaf4e_8b74_88ac_50c3);
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("abc", 5), "abc");
        assert_eq!(cut("abcdef", 3), "abc");
        assert_eq!(cut("aé", 2), "a");
        assert_eq!(cut("日本", 4), "日");
    }
}
