//! [`RedisStore`]: entries in Redis, shared by several proxy instances.

use std::time::Duration;

use bytes::Bytes;
use llm_proxy_core::redis::{RedisCallError, RedisLink};

use super::{Store, StoreError, StoreFuture};
use crate::entry::DecodeError;
use crate::{CacheKey, Entry};

/// A store in Redis: entries under `<key_prefix>cache:<hex key>`, in the
/// compact binary form of [`Entry::encode`], expiring by Redis's own TTL
/// (`SET … PX`).
///
/// One multiplexed connection ([`RedisLink`]): re-established in the
/// background when it fails, and replaced when it goes silent. Every call is
/// bounded by a timeout (250 ms unless [`RedisStore::with_timeout`] says
/// otherwise): with Redis down or slow, a lookup is a miss after at most that
/// long, and the cache layer serves the request from upstream (its breaker
/// then skips the store for a second at a time). `rediss://` URLs use TLS
/// (rustls with the system's roots).
#[derive(Clone)]
pub struct RedisStore {
    link: RedisLink,
    prefix: String,
    max_value_bytes: usize,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.link.timeout())
            .finish_non_exhaustive()
    }
}

fn store_error(error: RedisCallError) -> StoreError {
    match error {
        RedisCallError::Timeout { op, after } => StoreError::Timeout {
            store: "redis",
            op,
            after,
        },
        reply if reply.is_reply() => StoreError::Refused {
            store: "redis",
            message: reply.to_string(),
        },
        other => StoreError::Backend {
            store: "redis",
            message: other.to_string(),
        },
    }
}

impl RedisStore {
    /// The default limit of every Redis call: 250 ms.
    pub const DEFAULT_TIMEOUT: Duration = RedisLink::DEFAULT_TIMEOUT;

    /// The largest value the store writes or reads by default
    /// ([`RedisStore::with_max_value_bytes`]): an entry of the cache's
    /// largest answer by default
    /// ([`CacheConfig::max_entry_bytes`](crate::CacheConfig), 16 MiB) with
    /// room for its framing.
    pub const DEFAULT_MAX_VALUE_BYTES: usize = 40 << 20;

    /// Connect to `url` (`redis://[user:pass@]host:port[/db]`, or `rediss://`)
    /// and check that Redis answers, within four times
    /// [`RedisStore::DEFAULT_TIMEOUT`] (a first connection may need TLS).
    /// Keys are prefixed with `key_prefix`.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, StoreError> {
        let mut store = Self::lazy(url, key_prefix)?;
        let timeout = store.link.timeout();
        store.link = store.link.with_timeout(timeout * 4);
        let ping = store
            .link
            .call("connect", |mut c| async move {
                redis::cmd("PING").query_async::<()>(&mut c).await
            })
            .await;
        store.link = store.link.with_timeout(timeout);
        ping.map_err(store_error)?;
        Ok(store)
    }

    /// A store for `url` that connects on first use: the proxy starts even
    /// while Redis is down (and serves misses until it is back).
    pub fn lazy(url: &str, key_prefix: &str) -> Result<Self, StoreError> {
        // The cache layer has a breaker for every store: no second one here.
        let link = RedisLink::new(url)
            .map_err(|e| store_error(e.into()))?
            .without_breaker()
            .used_by("cache");
        Ok(RedisStore {
            link,
            prefix: key_prefix.to_owned(),
            max_value_bytes: Self::DEFAULT_MAX_VALUE_BYTES,
        })
    }

    /// Bound every call by `timeout` instead of [`RedisStore::DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.link = self.link.with_timeout(timeout);
        self
    }

    /// Write and read values of at most `bytes` (default
    /// [`RedisStore::DEFAULT_MAX_VALUE_BYTES`]). A larger value under a cache key
    /// (another program's, or damage) is read no further than this and
    /// refused as malformed, where a `GET` would pull all of it into
    /// memory; an entry that large is not written (it could not be read
    /// back). An embedder that raises
    /// [`CacheConfig::max_entry_bytes`](crate::CacheConfig) past 16 MiB
    /// raises this with it: about twice the entry, for the framing of many
    /// small frames.
    pub fn with_max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// The Redis key of a cache key.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}cache:{}", self.prefix, key.to_hex())
    }
}

/// The longest expiry given to Redis: a hundred years. Redis refuses (with
/// an error on every `SET`) an expiry that overflows its clock, which a TTL
/// of `Duration::MAX` would.
const MAX_EXPIRY_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// `ttl` as a Redis `PX` expiry: whole milliseconds, at least one (Redis
/// refuses zero), at most [`MAX_EXPIRY_MS`].
fn expiry_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

impl Store for RedisStore {
    fn get(&self, key: CacheKey) -> StoreFuture<'_, Option<Entry>> {
        Box::pin(async move {
            // At most one byte past the largest value: whether it is larger
            // shows, and no more of it crosses the network. (An absent key
            // reads as empty, as no entry encodes.)
            let mut get = redis::cmd("GETRANGE");
            get.arg(self.redis_key(&key))
                .arg(0)
                .arg(self.max_value_bytes);
            let get = &get;
            let found = self
                .link
                .call("get", |mut c| async move {
                    get.query_async::<Vec<u8>>(&mut c).await
                })
                .await
                .map_err(store_error)?;
            match found.len() {
                0 => Ok(None),
                n if n > self.max_value_bytes => Err(DecodeError::too_large().into()),
                _ => Ok(Some(Entry::decode(Bytes::from(found))?)),
            }
        })
    }

    fn put(&self, key: CacheKey, entry: Entry, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let value = entry.encode();
            if value.len() > self.max_value_bytes {
                // It could never be read back.
                return Err(StoreError::Refused {
                    store: "redis",
                    message: format!(
                        "an entry of {} bytes is over the store's limit",
                        value.len()
                    ),
                });
            }
            let mut set = redis::cmd("SET");
            set.arg(self.redis_key(&key))
                .arg(value)
                .arg("PX")
                .arg(expiry_ms(ttl));
            let set = &set;
            self.link
                .call(
                    "put",
                    |mut c| async move { set.query_async::<()>(&mut c).await },
                )
                .await
                .map_err(store_error)
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_are_clamped_to_what_redis_accepts() {
        assert_eq!(expiry_ms(Duration::ZERO), 1);
        assert_eq!(expiry_ms(Duration::from_micros(10)), 1);
        assert_eq!(expiry_ms(Duration::from_secs(60)), 60_000);
        assert_eq!(expiry_ms(Duration::from_secs_f64(1e19)), MAX_EXPIRY_MS);
        assert_eq!(expiry_ms(Duration::MAX), MAX_EXPIRY_MS);
    }
}
