//! A circuit breaker in front of a shared store: while the store keeps
//! failing (Redis down or silent), calls skip it instead of each waiting for
//! its timeout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Consecutive failures that open the breaker.
pub const THRESHOLD: u32 = 3;
/// How long an open breaker skips the store before one call probes it.
pub const COOLDOWN_MS: u64 = 1000;

/// Closed: every call goes to the store. Open (after [`THRESHOLD`]
/// consecutive failures): calls skip the store for [`COOLDOWN_MS`]; then one
/// call probes it while the others keep skipping, and a success closes the
/// breaker.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: AtomicU32,
    /// Until when calls skip the store (ms since the Unix epoch); 0: closed.
    open_until_ms: AtomicU64,
}

impl Breaker {
    /// Whether a call may go to the store now; `now_ms` is read only while
    /// the breaker is open (a closed one needs no clock).
    pub fn allow(&self, now_ms: impl FnOnce() -> u64) -> bool {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now_ms = now_ms();
        if now_ms < until {
            return false;
        }
        // The cooldown is over: this call probes; the others wait another one.
        self.open_until_ms
            .compare_exchange(
                until,
                now_ms + COOLDOWN_MS,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// A call went through: close the breaker.
    pub fn success(&self) {
        // Read first: on the hit path of a healthy store, no write contends.
        if self.failures.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
        }
        if self.open_until_ms.load(Ordering::Acquire) != 0 {
            self.open_until_ms.store(0, Ordering::Release);
        }
    }

    /// Count a failure; `true` when this one opened the breaker.
    pub fn failure(&self, now_ms: u64) -> bool {
        let failures = self
            .failures
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        if failures < THRESHOLD {
            return false;
        }
        let was = self
            .open_until_ms
            .swap(now_ms.max(1) + COOLDOWN_MS, Ordering::AcqRel);
        was == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_the_cooldown() {
        let breaker = Breaker::default();
        assert!(!breaker.failure(10));
        breaker.success();
        assert!(!breaker.failure(10));
        assert!(!breaker.failure(10));
        assert!(breaker.allow(|| 10));
        assert!(breaker.failure(10), "third in a row opens");
        assert!(!breaker.allow(|| 500));
        assert!(breaker.allow(|| 1010), "one probe");
        assert!(!breaker.allow(|| 1011), "the others still skip");
        assert!(!breaker.failure(1020), "a failed probe keeps it open");
        assert!(!breaker.allow(|| 1500));
        assert!(breaker.allow(|| 2020));
        breaker.success();
        assert!(breaker.allow(|| 2021) && breaker.allow(|| 2022));
    }
}
