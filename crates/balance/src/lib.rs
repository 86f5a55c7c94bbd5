//! The balancer of llm-proxy: a tower service that owns a set of upstream
//! services and decides, per request, which one serves it — and what happens
//! when that one fails.
//!
//! It sits below the cache layer and above the per-upstream stacks
//! (translation, the upstream client). It reads the request's
//! [`RequestMeta`](llm_proxy_core::RequestMeta) (model, buffered body) from
//! its extensions, is generic over the per-backend service `S`, and keeps
//! whatever the chosen service puts on the response (such as
//! [`UpstreamName`](llm_proxy_core::UpstreamName)).
//!
//! # Example
//!
//! ```
//! use llm_proxy_balance::{Backend, Balance, BalanceConfig, Strategy};
//! use llm_proxy_core::{Body, Error};
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let upstream = |name: &'static str| {
//!     service_fn(move |_req: http::Request<Body>| async move {
//!         Ok::<_, Error>(http::Response::new(llm_proxy_core::full(name)))
//!     })
//! };
//! let balance = Balance::new(
//!     [
//!         Backend::new("gpu-a", upstream("a")).with_models(["llama"]),
//!         Backend::new("gpu-b", upstream("b")),
//!     ],
//!     BalanceConfig { strategy: Strategy::LeastRequests, ..BalanceConfig::default() },
//! );
//! let resp = balance.clone().oneshot(http::Request::new(llm_proxy_core::empty())).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! assert!(balance.handle().any_healthy());
//! # }
//! ```
//!
//! # Candidates
//!
//! The candidates of a request are the backends that list its `model`, plus
//! those that serve every model ([`Backend::models`] `None`). A model no
//! backend serves is `404 model_not_found`. A request without a model (a
//! passthrough route) goes to the first healthy backend in config order.
//!
//! # Strategies
//!
//! - [`Strategy::RoundRobin`]; [`Strategy::Weighted`]: nginx's smooth
//!   weighted round robin by [`Backend::weight`] (3:1 gives `a a b a …`;
//!   weight 0 drains a backend).
//! - [`Strategy::LeastRequests`]: power of two choices over in-flight
//!   requests.
//! - [`Strategy::P2cEwma`] (default): power of two choices over tower's
//!   peak-EWMA cost, `latency estimate × (in-flight + 1)`. The latency
//!   sample is the time to the **first body frame** (time to first token of
//!   a stream), never the response head alone; a failed attempt is sampled as
//!   at least 1 s, so a backend that fails fast never looks fast. The estimate
//!   jumps up to a peak at once and decays with a 10 s time constant.
//! - [`Strategy::PrefixAffinity`]: see below.
//!
//! A request counts against its backend from the moment it is chosen —
//! before any await, so a burst decided together sees its own earlier
//! picks — until its response body ends or is dropped. The count lives in a
//! guard inside the response body ([`Guarded`](llm_proxy_core::Guarded)),
//! released in `Drop` only: early returns, retries, cancelled clients and
//! removed backends cannot leak or double-count it.
//!
//! # Prefix affinity
//!
//! LLM servers keep a prefix (KV) cache: a request whose prompt starts like
//! an earlier one is far cheaper on the server that saw it. The key of a
//! request is a chain of block hashes over its canonical prompt text
//! (`system`/`instructions`, then each message's role and text in order,
//! then `prompt`/`input`), cut to the first [`PrefixConfig::prefix_blocks`]
//! blocks of [`PrefixConfig::block_bytes`] ([`PromptPrefix`]). Backends sit
//! on a hash ring with [`PrefixConfig::virtual_nodes`] points each; the
//! request walks the ring from its key and takes the first healthy backend
//! whose in-flight count stays within
//! `max(ceil((1 + ε)·mean), ceil(mean) + min_slack)` (consistent hashing with
//! bounded load). When the in-flight spread exceeds
//! [`PrefixConfig::max_spread`] and twice ε of the mean (the spread the
//! bound itself allows), or a request has no prompt, the least loaded
//! backend is chosen instead.
//!
//! How this designs out what other routers shipped:
//!
//! - *Leaking in-flight counts*: the guard above; nothing else ever resets
//!   or decrements a count, health checks included.
//! - *Unbounded index memory*: there is no per-prefix index at all; the ring
//!   is `backends × virtual_nodes` points, rebuilt only when backends change.
//! - *One shared system prompt pulls everything to one server*: the load
//!   bound caps any home at about `(1 + ε) × mean`; overflow walks the ring,
//!   so a hot prefix spreads over a stable sequence of servers that all end
//!   up caching it. Keys cover `prefix_blocks × block_bytes` (2 KiB by
//!   default), so conversations behind a short shared system prompt key on
//!   their own first turn.
//! - *Misses stampede the emptiest server*: a new prefix goes to its ring
//!   position, which is uniform, not to the least loaded or emptiest tree.
//! - *Bursts decided on one snapshot*: counted at decision time.
//! - *Hot prefix with many servers*: `min_slack` keeps the bound sensible
//!   when the mean is tiny.
//! - *Several proxy replicas*: the ring is derived from backend names only
//!   and the hash is stable ([`PromptPrefix`]), so replicas agree on every
//!   prefix's home and spill order without shared state; only the load
//!   bound is local to each replica.
//!
//! # Failures, retries and health
//!
//! - An attempt fails on a connect error or timeout (`Error::BadGateway`,
//!   `Error::UpstreamTimeout`) or a 5xx answer other than 501; it is retried
//!   on another backend, up to [`BalanceConfig::max_retries`], while the
//!   fleet-wide [`RetryBudget`] allows (kept as tower's `TpsBudget` keeps
//!   it, without its lock per request: 20% of requests over 10 s plus 3/s
//!   by default). A 429 rests the request's model on that backend (one to
//!   a route outside the model APIs rests nothing), a 503 with
//!   `retry-after` the whole backend, for its `retry-after` (default 1 s,
//!   capped by `max_retry_after`), and is retried elsewhere the same way
//!   (never on that backend again within the request). Other 4xx answers
//!   and other errors are passed through at once, never retried and never
//!   counted as failures.
//! - Only requests whose body is buffered in `RequestMeta` are retried;
//!   others get exactly one attempt. Attempts are judged on the response
//!   head, before any byte reaches the client; a returned response is never
//!   retried.
//! - When retries are exhausted or the budget says no, the last attempt's
//!   result goes back as it is: the upstream's own 5xx/429 answer, or its
//!   error (502 `bad_gateway`, 504 `upstream_timeout`). `503
//!   no_upstream_available` only when no attempt could be made at all.
//! - Each attempt picks among healthy backends not yet tried for this
//!   request, over the model and then its [`BalanceConfig::fallbacks`] in
//!   order (a fallback rewrites `model` in the forwarded body through
//!   `RequestMeta::set_model`); if none, panic routing tries backends not
//!   yet tried even though they rest; failing that, a healthy backend tried
//!   before (a lone backend may be retried after a transient failure).
//! - A backend that serves a model under another name
//!   ([`Backend::with_served_names`]) gets the request with `model` rewritten
//!   to that name, the same way; the next attempt, on another backend, goes
//!   with that backend's name for it.
//! - [`BalanceConfig::eject_after_failures`] consecutive failures eject a
//!   backend for [`BalanceConfig::eject`], doubling on each ejection in a row
//!   up to `max_eject_multiplier ×`; a backend whose next failing request
//!   was sent as long as its last rest after it forgets the streak. A
//!   success resets the count once its body ends whole, and so ends the
//!   rest early when it was panic-routed there.
//! - Optional active checks ([`HealthCheck`]) send `GET /v1/models` through
//!   every backend each interval: a failure keeps a backend out until its
//!   next success, a 2xx clears that and ends an ejection it was sent in
//!   (unless [`HealthCheck::uneject`] is off), and a busy answer (429, or
//!   503 with `retry-after`) changes nothing.
//!
//! # Run-time changes and observability
//!
//! [`Balance::handle`] gives a [`BalanceHandle`]: `insert`/`remove` backends
//! or [`drive`](BalanceHandle::drive) a `tower::discover::Change` stream
//! without disturbing requests in flight, and read
//! [`snapshot`](BalanceHandle::snapshot), `retries_total`,
//! `ejections_total` and `any_healthy` at scrape time.
//!
//! The synchronous [`Picker`] is the decision itself, usable without tokio
//! (the benches and the prefix-routing simulation drive it).
//!
//! This crate has no feature flags.
#![forbid(unsafe_code)]

mod attempt;
mod body;
mod budget;
mod config;
mod handle;
mod hash;
mod health;
mod picker;
mod prefix;
mod probe;
mod route;
mod service;
mod set;
mod state;

pub use config::{BalanceConfig, HealthCheck, PrefixConfig, RetryBudget, Strategy};
pub use handle::{BackendStats, BalanceHandle, Seen};
pub use picker::{Load, LoadView, Picker, PickerMember};
pub use prefix::PromptPrefix;
pub use service::{Balance, BalanceLayer, ResponseFuture};
pub use set::Backend;

/// A fresh pseudo-random value per call (splitmix64 on a per-thread state
/// seeded once from the OS-seeded `RandomState`).
pub(crate) fn random() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, RandomState};
    thread_local! {
        static STATE: Cell<u64> = Cell::new(RandomState::new().hash_one(0u64));
    }
    STATE.with(|s| {
        let next = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(next);
        hash::mix(next)
    })
}

#[cfg(test)]
mod tests;
