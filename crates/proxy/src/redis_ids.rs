//! Response and conversation ids in Redis: `<prefix><namespace>:<id>` ->
//! upstream name (namespace `resp` or `conv`), with a TTL.
//! Every call goes through a [`RedisLink`] (bounded, self-healing, a
//! breaker while Redis keeps failing); a failure is a miss (logged, counted), never an
//! error for the client beyond the 404 an unknown id gets anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use llm_proxy_core::redis::{RedisCallError, RedisLink};
use redis::AsyncCommands;

/// A lazily connected Redis holding response ids.
#[derive(Clone)]
pub struct RedisIds {
    inner: Arc<Inner>,
}

struct Inner {
    link: RedisLink,
    prefix: String,
    errors: AtomicU64,
}

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
                link: RedisLink::new(url)?,
                prefix: prefix.to_owned(),
                errors: AtomicU64::new(0),
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

    fn failed<T>(&self, e: &RedisCallError) -> Option<T> {
        let n = self.inner.errors.fetch_add(1, Ordering::Relaxed);
        if n % 100 == 0 {
            tracing::warn!(error = %e, failures = n + 1, "response-id store (redis) failed");
        }
        None
    }

    /// The upstream that holds `id` of `namespace`, if Redis knows it.
    pub async fn get(&self, namespace: &str, id: &str) -> Option<String> {
        let key = self.key(namespace, id);
        let key = &key;
        let get = |mut c: redis::aio::ConnectionManager| async move {
            c.get::<_, Option<Vec<u8>>>(key).await
        };
        match self.inner.link.call("get", get).await {
            // (Not UTF-8: not an upstream name the proxy wrote.)
            Ok(found) => found.and_then(|name| String::from_utf8(name).ok()),
            Err(e) => self.failed(&e),
        }
    }

    /// Remember `id` of `namespace` -> `upstream` for `ttl`, in the
    /// background.
    pub fn set(&self, namespace: &str, id: &str, upstream: &str, ttl: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let (key, value) = (self.key(namespace, id), upstream.to_owned());
        rt.spawn(async move {
            let (key, value) = (&key, &value);
            let set = |mut c: redis::aio::ConnectionManager| async move {
                c.set_ex::<_, _, ()>(key, value, ttl.as_secs()).await
            };
            if let Err(e) = this.inner.link.call("set", set).await {
                this.failed::<()>(&e);
            }
        });
    }
}
