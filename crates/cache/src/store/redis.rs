//! [`RedisStore`]: entries in Redis, shared by several proxy instances.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Store, StoreError, StoreFuture};
use crate::{CacheKey, Entry};

/// A store in Redis: entries under `<key_prefix>cache:<hex key>`, in the
/// compact binary form of [`Entry::encode`], expiring by Redis's own TTL
/// (`SET … PX`).
///
/// One multiplexed connection, re-established in the background when it
/// breaks (redis-rs's `ConnectionManager`). Every call is bounded by a
/// timeout (250 ms unless [`RedisStore::with_timeout`] says otherwise): with
/// Redis down or slow, a lookup is a miss after at most that long, and the
/// cache layer serves the request from upstream. `rediss://` URLs use TLS
/// (rustls with the system's roots).
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn backend(error: redis::RedisError) -> StoreError {
    StoreError::Backend {
        store: "redis",
        message: error.to_string(),
    }
}

impl RedisStore {
    /// The default limit of every Redis call: 250 ms.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

    /// Connect to `url` (`redis://[user:pass@]host:port[/db]`, or `rediss://`)
    /// and check that Redis answers, within [`RedisStore::DEFAULT_TIMEOUT`] (a little
    /// more for TLS). Keys are prefixed with `key_prefix`.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, StoreError> {
        let store = Self::lazy(url, key_prefix)?;
        let mut connection = store.connection.clone();
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<()>(&mut connection);
        let limit = store.timeout * 4;
        tokio::time::timeout(limit, ping)
            .await
            .map_err(|_| StoreError::Timeout {
                store: "redis",
                op: "connect",
                after: limit,
            })?
            .map_err(backend)?;
        Ok(store)
    }

    /// A store for `url` that connects on first use: the proxy starts even
    /// while Redis is down (and serves misses until it is back).
    pub fn lazy(url: &str, key_prefix: &str) -> Result<Self, StoreError> {
        if url.starts_with("rediss://") {
            // One process-wide TLS provider; an earlier install is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url).map_err(backend)?;
        // Calls are bounded by `self.timeout`; a (re)connect may take a little
        // longer (TLS, a distant Redis) and runs behind the calls that time out.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection =
            ConnectionManager::new_lazy_with_config(client, config).map_err(backend)?;
        Ok(RedisStore {
            connection,
            prefix: key_prefix.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
        })
    }

    /// Bound every call by `timeout` instead of [`RedisStore::DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The Redis key of a cache key.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        format!("{}cache:{}", self.prefix, key.to_hex())
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout {
                store: "redis",
                op,
                after: self.timeout,
            })?
            .map_err(backend)
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
            let mut connection = self.connection.clone();
            let mut get = redis::cmd("GET");
            get.arg(self.redis_key(&key));
            let get = get.query_async::<Option<Vec<u8>>>(&mut connection);
            match self.bounded("get", get).await? {
                Some(bytes) => Ok(Some(Entry::decode(Bytes::from(bytes))?)),
                None => Ok(None),
            }
        })
    }

    fn put(&self, key: CacheKey, entry: Entry, ttl: Duration) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let millis = expiry_ms(ttl);
            let mut set = redis::cmd("SET");
            set.arg(self.redis_key(&key))
                .arg(entry.encode())
                .arg("PX")
                .arg(millis);
            let set = set.query_async::<()>(&mut connection);
            self.bounded("put", set).await
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
