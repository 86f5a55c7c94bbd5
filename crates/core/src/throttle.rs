//! [`LogThrottle`]: at most one log line per period for a failure that
//! repeats, with a count of the ones left out.

use std::sync::atomic::{AtomicU64, Ordering};

/// At most one line per `every_ms` for a failure that repeats (a store's
/// outage): the first failure of each outage is logged, however many came
/// before it, and a flood of them is one line per period saying how many
/// were left out.
///
/// ```
/// use llm_proxy_core::throttle::LogThrottle;
///
/// let throttle = LogThrottle::default();
/// assert_eq!(throttle.due(1_000, 10_000), Some(0));
/// assert_eq!(throttle.due(2_000, 10_000), None);
/// assert_eq!(throttle.due(3_000, 10_000), None);
/// // The next period's first failure is logged, with the two left out.
/// assert_eq!(throttle.due(11_000, 10_000), Some(2));
/// ```
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// When the last line was logged (ms on the caller's clock, at least 1);
    /// 0: never.
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// A failure at `now_ms` (any millisecond clock, the same at every
    /// call): `Some(left_out)` when a line is due, with the number of
    /// failures since the last line that logged none; `None` when this one
    /// is left out too.
    pub fn due(&self, now_ms: u64, every_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= every_ms;
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outage_is_logged_and_a_flood_is_one_line_per_period() {
        let t = LogThrottle::default();
        // A first outage of 250 failures over 2 s: one line.
        let lines: Vec<_> = (0..250u64).filter_map(|i| t.due(i * 8, 10_000)).collect();
        assert_eq!(lines, [0]);
        // A later outage, however many failures came before: logged.
        assert_eq!(t.due(60_000, 10_000), Some(249));
        assert_eq!(t.due(60_001, 10_000), None);
        // A clock at 0 still counts as a time (as 1 ms).
        let t = LogThrottle::default();
        assert_eq!(t.due(0, 10), Some(0));
        assert_eq!(t.due(5, 10), None);
        assert_eq!(t.due(11, 10), Some(1));
    }
}
