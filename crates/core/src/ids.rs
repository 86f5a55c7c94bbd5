//! Unique ids made without a system call: a random per-process prefix and
//! a counter, as 32 hex digits. Request ids, and the ids of translated
//! answers whose upstream gave none.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Hands out ids: its prefix (random, from the OS-seeded `RandomState`,
/// the clock and the process id), then a counter.
#[derive(Debug)]
pub struct UniqueIds {
    prefix: u64,
    next: AtomicU64,
}

impl Default for UniqueIds {
    fn default() -> Self {
        Self::new()
    }
}

impl UniqueIds {
    /// Ids with a fresh random prefix.
    pub fn new() -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        Self::with_prefix(h.finish(), 0)
    }

    /// Ids with this prefix, counting from `first` (for tests).
    pub fn with_prefix(prefix: u64, first: u64) -> Self {
        UniqueIds {
            prefix,
            next: AtomicU64::new(first),
        }
    }

    /// The next id: 32 lowercase hex digits, the prefix then the counter
    /// (no formatting machinery).
    pub fn next_id(&self) -> [u8; 32] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 32];
        for (i, digit) in id.iter_mut().enumerate() {
            let word = if i < 16 { self.prefix } else { n };
            *digit = HEX[((word >> (60 - 4 * (i % 16))) & 0xf) as usize];
        }
        id
    }
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
    fn ids_are_hex_and_distinct() {
        let ids = UniqueIds::with_prefix(0x0123_4567_89ab_cdef, 0xfe);
        assert_eq!(&ids.next_id(), b"0123456789abcdef00000000000000fe");
        assert_eq!(&ids.next_id(), b"0123456789abcdef00000000000000ff");
        let (a, b) = (unique_id(), unique_id());
        assert!(a != b && a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
