//! Per-key rate limits: GCRA with a burst equal to the per-minute limit.
//!
//! GCRA keeps one number per limit, the theoretical arrival time (TAT). A
//! request of cost `c` is allowed when `max(TAT, now) + c·T - now <= 60 s`,
//! where `T = 60 s / limit`; then `TAT := max(TAT, now) + c·T`. With a burst
//! equal to the limit, `rpm = 3` allows three requests at once, then one every
//! 20 s. Tokens are charged the same way, with a reservation before the
//! request and an adjustment once the real usage is known.
//!
//! Why not `governor`: its GCRA cannot give back an over-reservation or
//! force-charge an under-reservation, which token reconciliation needs, and
//! the Redis backend must run the very same formula in a Lua script. The
//! formula is a few lines; both backends share it.

use std::sync::Mutex;
use std::time::Duration;

const WINDOW_NS: u64 = 60_000_000_000;

/// The most one adjustment moves a limit, in windows of the limit: a year's
/// worth. No real usage comes near it; the bound keeps an absurd count from
/// an upstream from overflowing the clock arithmetic (Redis keeps TATs in
/// Lua's doubles, and an expiry beyond `i64` milliseconds is an error there).
const MAX_ADJUST_WINDOWS: i64 = 60 * 24 * 365;

/// One GCRA limit: `limit` units per minute, burst `limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Units per minute.
    pub limit: u32,
}

/// The outcome of a check against one limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Allowed: the new TAT.
    Allowed(u64),
    /// Denied: how long until the same request would be allowed.
    Denied(Duration),
}

impl Gcra {
    /// A limit of `limit` per minute (at least 1).
    pub fn per_minute(limit: u32) -> Self {
        Gcra {
            limit: limit.max(1),
        }
    }

    /// Nanoseconds between two units at the steady rate (60 s / limit,
    /// rounded down; a `limit` of 0 counts as 1).
    pub fn interval_ns(&self) -> u64 {
        self.span(1)
    }

    /// Nanoseconds `units` take at the steady rate: `units · 60 s / limit`,
    /// rounded down once for the whole amount, not once a unit. (Above ~60
    /// million a minute a unit is a few ns, and `units · interval_ns` would
    /// let through up to 7% more than the limit names: u32::MAX a minute is
    /// 13.97 ns a unit, not 13.)
    fn span(&self, units: u64) -> u64 {
        let ns = u128::from(units) * u128::from(WINDOW_NS) / u128::from(self.units());
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// The limit the clock arithmetic divides by: `limit`, at least 1 (the
    /// field is public, and may have been set to 0 since
    /// [`per_minute`](Self::per_minute)).
    pub(crate) fn units(&self) -> u32 {
        self.limit.max(1)
    }

    /// What a request of `cost` units is charged: `cost`, at most the whole
    /// limit, so that one large request passes on a full bucket (and empties
    /// it) instead of being refused forever. Whatever later settles or refunds
    /// a request must do so against this amount, not `cost`: refunding the
    /// uncharged part would credit the limit.
    pub fn charge(&self, cost: u64) -> u64 {
        cost.min(u64::from(self.limit))
    }

    /// Check a request of `cost` units at `now` against state `tat`; it is
    /// charged [`charge(cost)`](Self::charge).
    pub fn check(&self, tat: u64, now: u64, cost: u64) -> Check {
        let cost = self.charge(cost);
        let new_tat = tat.max(now).saturating_add(self.span(cost));
        let ahead = new_tat - now;
        if ahead <= WINDOW_NS {
            Check::Allowed(new_tat)
        } else {
            Check::Denied(Duration::from_nanos(ahead - WINDOW_NS))
        }
    }

    /// The units a bucket at `tat` has yet to refill at `now`: those whose
    /// span still runs past `now`, a part of one counted whole.
    pub fn owed(&self, tat: u64, now: u64) -> u64 {
        let ahead = u128::from(tat.saturating_sub(now));
        let units = (ahead * u128::from(self.units())).div_ceil(u128::from(WINDOW_NS));
        u64::try_from(units).unwrap_or(u64::MAX)
    }

    /// `delta` bounded to what one adjustment may move this limit: a year's
    /// worth of units either way.
    pub fn bounded(&self, delta: i64) -> i64 {
        let max = i64::from(self.limit).saturating_mul(MAX_ADJUST_WINDOWS);
        delta.clamp(-max, max)
    }

    /// `tat` after charging (`delta > 0`) or giving back (`delta < 0`) units
    /// unconditionally ([`bounded`](Self::bounded)); a refund never banks
    /// time before `now`.
    pub fn adjust(&self, tat: u64, now: u64, delta: i64) -> u64 {
        let delta = self.bounded(delta);
        let base = tat.max(now);
        let amount = self.span(delta.unsigned_abs());
        if delta >= 0 {
            base.saturating_add(amount)
        } else {
            base.saturating_sub(amount).max(now)
        }
    }

    /// What the `x-ratelimit-*` headers say at `tat`: remaining units and the
    /// time until the limit is whole again.
    pub fn status(&self, tat: u64, now: u64) -> Status {
        let used = tat.max(now) - now;
        // The most units whose span fits in what is left of the window:
        // the largest `r` with `r · 60 s / limit < left + 1 ns`.
        let left = u128::from(WINDOW_NS.saturating_sub(used));
        let remaining = ((left + 1) * u128::from(self.units()) - 1) / u128::from(WINDOW_NS);
        Status {
            limit: self.limit,
            remaining: remaining.min(u128::from(self.limit)) as u32,
            reset: Duration::from_nanos(used),
        }
    }
}

/// One limit's state as the response headers report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The per-minute limit.
    pub limit: u32,
    /// Units left right now.
    pub remaining: u32,
    /// Until the limit is whole again.
    pub reset: Duration,
}

