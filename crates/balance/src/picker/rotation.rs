//! Rotations: plain round robin and nginx's smooth weighted round robin.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{LoadView, PickerMember};

/// Each available backend in turn. The turns count over the backends
/// available now, so that one taken out shares its turns among all the
/// others instead of handing them to its neighbour.
#[derive(Debug, Default)]
pub(super) struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub(super) fn pick<L: LoadView + ?Sized>(&self, loads: &L) -> Option<usize> {
        let n = loads.len();
        let available = (0..n).filter(|&i| loads.is_available(i)).count();
        if available == 0 {
            return None;
        }
        let turn = if loads.is_retry() {
            self.next.load(Ordering::Relaxed)
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        (0..n)
            .filter(|&i| loads.is_available(i))
            .nth(turn % available)
            // (One taken out between the two reads.)
            .or_else(|| (0..n).find(|&i| loads.is_available(i)))
    }

    /// Go on from `from`'s turn.
    pub(super) fn carry_over(&self, from: &RoundRobin) {
        self.next
            .store(from.next.load(Ordering::Relaxed), Ordering::Relaxed);
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

    /// Give each backend the score it had in `from` (matched by name).
    pub(super) fn carry_over(&self, from: &SmoothWeighted, from_names: &[&str], names: &[&str]) {
        let then = from
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut now = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (score, name) in now.iter_mut().zip(names) {
            if let Some(i) = from_names.iter().position(|n| n == name) {
                *score = then.get(i).copied().unwrap_or(0);
            }
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
