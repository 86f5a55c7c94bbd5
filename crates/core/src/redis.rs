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
//! - when [`TIMEOUTS_BEFORE_RECONNECT`] calls in a row got no answer (timed
//!   out, or failed without Redis answering: a failed connect, a refused
//!   login) *and* nothing has answered on the connection for twice the
//!   timeout (at least a second), the connection is presumed dead and
//!   replaced by a new one, connected on the next call. The wall-time
//!   condition keeps a Redis that is alive but stalls for a moment (a fork
//!   for a snapshot, a slow script), which times out every call in flight at
//!   once, from being reconnected by every proxy at the same moment;
//! - a reply `READONLY` (the connection leads to a replica: a failover
//!   demoted the primary without closing its connections, and may have
//!   moved its address to the new one) replaces the connection too, at most
//!   once a second, so that writes follow the address instead of going to
//!   the replica for as long as the old connection lives;
//! - a call refused a connection (not a command) is made once more, within
//!   its timeout: the manager hands a call the outcome of its last
//!   reconnect however old it is, so a call made while Redis was down
//!   would otherwise fail the first call after Redis came back;
//! - a [`Breaker`]: after [`THRESHOLD`](crate::breaker::THRESHOLD) failed
//!   calls in a row (an error reply from Redis is no failure: it answered),
//!   calls fail at once with [`RedisCallError::Skipped`] for
//!   a second, then one call probes Redis. With Redis unreachable a request
//!   pays nothing for it, instead of a timeout each. A caller with a breaker
//!   of its own (the cache layer has one for every store) turns it off.
//!
//! Connecting is lazy: a proxy starts while Redis is down, and its callers
//! fall back (a cache miss, local limits, the local id map) until Redis is
//! back. A link can be made outside a tokio runtime; its calls need one.
//! `rediss://` URLs use TLS (rustls with the `ring` provider).
//!
//! This module is behind the `redis` feature.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisResult, ServerErrorKind};

use crate::breaker::Breaker;

/// Calls in a row without an answer before the connection may be replaced.
pub const TIMEOUTS_BEFORE_RECONNECT: u32 = 2;

/// Why a call through a [`RedisLink`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisCallError {
    /// Redis answered with an error, or the connection failed.
    #[error(transparent)]
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

