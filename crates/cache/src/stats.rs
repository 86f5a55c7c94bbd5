//! Counters the proxy reads at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::{Store, StoreError};

/// The cache layer's counters, shared by every clone of the layer and its
/// services; cheap to clone. Read them with [`CacheStats::snapshot`].
#[derive(Clone)]
pub struct CacheStats {
    pub(crate) counters: Arc<Counters>,
    pub(crate) store: Arc<dyn Store>,
}

impl std::fmt::Debug for CacheStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheStats")
            .field("store", &self.store.kind())
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bypasses: AtomicU64,
    pub coalesced: AtomicU64,
    pub stored: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub not_stored: AtomicU64,
    pub store_errors: AtomicU64,
    pub store_skipped: AtomicU64,
    pub breaker: llm_proxy_core::breaker::Breaker,
    /// Store-error warnings, at most one per [`WARN_EVERY_MS`].
    warnings: llm_proxy_core::throttle::LogThrottle,
}

/// One reading of [`CacheStats`]. Counters only grow; `entries` and `bytes`
/// are gauges of the store, when it can tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Requests answered from the cache: stored entries and coalesced
    /// requests fed by an identical one in flight.
    pub hits: u64,
    /// Requests looked up and not found, sent upstream.
    pub misses: u64,
    /// Requests not looked up: `no-cache`, `no-store`, or not cacheable.
    pub bypasses: u64,
    /// Requests that waited for an identical request in flight.
    pub coalesced: u64,
    /// Answers written to the store.
    pub stored: u64,
    /// Body bytes written to the store.
    pub stored_bytes: u64,
    /// Answers that were not stored: not a `200`, broken, not valid JSON or
    /// SSE, too large, or the client left before the end.
    pub not_stored: u64,
    /// Store calls that failed or timed out (each one served as a miss or
    /// left unstored; never a failed request).
    pub store_errors: u64,
    /// Store calls skipped because the store kept failing (a circuit
    /// breaker: after 3 consecutive errors, the store is left alone for a
    /// second, then probed by one call).
    pub store_skipped: u64,
    /// Entries the store evicted to stay within its bounds.
    pub evictions: u64,
    /// Entries the store dropped because their TTL ran out.
    pub expirations: u64,
    /// Entries the memory store did not keep: larger than a shard's part of
    /// `max_bytes` (also counted in `not_stored`).
    pub too_large: u64,
    /// Entries held now, if the store can tell.
    pub entries: Option<u64>,
    /// Body bytes held now, if the store can tell.
    pub bytes: Option<u64>,
}

impl StatsSnapshot {
    /// The event counters by the `event` label of
    /// `llm_proxy_cache_events_total`.
    pub fn events(&self) -> [(&'static str, u64); 10] {
        [
            ("hit", self.hits),
            ("miss", self.misses),
            ("bypass", self.bypasses),
            ("coalesced", self.coalesced),
            ("store", self.stored),
            ("not_stored", self.not_stored),
            ("eviction", self.evictions),
            ("expiration", self.expirations),
            ("too_large", self.too_large),
            ("store_skipped", self.store_skipped),
        ]
    }
}

impl CacheStats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let usage = self.store.usage();
        StatsSnapshot {
            hits: load(&c.hits),
            misses: load(&c.misses),
            bypasses: load(&c.bypasses),
            coalesced: load(&c.coalesced),
            stored: load(&c.stored),
            stored_bytes: load(&c.stored_bytes),
            not_stored: load(&c.not_stored),
            store_errors: load(&c.store_errors),
            store_skipped: load(&c.store_skipped),
            evictions: usage.map_or(0, |u| u.evictions),
            expirations: usage.map_or(0, |u| u.expirations),
            too_large: usage.map_or(0, |u| u.too_large),
            entries: usage.map(|u| u.entries),
            bytes: usage.map(|u| u.bytes),
        }
    }

    /// The store's kind (`memory`, `redis`), the `store` label of
    /// `llm_proxy_store_errors_total`.
    pub fn store_kind(&self) -> &'static str {
        self.store.kind()
    }
}

/// At most one store-error warning per this many milliseconds.
const WARN_EVERY_MS: u64 = 10_000;

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a store call may go ahead (the breaker is closed, or this
    /// call probes it); a skipped call is counted.
    pub(crate) fn store_allowed(&self) -> bool {
        let allowed = self.breaker.allow(crate::clock::now_ms);
        if !allowed {
            Self::bump(&self.store_skipped);
        }
        allowed
    }

    /// A store call succeeded.
    pub(crate) fn store_ok(&self) {
        self.breaker.success();
    }

    /// Count a store error and log it, at most once per 10 s (with the
    /// number of errors not logged since): a Redis outage must not flood the
    /// log at the request rate.
    pub(crate) fn store_error(&self, store: &'static str, op: &'static str, error: &StoreError) {
        Self::bump(&self.store_errors);
        let now = crate::clock::now_ms();
        if matches!(error, StoreError::Corrupt(_) | StoreError::Refused { .. }) {
            // The store answered: one bad value (another version's, or
            // damaged), or a refused call (a full Redis), is that entry's
            // miss, not a reason to leave the store alone for every key.
            self.breaker.success();
        } else if self.breaker.failure(now) {
            tracing::warn!(
                store,
                "cache store keeps failing; skipping it for a second at a time"
            );
        }
        if let Some(suppressed) = self.warnings.due(now, WARN_EVERY_MS) {
            tracing::warn!(
                store,
                op,
                error = %error,
                suppressed,
                "cache store failed; serving as a miss"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_do_not_decode_do_not_trip_the_breaker() {
        let counters = Counters::default();
        let corrupt = StoreError::Corrupt(crate::entry::DecodeError::for_tests());
        for _ in 0..10 {
            counters.store_error("redis", "get", &corrupt);
        }
        assert!(counters.store_allowed());
        assert_eq!(counters.store_errors.load(Ordering::Relaxed), 10);
        let down = StoreError::Backend {
            store: "redis",
            message: "connection refused".into(),
        };
        for _ in 0..3 {
            counters.store_error("redis", "get", &down);
        }
        assert!(
            !counters.store_allowed(),
            "an unreachable store is left alone"
        );
    }
}