/// The result of asking for one request and its token reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may go on.
    pub allowed: bool,
    /// When denied: how long until it would be allowed.
    pub retry_after: Duration,
    /// The requests limit's state after the decision.
    pub requests: Option<Status>,
    /// The tokens limit's state after the decision.
    pub tokens: Option<Status>,
    /// Decided by this process's own limits because the shared store
    /// (Redis) failed: the request's reservation is held here, and is
    /// settled here, not in the store.
    pub held_locally: bool,
}

/// A key's limits and their local (in-process) state.
#[derive(Debug)]
pub struct Limits {
    /// Requests per minute.
    pub requests: Option<Gcra>,
    /// Tokens per minute.
    pub tokens: Option<Gcra>,
    state: Mutex<Local>,
}

/// A key's local state.
#[derive(Debug, Default)]
struct Local {
    /// The two limits' TATs.
    tat: [u64; 2],
    /// With a shared store: the requests and tokens this process charged
    /// alone (the store failed) since the store last took them, for the
    /// store to add ([`Limits::take_alone`]).
    alone: [i64; 2],
    /// With a shared store: the tokens time as it would be without the
    /// store's own reservations given back here alone (the store did not
    /// take the refund): they lowered the local time, not the store's, and
    /// must not lower what a tally owes it ([`Limits::take_alone`]). The
    /// tokens time itself but for those.
    shadow: u64,
    /// Tallies taken and on their way to the store ([`Tally`]s not yet
    /// dropped).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    sending: u32,
}

