//! What the balancer knows about one backend at run time: requests in flight,
//! the latency estimate and the health state. Shared by the backend set, the
//! in-flight guards inside response bodies and the health checker; it
//! outlives the backend's removal for as long as a guard holds it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use crate::health::{Health, Policy};

/// The balancer's clock: nanoseconds since the balancer was built, on
/// tokio's clock (so paused time in tests moves it).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epoch(Instant);

impl Epoch {
    pub(crate) fn new() -> Self {
        Epoch(Instant::now())
    }

    pub(crate) fn now(&self) -> u64 {
        duration_ns(Instant::now().saturating_duration_since(self.0))
    }

    /// The time now on this clock, and how long it has been since `start`:
    /// one reading of the clock for both.
    pub(crate) fn now_since(&self, start: Instant) -> (u64, Duration) {
        let now = Instant::now();
        (
            duration_ns(now.saturating_duration_since(self.0)),
            now.saturating_duration_since(start),
        )
    }
}

pub(crate) fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `mutex`'s guard: what it holds stays usable after a panic mid-update.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The models resting on a backend, each with the end of its rest.
type ModelRests = SmallVec<[(Box<str>, u64); 2]>;

/// The most models resting on one backend at once (model names are the
/// clients' to choose).
const MAX_MODEL_RESTS: usize = 32;

/// The longest model name a rest is kept for.
const MAX_RESTED_NAME: usize = 256;

/// How fast the latency estimate forgets (tower's `PeakEwma` default).
const EWMA_DECAY_NS: f64 = 10e9;
/// The estimate of a backend without samples yet.
const DEFAULT_RTT_NS: f64 = 250e6;
/// The least a failed attempt weighs in the estimate, so a backend that
/// fails fast never looks fast.
const FAILURE_PENALTY_NS: f64 = 1e9;
/// How far apart answers are noted for a probe ([`BackendState::answered_since`]).
const ANSWER_NOTE_NS: u64 = 1_000_000;

/// Run-time state of one backend.
#[derive(Debug)]
pub(crate) struct BackendState {
    pub(crate) name: Arc<str>,
    in_flight: AtomicU32,
    /// Unavailable until this time (ns since the epoch); `u64::MAX` = until
    /// the next success. Written under `health`, read without a lock.
    down_until: AtomicU64,
    /// The same without a 429's rest ([`Health::sick_until`]); written
    /// under `health`.
    sick_until: AtomicU64,
    /// The end of a 429's rest of the whole backend
    /// ([`Health::throttled_until`]); written under `health`.
    throttled_until: AtomicU64,
    /// The rests of one model each (a 429 to a model request speaks of
    /// that model on this backend: OpenAI's limits are per model), and the
    /// latest of their ends, read first without the lock: past it, none
    /// runs.
    model_rests: Mutex<ModelRests>,
    model_rests_until: AtomicU64,
    /// Whether the failure count is above zero. Written under `health`,
    /// read without a lock: a clean end has nothing to reset otherwise.
    failing: AtomicBool,
    /// One past the time of the last answer's head below 400 (0: none
    /// yet), so a probe that failed can tell whether requests were
    /// answered while it waited.
    answered_after: AtomicU64,
    /// [`Health::failures_seen`]; written under `health`.
    failures_seen: AtomicU64,
    /// [`Health::ejections_seen`]; written under `health`.
    ejections_seen: AtomicU64,
    health: Mutex<Health>,
    ejections: AtomicU64,
    /// Attempts that failed, ever (while resting too).
    failed: AtomicU64,
    /// Answers that asked it to be left alone (429, 503 with `retry-after`).
    throttled: AtomicU64,
    /// The balancer's policy and its ejection count, for failures recorded
    /// where no balancer is at hand (a response body that breaks).
    policy: Policy,
    ejections_total: Arc<AtomicU64>,
    /// Peak-EWMA estimate (f64 bits) and when it was last updated (at
    /// first, when the backend was added: the default decays from then).
    ewma_ns: AtomicU64,
    ewma_at: AtomicU64,
    /// Whether a sample has replaced the default estimate.
    sampled: AtomicBool,
}