/// The I/O error behind `error`, if any.
fn io_kind(error: &redis::RedisError) -> Option<std::io::ErrorKind> {
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        // (redis-rs keeps its cause behind an `Arc`.)
        let io = e.downcast_ref::<std::io::Error>().or_else(|| {
            e.downcast_ref::<Shared>()
                .and_then(|shared| shared.downcast_ref::<std::io::Error>())
        });
        if let Some(io) = io {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// Whether the connection could not be made (refused, no such socket):
/// the command was never sent.
fn never_connected(error: &redis::RedisError) -> bool {
    matches!(
        io_kind(error),
        Some(std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound)
    )
}

/// Whether the call timed out. The link sets no response timeout, so from
/// the manager that is a connect's timeout (within a call's bound, the
/// stored outcome of an older reconnect: the command was not sent), or,
/// rarely, the kernel giving up on an established connection (it may have
/// been sent): only a call that may be made twice is made again for it.
fn timed_out(error: &redis::RedisError) -> bool {
    io_kind(error) == Some(std::io::ErrorKind::TimedOut)
}

/// Whether a connection that was up broke (closed by Redis, reset): not
/// one that could not be made.
fn dropped_in_use(error: &redis::RedisError) -> bool {
    !never_connected(error) && error.is_connection_dropped()
}

impl RedisCallError {
    /// Whether Redis answered, with an error reply (`OOM`, `WRONGTYPE`, a
    /// script's error): the call failed, but Redis is there.
    pub fn is_reply(&self) -> bool {
        matches!(self, RedisCallError::Redis(e) if answered(e))
    }

    /// Whether Redis turned the connection down for a reason that waiting
    /// will not mend: a refused login (a wrong or missing password, an ACL
    /// user without the right), a database it does not have, or another
    /// error reply to a `PING`. Not a Redis that is loading its data, or a
    /// cluster or replica that is not ready yet: those pass.
    pub fn is_refusal(&self) -> bool {
        let RedisCallError::Redis(e) = self else {
            return false;
        };
        match e.kind() {
            ErrorKind::AuthenticationFailed | ErrorKind::Extension => true,
            ErrorKind::Server(kind) => !matches!(
                kind,
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
            ),
            _ => false,
        }
    }
}

/// Whether Redis itself answered with this error (the connection works),
/// rather than the connection failing (I/O, a failed connect or login, a
/// reply that does not parse).
fn answered(error: &redis::RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(_)
            | ErrorKind::Extension
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Client
    )
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
    /// What the link serves (`cache`, `auth`, …), in its log lines.
    user: &'static str,
}

/// The connection in use (made on the first call).
struct Slot {
    manager: Option<ConnectionManager>,
    /// Bumped when `manager` is replaced, so that a late result of a call on
    /// an older connection does not count against the new one.
    generation: u64,
    health: Arc<Health>,
}

/// How one connection's calls have fared.
struct Health {
    /// Calls in a row without an answer.
    unanswered: AtomicU32,
    /// When something last answered (the link's ms; at first, when the
    /// connection was made).
    answered_ms: AtomicU64,
    /// When the connection was made (the link's ms).
    made_ms: u64,
}

impl Health {
    fn new(now_ms: u64) -> Arc<Health> {
        Arc::new(Health {
            unanswered: AtomicU32::new(0),
            answered_ms: AtomicU64::new(now_ms),
            made_ms: now_ms,
        })
    }
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
        // Calls are bounded by `timeout`; a connect may take a little longer
        // (TLS, a distant Redis) and goes on behind the calls that time out.
        // No retries inside redis-rs: a failed connect fails its calls at
        // once, and the breaker decides when to try again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(0);
        Ok(RedisLink {
            client,
            config,
            slot: Arc::new(Mutex::new(Slot {
                manager: None,
                generation: 0,
                health: Health::new(1),
            })),
            timeout: Self::DEFAULT_TIMEOUT,
            breaker: Some(Arc::default()),
            epoch: Instant::now(),
            user: "redis",
        })
    }

    /// Name what the link serves (`cache`, `auth`) in its log lines, so that
    /// an operator with one Redis per feature knows which one failed.
    pub fn used_by(mut self, user: &'static str) -> Self {
        self.user = user;
        self
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
    /// A call that finds the connection dropped (Redis restarted, or closed
    /// an idle connection: its `timeout` setting, a failover, a middlebox)
    /// is made once more, on the connection the manager makes in its place,
    /// within the same timeout: such a call was, as a rule, never sent. (A
    /// connection reset between the command's arrival and its reply is the
    /// exception: the command then runs twice. Callers send here commands
    /// that are idempotent, or whose repetition only errs on the strict
    /// side, as the limits' charge; a refund goes through
    /// [`RedisLink::call_once`].)
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
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call_with(op, call, true).await
    }

    /// [`RedisLink::call`] without the second attempt on a dropped
    /// connection, for a command that must not run twice (one that gives
    /// something back: a refund).
    pub async fn call_once<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, RedisCallError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.call_with(op, call, false).await
    }

    async fn call_with<T, F, Fut>(
        &self,
        op: &'static str,
        call: F,
        again: bool,
    ) -> Result<T, RedisCallError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if let Some(breaker) = &self.breaker
            && !breaker.allow(|| self.now_ms())
        {
            return Err(RedisCallError::Skipped);
        }
        let (manager, generation, health) = self.current()?;
        let once_more = async {
            match call(manager.clone()).await {
                // The manager hands a call the outcome of its last
                // reconnect, however old: one made while Redis was down
                // fails the first call after Redis came back. The command
                // was not sent; one more try connects anew (and is refused
                // at once if Redis is still down).
                Err(e) if never_connected(&e) || (again && timed_out(&e)) => {
                    tracing::debug!(error = %e, op, "redis connection not made; calling again");
                    call(manager).await
                }
                Err(e) if again && dropped_in_use(&e) => {
                    tracing::debug!(error = %e, op, "redis connection dropped; calling again");
                    call(manager).await
                }
                done => done,
            }
        };
        let result = match tokio::time::timeout(self.timeout, once_more).await {
            Ok(Ok(value)) => {
                self.answered(&health);
                Ok(value)
            }
            Ok(Err(e)) => {
                if answered(&e) {
                    self.answered(&health);
                    if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) {
                        self.read_only(generation, &health);
                    }
                } else {
                    self.unanswered(generation, &health);
                }
                Err(RedisCallError::Redis(e))
            }
            Err(_) => {
                self.unanswered(generation, &health);
                Err(RedisCallError::Timeout {
                    op,
                    after: self.timeout,
                })
            }
        };
        if let Some(breaker) = &self.breaker {
            match &result {
                // An error Redis answered with (a full Redis's `OOM`, a
                // `WRONGTYPE`) is that call's: Redis is there.
                Ok(_) => breaker.success(),
                Err(e) if e.is_reply() => breaker.success(),
                Err(_) => {
                    breaker.failure(self.now_ms());
                }
            }
        }
        result
    }

    /// Whether Redis answers a `PING` on this link's connection (connecting
    /// it now), waiting up to `within` for the connect and the answer: a
    /// start-up check. Neither the link's breaker nor its reconnect logic
    /// hear of it. See [`RedisCallError::is_refusal`] for the errors that
    /// mean a wrong setting rather than a Redis that is away.
    pub async fn ping(&self, within: Duration) -> Result<(), RedisCallError> {
        let (mut manager, ..) = self.current()?;
        let ping = redis::cmd("PING");
        match tokio::time::timeout(within, ping.query_async::<String>(&mut manager)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(RedisCallError::Redis(e)),
            Err(_) => Err(RedisCallError::Timeout {
                op: "ping",
                after: within,
            }),
        }
    }

    /// [`RedisLink::ping`], then whether this connection may do what the
    /// proxy's features do: run a script that writes a key under
    /// `key_prefix` with `SET`, the command every store writes with (`XX`,
    /// on a key that does not exist: nothing is written). An ACL user that
    /// may `PING` but not `EVAL`, or not write the prefix's keys, is
    /// refused here rather than at every request; one allowed only the
    /// commands the features run is not. A replica (`READONLY`) is not a
    /// refusal: a failover may be under way.
    pub async fn check(&self, within: Duration, key_prefix: &str) -> Result<(), RedisCallError> {
        self.ping(within).await?;
        let (mut manager, ..) = self.current()?;
        let mut probe = redis::cmd("EVAL");
        probe
            .arg("return redis.call('SET', KEYS[1], '', 'XX', 'PX', 1)")
            .arg(1)
            .arg(format!("{key_prefix}startup-probe"));
        let probed = probe.query_async::<redis::Value>(&mut manager);
        match tokio::time::timeout(within, probed).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly) => Ok(()),
            Ok(Err(e)) => Err(RedisCallError::Redis(e)),
            Err(_) => Err(RedisCallError::Timeout {
                op: "eval",
                after: within,
            }),
        }
    }

    /// The connection to call on (made now if there is none yet).
    fn current(&self) -> Result<(ConnectionManager, u64, Arc<Health>), RedisCallError> {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let manager = match &slot.manager {
            Some(manager) => manager.clone(),
            None => {
                let manager = self.connect()?;
                slot.manager = Some(manager.clone());
                slot.health = Health::new(self.now_ms());
                manager
            }
        };
        Ok((manager, slot.generation, slot.health.clone()))
    }

    fn connect(&self) -> Result<ConnectionManager, RedisCallError> {
        Ok(ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.config.clone(),
        )?)
    }

    fn answered(&self, health: &Health) {
        if health.unanswered.load(Ordering::Relaxed) != 0 {
            health.unanswered.store(0, Ordering::Relaxed);
        }
        health.answered_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A call on generation `generation` got no answer: replace the
    /// connection when this makes it look dead (see the module docs).
    fn unanswered(&self, generation: u64, health: &Health) {
        let unanswered = health.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
        let silence_ms = u64::try_from((self.timeout * 2).max(Duration::from_secs(1)).as_millis())
            .unwrap_or(u64::MAX);
        let silent_for = self
            .now_ms()
            .saturating_sub(health.answered_ms.load(Ordering::Relaxed));
        if unanswered < TIMEOUTS_BEFORE_RECONNECT || silent_for < silence_ms {
            return;
        }
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.generation != generation {
            return; // another call replaced it already
        }
        tracing::warn!(
            redis = self.user,
            unanswered,
            silent_ms = silent_for,
            "redis calls failed or went unanswered; replacing its connection"
        );
        // Made on the next call; the old one closes when its last call ends.
        slot.manager = None;
        slot.generation = generation.wrapping_add(1);
    }

    /// A call on generation `generation` was answered `READONLY`: replace
    /// the connection, unless it was made less than a second ago (the
    /// address still leads to a replica: not a new connection a call).
    fn read_only(&self, generation: u64, health: &Health) {
        if self.now_ms().saturating_sub(health.made_ms) < 1000 {
            return;
        }
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.generation != generation {
            return;
        }
        tracing::warn!(
            redis = self.user,
            "redis answered READONLY (a replica now); replacing its connection"
        );
        slot.manager = None;
        slot.generation = generation.wrapping_add(1);
    }

    /// Milliseconds on the link's clock, from 1 (the breaker's 0 is "closed").
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_failed_calls_are_made_once_more() {
        let io = |kind| redis::RedisError::from(std::io::Error::new(kind, "x"));
        assert!(dropped_in_use(&io(std::io::ErrorKind::BrokenPipe)));
        assert!(dropped_in_use(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(!dropped_in_use(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(!dropped_in_use(&io(std::io::ErrorKind::NotFound)));
        // A connection never made is tried once more, by any call.
        assert!(never_connected(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(never_connected(&io(std::io::ErrorKind::NotFound)));
        assert!(!never_connected(&io(std::io::ErrorKind::BrokenPipe)));
    }
}
