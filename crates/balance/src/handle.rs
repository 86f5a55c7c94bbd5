//! [`BalanceHandle`]: run-time changes of the backends and the state the
//! proxy reads at scrape time.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::{TryStream, TryStreamExt};
use tower::discover::Change;

use crate::service::{Shared, upsert};
use crate::set::Backend;

/// Changes a [`Balance`](crate::Balance)'s backends at run time and reads
/// their state. Cheap to clone; keeps the balancer's shared state alive.
///
/// Changes never disturb requests in flight: a request keeps the backend it
/// was sent to, and the backend's in-flight count is released by the
/// request's own guard whenever it ends, removed backend or not.
pub struct BalanceHandle<S> {
    pub(crate) shared: Arc<Shared<S>>,
}

impl<S> Clone for BalanceHandle<S> {
    fn clone(&self) -> Self {
        BalanceHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for BalanceHandle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalanceHandle").finish_non_exhaustive()
    }
}

/// One backend's state, as [`BalanceHandle::snapshot`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendStats {
    /// The backend's name.
    pub name: Arc<str>,
    /// Requests in flight (from decision to the end of the response body).
    pub in_flight: u32,
    /// Whether it takes new requests now (not ejected, throttled whole or
    /// failing its health check; a model of it resting after its own 429
    /// leaves it taking the others).
    pub healthy: bool,
    /// How many times it has been ejected.
    pub ejections: u64,
    /// Attempts sent to it that failed (5xx, a connection or timeout
    /// error, a body it broke), whether retried elsewhere or not.
    pub failures: u64,
    /// Answers of it that asked to be left alone for a while (429, or 503
    /// with `retry-after`).
    pub throttled: u64,
}

/// What the balancer had counted of a backend at one moment
/// ([`BalanceHandle::seen`]): its failures and ejections so far.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    failures: u64,
    ejections: u64,
}

impl<S: Clone> BalanceHandle<S> {
    /// Add `backend`, or replace the one of the same name (keeping its
    /// in-flight count and health).
    pub fn insert(&self, backend: Backend<S>) {
        self.shared
            .change(|members, make| upsert(members, make(backend)));
    }

    /// Remove the backend named `name`; `false` if there was none. Its
    /// requests in flight finish undisturbed.
    pub fn remove(&self, name: &str) -> bool {
        let mut found = false;
        self.shared.change(|members, _| {
            let before = members.len();
            members.retain(|m| &*m.name != name);
            found = members.len() != before;
        });
        found
    }

    /// Apply one `tower::discover` change; an inserted backend takes the
    /// change's key as its name.
    pub fn apply(&self, change: Change<Arc<str>, Backend<S>>) {
        match change {
            Change::Insert(name, mut backend) => {
                backend.name = name;
                self.insert(backend);
            }
            Change::Remove(name) => {
                self.remove(&name);
            }
        }
    }

    /// Drive a `tower::discover`-style stream of changes into the balancer
    /// until it ends (`Ok`) or fails (its error). Spawn it beside the server.
    pub async fn drive<D>(&self, changes: D) -> Result<(), D::Error>
    where
        D: TryStream<Ok = Change<Arc<str>, Backend<S>>>,
    {
        let mut changes = std::pin::pin!(changes.into_stream());
        while let Some(change) = changes.try_next().await? {
            self.apply(change);
        }
        Ok(())
    }
}

impl<S> BalanceHandle<S> {
    /// Every backend's state, in config order.
    pub fn snapshot(&self) -> Vec<BackendStats> {
        let now = self.shared.epoch.now();
        self.shared
            .snapshot()
            .members
            .iter()
            .map(|m| BackendStats {
                name: m.name.clone(),
                in_flight: m.state.in_flight(),
                healthy: m.state.is_available(now),
                ejections: m.state.ejections(),
                failures: m.state.failed(),
                throttled: m.state.throttled(),
            })
            .collect()
    }

    /// Whether any backend is up now: neither ejected nor failing its
    /// health checks (for `/readyz`). One resting after a 429 is up: an
    /// upstream's rate limit is not the proxy's to be pulled out of a load
    /// balancer for (every replica behind it would see the same 429s, and
    /// clients would get refused connections instead of the 429).
    pub fn any_healthy(&self) -> bool {
        let now = self.shared.epoch.now();
        self.shared
            .snapshot()
            .members
            .iter()
            .any(|m| m.state.is_up(now))
    }