impl BackendState {
    /// The state of backend `name`, added at `now`.
    pub(crate) fn new(
        name: Arc<str>,
        policy: Policy,
        ejections_total: Arc<AtomicU64>,
        now: u64,
    ) -> Self {
        BackendState {
            name,
            in_flight: AtomicU32::new(0),
            down_until: AtomicU64::new(0),
            sick_until: AtomicU64::new(0),
            throttled_until: AtomicU64::new(0),
            model_rests: Mutex::default(),
            model_rests_until: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            answered_after: AtomicU64::new(0),
            failures_seen: AtomicU64::new(0),
            ejections_seen: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            ejections: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            policy,
            ejections_total,
            ewma_ns: AtomicU64::new(DEFAULT_RTT_NS.to_bits()),
            ewma_at: AtomicU64::new(now),
            sampled: AtomicBool::new(false),
        }
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Attempts that failed, ever.
    pub(crate) fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Answers that asked it to be left alone, ever.
    pub(crate) fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    pub(crate) fn is_available(&self, now: u64) -> bool {
        now >= self.down_until.load(Ordering::Relaxed)
    }

    /// Whether it is neither ejected nor failing its probes: available, or
    /// only resting after a 429 (for readiness).
    pub(crate) fn is_up(&self, now: u64) -> bool {
        now >= self.sick_until.load(Ordering::Relaxed)
    }

    /// Until when it asked to be left alone (a 429, or a 503 with
    /// `retry-after`) for requests of `model` (`None`: a request of no
    /// model), if that is after `now`: the longer of the whole backend's
    /// rest and the model's.
    pub(crate) fn throttled_until(&self, now: u64, model: Option<&str>) -> Option<u64> {
        let whole = self.throttled_until.load(Ordering::Relaxed);
        let own = self.model_rest_until(now, model).unwrap_or(0);
        Some(whole.max(own)).filter(|&until| until > now)
    }

    /// Until when `model` rests here, if it does at `now`. Asked of every
    /// candidate of every request: one atomic read while no model rests.
    #[inline]
    fn model_rest_until(&self, now: u64, model: Option<&str>) -> Option<u64> {
        if self.model_rests_until.load(Ordering::Relaxed) <= now {
            return None;
        }
        self.model_rest_until_slow(now, model?)
    }

    #[cold]
    #[inline(never)]
    fn model_rest_until_slow(&self, now: u64, model: &str) -> Option<u64> {
        lock(&self.model_rests)
            .iter()
            .find(|(m, until)| **m == *model && *until > now)
            .map(|&(_, until)| until)
    }

    /// Whether it takes a request of `model` now: available, and `model`
    /// not resting here.
    #[inline]
    pub(crate) fn takes(&self, now: u64, model: Option<&str>) -> bool {
        self.is_available(now) && self.model_rest_until(now, model).is_none()
    }

    /// Peak-EWMA cost: the decayed latency estimate × (in-flight + 1).
    pub(crate) fn cost(&self, now: u64) -> f64 {
        self.estimate(now) * (f64::from(self.in_flight()) + 1.0)
    }

    /// The latency estimate at `now` (ns), decayed since its last update.
    fn estimate(&self, now: u64) -> f64 {
        let est = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let at = self.ewma_at.load(Ordering::Relaxed);
        est * (-(now.saturating_sub(at) as f64) / EWMA_DECAY_NS).exp()
    }

    /// Record a latency sample (time to first body frame): a peak replaces
    /// the estimate at once, a lower value is blended in by elapsed time.
    /// Concurrent samples may race; the loser's sample is lost, which an
    /// estimate can afford.
    pub(crate) fn observe(&self, now: u64, rtt: Duration) {
        let rtt = duration_ns(rtt) as f64;
        let est = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let at = self.ewma_at.load(Ordering::Relaxed);
        // The first sample replaces the default outright; later ones follow
        // tower's peak-EWMA.
        let first =
            !self.sampled.load(Ordering::Relaxed) && !self.sampled.swap(true, Ordering::Relaxed);
        let next = if rtt > est || first {
            rtt
        } else {
            let decay = (-(now.saturating_sub(at) as f64) / EWMA_DECAY_NS).exp();
            est * decay + rtt * (1.0 - decay)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now, Ordering::Relaxed);
    }

    /// A wait of `waited` for a first frame that did not come (the client
    /// gave up: the attempt was cancelled, or the body dropped before its
    /// first frame). The latency is at least that: it may raise the
    /// estimate, never lower it. Without this, a backend that takes
    /// requests and never answers them would be sampled never, and look
    /// cheaper the longer it hangs (as tower's `PeakEwma` records a dropped
    /// request's time).
    pub(crate) fn observe_at_least(&self, now: u64, waited: Duration) {
        if duration_ns(waited) as f64 > self.estimate(now) {
            self.observe(now, waited);
        }
    }

    /// Record a failed attempt in the latency estimate.
    pub(crate) fn observe_failure(&self, now: u64, elapsed: Duration) {
        let ns = (duration_ns(elapsed) as f64).max(FAILURE_PENALTY_NS);
        self.observe(now, Duration::from_nanos(ns as u64));
    }

    /// Change the health state under its lock and publish the result.
    /// Returns what `f` returns.
    pub(crate) fn update_health<R>(&self, f: impl FnOnce(&mut Health) -> R) -> R {
        let mut health = self.lock_health();
        let out = f(&mut health);
        self.down_until
            .store(health.down_until(), Ordering::Relaxed);
        self.sick_until
            .store(health.sick_until(), Ordering::Relaxed);
        self.throttled_until
            .store(health.throttled_until, Ordering::Relaxed);
        self.failing.store(health.failures > 0, Ordering::Relaxed);
        self.failures_seen
            .store(health.failures_seen, Ordering::Relaxed);
        self.ejections_seen
            .store(health.ejections_seen, Ordering::Relaxed);
        out
    }

    /// An answer's head below 400 at `now` ([`Health::on_answered`]). The
    /// usual case, a backend neither resting nor marked down, changes
    /// nothing and takes no lock.
    pub(crate) fn answered(&self, now: u64) {
        self.answered_with(now, |h| h.on_answered(now));
    }

    fn answered_with<R: Default>(&self, now: u64, on_health: impl FnOnce(&mut Health) -> R) -> R {
        // Noted at most once a millisecond: the line is shared by every
        // worker, and a write per answer would move it between their cores
        // on each request. A probe waits a second or more for its answer,
        // so a busy backend's answers are seen all the same.
        let noted = self.answered_after.load(Ordering::Relaxed);
        if noted == 0 || now >= noted.saturating_add(ANSWER_NOTE_NS) {
            self.answered_after
                .store(now.saturating_add(1), Ordering::Relaxed);
        }
        if self.down_until.load(Ordering::Relaxed) > now {
            self.update_health(on_health)
        } else {
            R::default()
        }
    }

    /// Whether an answer's head below 400 came at `since` or later (one
    /// that came within a millisecond of the one noted before it may go
    /// unseen: see `answered`).
    pub(crate) fn answered_since(&self, since: u64) -> bool {
        self.answered_after.load(Ordering::Relaxed) > since
    }

    /// An answered body ended without breaking ([`Health::on_clean_end`]);
    /// no lock unless there are failures to forget.
    pub(crate) fn clean_end(&self) {
        if self.failing.load(Ordering::Relaxed) {
            self.update_health(Health::on_clean_end);
        }
    }

    /// Ejections so far, noted when a request is sent for
    /// [`answered_of`](Self::answered_of).
    pub(crate) fn ejections_seen(&self) -> u64 {
        self.ejections_seen.load(Ordering::Relaxed)
    }

    /// [`answered`](Self::answered) for a request sent when
    /// [`ejections_seen`](Self::ejections_seen) was `seen`
    /// ([`Health::on_answered_of`]): whether it was panic-routed into the
    /// ejection that still runs, which its body's whole end is to end
    /// ([`whole_of`](Self::whole_of)).
    pub(crate) fn answered_of(&self, now: u64, seen: u64) -> bool {
        self.answered_with(now, |h| h.on_answered_of(now, seen))
    }

    /// The body of an answer to a request panic-routed into an ejection
    /// (sent when [`ejections_seen`](Self::ejections_seen) was `seen`)
    /// ended whole at `now` ([`Health::on_whole_of`]).
    pub(crate) fn whole_of(&self, now: u64, seen: u64) {
        self.update_health(|h| h.on_whole_of(now, seen));
    }

    /// Failures counted so far, noted at an answer's head for
    /// [`clean_end_of`](Self::clean_end_of).
    pub(crate) fn failures_seen(&self) -> u64 {
        self.failures_seen.load(Ordering::Relaxed)
    }

    /// An answered body ended without breaking, its head having come when
    /// [`failures_seen`](Self::failures_seen) was `seen`
    /// ([`Health::on_clean_end_of`]).
    pub(crate) fn clean_end_of(&self, seen: u64) {
        if self.failing.load(Ordering::Relaxed) {
            self.update_health(|h| h.on_clean_end_of(seen));
        }
    }

    /// A failure at `now`, after `elapsed`: in the latency estimate, and
    /// towards the backend's ejection (counted here and balancer-wide).
    /// `headless`: no head came (no connection, no answer in time, a 5xx
    /// head): its streak is judged by when the request was sent (a hung
    /// server fails a whole timeout later); a body or session broken off
    /// by when it broke (a stream may have run for minutes, well after the
    /// backend's last rest, before it did).
    pub(crate) fn record_failure(&self, now: u64, elapsed: Duration, headless: bool) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.observe_failure(now, elapsed);
        let sent = if headless {
            now.saturating_sub(duration_ns(elapsed))
        } else {
            now
        };
        let rest_ns =
            self.update_health(|h| h.on_failure(now, sent, &self.policy).then_some(h.last_rest));
        if let Some(rest_ns) = rest_ns {
            self.ejections.fetch_add(1, Ordering::Relaxed);
            self.ejections_total.fetch_add(1, Ordering::Relaxed);
            // Its rest ends by time alone, with no line of its own: said
            // here (a panic-routed request that is answered ends it sooner).
            tracing::warn!(
                upstream = %self.name,
                rest_secs = Duration::from_nanos(rest_ns).as_secs_f64(),
                "upstream ejected after consecutive failures; it rests, then takes requests again"
            );
        }
    }

