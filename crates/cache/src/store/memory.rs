//! [`MemoryStore`]: sharded LRU maps in this process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use foldhash::fast::RandomState;
use lru::LruCache;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::{Store, StoreFuture, StoreUsage};
use crate::{CacheKey, Entry};

/// The embedded store: LRU maps bounded by entry count and by body bytes,
/// with a TTL per entry.
///
/// The keys are spread over shards (up to 16, one per 64 entries of
/// `max_entries`), each an LRU map behind its own mutex that is held only for
/// the map operation: concurrent hits on different keys rarely meet on one
/// lock. Each shard gets an equal part of both bounds, so the bounds hold
/// exactly; an entry larger than one shard's part of `max_bytes` is not
/// kept. Recency is per shard: the entry evicted is the least recently used
/// of its shard. An expired entry is a miss and is removed when it is read;
/// until then it counts towards the bounds and goes as they require.
///
/// ```
/// use std::time::Duration;
/// use llm_proxy_cache::{CacheKey, Entry, EntryBody, MemoryStore, Store};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryStore::new(10_000, 256 << 20);
/// let key = CacheKey::from_bytes([7; 32]);
/// let entry = Entry {
///     stored_at_ms: 0,
///     content_type: None,
///     body: EntryBody::Json(bytes::Bytes::from_static(b"{}")),
/// };
/// store.put(key, entry.clone(), Duration::from_secs(60)).await.unwrap();
/// assert_eq!(store.get(key).await.unwrap(), Some(entry));
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    evictions: AtomicU64,
    expirations: AtomicU64,
    too_large: AtomicU64,
}

#[derive(Debug)]
struct Shard {
    map: LruCache<CacheKey, Stored, RandomState>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Stored {
    entry: Entry,
    bytes: usize,
    /// `None`: a TTL so long that the clock cannot count to its end; the
    /// entry goes only as the bounds require.
    expires_at: Option<Instant>,
}

const MAX_SHARDS: usize = 16;
const ENTRIES_PER_SHARD: usize = 64;

impl MemoryStore {
    /// A store of at most `max_entries` entries and `max_bytes` body bytes.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        let shards = (max_entries / ENTRIES_PER_SHARD).clamp(1, MAX_SHARDS);
        Self::with_shards(max_entries, max_bytes, shards)
    }

    /// [`MemoryStore::new`] with a chosen number of shards (at least 1);
    /// for benchmarks and for stores of a few huge entries (one shard: the
    /// whole `max_bytes` for one entry).
    pub fn with_shards(max_entries: usize, max_bytes: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        let part = |total: usize, i: usize| total / shards + usize::from(i < total % shards);
        MemoryStore {
            shards: (0..shards)
                .map(|i| {
                    Mutex::new(Shard {
                        map: LruCache::unbounded_with_hasher(RandomState::default()),
                        bytes: 0,
                        max_entries: part(max_entries, i),
                        max_bytes: part(max_bytes, i),
                    })
                })
                .collect(),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
            too_large: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &CacheKey) -> MutexGuard<'_, Shard> {
        let index = (key.shard_hash() % self.shards.len() as u64) as usize;
        // A panic while a shard was locked leaves a consistent map (every
        // operation is one map call plus counter updates): keep using it.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The entry under `key`, without the boxed future of [`Store::get`].
    pub fn get_now(&self, key: &CacheKey) -> Option<Entry> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        let stored = shard.map.get(key)?;
        if stored.expires_at.is_none_or(|at| at > now) {
            return Some(stored.entry.clone());
        }
        let expired = shard.map.pop(key);
        if let Some(expired) = &expired {
            shard.bytes -= expired.bytes;
        }
        drop(shard);
        self.expirations.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Keep `entry` under `key` for `ttl`, without the boxed future of
    /// [`Store::put`]; `false` when it is not kept: larger than its shard's
    /// part of `max_bytes` (counted in [`StoreUsage::too_large`]). A `ttl`
    /// past what the clock can count (say `Duration::MAX`) never expires.
    pub fn put_now(&self, key: CacheKey, entry: Entry, ttl: Duration) -> bool {
        let bytes = entry.body_len();
        let expires_at = Instant::now().checked_add(ttl);
        let mut shard = self.shard(&key);
        if bytes > shard.max_bytes || shard.max_entries == 0 {
            let limit = shard.max_bytes;
            drop(shard);
            if self.too_large.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    bytes,
                    limit,
                    "a cache entry is larger than its shard's part of max_bytes: not kept (raise max_bytes; further ones are counted in llm_proxy_cache_events_total{{event=\"too_large\"}})"
                );
            }
            return false;
        }
        let stored = Stored {
            entry,
            bytes,
            expires_at,
        };
        // Dropped after the lock is released: freeing big bodies takes time.
        // Inline room for the usual put into a full shard (one evicted).
        let mut dropped = SmallVec::<[Stored; 2]>::new();
        if let Some((_, old)) = shard.map.push(key, stored) {
            shard.bytes -= old.bytes;
            dropped.push(old);
        }
        shard.bytes += bytes;
        let mut evicted = 0;
        while shard.map.len() > shard.max_entries || shard.bytes > shard.max_bytes {
            // The new entry fits alone and is the most recent: it stays.
            let Some((_, old)) = shard.map.pop_lru() else {
                break;
            };
            shard.bytes -= old.bytes;
            dropped.push(old);
            evicted += 1;
        }
        drop(shard);
        self.evictions.fetch_add(evicted, Ordering::Relaxed);
        true
    }
}