impl Limits {
    /// Limits of `rpm` requests and `tpm` tokens per minute (each optional).
    pub fn new(rpm: Option<u32>, tpm: Option<u32>) -> Self {
        Limits {
            requests: rpm.map(Gcra::per_minute),
            tokens: tpm.map(Gcra::per_minute),
            state: Mutex::default(),
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any limit applies.
    pub fn any(&self) -> bool {
        self.requests.is_some() || self.tokens.is_some()
    }

    /// What a reservation of `tokens` charges this key's token limit (see
    /// [`Gcra::charge`]); 0 without a token limit. Settle and refund against
    /// this, whichever backend holds the state.
    pub fn token_charge(&self, tokens: u64) -> u64 {
        self.tokens.map_or(0, |g| g.charge(tokens))
    }

    /// Ask for one request reserving `tokens`, at `now` (ns on a monotonic
    /// clock). Both limits are charged, or neither.
    pub fn acquire(&self, now: u64, tokens: u64) -> Decision {
        decide(
            self.requests,
            self.tokens,
            &mut self.local().tat,
            now,
            tokens,
        )
    }

    /// Charge (`delta > 0`) or give back (`delta < 0`) tokens.
    pub fn adjust_tokens(&self, now: u64, delta: i64) {
        if let Some(g) = self.tokens {
            let mut local = self.local();
            local.tat[1] = g.adjust(local.tat[1], now, delta);
        }
    }

    /// With a shared store that failed: [`acquire`](Self::acquire), and
    /// what it charged is kept for the store to add once it answers again.
    #[cfg(feature = "redis")]
    pub(crate) fn acquire_alone(&self, now: u64, tokens: u64) -> Decision {
        let mut local = self.local();
        let decision = decide(self.requests, self.tokens, &mut local.tat, now, tokens);
        if decision.allowed {
            if self.requests.is_some() {
                local.alone[0] = local.alone[0].saturating_add(1);
            }
            if let Some(g) = self.tokens
                && tokens > 0
            {
                let charged = i64::try_from(g.charge(tokens)).unwrap_or(i64::MAX);
                local.alone[1] = local.alone[1].saturating_add(charged);
                local.shadow = g.adjust(local.shadow, now, charged);
            }
        }
        decision
    }

    /// With a shared store: tokens charged (`delta > 0`) or given back
    /// here, and `alone` of them kept for the store to add: a settlement
    /// of a reservation taken here alone (all of it, refunds too), or the
    /// charge of one the store could not take (but not a refund it could
    /// not: it may have run there after all, and must not run twice).
    pub(crate) fn adjust_alone(&self, now: u64, delta: i64, alone: i64) {
        if let Some(g) = self.tokens {
            let mut local = self.local();
            local.tat[1] = g.adjust(local.tat[1], now, delta);
            local.alone[1] = local.alone[1].saturating_add(alone);
            local.shadow = g.adjust(local.shadow, now, alone);
        }
    }

    /// With a shared store about to answer at `now`: the requests and
    /// tokens this process charged alone since it last took them and has
    /// not yet refilled (none: `None`), taken. What refilled here is not
    /// passed on: the store adds the tally to its bucket as owed now, and
    /// an outage's whole spend owed again after it would refuse a key that
    /// kept within its limit throughout, for as long as the outage lasted
    /// (a key at 97% of its limit through 90 s without Redis, then 29 s
    /// refused). The local bucket refills its oldest charges first, so of
    /// what it still owes, the newest part, up to the tally, is the tally's.
    /// A net refund is not passed on (the store never held what was charged
    /// here). The tally is on its way until the [`Tally`] is dropped, which
    /// it is however the call ends: answered, failed, or its request
    /// dropped mid-way (a client gone); should the store surely not have
    /// run the call, [`Tally::give_back`].
    #[cfg(feature = "redis")]
    pub(crate) fn take_alone(&self, now: u64) -> Option<Tally<'_>> {
        let mut local = self.local();
        if local.alone == [0, 0] {
            return None;
        }
        let alone = std::mem::take(&mut local.alone);
        let mut units = alone.map(|n| u64::try_from(n).unwrap_or(0));
        // (Reckoned without the store's own refunds given back here.)
        let tats = [local.tat[0], local.shadow];
        for ((units, limit), tat) in units.iter_mut().zip([self.requests, self.tokens]).zip(tats) {
            *units = limit.map_or(0, |g| (*units).min(g.owed(tat, now)));
        }
        if units == [0, 0] {
            return None;
        }
        local.sending += 1;
        Some(Tally {
            limits: self,
            units,
        })
    }

    /// With a shared store: take on its state, which it reported at `now`
    /// as how far (ns) each limit's TAT ran ahead of its clock (`None`: a
    /// limit it did not report). Should the store fail later, this process
    /// goes on from what the fleet had used, not from a full bucket. While
    /// something charged here alone has yet to reach the store, the larger
    /// of the two stands.
    #[cfg(feature = "redis")]
    pub(crate) fn mirror(&self, now: u64, ahead: [Option<u64>; 2]) {
        let mut local = self.local();
        // (A tally on its way may reach the store after this answer.)
        let pending = local.alone != [0, 0] || local.sending > 0;
        for (tat, ahead) in local.tat.iter_mut().zip(ahead) {
            if let Some(ahead) = ahead {
                let fleet = now.saturating_add(ahead);
                *tat = if pending { (*tat).max(fleet) } else { fleet };
            }
        }
        if let Some(ahead) = ahead[1] {
            let fleet = now.saturating_add(ahead);
            local.shadow = if pending {
                local.shadow.max(fleet)
            } else {
                fleet
            };
        }
    }
}

/// The decision over both limits' TATs: the local backend's, and the model
/// of the Redis script.
pub fn decide(
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    tat: &mut [u64; 2],
    now: u64,
    cost: u64,
) -> Decision {
    let r = requests.map(|g| g.check(tat[0], now, 1));
    // A request that reserves no tokens (counting tokens, reading a stored
    // response) is held to the request limit only, even while the key's
    // tokens are overdrawn.
    let t = tokens
        .filter(|_| cost > 0)
        .map(|g| g.check(tat[1], now, cost));
    let wait = [r, t]
        .iter()
        .filter_map(|c| match c {
            Some(Check::Denied(d)) => Some(*d),
            _ => None,
        })
        .max();
    if wait.is_none() {
        if let Some(Check::Allowed(new)) = r {
            tat[0] = new;
        }
        if let Some(Check::Allowed(new)) = t {
            tat[1] = new;
        }
    }
    Decision {
        allowed: wait.is_none(),
        retry_after: wait.unwrap_or_default(),
        requests: requests.map(|g| g.status(tat[0], now)),
        tokens: tokens.map(|g| g.status(tat[1], now)),
        held_locally: false,
    }
}

/// Requests and tokens charged alone, on their way to the shared store
/// ([`Limits::take_alone`]). While one is, a mirror of the store's state
/// keeps the larger of it and the local one (the answer may not hold the
/// tally yet); its drop says it is no longer on its way.
#[cfg(feature = "redis")]
#[derive(Debug)]
pub(crate) struct Tally<'a> {
    limits: &'a Limits,
    units: [u64; 2],
}

