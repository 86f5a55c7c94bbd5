//! Unique ids made without a system call, that no one can guess: a counter
//! and a keyed hash of it, as 32 hex digits. Request ids, and the ids of
//! translated answers whose upstream gave none.
//!
//! Unguessable, because ids travel: a request id is echoed to the client
//! and sent upstream as `x-request-id`, and some servers name what they
//! make after it (vLLM's chat completions), which can become a response id.
//! Ids that could be predicted would let a client claim another's response
//! id before it exists (the proxy's id map keeps an id with whoever records
//! it first).

use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Hands out ids: a keyed hash of the counter (the key random, from the
/// OS-seeded `RandomState`, per instance), then the counter, so ids are
/// unique within an instance and unguessable outside it.
#[derive(Debug)]
pub struct UniqueIds {
    key: std::collections::hash_map::RandomState,
    next: AtomicU64,
}

impl Default for UniqueIds {
    fn default() -> Self {
        Self::new()
    }
}

impl UniqueIds {
    /// Ids under a fresh random key.
    pub fn new() -> Self {
        UniqueIds {
            key: std::collections::hash_map::RandomState::new(),
            next: AtomicU64::new(0),
        }
    }

    /// The next id: 32 lowercase hex digits, the keyed hash of the counter
    /// then the counter (no formatting machinery).
    pub fn next_id(&self) -> [u8; 32] {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mask = self.key.hash_one(n);
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&hex(mask));
        id[16..].copy_from_slice(&hex(n));
        id
    }
}

/// `word`'s 16 hex digits, most significant first (a loop of known
/// length, unrolled).
fn hex(word: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = HEX[((word >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// An id from one process-wide [`UniqueIds`], as text.
pub fn unique_id() -> String {
    static IDS: OnceLock<UniqueIds> = OnceLock::new();
    let id = IDS.get_or_init(UniqueIds::new).next_id();
    // Hex digits are ASCII.
    id.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_distinct_and_not_a_count() {
        let ids = UniqueIds::new();
        let (a, b) = (ids.next_id(), ids.next_id());
        assert!(a.iter().chain(&b).all(u8::is_ascii_hexdigit));
        assert_eq!(&a[16..], b"0000000000000000");
        assert_eq!(&b[16..], b"0000000000000001");
        // The first half does not count along with the second.
        assert_ne!(a[..16], b[..16]);
        // Another instance's ids differ at the same count.
        assert_ne!(UniqueIds::new().next_id(), a);
        let (x, y) = (unique_id(), unique_id());
        assert!(x != y && x.len() == 32);
    }
}
