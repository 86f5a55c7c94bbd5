//! The synchronous decision: which of a group's backends takes a request.
//!
//! [`Picker`] knows nothing of tokio, time or services: the caller describes
//! each backend's load through [`LoadView`] and passes the request's prefix
//! key and a random value. The service, the benches and the prefix-routing
//! simulation all drive this same code.

mod p2c;
mod ring;
mod rotation;

use crate::config::Strategy;

/// What a [`Picker`] needs to know about backend `i` of its group, read
/// lazily so that a pick over 256 backends reads only what it uses.
pub trait LoadView {
    /// How many backends there are; indices run `0..len()`.
    fn len(&self) -> usize;

    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether backend `i` may be chosen (healthy, not excluded).
    fn is_available(&self, i: usize) -> bool;

    /// Requests in flight on backend `i`, counted from decision to the end of
    /// the response body.
    fn in_flight(&self, i: usize) -> u32;

    /// The peak-EWMA cost of backend `i` (latency estimate × (in-flight + 1)),
    /// read by `p2c_ewma` only. Defaults to the in-flight count.
    fn cost(&self, i: usize) -> f64 {
        f64::from(self.in_flight(i))
    }

    /// Whether this pick is a retry of a request another backend failed.
    /// A rotation does not advance for it: if it did, with two backends
    /// every request would start on the one that fails (its retry moving
    /// the rotation past the other). Defaults to false.
    fn is_retry(&self) -> bool {
        false
    }
}

/// A plain description of one backend's load, for callers that keep loads in
/// a slice (`[Load]` implements [`LoadView`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Whether the backend may be chosen.
    pub available: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Peak-EWMA cost (`p2c_ewma` only).
    pub cost: f64,
}

impl LoadView for [Load] {
    fn len(&self) -> usize {
        <[Load]>::len(self)
    }

    fn is_available(&self, i: usize) -> bool {
        self[i].available
    }

    fn in_flight(&self, i: usize) -> u32 {
        self[i].in_flight
    }

    fn cost(&self, i: usize) -> f64 {
        self[i].cost
    }
}

/// One group's backends as a picker sees them: a name (placing them on the
/// prefix ring) and a weight (for `weighted`).
#[derive(Clone, Copy, Debug)]
pub struct PickerMember<'a> {
    /// The backend's name.
    pub name: &'a str,
    /// Its weight (0: only when no weighted backend is available).
    pub weight: u32,
}

/// Chooses a backend of one group by the configured [`Strategy`].
///
/// ```
/// use llm_proxy_balance::{Load, Picker, PickerMember, Strategy};
///
/// let members = [PickerMember { name: "a", weight: 1 }, PickerMember { name: "b", weight: 1 }];
/// let picker = Picker::new(&Strategy::LeastRequests, &members);
/// let loads = [
///     Load { available: true, in_flight: 9, cost: 9.0 },
///     Load { available: true, in_flight: 1, cost: 1.0 },
/// ];
/// assert_eq!(picker.pick(&loads[..], None, 42), Some(1));
/// ```
#[derive(Debug)]
pub struct Picker {
    kind: Kind,
    len: usize,
}

#[derive(Debug)]
enum Kind {
    RoundRobin(rotation::RoundRobin),
    Weighted(rotation::SmoothWeighted),
    LeastRequests,
    P2cEwma,
    Prefix(Box<ring::Ring>),
    FirstAvailable,
}

impl Picker {
    /// A picker for `members` (in group order) by `strategy`.
    pub fn new(strategy: &Strategy, members: &[PickerMember<'_>]) -> Picker {
        let kind = match strategy {
            Strategy::RoundRobin => Kind::RoundRobin(rotation::RoundRobin::default()),
            Strategy::Weighted => Kind::Weighted(rotation::SmoothWeighted::new(members)),
            Strategy::LeastRequests => Kind::LeastRequests,
            Strategy::P2cEwma => Kind::P2cEwma,
            Strategy::PrefixAffinity(cfg) => Kind::Prefix(Box::new(ring::Ring::new(cfg, members))),
        };
        Picker {
            kind,
            len: members.len(),
        }
    }

    /// A picker that takes the first available backend in order (passthrough
    /// routes: "the first healthy upstream in config order").
    pub fn first_available(len: usize) -> Picker {
        Picker {
            kind: Kind::FirstAvailable,
            len,
        }
    }

    /// Carry the rotation state of `from`, the picker this one replaces,
    /// over a change of members (`from_names` then, `names` now): a
    /// rotation goes on from its turn, a weighted backend keeps its score,
    /// instead of every change starting over at the first backend.
    pub(crate) fn carry_over(&self, from: &Picker, from_names: &[&str], names: &[&str]) {
        match (&self.kind, &from.kind) {
            (Kind::RoundRobin(now), Kind::RoundRobin(then)) => now.carry_over(then),
            (Kind::Weighted(now), Kind::Weighted(then)) => {
                now.carry_over(then, from_names, names);
            }
            _ => {}
        }
    }

    /// How many backends the picker was built for.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it was built for none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Choose an available backend: its index in `loads`, or `None` when no
    /// backend is available (the caller decides about panic routing).
    ///
    /// `key` is the request's prefix key (`prefix_affinity` only; without one
    /// the least loaded of two random backends is chosen). `random` seeds the
    /// power-of-two choices and tie-breaks; pass a fresh random value per
    /// call. `loads.len()` must equal [`Picker::len`]; extra entries are
    /// ignored and missing ones are never chosen.
    pub fn pick<L: LoadView + ?Sized>(
        &self,
        loads: &L,
        key: Option<u64>,
        random: u64,
    ) -> Option<usize> {
        let view = Bounded {
            inner: loads,
            len: loads.len().min(self.len),
        };
        match &self.kind {
            Kind::RoundRobin(rr) => rr.pick(&view),
            Kind::Weighted(w) => w.pick(&view),
            Kind::LeastRequests => p2c::pick(&view, random, |i| f64::from(view.in_flight(i))),
            Kind::P2cEwma => p2c::pick(&view, random, |i| view.cost(i)),
            Kind::Prefix(ring) => ring.pick(&view, key, random),
            Kind::FirstAvailable => (0..view.len()).find(|&i| view.is_available(i)),
        }
    }
}

/// A view cut to the picker's length, so no index beyond either is read.
struct Bounded<'a, L: ?Sized> {
    inner: &'a L,
    len: usize,
}

impl<L: LoadView + ?Sized> LoadView for Bounded<'_, L> {
    fn len(&self) -> usize {
        self.len
    }
    fn is_available(&self, i: usize) -> bool {
        self.inner.is_available(i)
    }
    fn in_flight(&self, i: usize) -> u32 {
        self.inner.in_flight(i)
    }
    fn cost(&self, i: usize) -> f64 {
        self.inner.cost(i)
    }
    fn is_retry(&self) -> bool {
        self.inner.is_retry()
    }
}

/// A uniform index in `0..n` from `random` (multiply-shift; `n > 0`).
fn uniform(random: u64, n: usize) -> usize {
    ((u128::from(random) * n as u128) >> 64) as usize
}

/// The least loaded available backend by `in_flight`, ties broken by a
/// random rotation so that equal backends share the traffic.
fn least_loaded<L: LoadView + ?Sized>(loads: &L, random: u64) -> Option<usize> {
    let n = loads.len();
    if n == 0 {
        return None;
    }
    let start = uniform(random, n);
    (0..n)
        .map(|k| (start + k) % n)
        .filter(|&i| loads.is_available(i))
        .min_by_key(|&i| loads.in_flight(i))
}

#[cfg(test)]
mod tests;
