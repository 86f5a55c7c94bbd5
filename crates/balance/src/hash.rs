//! A small, fast, stable 64-bit hash of our own.
//!
//! Stable means the same bytes hash to the same value in every process, on
//! every platform and in every release of this crate: several proxy replicas
//! must place a prompt prefix and a backend's virtual nodes at the same ring
//! positions without talking to each other. `std`'s hashers promise no such
//! thing, so this one is spelt out here. It is not meant to resist crafted
//! collisions; a collision only changes which backend serves a request.

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// Hash `bytes`, continuing from `seed` (a chain: `hash(hash(s, a), b)`).
pub(crate) fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(K0);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h = step(h, u64::from_le_bytes(w));
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        let mut w = [0u8; 8];
        w[..tail.len()].copy_from_slice(tail);
        h = step(h, u64::from_le_bytes(w));
    }
    mix(h)
}

/// Hash one `u64` value onto `seed`.
pub(crate) fn hash_u64(seed: u64, value: u64) -> u64 {
    mix(step(seed ^ K1, value))
}

fn step(h: u64, w: u64) -> u64 {
    (h ^ w.wrapping_mul(K1)).rotate_left(29).wrapping_mul(K0)
}

/// The murmur3 64-bit finaliser: every input bit reaches every output bit.
pub(crate) fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    x ^ (x >> 33)
}

/// A splitmix64 step: the next pseudo-random value after `state`.
pub(crate) fn splitmix(state: u64) -> u64 {
    mix(state.wrapping_add(K0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED: u64 = 0x6710_2ad9_3da3_e8d1;

    #[test]
    fn stable_values() {
        // Pinned: changing these moves every prefix to another backend.
        assert_eq!(hash_bytes(0, b""), hash_bytes(0, b""));
        assert_ne!(hash_bytes(0, b"a"), hash_bytes(0, b"b"));
        assert_ne!(hash_bytes(0, b"ab"), hash_bytes(0, b"ab\0"));
        assert_ne!(hash_bytes(1, b"ab"), hash_bytes(2, b"ab"));
        assert_eq!(hash_bytes(7, b"hello world, prefix"), PINNED);
    }

    #[test]
    fn spreads_bits() {
        let ones: u32 = (0..1000u64).map(|i| hash_u64(0, i).count_ones()).sum();
        let mean = f64::from(ones) / 1000.0;
        assert!((28.0..36.0).contains(&mean), "mean set bits {mean}");
    }
}
