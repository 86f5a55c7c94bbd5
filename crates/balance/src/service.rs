//! [`Balance`], its layer, and the state its clones and handles share.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::task::{Context, Poll};

use http::{Request, Response};
use llm_proxy_core::{Body, Error};
use tower_service::Service;

use crate::config::BalanceConfig;
use crate::handle::BalanceHandle;
use crate::health::Policy;
use crate::set::{Backend, BackendSet, Member};
use crate::state::{BackendState, Epoch, policy_of};

/// The service that spreads requests over backends: by model, by strategy,
/// with retries, failover, fallbacks and outlier ejection.
///
/// Cheap to clone: clones share backends, health and counters. See the
/// [crate docs](crate) for the behaviour.
pub struct Balance<S> {
    pub(crate) shared: Arc<Shared<S>>,
}

impl<S> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Balance {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balance")
            .field("strategy", &self.shared.config.strategy.as_str())
            .field("backends", &self.shared.snapshot().members.len())
            .finish_non_exhaustive()
    }
}

/// A [`tower::Layer`] that turns a list of backends into a [`Balance`]:
/// `ServiceBuilder::new().layer(BalanceLayer::new(cfg)).service(backends)`.
#[derive(Clone, Debug, Default)]
pub struct BalanceLayer {
    config: BalanceConfig,
}

impl BalanceLayer {
    /// A layer building balancers with `config`.
    pub fn new(config: BalanceConfig) -> Self {
        BalanceLayer { config }
    }
}

impl<S> tower_layer::Layer<Vec<Backend<S>>> for BalanceLayer
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Service = Balance<S>;

    fn layer(&self, backends: Vec<Backend<S>>) -> Balance<S> {
        Balance::new(backends, self.config.clone())
    }
}

/// What every clone of a [`Balance`] and every [`BalanceHandle`] share.
pub(crate) struct Shared<S> {
    set: RwLock<Arc<BackendSet<S>>>,
    /// Serialises changes of the set. Keeps the state of removed backends
    /// that still have requests in flight, so a quick re-add reuses it.
    states: Mutex<HashMap<Arc<str>, Weak<BackendState>>>,
    pub(crate) config: BalanceConfig,
    pub(crate) policy: Policy,
    pub(crate) budget: crate::budget::Budget,
    pub(crate) epoch: Epoch,
    pub(crate) retries: AtomicU64,
    pub(crate) ejections: Arc<AtomicU64>,
    pub(crate) probe: Mutex<Option<tokio::task::AbortHandle>>,
}

impl<S> Drop for Shared<S> {
    fn drop(&mut self) {
        let probe = self.probe.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = probe.take() {
            task.abort();
        }
    }
}

impl<S> Shared<S> {
    /// The current set; the read lock is held only to clone the `Arc`.
    pub(crate) fn snapshot(&self) -> Arc<BackendSet<S>> {
        self.set
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S: Clone> Shared<S> {
    /// Apply `change` to the list of members and swap in the rebuilt set.
    pub(crate) fn change(
        &self,
        change: impl FnOnce(&mut Vec<Arc<Member<S>>>, &mut dyn FnMut(Backend<S>) -> Arc<Member<S>>),
    ) {
        let mut states = self.states.lock().unwrap_or_else(PoisonError::into_inner);
        let mut members = self.snapshot().members.clone();
        let mut make = |backend: Backend<S>| {
            let state = states
                .get(&backend.name)
                .and_then(Weak::upgrade)
                .unwrap_or_else(|| {
                    Arc::new(BackendState::new(
                        backend.name.clone(),
                        self.policy,
                        self.ejections.clone(),
                        self.epoch.now(),
                    ))
                });
            states.insert(backend.name.clone(), Arc::downgrade(&state));
            Arc::new(Member::new(backend, state))
        };
        change(&mut members, &mut make);
        states.retain(|_, state| state.strong_count() > 0);
        let previous = self.snapshot();
        let set = Arc::new(BackendSet::new(
            &self.config.strategy,
            members,
            Some(&previous),
        ));
        *self.set.write().unwrap_or_else(PoisonError::into_inner) = set;
    }
}

/// Insert `backend` into `members`, replacing one of the same name in place.
pub(crate) fn upsert<S>(members: &mut Vec<Arc<Member<S>>>, member: Arc<Member<S>>) {
    match members.iter_mut().find(|m| m.name == member.name) {
        Some(slot) => *slot = member,
        None => members.push(member),
    }
}

impl<S> Balance<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// A balancer over `backends` (in config order; a later backend with an
    /// earlier one's name replaces it). Starts the health checker when
    /// `config.health_check` is set and a tokio runtime is running.
    pub fn new(backends: impl IntoIterator<Item = Backend<S>>, config: BalanceConfig) -> Self {
        let epoch = Epoch::new();
        let shared = Arc::new(Shared {
            set: RwLock::new(Arc::new(BackendSet::new(
                &config.strategy,
                Vec::new(),
                None,
            ))),
            states: Mutex::new(HashMap::new()),
            policy: policy_of(&config),
            budget: config.retry_budget.build(epoch.now()),
            epoch,
            retries: AtomicU64::new(0),
            ejections: Arc::default(),
            probe: Mutex::new(None),
            config,
        });
        shared.change(|members, make| {
            // Each name's place, found by hash: a search of the list per
            // backend made a start with many upstreams quadratic (200 000
            // took minutes).
            let mut at: HashMap<Arc<str>, usize> = HashMap::new();
            for backend in backends {
                let member = make(backend);
                match at.entry(member.name.clone()) {
                    std::collections::hash_map::Entry::Occupied(slot) => {
                        members[*slot.get()] = member;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(members.len());
                        members.push(member);
                    }
                }
            }
        });
        if let Some(check) = shared.config.health_check.clone() {
            let task = crate::probe::spawn(&shared, check);
            *shared.probe.lock().unwrap_or_else(PoisonError::into_inner) = task;
        }
        Balance { shared }
    }

    /// A handle to change the backends at run time and read their state.
    pub fn handle(&self) -> BalanceHandle<S> {
        BalanceHandle {
            shared: self.shared.clone(),
        }
    }
}

/// The future of [`Balance`]'s `call`.
pub type ResponseFuture = llm_proxy_core::BoxFuture;

impl<S> Service<Request<Body>> for Balance<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture;

    /// Always ready: the backend is chosen per request in `call`, and the
    /// chosen backend's own readiness is awaited inside the attempt.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        Box::pin(crate::attempt::serve(self.shared.clone(), req))
    }
}
