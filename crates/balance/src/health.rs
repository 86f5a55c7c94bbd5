//! The health state machine of one backend. Times are nanoseconds on the
//! balancer's clock ([`Epoch`](crate::state::Epoch)); nothing here sleeps.
//!
//! - `eject_after` consecutive failures (connect error, timeout, 5xx) eject
//!   the backend: it rests for `eject × 2^(streak − 1)`, capped at
//!   `eject × max_multiplier`, where the streak counts ejections in a row.
//!   A backend whose next failure came as long as its last rest after
//!   that rest ended forgets its streak; a failure with no head (no
//!   connection, a timeout, a 5xx) counts from when its request was sent:
//!   a server that hangs fails each request a whole timeout after it was
//!   sent, and measured from the failure its streak would be forgotten
//!   whenever the timeout is longer than its rest, its rest never
//!   doubling. (A stream broken off counts from when it broke: it may
//!   have run for minutes, the backend well meanwhile.)
//! - A success (2xx) resets the failure count, clears a probe's "down" mark
//!   and ends an ejection early (a panic-routed request just proved it works;
//!   the answer to a request sent before the ejection does not,
//!   [`Health::on_answered_of`]).
//!   The answer's head clears the mark ([`Health::on_answered`]); the
//!   count is reset when its body ends without breaking
//!   ([`Health::on_clean_end`]), so that a server that always breaks its
//!   streams mid-way, whose heads are all 200, is ejected too; and only if
//!   no failure was counted after its head ([`Health::on_clean_end_of`]),
//!   so that long streams answered earlier do not hide a server that now
//!   fails every new request. For the same reason the ejection a
//!   panic-routed request was sent into ends when its body ends whole
//!   ([`Health::on_whole_of`]), not at its head: a server that breaks every
//!   stream, let back by the 200 head of each request that other
//!   backends' failures panic-route to it, would take its whole share
//!   again each time, breaking it.
//! - A 429 rests the backend for its `retry-after` (default 1 s, capped);
//!   it is neither a failure nor a success, and only time ends it.
//! - Active probes: a failure marks the backend down until the next
//!   success (probe or request), unless a request was answered while the
//!   probe waited (`probe.rs`); a 2xx clears that mark, and (by default,
//!   as Envoy's `successful_active_health_check_uneject_host`) ends an
//!   ejection that began before the probe was sent. A probe of
//!   `/v1/models` answered does not show that the model answers (the
//!   common LLM server failure: HTTP up, model broken): with
//!   `HealthCheck::uneject` off, an ejection runs its course.
//! - Failures while resting (panic-routed requests) are not counted: the
//!   backend is not re-ejected the moment its rest ends.

/// The knobs of the state machine, from [`BalanceConfig`](crate::BalanceConfig).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub(crate) eject_after: u32,
    pub(crate) eject_ns: u64,
    pub(crate) max_multiplier: u32,
    pub(crate) max_retry_after_ns: u64,
}

/// One backend's health.
#[derive(Clone, Debug, Default)]
pub(crate) struct Health {
    pub(crate) failures: u32,
    /// Failures counted ever: an answer notes it at its head, and its
    /// clean end resets the count only if no failure was counted since.
    pub(crate) failures_seen: u64,
    /// Ejections ever: a request notes it when it is sent, and its answer
    /// ends an ejection only if it was sent during it (panic routing).
    pub(crate) ejections_seen: u64,
    /// End of the current (or last) ejection, if ever ejected.
    pub(crate) ejected_until: Option<u64>,
    /// Length of the last rest.
    pub(crate) last_rest: u64,
    /// Ejections in a row.
    pub(crate) streak: u32,
    /// End of a 429's rest.
    pub(crate) throttled_until: u64,
    /// A probe failed and nothing has succeeded since.
    pub(crate) probe_down: bool,
}

impl Health {
    /// Until when the backend is unavailable; `u64::MAX`: until a success.
    pub(crate) fn down_until(&self) -> u64 {
        if self.probe_down {
            return u64::MAX;
        }
        self.ejected_until.unwrap_or(0).max(self.throttled_until)
    }