    /// An answer that asked it to be left alone (429, 503 with
    /// `retry-after`), counted whatever it rests.
    pub(crate) fn count_throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    /// A 429's (or a 503's) rest of `ns`: of `model` alone, or of the
    /// whole backend (`None`). A model named longer than any real one is
    /// not rested (a client chooses the name); past [`MAX_MODEL_RESTS`],
    /// the rest that ends soonest makes room.
    pub(crate) fn rest(&self, now: u64, ns: u64, model: Option<&str>) {
        let Some(model) = model else {
            self.update_health(|h| h.on_throttled(now, ns, &self.policy));
            return;
        };
        if model.len() > MAX_RESTED_NAME {
            return;
        }
        let until = now.saturating_add(ns.min(self.policy.max_retry_after_ns));
        let mut rests = lock(&self.model_rests);
        rests.retain(|(_, end)| *end > now);
        match rests.iter_mut().find(|(m, _)| **m == *model) {
            Some((_, end)) => *end = (*end).max(until),
            None => {
                // (The first of equal ends: the oldest, as the order is
                // kept.)
                if rests.len() >= MAX_MODEL_RESTS
                    && let Some(soonest) = (0..rests.len()).min_by_key(|&i| rests[i].1)
                {
                    rests.remove(soonest);
                }
                rests.push((model.into(), until));
            }
        }
        let latest = rests.iter().map(|&(_, end)| end).max().unwrap_or(0);
        self.model_rests_until.store(latest, Ordering::Relaxed);
    }

