//! Rotations: plain round robin and nginx's smooth weighted round robin.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{LoadView, PickerMember};

/// Each available backend in turn.
#[derive(Debug, Default)]
pub(super) struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub(super) fn pick<L: LoadView + ?Sized>(&self, loads: &L) -> Option<usize> {
        let n = loads.len();
        if n == 0 {
            return None;
        }
        let start = if loads.is_retry() {
            self.next.load(Ordering::Relaxed)
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        } % n;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| loads.is_available(i))
    }
}

/// nginx's smooth weighted round robin: every pick adds each available
/// backend's weight to its current score, takes the highest score and
/// subtracts the total from it. Weights 3:1 give `a a b a`, not `a a a b`.
#[derive(Debug)]
pub(super) struct SmoothWeighted {
    weights: Vec<i64>,
    current: Mutex<Vec<i64>>,
}

impl SmoothWeighted {
    pub(super) fn new(members: &[PickerMember<'_>]) -> Self {
        let weights: Vec<i64> = members.iter().map(|m| i64::from(m.weight)).collect();
        SmoothWeighted {
            current: Mutex::new(vec![0; weights.len()]),
            weights,
        }
    }

    pub(super) fn pick<L: LoadView + ?Sized>(&self, loads: &L) -> Option<usize> {
        let n = loads.len().min(self.weights.len());
        let any_weighted = (0..n).any(|i| loads.is_available(i) && self.weights[i] > 0);
        // Weight 0 drains a backend: chosen only when no weighted one is available.
        let weight = |i: usize| match (self.weights[i], any_weighted) {
            (0, false) => 1,
            (w, _) => w,
        };
        // A poisoned lock only means a panic elsewhere mid-update: the scores
        // are still usable numbers.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in (0..n).filter(|&i| loads.is_available(i)) {
            let w = weight(i);
            if w == 0 {
                continue;
            }
            current[i] = current[i].saturating_add(w);
            total = total.saturating_add(w);
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let chosen = best?;
        current[chosen] = current[chosen].saturating_sub(total);
        Some(chosen)
    }
}