    /// Until when the backend is out for its health (ejected, or failing
    /// its probes: `u64::MAX`), leaving a 429's rest aside: a throttled
    /// backend is up, only busy.
    pub(crate) fn sick_until(&self) -> u64 {
        if self.probe_down {
            return u64::MAX;
        }
        self.ejected_until.unwrap_or(0)
    }

    /// A whole success: [`on_answered`](Self::on_answered) and
    /// [`on_clean_end`](Self::on_clean_end).
    pub(crate) fn on_success(&mut self, now: u64) {
        self.on_answered(now);
        self.on_clean_end();
    }

    /// An answer's head below 400: the backend is up.
    pub(crate) fn on_answered(&mut self, now: u64) {
        self.probe_down = false;
        self.end_ejection(now);
    }

    /// An answer's head below 400, to a request sent when
    /// `ejections_seen` was `seen`: it clears a probe's mark. Whether the
    /// request was panic-routed into the ejection that still runs (sent
    /// during it): then its body's whole end ends it
    /// ([`on_whole_of`](Self::on_whole_of)). An ejection that began after
    /// the request was sent stands either way (the answer is older news
    /// than the failures that ejected the backend).
    pub(crate) fn on_answered_of(&mut self, now: u64, seen: u64) -> bool {
        self.probe_down = false;
        self.ejections_seen == seen && self.ejected_until.is_some_and(|until| until > now)
    }

    /// The body of an answer to a request panic-routed into an ejection
    /// (sent when `ejections_seen` was `seen`) ended whole: the backend
    /// carried a request to its end, and that ejection ends, unless
    /// another began since.
    pub(crate) fn on_whole_of(&mut self, now: u64, seen: u64) {
        if self.ejections_seen == seen {
            self.end_ejection(now);
        }
    }

    /// An answered request's body ended (or the client left) without the
    /// upstream breaking it: the failure count starts over.
    pub(crate) fn on_clean_end(&mut self) {
        self.failures = 0;
    }

    /// [`on_clean_end`](Self::on_clean_end) of an answer whose head came
    /// when `failures_seen` was `seen`: only if no failure was counted
    /// since. A stream answered before the backend began to fail, ending
    /// whole while it fails every new request, says nothing of it now.
    pub(crate) fn on_clean_end_of(&mut self, seen: u64) {
        if self.failures_seen == seen {
            self.on_clean_end();
        }
    }

    /// A failure at `now` of a request sent at `sent`; `true` when it
    /// ejects the backend.
    pub(crate) fn on_failure(&mut self, now: u64, sent: u64, p: &Policy) -> bool {
        if self.ejected_until.is_some_and(|until| now < until) {
            return false;
        }
        self.failures = self.failures.saturating_add(1);
        self.failures_seen = self.failures_seen.wrapping_add(1);
        if self.failures < p.eject_after {
            return false;
        }
        if let Some(end) = self.ejected_until
            && sent.saturating_sub(end) >= self.last_rest
        {
            self.streak = 0;
        }
        self.streak = self.streak.saturating_add(1);
        let growth = 1u64 << (self.streak - 1).min(32);
        let cap = p.eject_ns.saturating_mul(u64::from(p.max_multiplier));
        let rest = p.eject_ns.saturating_mul(growth).min(cap);
        self.ejected_until = Some(now.saturating_add(rest));
        self.ejections_seen = self.ejections_seen.wrapping_add(1);
        self.last_rest = rest;
        self.failures = 0;
        true
    }

    /// A 429 asking for `retry_after_ns` (capped by the policy).
    pub(crate) fn on_throttled(&mut self, now: u64, retry_after_ns: u64, p: &Policy) {
        let until = now.saturating_add(retry_after_ns.min(p.max_retry_after_ns));
        self.throttled_until = self.throttled_until.max(until);
    }