impl Store for MemoryStore {
    fn get(&self, key: CacheKey) -> StoreFuture<'_, Option<Entry>> {
        let entry = self.get_now(&key);
        Box::pin(std::future::ready(Ok(entry)))
    }

    fn put(&self, key: CacheKey, entry: Entry, ttl: Duration) -> StoreFuture<'_, ()> {
        // Not kept: counted in the usage, as the trait has no way to say.
        let _kept = self.put_now(key, entry, ttl);
        Box::pin(std::future::ready(Ok(())))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn as_memory(&self) -> Option<&MemoryStore> {
        Some(self)
    }

    fn usage(&self) -> Option<StoreUsage> {
        let (mut entries, mut bytes) = (0, 0);
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            entries += shard.map.len() as u64;
            bytes += shard.bytes as u64;
        }
        Some(StoreUsage {
            entries,
            bytes,
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            too_large: self.too_large.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use crate::EntryBody;
    use bytes::Bytes;

    fn key(i: u8) -> CacheKey {
        CacheKey::from_bytes([i; 32])
    }

    fn entry(len: usize) -> Entry {
        Entry {
            stored_at_ms: 0,
            content_type: None,
            body: EntryBody::Json(Bytes::from(vec![b'x'; len])),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn shards_scale_with_entries() {
        assert_eq!(MemoryStore::new(10, 1000).shards.len(), 1);
        assert_eq!(MemoryStore::new(200, 1000).shards.len(), 3);
        assert_eq!(MemoryStore::new(10_000, 1 << 28).shards.len(), 16);
        let store = MemoryStore::with_shards(10, 100, 4);
        let parts: Vec<_> = store
            .shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                (s.max_entries, s.max_bytes)
            })
            .collect();
        assert_eq!(parts, [(3, 25), (3, 25), (2, 25), (2, 25)]);
    }

    #[test]
    fn count_bound_evicts_least_recently_used() {
        let store = MemoryStore::new(3, 1 << 20);
        for i in 0..3 {
            store.put_now(key(i), entry(1), HOUR);
        }
        assert!(store.get_now(&key(0)).is_some()); // 0 is now the most recent
        store.put_now(key(3), entry(1), HOUR);
        assert!(
            store.get_now(&key(1)).is_none(),
            "1 was least recently used"
        );
        for i in [0, 2, 3] {
            assert!(store.get_now(&key(i)).is_some(), "{i} kept");
        }
        let usage = store.usage().unwrap();
        assert_eq!((usage.entries, usage.evictions), (3, 1));
    }

    #[test]
    fn byte_bound_evicts_until_the_new_entry_fits() {
        let store = MemoryStore::new(100, 1000);
        for i in 0..4 {
            store.put_now(key(i), entry(250), HOUR);
        }
        assert_eq!(store.usage().unwrap().bytes, 1000);
        store.put_now(key(9), entry(600), HOUR);
        let usage = store.usage().unwrap();
        assert_eq!((usage.entries, usage.bytes, usage.evictions), (2, 850, 3));
        assert!(store.get_now(&key(3)).is_some());
        assert!(store.get_now(&key(9)).is_some());
        // Larger than the whole store: not kept, nothing evicted for it.
        store.put_now(key(10), entry(1001), HOUR);
        let usage = store.usage().unwrap();
        assert_eq!((usage.entries, usage.too_large, usage.evictions), (2, 1, 3));
    }

    #[test]
    fn replacing_an_entry_keeps_the_byte_count_right() {
        let store = MemoryStore::new(10, 1000);
        store.put_now(key(1), entry(100), HOUR);
        store.put_now(key(1), entry(30), HOUR);
        let usage = store.usage().unwrap();
        assert_eq!((usage.entries, usage.bytes, usage.evictions), (1, 30, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_ttl_past_the_clock_keeps_the_entry_without_a_panic() {
        let store = MemoryStore::new(10, 1000);
        let ten_to_the_19 = Duration::from_secs_f64(1e19);
        for (i, ttl) in [(1, Duration::MAX), (2, ten_to_the_19)] {
            store.put_now(key(i), entry(10), ttl);
        }
        store.put(key(3), entry(10), Duration::MAX).await.unwrap();
        tokio::time::advance(Duration::from_secs(100 * 365 * 24 * 3600)).await;
        for i in 1..=3 {
            assert!(store.get_now(&key(i)).is_some(), "{i} kept");
        }
        // Still bounded: the longest-lived entry goes when room is needed.
        let store = MemoryStore::new(1, 1000);
        store.put_now(key(1), entry(10), Duration::MAX);
        store.put_now(key(2), entry(10), HOUR);
        assert!(store.get_now(&key(1)).is_none());
        assert_eq!(store.usage().unwrap().evictions, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let store = MemoryStore::new(10, 1000);
        store.put_now(key(1), entry(10), Duration::from_secs(60));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(store.get(key(1)).await.unwrap().is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(store.get(key(1)).await.unwrap().is_none());
        let usage = store.usage().unwrap();
        assert_eq!((usage.entries, usage.bytes, usage.expirations), (0, 0, 1));
    }
}
