//! Response and conversation ids in Redis: `<prefix><namespace>:<id>` ->
//! upstream name (namespace `resp` or `conv`), with a TTL.
//! Every call goes through a [`RedisLink`] (bounded, self-healing, a
//! breaker while Redis keeps failing); a failure is logged (at most a line
//! per 10 s) and counted, and the caller decides what it means (a lookup
//! Redis could not answer is a 503, a claim it could not take is tried
//! again later).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llm_proxy_core::redis::{RedisCallError, RedisLink};
use llm_proxy_core::throttle::LogThrottle;
use redis::AsyncCommands;

/// Set `KEYS[1]` to `ARGV[1]` for `ARGV[2]` seconds unless it holds
/// another value: 1 when set, 0 when it is another's. (A script of a few
/// bytes: `EVAL` each time, no `SCRIPT LOAD` to lose on a restart.)
const CLAIM: &str = "local v = redis.call('GET', KEYS[1]) \
if v == false or v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end \
return 0";

/// A lazily connected Redis holding response ids.
#[derive(Clone)]
pub struct RedisIds {
    inner: Arc<Inner>,
}

struct Inner {
    link: RedisLink,
    prefix: String,
    errors: AtomicU64,
    warnings: LogThrottle,
    /// The clock of `warnings`.
    epoch: Instant,
}

/// Redis could not be asked (down, slow, or skipped by the breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unreachable;

impl std::fmt::Debug for RedisIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIds")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisIds {
    /// Ids in the Redis at `url`, under `prefix`. Connects on first use.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        Ok(RedisIds {
            inner: Arc::new(Inner {
                link: RedisLink::new(url)?.used_by("response ids"),
                prefix: prefix.to_owned(),
                errors: AtomicU64::new(0),
                warnings: LogThrottle::default(),
                epoch: Instant::now(),
            }),
        })
    }

    /// Failed calls so far (calls the breaker skipped included).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    fn key(&self, namespace: &str, id: &str) -> String {
        format!("{}{namespace}:{id}", self.inner.prefix)
    }

    /// A failed call: counted, and logged at most once per 10 s (with the
    /// number left out since), as the other stores' failures are.
    fn failed(&self, e: &RedisCallError) -> Unreachable {
        const WARN_EVERY_MS: u64 = 10_000;
        let n = self.inner.errors.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(suppressed) = self.inner.warnings.due(now, WARN_EVERY_MS) {
            tracing::warn!(
                error = %e,
                failures = n + 1,
                suppressed,
                "response-id store (redis) failed"
            );
        }
        Unreachable
    }

    /// The upstream (and owner) that holds `id` of `namespace`, if Redis
    /// knows it.
    pub(crate) async fn get(
        &self,
        namespace: &str,
        id: &str,
    ) -> Result<Option<String>, Unreachable> {
        let key = self.key(namespace, id);
        let key = &key;
        let get = |mut c: redis::aio::ConnectionManager| async move {
            c.get::<_, Option<Vec<u8>>>(key).await
        };
        match self.inner.link.call("get", get).await {
            // (Not UTF-8: not an upstream name the proxy wrote.)
            Ok(found) => Ok(found.and_then(|name| String::from_utf8(name).ok())),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Claim `id` of `namespace` for `value` (its upstream and owner) for
    /// `ttl`: set when the id is free or already holds `value` (then its
    /// TTL is renewed), in one step on Redis. `Some(false)`: the id is
    /// another's, and stays so. `None`: Redis could not be asked.
    pub async fn claim(
        &self,
        namespace: &str,
        id: &str,
        value: &str,
        ttl: Duration,
    ) -> Option<bool> {
        let key = self.key(namespace, id);
        let (key, secs) = (&key, ttl.as_secs().max(1));
        let claim = |mut c: redis::aio::ConnectionManager| async move {
            redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(1)
                .arg(key)
                .arg(value)
                .arg(secs)
                .query_async::<i64>(&mut c)
                .await
        };
        match self.inner.link.call("claim", claim).await {
            Ok(claimed) => Some(claimed == 1),
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }
}