    /// An active probe's result at `now`, of a probe sent when
    /// `ejections_seen` was `seen`. With `uneject`, a pass ends an ejection
    /// that began before the probe was sent (Envoy's
    /// `successful_active_health_check_uneject_host`); one that began after
    /// stands (the probe is older news than the failures that ejected the
    /// backend). Outside an ejection a pass leaves the failure count alone:
    /// `/v1/models` answered says nothing of the requests that fail.
    /// A probe's verdict; `true` when it changed the probes' say (down
    /// after up, or up after down).
    pub(crate) fn on_probe(&mut self, ok: bool, now: u64, seen: u64, uneject: bool) -> bool {
        let changed = self.probe_down == ok;
        self.probe_down = !ok;
        if ok && uneject && self.ejections_seen == seen {
            self.end_ejection(now);
        }
        changed
    }

    fn end_ejection(&mut self, now: u64) {
        if let Some(until) = self.ejected_until.as_mut() {
            if *until > now {
                self.last_rest = self.last_rest.saturating_sub(*until - now);
                *until = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const P: Policy = Policy {
        eject_after: 3,
        eject_ns: 30 * S,
        max_multiplier: 10,
        max_retry_after_ns: 300 * S,
    };

    fn fail(h: &mut Health, now: u64, n: u32) -> bool {
        (0..n)
            .map(|_| h.on_failure(now, now, &P))
            .fold(false, |a, b| a | b)
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let mut h = Health::default();
        assert!(!fail(&mut h, 0, 2));
        h.on_success(0);
        assert!(!fail(&mut h, 0, 2), "a success reset the count");
        assert!(h.on_failure(0, 0, &P));
        assert_eq!(h.down_until(), 30 * S);
    }

    #[test]
    fn rest_doubles_up_to_the_cap_and_is_forgotten() {
        let mut h = Health::default();
        let mut now = 0;
        let mut rests = Vec::new();
        for _ in 0..6 {
            assert!(fail(&mut h, now, 3));
            rests.push((h.down_until() - now) / S);
            now = h.down_until();
        }
        assert_eq!(rests, vec![30, 60, 120, 240, 300, 300]);
        // Healthy for as long as the last rest: back to the base.
        now += 300 * S;
        assert!(fail(&mut h, now, 3));
        assert_eq!(h.down_until() - now, 30 * S);
    }

    #[test]
    fn failures_while_resting_do_not_re_eject() {
        let mut h = Health::default();
        assert!(fail(&mut h, 0, 3));
        assert!(!fail(&mut h, S, 10));
        assert_eq!(h.down_until(), 30 * S);
        // Nor do they count once the rest is over: it takes `eject_after`
        // new ones.
        assert!(!fail(&mut h, 30 * S, 2));
        assert!(h.on_failure(30 * S, 30 * S, &P));
    }

    /// A server that hangs fails each request a whole timeout (here 60 s,
    /// longer than its 30 s rest) after it was sent: sent at once after
    /// its rest, the failures continue its streak.
    #[test]
    fn a_hung_backends_rest_doubles_all_the_same() {
        let mut h = Health::default();
        let mut end = 0;
        let mut rests = Vec::new();
        for _ in 0..4 {
            let failed = end + 60 * S;
            assert!(
                (0..3)
                    .map(|_| h.on_failure(failed, end, &P))
                    .fold(false, |a, b| a | b)
            );
            rests.push((h.down_until() - failed) / S);
            end = h.down_until();
        }
        assert_eq!(rests, vec![30, 60, 120, 240]);
        // Sent once it had been up for as long as its last rest: forgotten.
        let sent = end + 240 * S;
        assert!(
            (0..3)
                .map(|_| h.on_failure(sent + 60 * S, sent, &P))
                .fold(false, |a, b| a | b)
        );
        assert_eq!(h.down_until() - (sent + 60 * S), 30 * S);
    }

    /// A request panic-routed into an ejection ends it when its body ends
    /// whole, not at its head: a server that breaks every stream answers
    /// every head with 200.
    #[test]
    fn a_panic_routed_request_ends_its_ejection_when_whole() {
        let mut h = Health::default();
        assert!(fail(&mut h, 0, 3));
        let seen = h.ejections_seen;
        h.on_probe(false, S, seen, true);
        assert!(h.on_answered_of(S, seen), "sent into the ejection");
        assert_eq!(h.down_until(), 30 * S, "the head cleared the mark only");
        h.on_whole_of(2 * S, seen);
        assert_eq!(h.down_until(), 2 * S);
        // Sent before an ejection, answered during it: older news.
        let before = h.ejections_seen;
        assert!(fail(&mut h, 3 * S, 3));
        assert!(!h.on_answered_of(4 * S, before));
        h.on_whole_of(4 * S, before);
        assert!(h.down_until() > 4 * S);
        // Sent and answered while it was not ejected: nothing to end.
        let mut h = Health::default();
        assert!(!h.on_answered_of(0, h.ejections_seen));
    }

    #[test]
    fn a_probe_success_ends_an_ejection_it_was_sent_in_when_told_to() {
        let mut h = Health::default();
        assert!(fail(&mut h, 0, 3));
        let seen = h.ejections_seen;
        h.on_probe(true, S, seen, false);
        assert_eq!(h.down_until(), 30 * S, "not told to");
        h.on_probe(true, S, seen.wrapping_sub(1), true);
        assert_eq!(h.down_until(), 30 * S, "sent before the ejection");
        h.on_probe(true, 2 * S, seen, true);
        assert_eq!(h.down_until(), 2 * S);
        // Outside an ejection, failures still add up between passes.
        let mut h = Health::default();
        for i in 0..2 {
            assert!(!h.on_failure(i * S, i * S, &P));
            h.on_probe(true, i * S, h.ejections_seen, true);
        }
        assert!(h.on_failure(2 * S, 2 * S, &P), "the third ejects");
        let mut h = Health::default();
        assert!(fail(&mut h, 3 * S, 3));
        h.on_success(5 * S);
        assert_eq!(h.down_until(), 5 * S, "a request that worked does too");
    }

    #[test]
    fn success_ends_an_ejection_early() {
        let mut h = Health::default();
        assert!(fail(&mut h, 0, 3));
        h.on_success(5 * S);
        assert_eq!(h.down_until(), 5 * S);
    }

    #[test]
    fn throttle_is_capped_and_only_time_ends_it() {
        let mut h = Health::default();
        h.on_throttled(0, 1000 * S, &P);
        assert_eq!(h.down_until(), 300 * S);
        h.on_success(S);
        h.on_probe(true, S, h.ejections_seen, true);
        assert_eq!(h.down_until(), 300 * S);
    }

    #[test]
    fn probe_failure_holds_until_a_success() {
        let mut h = Health::default();
        h.on_probe(false, 0, 0, true);
        assert_eq!(h.down_until(), u64::MAX);
        h.on_probe(true, 0, 0, true);
        assert_eq!(h.down_until(), 0);
        h.on_probe(false, 0, 0, true);
        h.on_success(3 * S);
        assert_eq!(h.down_until(), 0);
    }

    /// An ejection ended early by a success was a rest as long as it
    /// lasted: failures sent soon after it go on with the streak (the
    /// next rest doubles), those sent as long after it as it lasted do not.
    #[test]
    fn an_ejection_ended_early_was_a_rest_as_long_as_it_lasted() {
        let mut h = Health::default();
        assert!(fail(&mut h, 0, 3));
        h.on_success(5 * S);
        // Sent 1 s after a 5 s rest: the streak goes on.
        assert!(fail(&mut h, 6 * S, 3));
        assert_eq!(h.down_until(), 66 * S);
        // Let back after 10 s of its 60; sent 10 s after that: forgotten.
        h.on_success(16 * S);
        assert!(fail(&mut h, 26 * S, 3));
        assert_eq!(h.down_until(), 56 * S);
    }
}