    /// Whether the backend named `name` takes new requests now; false for
    /// a name it does not have.
    pub fn is_healthy(&self, name: &str) -> bool {
        let now = self.shared.epoch.now();
        self.shared
            .snapshot()
            .members
            .iter()
            .any(|m| &*m.name == name && m.state.is_available(now))
    }

    /// Tell the balancer how an exchange with the backend named `name`
    /// went outside its own requests (a WebSocket session the proxy opened
    /// itself): a whole success resets its failure count, a failure (no
    /// connection, no answer in time, a session it broke off) counts
    /// towards its ejection, as a request's would. `elapsed` is how long
    /// the failure took.
    pub fn report(&self, name: &str, outcome: Result<(), std::time::Duration>) {
        let now = self.shared.epoch.now();
        let Some(state) = self.state_of(name) else {
            return;
        };
        match outcome {
            Ok(()) => state.update_health(|h| h.on_success(now)),
            Err(elapsed) => state.record_failure(now, elapsed, false),
        }
    }

    /// Tell the balancer how the backend named `name` answered an exchange
    /// outside its own requests (a WebSocket upgrade it refused), by the
    /// answer's head, judged as the balancer judges its own answers to
    /// routes outside the model APIs: a 503 with `retry-after` rests it
    /// for that long, a 429 (one tenant's, or that route's own limit) is
    /// counted and rests nothing; another 5xx counts
    /// towards its ejection (`elapsed`: how long it took); a 4xx says
    /// nothing of it; below 400 it answered.
    pub fn refused(
        &self,
        name: &str,
        status: http::StatusCode,
        headers: &http::HeaderMap,
        elapsed: std::time::Duration,
    ) {
        if let Some(state) = self.state_of(name) {
            crate::attempt::judge_head(&state, self.shared.epoch.now(), status, headers, elapsed);
        }
    }

    /// What the balancer has counted of the backend named `name` so far,
    /// to note when an exchange outside its own requests is sent (for
    /// [`answered`](Self::answered)) and when it is answered (for
    /// [`ended_whole`](Self::ended_whole)); `None` if there is no such
    /// backend.
    pub fn seen(&self, name: &str) -> Option<Seen> {
        self.state_of(name).map(|state| Seen {
            failures: state.failures_seen(),
            ejections: state.ejections_seen(),
        })
    }

    /// Tell the balancer that the backend named `name` answered (a
    /// WebSocket upgrade switched) an exchange sent when it had counted
    /// `sent`: as a request's answer head, it ends a rest early — unless
    /// the rest began after the exchange was sent (the answer is older news
    /// than the failures that ejected it). Its failure count stands until
    /// what it answered ends whole ([`ended_whole`](Self::ended_whole)) or
    /// breaks ([`report`](Self::report) `Err`). (A request's answer ends
    /// the rest only once its body ends whole; a session may last hours,
    /// and its switch is a whole exchange of its own.)
    pub fn answered(&self, name: &str, sent: Seen) {
        if let Some(state) = self.state_of(name) {
            let now = self.shared.epoch.now();
            if state.answered_of(now, sent.ejections) {
                state.whole_of(now, sent.ejections);
            }
        }
    }

    /// Tell the balancer that what the backend named `name` answered (a
    /// WebSocket session), when it had counted `answered`, ended whole: its
    /// failure count starts over, unless failures were counted since the
    /// answer (a session that began before the backend began to fail says
    /// nothing of it now). A rest or a probe's mark stands (the answer may
    /// be hours old).
    pub fn ended_whole(&self, name: &str, answered: Seen) {
        if let Some(state) = self.state_of(name) {
            state.clean_end_of(answered.failures);
        }
    }

    fn state_of(&self, name: &str) -> Option<Arc<crate::state::BackendState>> {
        let set = self.shared.snapshot();
        set.members
            .iter()
            .find(|m| &*m.name == name)
            .map(|m| m.state.clone())
    }

    /// Retries made since the balancer was built.
    pub fn retries_total(&self) -> u64 {
        self.shared.retries.load(Ordering::Relaxed)
    }

    /// Ejections since the balancer was built, removed backends included.
    pub fn ejections_total(&self) -> u64 {
        self.shared.ejections.load(Ordering::Relaxed)
    }
}
