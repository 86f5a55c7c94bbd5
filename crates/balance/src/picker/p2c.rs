//! Power of two choices: sample two distinct available backends at random,
//! keep the cheaper. Near-best balance at O(1) reads, and unlike "always the
//! least loaded" it does not send a burst decided on one snapshot to the
//! same backend.

use super::{LoadView, uniform};
use crate::hash::splitmix;

/// The cheaper of two random available backends by `cost`.
pub(super) fn pick<L, F>(loads: &L, random: u64, cost: F) -> Option<usize>
where
    L: LoadView + ?Sized,
    F: Fn(usize) -> f64,
{
    let n = loads.len();
    let (a, b) = two_available(loads, n, random)?;
    let Some(b) = b else {
        return Some(a);
    };
    let (ca, cb) = (cost(a), cost(b));
    // NaN costs lose; equal costs are decided by the draw order (random).
    Some(if cb < ca || ca.is_nan() { b } else { a })
}

/// Two distinct available indices drawn uniformly, or one when only one is
/// available. Fast path: a few draws by rejection; slow path: rank among the
/// available ones.
fn two_available<L: LoadView + ?Sized>(
    loads: &L,
    n: usize,
    random: u64,
) -> Option<(usize, Option<usize>)> {
    if n == 0 {
        return None;
    }
    let r2 = splitmix(random);
    let a = uniform(random, n);
    let b = (a + 1 + uniform(r2, n.saturating_sub(1).max(1))) % n;
    let (ok_a, ok_b) = (loads.is_available(a), loads.is_available(b));
    if ok_a && ok_b && a != b {
        return Some((a, Some(b)));
    }
    let m = (0..n).filter(|&i| loads.is_available(i)).count();
    match m {
        0 => None,
        1 => (0..n).find(|&i| loads.is_available(i)).map(|i| (i, None)),
        _ => {
            let ra = uniform(splitmix(r2), m);
            let rb = (ra + 1 + uniform(splitmix(splitmix(r2)), m - 1)) % m;
            let nth = |rank: usize| (0..n).filter(|&i| loads.is_available(i)).nth(rank);
            Some((nth(ra)?, nth(rb)))
        }
    }
}
