//! Where entries live: the [`Store`] trait, [`MemoryStore`] and, with the
//! `redis` feature, `RedisStore`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::{CacheKey, DecodeError, Entry};

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// The future a [`Store`] call returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A place to keep entries: in this process, or shared between proxies.
///
/// The cache layer never fails a request because of its store: an error of
/// [`Store::get`] is a miss, an error of [`Store::put`] an answer left
/// unstored; both are logged and counted. A store bounds its own calls in
/// time (a remote store times out rather than hang a request).
pub trait Store: Send + Sync + 'static {
    /// The entry under `key`, if there is one that has not expired.
    fn get(&self, key: CacheKey) -> StoreFuture<'_, Option<Entry>>;

    /// Keep `entry` under `key` for `ttl`, replacing an earlier one. Any
    /// `ttl` is accepted, up to `Duration::MAX`: one longer than a store can
    /// represent keeps the entry for as long as the store can (never a panic
    /// and never an error).
    fn put(&self, key: CacheKey, entry: Entry, ttl: Duration) -> StoreFuture<'_, ()>;

    /// A short name for metrics labels and logs: `memory`, `redis`.
    fn kind(&self) -> &'static str;

    /// What the store holds, if it can tell cheaply.
    fn usage(&self) -> Option<StoreUsage> {
        None
    }

    /// The store as a [`MemoryStore`], whose calls complete at once: the
    /// cache layer then makes them directly, without a boxed future.
    fn as_memory(&self) -> Option<&MemoryStore> {
        None
    }
}

impl<T: Store + ?Sized> Store for Arc<T> {
    fn get(&self, key: CacheKey) -> StoreFuture<'_, Option<Entry>> {
        (**self).get(key)
    }

    fn put(&self, key: CacheKey, entry: Entry, ttl: Duration) -> StoreFuture<'_, ()> {
        (**self).put(key, entry, ttl)
    }

    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    fn usage(&self) -> Option<StoreUsage> {
        (**self).usage()
    }

    fn as_memory(&self) -> Option<&MemoryStore> {
        (**self).as_memory()
    }
}

/// What a store holds and has dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreUsage {
    /// Entries held.
    pub entries: u64,
    /// Body bytes held.
    pub bytes: u64,
    /// Entries evicted to stay within the bounds.
    pub evictions: u64,
    /// Entries dropped because their TTL ran out.
    pub expirations: u64,
    /// Entries not kept because one alone is larger than the store allows.
    pub too_large: u64,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store did not answer in time.
    #[error("{store} did not answer a {op} within {} ms", after.as_millis())]
    Timeout {
        /// The store's kind.
        store: &'static str,
        /// `get` or `put`.
        op: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// The store answered with an error, or could not be reached.
    #[error("{store}: {message}")]
    Backend {
        /// The store's kind.
        store: &'static str,
        /// What it said.
        message: String,
    },
    /// The store answered, refusing the call (a full Redis's `OOM`, a key
    /// of another type): that call's failure, not the store's.
    #[error("{store} refused the call: {message}")]
    Refused {
        /// The store's kind.
        store: &'static str,
        /// What it said.
        message: String,
    },
    /// A stored value could not be decoded (written by an incompatible
    /// version, or damaged).
    #[error(transparent)]
    Corrupt(#[from] DecodeError),
}
