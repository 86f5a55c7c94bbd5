//! Response ids in Redis: `<prefix>resp:<id>` -> upstream name, with a TTL.
//! Every call is bounded; a failure is a miss (logged, counted), never an
//! error for the client beyond the 404 an unknown id gets anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

const TIMEOUT: Duration = Duration::from_millis(250);

/// A lazily connected Redis holding response ids.
#[derive(Clone)]
pub struct RedisIds {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
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
                client: redis::Client::open(url)?,
                conn: OnceCell::new(),
                prefix: prefix.to_owned(),
                errors: AtomicU64::new(0),
            }),
        })
    }

    /// Failed calls so far.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    fn key(&self, id: &str) -> String {
        format!("{}resp:{id}", self.inner.prefix)
    }

    async fn connection(&self) -> Option<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(1);
        let client = self.inner.client.clone();
        let init = || async move { ConnectionManager::new_with_config(client, config).await };
        match tokio::time::timeout(TIMEOUT * 2, self.inner.conn.get_or_try_init(init)).await {
            Ok(Ok(conn)) => Some(conn.clone()),
            Ok(Err(e)) => self.failed(&e),
            Err(_) => self.failed(&"connect timed out"),
        }
    }

    fn failed<T>(&self, e: &dyn std::fmt::Display) -> Option<T> {
        let n = self.inner.errors.fetch_add(1, Ordering::Relaxed);
        if n % 100 == 0 {
            tracing::warn!(error = %e, failures = n + 1, "response-id store (redis) failed");
        }
        None
    }

    /// The upstream that holds `id`, if Redis knows it.
    pub async fn get(&self, id: &str) -> Option<String> {
        let mut conn = self.connection().await?;
        let key = self.key(id);
        match tokio::time::timeout(TIMEOUT, conn.get::<_, Option<String>>(key)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => self.failed(&e),
            Err(_) => self.failed(&"get timed out"),
        }
    }

    /// Remember `id -> upstream` for `ttl`, in the background.
    pub fn set(&self, id: &str, upstream: &str, ttl: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        let (key, value) = (self.key(id), upstream.to_owned());
        rt.spawn(async move {
            let Some(mut conn) = this.connection().await else {
                return;
            };
            let set = conn.set_ex::<_, _, ()>(key, value, ttl.as_secs());
            match tokio::time::timeout(TIMEOUT, set).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    this.failed::<()>(&e);
                }
                Err(_) => {
                    this.failed::<()>(&"set timed out");
                }
            }
        });
    }
}
