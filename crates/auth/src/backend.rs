//! Where limit state lives: in this process, or in Redis for a fleet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::keys::KeyEntry;
use crate::limit::Decision;
#[cfg(feature = "redis")]
use crate::limit::Tally;
#[cfg(feature = "redis")]
use llm_proxy_core::redis::RedisCallError;

/// The limit store of an [`AuthLayer`](crate::AuthLayer).
#[derive(Debug)]
pub struct LimitBackend {
    base: Instant,
    kind: Kind,
    errors: AtomicU64,
    #[cfg(feature = "redis")]
    warnings: llm_proxy_core::throttle::LogThrottle,
}

#[derive(Debug)]
enum Kind {
    Local,
    #[cfg(feature = "redis")]
    Redis(Box<crate::redis::RedisLimits>),
}

impl LimitBackend {
    /// Limits kept in this process.
    pub fn local() -> Self {
        LimitBackend {
            base: Instant::now(),
            kind: Kind::Local,
            errors: AtomicU64::new(0),
            #[cfg(feature = "redis")]
            warnings: llm_proxy_core::throttle::LogThrottle::default(),
        }
    }

    /// Limits kept in Redis, shared by every proxy using the same Redis and
    /// key prefix. When Redis fails, each decision falls back to this
    /// process's own limits (logged and counted), never to an outage.
    #[cfg(feature = "redis")]
    pub fn redis(limits: crate::redis::RedisLimits) -> Self {
        LimitBackend {
            kind: Kind::Redis(Box::new(limits)),
            ..Self::local()
        }
    }

    /// Nanoseconds on this backend's monotonic clock (tokio's, so paused
    /// time works in tests).
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Ask for one request reserving `tokens`.
    pub async fn acquire(&self, key: &KeyEntry, tokens: u64) -> Decision {
        match &self.kind {
            Kind::Local => key.limits.acquire(self.now(), tokens),
            #[cfg(feature = "redis")]
            Kind::Redis(r) => {
                // What this process charged alone while Redis failed goes to
                // Redis with its next call, to be added there: a bucket
                // Redis kept (or lost) through the outage is not a fresh one.
                // (Dropped with this future, a client gone mid-call, the
                // tally is no longer on its way: the call may have run.)
                let alone = key.limits.take_alone(self.now());
                let answer = r
                    .acquire(key, tokens, alone.as_ref().map(Tally::units))
                    .await;
                if let Ok((_, ahead)) = &answer {
                    key.limits.mirror(self.now(), ahead.map(Some));
                }
                if let Some(tally) = alone {
                    // Sent again only when the call surely did not run (it
                    // was skipped, or refused): a timed-out one may have run,
                    // and adding the tally twice would lock the key out.
                    if matches!(
                        &answer,
                        Err(RedisCallError::Skipped | RedisCallError::Redis(_))
                    ) {
                        tally.give_back();
                    }
                }
                match answer {
                    Ok((decision, _)) => decision,
                    Err(e) => {
                        self.failed(&e);
                        Decision {
                            held_locally: true,
                            ..key.limits.acquire_alone(self.now(), tokens)
                        }
                    }
                }
            }
        }
    }

    /// Charge (`delta > 0`) or refund (`delta < 0`) tokens of a request
    /// whose reservation is `held_locally` ([`Decision::held_locally`]) or
    /// in the store. Does not wait: the Redis update runs in the background.
    ///
    /// A reservation taken locally while Redis failed is settled locally: a
    /// refund sent to Redis once it is back would credit the fleet's bucket
    /// with tokens it never charged.
    pub fn adjust(self: &Arc<Self>, key: &Arc<KeyEntry>, delta: i64, held_locally: bool) {
        if delta == 0 || key.limits.tokens.is_none() {
            return;
        }
        if held_locally {
            // Settled here, refunds too: Redis is to learn what it came to.
            key.limits.adjust_alone(self.now(), delta, delta);
            return;
        }
        match &self.kind {
            Kind::Local => key.limits.adjust_tokens(self.now(), delta),
            #[cfg(feature = "redis")]
            Kind::Redis(_) => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let this = self.clone();
                let key = key.clone();
                rt.spawn(async move {
                    let Kind::Redis(r) = &this.kind else { return };
                    match r.adjust(&key, delta).await {
                        Ok(ahead) => key.limits.mirror(this.now(), [None, Some(ahead)]),
                        Err(e) => {
                            this.failed(&e);
                            // A charge Redis did not take is kept for it;
                            // a refund is not (it may have run there).
                            key.limits.adjust_alone(this.now(), delta, delta.max(0));
                        }
                    }
                });
            }
        }
    }

    /// Limit-store errors so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// A store error: counted, and logged at most once per 10 s (with the
    /// number of errors not logged since), so that an outage neither floods
    /// the log at the request rate nor goes unlogged when an earlier one
    /// was.
    #[cfg(feature = "redis")]
    fn failed(&self, e: &dyn std::fmt::Display) {
        const WARN_EVERY_MS: u64 = 10_000;
        let n = self.errors.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.warnings.due(self.now() / 1_000_000, WARN_EVERY_MS) {
            tracing::warn!(
                error = %e,
                failures = n + 1,
                suppressed,
                "rate-limit store failed; using local limits"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeySpec, KeyTable};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn limit_resets_as_time_passes() {
        let mut spec = KeySpec::from_key("k", "sk");
        spec.requests_per_minute = Some(3);
        let table = KeyTable::new(vec![spec]);
        let key = table.entries().next().expect("one key").clone();
        let backend = Arc::new(LimitBackend::local());
        for _ in 0..3 {
            assert!(backend.acquire(&key, 0).await.allowed);
        }
        let denied = backend.acquire(&key, 0).await;
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(!backend.acquire(&key, 0).await.allowed);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(backend.acquire(&key, 0).await.allowed);
        // A whole window later, the whole burst is back.
        tokio::time::advance(Duration::from_secs(60)).await;
        let d = backend.acquire(&key, 0).await;
        assert_eq!(d.requests.map(|s| s.remaining), Some(2));
    }
}
