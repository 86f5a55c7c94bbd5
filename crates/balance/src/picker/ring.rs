//! Consistent hashing with bounded load (CHWBL) over a ring of virtual nodes.
//!
//! Each backend owns `virtual_nodes` points at `H(H(name), i)`. A request
//! with prefix key `k` walks the ring clockwise from `k` and takes the first
//! available backend whose in-flight count, with this request, stays within
//!
//! ```text
//! bound = max(ceil((1 + ε) · m), ceil(m) + min_slack),   m = (Σ in-flight + 1) / n
//! ```
//!
//! over the `n` available backends. At least one backend is always below the
//! bound (not all can be above the mean), so the walk ends. The ring depends
//! only on backend names: every proxy replica, and this one after a restart,
//! sends a prefix to the same home and, under load, spills it along the same
//! sequence of backends.

use super::{LoadView, PickerMember, least_loaded, p2c};
use crate::config::PrefixConfig;
use crate::hash::{hash_bytes, hash_u64};

#[derive(Debug)]
pub(super) struct Ring {
    /// (position, member index), sorted by position.
    points: Vec<(u64, u32)>,
    load_factor: f64,
    min_slack: u32,
    max_spread: u32,
}

impl Ring {
    pub(super) fn new(cfg: &PrefixConfig, members: &[PickerMember<'_>]) -> Ring {
        let vnodes = cfg.virtual_nodes_clamped();
        let mut points = Vec::with_capacity(members.len() * vnodes);
        for (i, m) in members.iter().enumerate() {
            let Ok(index) = u32::try_from(i) else { break };
            let base = hash_bytes(0, m.name.as_bytes());
            points.extend((0..vnodes as u64).map(|v| (hash_u64(base, v), index)));
        }
        points.sort_unstable();
        Ring {
            points,
            load_factor: cfg.load_factor_clamped(),
            min_slack: cfg.min_slack,
            max_spread: cfg.max_spread,
        }
    }

    pub(super) fn pick<L: LoadView + ?Sized>(
        &self,
        loads: &L,
        key: Option<u64>,
        random: u64,
    ) -> Option<usize> {
        let stats = Stats::of(loads)?;
        let Some(key) = key else {
            // No prompt to route by: by load alone.
            return p2c::pick(loads, random, |i| f64::from(loads.in_flight(i)));
        };
        if stats.max - stats.min > self.tolerated_spread(&stats) {
            // Loads have drifted apart (a stuck or slow backend): affinity
            // waits until the spread closes.
            return least_loaded(loads, random);
        }
        let bound = self.bound(&stats);
        let start = self.points.partition_point(|&(pos, _)| pos < key);
        let len = self.points.len();
        (0..len)
            .map(|k| self.points[(start + k) % len].1 as usize)
            .find(|&i| {
                i < loads.len() && loads.is_available(i) && u64::from(loads.in_flight(i)) < bound
            })
            .or_else(|| least_loaded(loads, random))
    }

    /// The in-flight spread (max − min) past which affinity is set aside:
    /// `max_spread`, or twice ε of the mean when that is more. The bound
    /// lets a backend sit ε·mean above the mean, and another as far below
    /// it: under heavy load (a mean of 128 in flight, as vLLM batches) that
    /// spread is the bound at work, not a stuck backend, and an absolute 32
    /// alone would turn affinity off for every prefix just when the
    /// servers' caches count most.
    fn tolerated_spread(&self, s: &Stats) -> u32 {
        let mean = s.sum as f64 / s.n as f64;
        let relative = (2.0 * self.load_factor * mean).ceil();
        // Finite and ≥ 0: the cast saturates.
        self.max_spread.max(relative as u32)
    }

    /// The highest in-flight count a backend may reach with this request.
    fn bound(&self, s: &Stats) -> u64 {
        let mean = (s.sum as f64 + 1.0) / s.n as f64;
        let relative = ((1.0 + self.load_factor) * mean).ceil();
        let absolute = mean.ceil() + f64::from(self.min_slack);
        // `relative` and `absolute` are finite and ≥ 1: the cast saturates.
        relative.max(absolute) as u64
    }
}

/// Sum, min and max of in-flight over the available backends.
struct Stats {
    n: u64,
    sum: u64,
    min: u32,
    max: u32,
}

impl Stats {
    fn of<L: LoadView + ?Sized>(loads: &L) -> Option<Stats> {
        let mut s = Stats {
            n: 0,
            sum: 0,
            min: u32::MAX,
            max: 0,
        };
        for i in (0..loads.len()).filter(|&i| loads.is_available(i)) {
            let f = loads.in_flight(i);
            s.n += 1;
            s.sum += u64::from(f);
            s.min = s.min.min(f);
            s.max = s.max.max(f);
        }
        (s.n > 0).then_some(s)
    }
}
