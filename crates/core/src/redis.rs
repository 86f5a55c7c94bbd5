//! [`RedisLink`]: the one way llm-proxy's layers talk to Redis (the cache's
//! store, the auth layer's shared limits, the Responses id map).
//!
//! redis-rs's [`ConnectionManager`] multiplexes calls over one connection
//! and reconnects when that connection *fails*. A connection can also go
//! silent without failing: Redis's host vanishes, a NAT or firewall drops
//! the connection's state, a failover moves the address. TCP then reports
//! nothing for many minutes (until its retransmissions give up), every call
//! waits for its timeout, and the manager never reconnects. A link adds what
//! the manager lacks:
//!
//! - every call bounded by a timeout (250 ms unless set otherwise);
//! - after [`TIMEOUTS_BEFORE_RECONNECT`] calls in a row time out with no
//!   answer between them, the connection is presumed dead and replaced by a
//!   new one (connected in the background, on the next call);
//! - a [`Breaker`]: after [`THRESHOLD`](crate::breaker::THRESHOLD) failed
//!   calls in a row, calls fail at once with [`RedisCallError::Skipped`] for
//!   a second, then one call probes Redis. With Redis unreachable a request
//!   pays nothing for it, instead of a timeout each. A caller with a breaker
//!   of its own (the cache layer has one for every store) turns it off.
//!
//! Connecting is lazy: a proxy starts while Redis is down, and its callers
//! fall back (a cache miss, local limits, the local id map) until Redis is
//! back. `rediss://` URLs use TLS (rustls with the `ring` provider).
//!
//! This module is behind the `redis` feature.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::RedisResult;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::breaker::Breaker;

/// Calls in a row that time out before the connection is replaced.
pub const TIMEOUTS_BEFORE_RECONNECT: u32 = 2;

/// Why a call through a [`RedisLink`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisCallError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within the link's timeout.
    #[error("redis did not answer {op} within {after:?}")]
    Timeout {
        /// The call that timed out.
        op: &'static str,
        /// The link's timeout.
        after: Duration,
    },
    /// Not tried: Redis kept failing, and the breaker skips it for a while.
    #[error("redis keeps failing; skipped for up to a second")]
    Skipped,
}

/// A lazily connected, self-healing connection to one Redis; cheap to clone
/// (clones share the connection). See the [module docs](self).
#[derive(Clone)]
pub struct RedisLink {
    client: redis::Client,
    config: ConnectionManagerConfig,
    slot: Arc<Mutex<Slot>>,
    timeout: Duration,
    breaker: Option<Arc<Breaker>>,
    epoch: Instant,
}

/// The connection in use, and how its calls have fared.
struct Slot {
    manager: ConnectionManager,
    /// Bumped when `manager` is replaced, so that a late result of a call on
    /// an older connection does not count against the new one.
    generation: u64,
    timeouts: Arc<AtomicU32>,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the client: its connection info holds the password.
        f.debug_struct("RedisLink")
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// The default bound of every call: 250 ms.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);

    /// A link to the Redis at `url` (`redis://[user:pass@]host:port[/db]`, or
    /// `rediss://` for TLS). Does not connect: the first call does.
    pub fn new(url: &str) -> Result<Self, redis::RedisError> {
        if url.starts_with("rediss://") {
            // One process-wide TLS provider; an earlier install is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url)?;
        // Calls are bounded by `timeout`; a (re)connect may take a little
        // longer (TLS, a distant Redis) and goes on behind the calls that
        // time out, retried a few times before the next call tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(RedisLink {
            client,
            config,
            slot: Arc::new(Mutex::new(Slot {
                manager,
                generation: 0,
                timeouts: Arc::default(),
            })),
            timeout: Self::DEFAULT_TIMEOUT,
            breaker: Some(Arc::default()),
            epoch: Instant::now(),
        })
    }

    /// Bound every call by `timeout` instead of [`RedisLink::DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// No breaker: every call goes to Redis (for a caller that has its own).
    pub fn without_breaker(mut self) -> Self {
        self.breaker = None;
        self
    }

    /// The bound of every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Run one call, named `op` in errors: `call` gets a handle on the
    /// current connection and is bounded by the link's timeout.
    ///
    /// ```no_run
    /// # async fn f(link: llm_proxy_core::redis::RedisLink) -> Result<(), llm_proxy_core::redis::RedisCallError> {
    /// let value: Option<String> = link
    ///     .call("get", |mut c| async move { redis::cmd("GET").arg("k").query_async(&mut c).await })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, RedisCallError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if let Some(breaker) = &self.breaker
            && !breaker.allow(|| self.now_ms())
        {
            return Err(RedisCallError::Skipped);
        }
        let (manager, generation, timeouts) = {
            let slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            (slot.manager.clone(), slot.generation, slot.timeouts.clone())
        };
        let result = match tokio::time::timeout(self.timeout, call(manager)).await {
            Ok(Ok(value)) => {
                timeouts.store(0, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Err(e)) => {
                // An answer, even an error: the connection is alive (or the
                // manager saw it fail and reconnects by itself).
                timeouts.store(0, Ordering::Relaxed);
                Err(RedisCallError::Redis(e))
            }
            Err(_) => {
                if timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_BEFORE_RECONNECT {
                    self.replace(generation);
                }
                Err(RedisCallError::Timeout {
                    op,
                    after: self.timeout,
                })
            }
        };
        if let Some(breaker) = &self.breaker {
            match &result {
                Ok(_) => breaker.success(),
                Err(_) => {
                    breaker.failure(self.now_ms());
                }
            }
        }
        result
    }

    /// Put a new connection in place of generation `generation`'s (unless
    /// another call already did). The old one closes when its last call ends.
    fn replace(&self, generation: u64) {
        let manager =
            match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())
            {
                Ok(manager) => manager,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make a new redis connection");
                    return;
                }
            };
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.generation != generation {
            return;
        }
        tracing::warn!("redis stopped answering; replacing its connection");
        *slot = Slot {
            manager,
            generation: generation.wrapping_add(1),
            timeouts: Arc::default(),
        };
    }

    /// Milliseconds on the link's clock, from 1 (the breaker's 0 is "closed").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
}
