//! The time a request spends waiting on its peers, which is not the
//! proxy's: the figure of the proxy's own overhead leaves it out.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The time a request has waited on others so far: its client's body, its
/// upstreams' answer heads (every attempt), a coalesced leader's answer.
/// Whoever waits adds to it; the server subtracts it from the time to the
/// response head to tell the proxy's overhead (`x-llm-proxy-overhead-ms`).
///
/// Carried in the request's extensions; clones share one count (a retried
/// request's clones add to the same).
#[derive(Clone, Debug, Default)]
pub struct Waited(Arc<AtomicU64>);

impl Waited {
    /// A count at zero.
    pub fn new() -> Self {
        Waited::default()
    }

    /// Count `elapsed` as waited (a single wait past 2⁶² ns, 146 years,
    /// counts as that).
    pub fn add(&self, elapsed: Duration) {
        const MOST: u64 = 1 << 62;
        let nanos = u64::try_from(elapsed.as_nanos()).map_or(MOST, |n| n.min(MOST));
        // Four such waits would wrap: none will come in a request's life.
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Count the time since `since` as waited.
    pub fn add_since(&self, since: Instant) {
        self.add(since.elapsed());
    }

    /// `wait`'s output, the time it took counted in `waited` if any (the
    /// clock is read only then).
    pub async fn timing<F: Future>(waited: Option<&Waited>, wait: F) -> F::Output {
        match waited {
            Some(waited) => {
                let since = Instant::now();
                let out = wait.await;
                waited.add_since(since);
                out
            }
            None => wait.await,
        }
    }

    /// The time waited so far.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_count_and_a_wait_is_bounded() {
        let waited = Waited::new();
        let clone = waited.clone();
        waited.add(Duration::from_millis(3));
        clone.add(Duration::from_micros(5));
        assert_eq!(waited.total(), Duration::from_micros(3005));
        clone.add(Duration::MAX);
        assert_eq!(waited.total(), Duration::from_nanos((1 << 62) + 3_005_000));
    }
}