    fn lock_health(&self) -> MutexGuard<'_, Health> {
        // Health holds plain numbers; a panic mid-update leaves them usable.
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts one request against a backend from the moment it is chosen until
/// this guard is dropped: with the response body at its end or when the
/// client hangs up, or with a failed attempt. `Drop` is the only decrement,
/// so no path can leak or double-count.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<BackendState>);

impl InFlight {
    pub(crate) fn new(state: Arc<BackendState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(state)
    }

    pub(crate) fn state(&self) -> &Arc<BackendState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The health policy's knobs with the shared ejection counter, as an attempt
/// applies them.
pub(crate) fn policy_of(cfg: &crate::BalanceConfig) -> Policy {
    Policy {
        eject_after: cfg.eject_after_failures.max(1),
        eject_ns: duration_ns(cfg.eject),
        max_multiplier: cfg.max_eject_multiplier.max(1),
        max_retry_after_ns: duration_ns(cfg.max_retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Ejected by one failure, for 30 s, doubling.
    fn backend() -> BackendState {
        let policy = crate::health::Policy {
            eject_after: 1,
            eject_ns: 30 * S,
            max_multiplier: 10,
            max_retry_after_ns: 300 * S,
        };
        BackendState::new("a".into(), policy, Arc::default(), 0)
    }

    /// A stream broken off counts from when it broke (it may have run for
    /// minutes, the backend well meanwhile); a failure without a head from
    /// when its request was sent (a hung server's timeout).
    #[test]
    fn a_failures_streak_counts_from_its_send_only_without_a_head() {
        for (headless, rest) in [(false, 30), (true, 60)] {
            let b = backend();
            b.record_failure(0, Duration::ZERO, true);
            assert!(!b.is_available(29 * S));
            // Sent at 40 s (10 s after the rest ended), failed at 400 s.
            b.record_failure(400 * S, Duration::from_secs(360), headless);
            assert!(!b.is_available((399 + rest) * S), "headless: {headless}");
            assert!(b.is_available((400 + rest) * S), "headless: {headless}");
        }
    }

    /// Peak-EWMA's cost is the estimate times the requests in flight plus
    /// one: at the same latency, a backend with two in flight costs three
    /// times an idle one.
    #[test]
    fn cost_weighs_the_estimate_by_the_requests_in_flight() {
        let b = Arc::new(backend());
        assert_eq!(b.cost(0), DEFAULT_RTT_NS);
        let _one = InFlight::new(b.clone());
        let _two = InFlight::new(b.clone());
        assert_eq!(b.cost(0), 3.0 * DEFAULT_RTT_NS);
    }

    /// The estimate decays with time (a backend that was slow once is
    /// tried again), and a lower sample is blended in by the time since
    /// the last one instead of replacing it; a peak replaces it at once.
    #[test]
    fn the_estimate_decays_and_blends_lower_samples() {
        let e = (-1f64).exp(); // one decay constant: 10 s
        let b = backend();
        b.observe(0, Duration::from_secs(2));
        assert_eq!(b.cost(0), 2e9, "the first sample replaces the default");
        let decayed = b.cost(10 * S);
        assert!((decayed - 2e9 * e).abs() < 1.0, "{decayed}");
        b.observe(10 * S, Duration::from_secs(1));
        let blended = b.cost(10 * S);
        assert!(
            (blended - (2e9 * e + 1e9 * (1.0 - e))).abs() < 1.0,
            "{blended}"
        );
        b.observe(10 * S, Duration::from_secs(3));
        assert_eq!(b.cost(10 * S), 3e9, "a peak replaces it");
    }

    /// A failed attempt weighs at least a second in the estimate: a
    /// backend that fails fast (a refused connection) never looks fast.
    #[test]
    fn a_fast_failure_weighs_a_second_in_the_estimate() {
        let b = backend();
        b.record_failure(0, Duration::from_millis(2), true);
        assert_eq!(b.cost(0), FAILURE_PENALTY_NS);
    }

    /// Answers are noted for a probe that fails meanwhile (it leaves the
    /// backend up): the first, and later ones a millisecond or more after
    /// the last noted.
    #[test]
    fn answers_are_noted_for_a_failing_probe() {
        let b = backend();
        assert!(!b.answered_since(0));
        b.answered(5 * S);
        assert!(b.answered_since(5 * S));
        assert!(!b.answered_since(5 * S + 1));
        b.answered(10 * S);
        assert!(b.answered_since(10 * S), "a later answer is noted too");
    }
}
