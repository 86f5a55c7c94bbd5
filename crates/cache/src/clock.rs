//! Wall-clock milliseconds that follow tokio's clock.
//!
//! Entries carry the Unix time they were stored at, so that proxy instances
//! sharing a store agree on their age. The time is read as a Unix base taken
//! once plus tokio's monotonic clock since then: a paused tokio clock in tests
//! moves entry ages (`age`, `max-age`) as it moves TTLs.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    static BASE: OnceLock<(i128, Instant)> = OnceLock::new();
    let (base_ns, base) = BASE.get_or_init(|| {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        (i128::try_from(unix.as_nanos()).unwrap_or(0), Instant::now())
    });
    let now = Instant::now();
    // A paused clock (tests) may stand before the base taken elsewhere.
    let offset_ns = match now.checked_duration_since(*base) {
        Some(since) => i128::try_from(since.as_nanos()).unwrap_or(i128::MAX),
        None => -i128::try_from(base.duration_since(now).as_nanos()).unwrap_or(i128::MAX),
    };
    // Rounded down in one step, so that two readings differ by exactly the
    // time between them, truncated.
    let ms = base_ns.saturating_add(offset_ns).div_euclid(1_000_000);
    u64::try_from(ms).unwrap_or(0)
}