#[cfg(feature = "redis")]
impl Tally<'_> {
    /// The requests and tokens, as the store's call carries them.
    pub(crate) fn units(&self) -> [u64; 2] {
        self.units
    }

    /// Keep the tally for the next call: the store surely did not run this
    /// one (it was skipped, or refused).
    pub(crate) fn give_back(self) {
        let mut local = self.limits.local();
        for (kept, n) in local.alone.iter_mut().zip(self.units) {
            *kept = kept.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for Tally<'_> {
    fn drop(&mut self) {
        let mut local = self.limits.local();
        local.sending = local.sending.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[cfg(feature = "redis")]
    #[test]
    fn a_mirrored_fleet_state_is_where_local_limits_go_on_from() {
        let limits = Limits::new(Some(3), Some(1000));
        // The fleet had used two requests of three (40 s ahead) when it
        // last answered.
        limits.mirror(10 * S, [Some(40 * S), Some(0)]);
        assert!(limits.take_alone(10 * S).is_none(), "nothing charged alone");
        assert!(limits.acquire_alone(10 * S, 100).allowed);
        assert!(!limits.acquire_alone(10 * S, 100).allowed);
        // Settled here: 30 of the 100 used.
        limits.adjust_alone(10 * S, -70, -70);
        // A failed refund of the store's own is not passed on (nor does it
        // lower what the tally owes: it lowered the local time alone); its
        // charge is.
        limits.adjust_alone(10 * S, -5, 0);
        limits.adjust_alone(10 * S, 7, 7);
        // What the store is to add: one request, 37 tokens; then nothing.
        let tally = limits.take_alone(10 * S).unwrap();
        assert_eq!(tally.units(), [1, 37]);
        assert!(limits.take_alone(10 * S).is_none());
        // Given back when the store surely did not take it, and added to.
        tally.give_back();
        assert!(limits.acquire_alone(30 * S, 1).allowed);
        // While it is pending, a mirror keeps the larger.
        let before = limits.local().tat;
        limits.mirror(30 * S, [Some(0), Some(0)]);
        assert_eq!(limits.local().tat, before);
        // Two requests; of 38 tokens, the one charged now (the 37 charged
        // at 10 s, 2.2 s of the limit, have refilled).
        let tally = limits.take_alone(30 * S).unwrap();
        assert_eq!(tally.units(), [2, 1]);
        // So it does while the tally is on its way (an answer that raced it
        // may not hold it).
        limits.mirror(30 * S, [Some(0), Some(0)]);
        assert_eq!(limits.local().tat, before);
        // Once it arrived (or its call was dropped, which may have sent it),
        // the store's state stands, lower too (a refund).
        drop(tally);
        limits.mirror(30 * S, [Some(0), None]);
        assert_eq!(limits.local().tat[0], 30 * S);
        assert_eq!(limits.local().tat[1], before[1], "not reported: kept");
    }

    /// What the store adds once it is back is what this process charged
    /// alone and has yet to refill: a key that kept within its limit
    /// through an outage is not charged its whole spend again after it.
    #[cfg(feature = "redis")]
    #[test]
    fn a_tally_carries_only_what_has_not_refilled() {
        // A request a second, a token every 0.1 s.
        let limits = Limits::new(Some(60), Some(600));
        limits.mirror(0, [Some(0), Some(0)]);
        for _ in 0..3 {
            assert!(limits.acquire_alone(0, 100).allowed);
        }
        // Twenty seconds on, the three requests have refilled, and 200 of
        // the 300 tokens: 100 are owed (a part of one counts whole).
        let tally = limits.take_alone(20 * S).unwrap();
        assert_eq!(tally.units(), [0, 100]);
        drop(tally);
        assert!(limits.acquire_alone(20 * S, 100).allowed);
        let tally = limits.take_alone(20 * S + 1).unwrap();
        assert_eq!(
            tally.units(),
            [1, 100],
            "the 100 taken before are not taken again"
        );
        drop(tally);
        // Charged alone, and refilled before the store answers: nothing.
        assert!(limits.acquire_alone(40 * S, 50).allowed);
        assert!(limits.take_alone(100 * S).is_none());
        // A refund of the store's own given back here (it failed there) does
        // not eat into what was charged alone: 500 held by the store, 500
        // charged alone, the store's refund of its 500 failed.
        let limits = Limits::new(None, Some(1000));
        limits.mirror(0, [None, Some(30 * S)]);
        assert!(limits.acquire_alone(45 * S, 500).allowed);
        limits.adjust_alone(45 * S, -500, 0);
        assert_eq!(limits.take_alone(45 * S).unwrap().units(), [0, 500]);
        let limits = Limits::new(Some(60), Some(600));
        limits.mirror(0, [Some(0), Some(0)]);
        // Given back, a tally is owed no longer than it is here.
        assert!(limits.acquire_alone(100 * S, 10).allowed);
        let tally = limits.take_alone(100 * S).unwrap();
        assert_eq!(tally.units(), [1, 10]);
        tally.give_back();
        assert_eq!(limits.take_alone(100 * S + S / 2).unwrap().units(), [1, 5]);
    }

    #[test]
    fn rpm_three_allows_three_then_one_every_twenty_seconds() {
        let l = Limits::new(Some(3), None);
        for i in 0..3 {
            let d = l.acquire(0, 0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.requests.unwrap().remaining, 2 - i);
        }
        let d = l.acquire(0, 0);
        assert!(!d.allowed);
        assert_eq!(d.retry_after, Duration::from_secs(20));
        assert_eq!(d.requests.unwrap().reset, Duration::from_secs(60));
        assert!(!l.acquire(19 * S, 0).allowed);
        assert!(l.acquire(20 * S, 0).allowed);
        assert!(!l.acquire(21 * S, 0).allowed);
        // After a full minute of quiet the burst is whole again.
        let d = l.acquire(120 * S, 0);
        assert!(d.allowed);
        assert_eq!(d.requests.unwrap().remaining, 2);
    }

    #[test]
    fn both_limits_or_neither() {
        let l = Limits::new(Some(10), Some(100));
        assert!(l.acquire(0, 90).allowed);
        let d = l.acquire(0, 20);
        assert!(!d.allowed, "tokens run out");
        assert_eq!(
            d.requests.unwrap().remaining,
            9,
            "the request was not charged"
        );
        assert_eq!(d.tokens.unwrap().remaining, 10);
    }

    #[test]
    fn reconciliation_refunds_and_charges() {
        let l = Limits::new(None, Some(100));
        assert!(l.acquire(0, 80).allowed);
        l.adjust_tokens(0, -70); // used 10, not 80
        assert_eq!(l.acquire(0, 0).tokens.unwrap().remaining, 90);
        l.adjust_tokens(0, 85); // a stream used far more than reserved
        let d = l.acquire(0, 10);
        assert!(!d.allowed);
        // A refund never banks capacity beyond a full bucket.
        l.adjust_tokens(0, -10_000);
        assert_eq!(l.acquire(0, 0).tokens.unwrap().remaining, 100);
    }

    #[test]
    fn a_request_without_tokens_passes_while_tokens_are_overdrawn() {
        let l = Limits::new(Some(100), Some(100));
        assert!(l.acquire(0, 100).allowed);
        l.adjust_tokens(0, 5000);
        assert!(!l.acquire(0, 1).allowed);
        let d = l.acquire(0, 0);
        assert!(d.allowed);
        assert_eq!(d.tokens.unwrap().remaining, 0);
        assert_eq!(d.requests.unwrap().remaining, 98);
    }

    #[test]
    fn oversized_cost_passes_on_a_full_bucket() {
        let g = Gcra::per_minute(100);
        assert!(matches!(g.check(0, 0, 1_000_000), Check::Allowed(_)));
    }

    #[test]
    fn oversized_reservation_settles_against_its_charge() {
        let l = Limits::new(None, Some(1000));
        let reserve = l.token_charge(1_000_600);
        assert_eq!(reserve, 1000, "charged as the whole limit");
        assert!(l.acquire(0, reserve).allowed);
        // 610 used: settling against the charge leaves 390, not a full bucket.
        l.adjust_tokens(0, 610 - reserve as i64);
        assert_eq!(l.acquire(0, 0).tokens.unwrap().remaining, 390);
        assert!(!l.acquire(0, reserve).allowed);
        assert_eq!(Limits::new(Some(5), None).token_charge(10), 0);
    }

    /// 60 s / u32::MAX is 13.97 ns a unit: charged as a whole 13 ns, a
    /// huge limit let through 7% more than it names.
    #[test]
    fn a_huge_limit_lets_through_what_it_names_and_no_more() {
        for limit in [u32::MAX, 700_000_000] {
            let l = Limits::new(None, Some(limit));
            let all = u64::from(limit);
            let d = l.acquire(0, all);
            assert!(d.allowed, "{limit}: a whole limit on a full bucket");
            assert_eq!(d.tokens.unwrap().remaining, 0, "{limit}");
            assert!(!l.acquire(0, all / 50).allowed, "{limit}: 2% more at once");
            // Half a minute on, half of it is back, not more.
            assert!(l.acquire(30 * S, all / 2).allowed, "{limit}");
            assert!(!l.acquire(30 * S, all / 50).allowed, "{limit}: 2% more");
            // Given back whole, the bucket reads whole.
            l.adjust_tokens(30 * S, -i64::from(limit));
            assert_eq!(l.acquire(90 * S, 0).tokens.unwrap().remaining, limit);
        }
    }

    /// `limit` is a public field: set to 0 after `per_minute` (which makes
    /// it at least 1), it must not divide by zero; it charges nothing, as
    /// it did when the interval alone was used.
    #[test]
    fn a_limit_set_to_zero_afterwards_does_not_panic() {
        let mut g = Gcra::per_minute(5);
        g.limit = 0;
        assert_eq!(g.check(0, 0, 3), Check::Allowed(0));
        assert_eq!(g.adjust(7, 0, 3), 7);
        assert_eq!(g.status(0, 0).remaining, 0);
    }

    #[test]
    fn huge_adjustments_saturate_instead_of_wrapping() {
        let g = Gcra::per_minute(1000);
        let tat = g.adjust(0, 0, i64::MAX);
        assert!(tat > 0, "a huge charge stays a charge");
        assert!(matches!(g.check(tat, 0, 1), Check::Denied(_)));
        assert_eq!(g.adjust(tat, 0, i64::MIN), 0, "and a huge refund a refund");
        assert_eq!(g.bounded(i64::MAX), 1000 * MAX_ADJUST_WINDOWS);
        assert_eq!(g.bounded(-5), -5);
    }

    /// `remaining` is the units that fit now, and no more: a bucket a
    /// nanosecond past a whole unit reads one fewer (the headers promised
    /// a request the limit then refused).
    #[test]
    fn remaining_is_what_fits_now_and_no_more() {
        // A request a second; the second one a nanosecond before 1 s.
        let l = Limits::new(Some(60), None);
        assert_eq!(l.acquire(0, 0).requests.unwrap().remaining, 59);
        let d = l.acquire(S - 1, 0);
        assert!(d.allowed);
        // 2 s charged, 1 s − 1 ns gone by: 58 more fit, not 59.
        assert_eq!(d.requests.unwrap().remaining, 58);
        for i in 0..58 {
            assert!(l.acquire(S - 1, 0).allowed, "request {i}");
        }
        assert!(
            !l.acquire(S - 1, 0).allowed,
            "the 59th the headers did not promise"
        );
    }

    /// One adjustment moves a limit by up to a year's worth of it: a
    /// usage report of a week's worth is charged whole.
    #[test]
    fn an_adjustment_is_bounded_at_a_year_of_the_limit() {
        let g = Gcra::per_minute(100);
        assert_eq!(g.bounded(i64::MAX), 100 * 60 * 24 * 365);
        assert_eq!(g.bounded(i64::MIN), -100 * 60 * 24 * 365);
        let week_min: i64 = 7 * 24 * 60;
        assert_eq!(g.adjust(0, 0, 100 * week_min), week_min as u64 * 60 * S);
    }

    /// The interval follows `limit`, a public field a caller may set after
    /// construction.
    #[test]
    fn interval_is_the_steady_rate() {
        assert_eq!(Gcra::per_minute(3).interval_ns(), 20 * S);
        assert_eq!(Gcra::per_minute(0).interval_ns(), 60 * S);
        let mut g = Gcra::per_minute(3);
        g.limit = 4;
        assert_eq!(g.interval_ns(), 15 * S);
        g.limit = 0;
        assert_eq!(g.interval_ns(), 60 * S);
    }
}
