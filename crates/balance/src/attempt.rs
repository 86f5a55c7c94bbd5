//! One request through the balancer: choose, send, judge the outcome, retry
//! elsewhere or answer.
//!
//! Each attempt rebuilds the request from its saved head (method, URI,
//! headers, extensions); the body lives in `RequestMeta`, so a buffered
//! request can be sent again. A request whose body is not buffered gets one
//! attempt. A response is judged by its head only, before any byte of it has
//! gone to the client, and once a response is returned it is never retried.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, Error, Guarded, RequestMeta, Waited};
use tokio::time::Instant;
use tower_service::Service;

use crate::body::FirstFrame;
use crate::route::Route;
use crate::service::Shared;
use crate::state::{BackendState, Epoch, InFlight};

type Outcome = Result<Response<Body>, Error>;

/// What an attempt's outcome means for health and for retrying.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Below 400: answered; resets the failure count.
    Success,
    /// A 4xx other than 429 (or 501): the request's fault; passed through.
    Pass,
    /// 429 (too many requests: come back then): rest what the request
    /// asked of this long (ns; its model, see [`Rests`]), then maybe retry
    /// elsewhere.
    Throttled(u64),
    /// 503 with `retry-after` (the server sheds load: come back then): rest
    /// the whole backend this long (ns), then maybe retry elsewhere.
    Shedding(u64),
    /// Connect error, timeout, 5xx: counts towards ejection; retryable.
    Failure,
    /// Not taken at all ([`Error::UpstreamRefused`]: an HTTP/2 stream
    /// refused, or past a `GOAWAY`): retryable, and no failure of the
    /// backend's.
    Refused,
    /// Any other error of the inner service: returned as is.
    Fatal,
}

/// Default rest of a 429 without a usable `retry-after`.
const DEFAULT_RETRY_AFTER_NS: u64 = 1_000_000_000;

fn classify(outcome: &Outcome) -> Verdict {
    match outcome {
        Ok(resp) => classify_head(resp.status(), resp.headers()),
        Err(Error::BadGateway { .. } | Error::UpstreamTimeout { .. }) => Verdict::Failure,
        Err(Error::UpstreamRefused { .. }) => Verdict::Refused,
        Err(_) => Verdict::Fatal,
    }
}

/// How many attempts the upstreams processed none of are given back
/// beyond `max_retries` (each within the retry budget still).
const MAX_UNPROCESSED_AGAIN: usize = 4;

/// What an answer's head says of its backend (also a probe's: a 429, or a
/// 503 with `retry-after`, is busy, not down).
pub(crate) fn classify_head(status: StatusCode, headers: &http::HeaderMap) -> Verdict {
    match status {
        StatusCode::TOO_MANY_REQUESTS => Verdict::Throttled(retry_after_ns(headers)),
        StatusCode::SERVICE_UNAVAILABLE if headers.contains_key(header::RETRY_AFTER) => {
            Verdict::Shedding(retry_after_ns(headers))
        }
        StatusCode::NOT_IMPLEMENTED => Verdict::Pass,
        s if s.is_server_error() => Verdict::Failure,
        s if s.is_client_error() => Verdict::Pass,
        _ => Verdict::Success,
    }
}

/// Whether an answer says it must not be sent again: `x-should-retry:
/// false`.
fn says_do_not_retry(outcome: &Outcome) -> bool {
    const SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");
    outcome.as_ref().is_ok_and(|resp| {
        resp.headers()
            .get(SHOULD_RETRY)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"false"))
    })
}

/// Apply what an answer's head says to its backend's health (a failure
/// took `elapsed`; `sent`: the backend's ejections when the request was
/// sent, if it is one of the balancer's); the verdict, and whether the
/// request was panic-routed into the ejection that still runs (its body's
/// whole end is to end it: [`BackendState::answered_of`]).
fn judge(
    state: &BackendState,
    now: u64,
    verdict: Verdict,
    elapsed: Duration,
    sent: Option<u64>,
    rests: Rests<'_>,
) -> (Verdict, bool) {
    let mut panic_routed = false;
    match verdict {
        // The failure count is reset by the body's clean end (FirstFrame).
        Verdict::Success => match sent {
            Some(seen) => panic_routed = state.answered_of(now, seen),
            None => state.answered(now),
        },
        Verdict::Failure => state.record_failure(now, elapsed, true),
        Verdict::Throttled(ns) => {
            state.count_throttled();
            match rests {
                Rests::Backend => state.rest(now, ns, None),
                Rests::Model(model) => state.rest(now, ns, Some(model)),
                Rests::Nothing => {}
            }
        }
        Verdict::Shedding(ns) => {
            state.count_throttled();
            state.rest(now, ns, None);
        }
        Verdict::Pass | Verdict::Fatal | Verdict::Refused => {}
    }
    (verdict, panic_routed)
}

/// What a 429 rests (a 503 with `retry-after`, a server shedding load,
/// rests the whole backend).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rests<'m> {
    /// The whole backend: a model request that names no model.
    Backend,
    /// That model on the backend: a model request's answer speaks of the
    /// model's limits there (OpenAI's are per model; one tenant's request
    /// that hits one model's limit must not shut the backend to every
    /// other model and tenant).
    Model(&'m str),
    /// Nothing: the answer to a route outside the model APIs (files,
    /// batches, a stored response by id, a WebSocket upgrade) or to a
    /// token count (Anthropic limits counting apart from generating)
    /// speaks of that route's own limits, or one tenant's.
    Nothing,
}

impl<'m> Rests<'m> {
    /// What a 429 to a request to `endpoint`, sent as `model`, rests.
    pub(crate) fn of(endpoint: llm_proxy_core::Endpoint, model: Option<&'m str>) -> Self {
        use llm_proxy_core::Endpoint;
        let counts_only = matches!(
            endpoint,
            Endpoint::MessagesCountTokens | Endpoint::ResponsesInputTokens
        );
        match model {
            _ if counts_only || !endpoint.has_model_body() => Rests::Nothing,
            Some(model) => Rests::Model(model),
            None => Rests::Backend,
        }
    }
}

/// [`BalanceHandle::refused`](crate::BalanceHandle::refused): an answer's
/// head outside the balancer's own requests, judged as one of theirs.
pub(crate) fn judge_head(
    state: &BackendState,
    now: u64,
    status: StatusCode,
    headers: &http::HeaderMap,
    elapsed: Duration,
) {
    judge(
        state,
        now,
        classify_head(status, headers),
        elapsed,
        None,
        Rests::Nothing,
    );
}

/// `retry-after` as seconds, or as an HTTP-date (RFC 9110 §10.2.3: the
/// rest lasts until then, by this machine's clock). What is neither, `0`
/// and a date gone by get the default: a backend that has just refused
/// must rest a while, or the request it refused would be retried on it at
/// once.
fn retry_after_ns(headers: &http::HeaderMap) -> u64 {
    retry_after_ns_at(headers, std::time::SystemTime::now())
}

fn retry_after_ns_at(headers: &http::HeaderMap, now: std::time::SystemTime) -> u64 {
    let Some(value) = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    else {
        return DEFAULT_RETRY_AFTER_NS;
    };
    let rest = match value.parse::<f64>() {
        Ok(secs) => (secs.is_finite() && secs > 0.0).then(|| (secs.min(1e9) * 1e9) as u64),
        Err(_) => httpdate::parse_http_date(value)
            .ok()
            .and_then(|at| at.duration_since(now).ok())
            .map(|left| u64::try_from(left.as_nanos()).unwrap_or(u64::MAX))
            .filter(|&ns| ns > 0),
    };
    rest.unwrap_or(DEFAULT_RETRY_AFTER_NS)
}

/// The request of the first attempt, and what a retry is rebuilt from.
struct Template {
    /// The client's head and body, for the first attempt.
    first: Option<Request<Body>>,
    /// A copy of the head for retries (none when there can be none). Its
    /// extensions are left out when they were only the request's
    /// [`RequestMeta`] and its [`Waited`], which a retry puts back from
    /// `meta` and `waited`: a copy of an extension map is three
    /// allocations.
    spare: Option<Parts>,
    /// The retries' head lacks the request's extensions: put `meta` (and
    /// `waited`) back.
    bare: bool,
    waited: Option<Waited>,
}

impl Template {
    fn new(parts: Parts, body: Body, retries: bool, meta: Option<&RequestMeta>) -> Self {
        // (Only a retry needs these: no lookup for a request that has none.)
        let waited = retries.then(|| parts.extensions.get::<Waited>()).flatten();
        let bare = retries
            && meta.is_some()
            && parts.extensions.len() == 1 + usize::from(waited.is_some());
        let waited = waited.filter(|_| bare).cloned();
        let spare = retries.then(|| {
            let (mut head, ()) = Request::new(()).into_parts();
            head.method = parts.method.clone();
            head.uri = parts.uri.clone();
            head.version = parts.version;
            head.headers = parts.headers.clone();
            if !bare {
                head.extensions = parts.extensions.clone();
            }
            head
        });
        Template {
            first: Some(Request::from_parts(parts, body)),
            spare,
            bare,
            waited,
        }
    }

    /// The extensions of the first attempt's request, while it has not
    /// been taken.
    fn extensions(&self) -> Option<&http::Extensions> {
        self.first.as_ref().map(Request::extensions)
    }

    /// The request for the next attempt (`last`: no attempt can follow
    /// it), with `own` as its metadata when the attempt has its own body
    /// (another model, or the model under its upstream's name for it).
    fn next(
        &mut self,
        last: bool,
        meta: Option<&RequestMeta>,
        own: Option<&RequestMeta>,
    ) -> Option<Request<Body>> {
        let mut req = match self.first.take() {
            Some(first) => first,
            None => {
                let parts = if last {
                    self.spare.take()?
                } else {
                    self.spare.clone()?
                };
                let mut req = Request::from_parts(parts, llm_proxy_core::empty());
                if let (true, Some(meta)) = (self.bare, meta) {
                    req.extensions_mut().insert(meta.clone());
                    if let Some(waited) = &self.waited {
                        req.extensions_mut().insert(waited.clone());
                    }
                }
                req
            }
        };
        if let Some(meta) = own {
            req.extensions_mut().insert(meta.clone());
        }
        Some(req)
    }
}

/// Serve one request (the body of [`Balance`](crate::Balance)'s future).
///
/// The request is split and its template made before the future, which
/// then holds it once (in the template): an `async fn` would hold it as its
/// argument, as the split head, and in the template.
pub(crate) fn serve<S>(
    shared: Arc<Shared<S>>,
    req: Request<Body>,
) -> impl Future<Output = Outcome> + Send + 'static
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let meta = req.extensions().get::<RequestMeta>().cloned();
    // A model request the parse layer did not read: its model is unknown,
    // and routed as passthrough it would reach any upstream, of any model.
    let unparsed = meta.is_none()
        && llm_proxy_core::Endpoint::from_path(req.uri().path())
            .is_some_and(llm_proxy_core::Endpoint::has_model_body);
    // Retried elsewhere: only the model APIs, whose requests any upstream
    // of the model answers alike. A passthrough write (files, batches,
    // fine-tunes) names ids that live on one upstream and may have taken
    // effect there before it failed: one attempt, buffered or not.
    let retryable = meta
        .as_ref()
        .is_some_and(|m| m.original_body().is_some() && m.endpoint().has_model_body());
    let attempts = if retryable {
        shared.config.max_retries.saturating_add(1)
    } else {
        1
    };
    // A model with fallbacks gets one attempt at them beyond
    // `max_retries` when its own upstreams took every attempt (they may be
    // more than `max_retries + 1`): the fallback is what the operator named
    // for a model whose upstreams all fail. Not with `max_retries = 0`
    // (one call a request, whatever happens), and only when the route
    // holds a fallback (below): the config's says whether the template
    // must keep a head for it.
    let fallbacks = attempts > 1
        && meta
            .as_ref()
            .and_then(RequestMeta::model)
            .and_then(|model| shared.config.fallbacks.get(model))
            .is_some_and(|models| !models.is_empty());
    let (parts, body) = req.into_parts();
    let mut template = Template::new(parts, body, attempts > 1, meta.as_ref());
    async move {
        if unparsed {
            return Err(Error::Misconfigured(
                "the balancer needs the parse layer in front of it: it routes model requests \
                 by the body's model"
                    .into(),
            ));
        }
        let set = shared.snapshot();
        let route = {
            let extensions = template.extensions();
            let pin = extensions.and_then(|e| e.get::<llm_proxy_core::PinnedUpstream>());
            let allowed = extensions.and_then(|e| e.get::<llm_proxy_core::ModelAllowlist>());
            let path = template.first.as_ref().map(|r| r.uri().path());
            Route::new(&shared.config, &set, meta.as_ref(), pin, allowed, path)?
        };
        // (A pinned request, or one whose key may use none of them, has
        // none.)
        let fallbacks = fallbacks && route.has_fallbacks();
        let mut now = shared.epoch.now();
        shared.budget.deposit(now);
        let mut tried: Vec<usize> = Vec::new();
        let mut spent: Vec<usize> = Vec::new();
        let mut last: Option<Outcome> = None;
        let mut fell_back = false;
        // Attempts the upstreams processed none of (refused streams,
        // streams past a `GOAWAY`) are given back, a few times: a server
        // that rotates its connections often under load (nginx's
        // `keepalive_requests`) refuses many in a row, none of them a
        // fault, and each no work done.
        let mut attempts = attempts;
        let mut unprocessed = 0;
        for attempt in 0.. {
            let extra = attempt >= attempts;
            if extra && (fell_back || !fallbacks) {
                break;
            }
            if attempt > 0 {
                now = shared.epoch.now();
            }
            let Some(choice) = route.choose(&set, &tried, &spent, now, crate::random(), extra)
            else {
                break;
            };
            fell_back |= choice.model.is_some();
            if attempt > 0 {
                if !shared.budget.withdraw(now) {
                    tracing::debug!("retry budget exhausted; answering with the last attempt");
                    break;
                }
                shared.retries.fetch_add(1, Ordering::Relaxed);
            }
            let member = &set.members[choice.member];
            // The request is made and handed to `send` in one expression: a
            // local holding it would keep its room in this future beside the
            // attempt's, even once moved out.
            // No attempt can follow this one.
            let final_attempt = extra
                || (attempt + 1 == attempts
                    && (fell_back || !fallbacks)
                    && (attempts == 1 || unprocessed == MAX_UNPROCESSED_AGAIN));
            let made = template
                .next(
                    final_attempt,
                    meta.as_ref(),
                    attempt_meta(&meta, &route, choice.model, member).as_ref(),
                )
                .map(|req| {
                    // The previous failure is superseded: release its backend now.
                    drop(last.take());
                    tracing::debug!(
                        request_id = req
                            .headers()
                            .get("x-request-id")
                            .and_then(|id| id.to_str().ok())
                            .unwrap_or(""),
                        upstream = %member.name,
                        attempt,
                        "balancer attempt"
                    );
                    let rests = Rests::of(route.endpoint(), choice.model.or(route.model()));
                    send(&shared, &member.state, member.service(), req, rests)
                });
            let (mut outcome, verdict) = match made {
                Some(attempt) => attempt.await,
                None => break,
            };
            if let (Some(model), Ok(response)) = (choice.model, &mut outcome) {
                // Not the answer of the client's model: the cache must not keep
                // it under that model's key.
                response
                    .extensions_mut()
                    .insert(llm_proxy_core::fallback::ServedByFallback(model.into()));
            }
            match verdict {
                Verdict::Success | Verdict::Pass | Verdict::Fatal => return outcome,
                // The upstream says the request itself failed (its
                // `x-should-retry: false` on a 5xx, as Anthropic and OpenAI
                // send): sending it again, there or to a replica, would fail
                // again. (Its health counts the failure all the same.) On a
                // 429 it speaks of that upstream's account or load, which
                // another upstream does not share: that one is tried.
                Verdict::Failure if says_do_not_retry(&outcome) => return outcome,
                Verdict::Failure
                | Verdict::Throttled(_)
                | Verdict::Shedding(_)
                | Verdict::Refused => {
                    if matches!(verdict, Verdict::Refused)
                        && attempts > 1
                        && unprocessed < MAX_UNPROCESSED_AGAIN
                    {
                        unprocessed += 1;
                        attempts += 1;
                    }
                    tried.push(choice.member);
                    // Nor is one that said when to come back asked again
                    // within this request, whatever its answer rested.
                    if timed_out_waiting(&outcome)
                        || matches!(verdict, Verdict::Throttled(_) | Verdict::Shedding(_))
                    {
                        spent.push(choice.member);
                    }
                    last = Some(outcome);
                }
            }
        }
        last.unwrap_or_else(|| Err(no_attempt(&route, &set, now)))
    }
}

/// The metadata of an attempt, when it is not the request's own: it
/// serves `fallback`, a model standing in for the request's, or `member`
/// serves the model under another name. `None`: the request goes as it is.
fn attempt_meta<S>(
    meta: &Option<RequestMeta>,
    route: &Route<'_>,
    fallback: Option<&str>,
    member: &crate::set::Member<S>,
) -> Option<RequestMeta> {
    let model = fallback.or_else(|| meta.as_ref().and_then(RequestMeta::model))?;
    let model = member.served_name(model).or(fallback)?;
    let mut m = meta
        .clone()
        .unwrap_or_else(|| RequestMeta::unbuffered(route.endpoint()));
    m.set_model(model);
    Some(m)
}

/// Whether the upstream took the request and sent no head within its
/// first-byte timeout: the client has waited that long once already, and
/// that upstream is not tried again for it (another one may be).
fn timed_out_waiting(outcome: &Outcome) -> bool {
    matches!(outcome, Err(Error::UpstreamTimeout { phase, .. }) if *phase == Error::WAITING_FOR_HEAD)
}

/// Why no attempt could be made: every backend asked to be left alone
/// (503 with the soonest one's `retry-after`), or there is none.
fn no_attempt<S>(route: &Route<'_>, set: &crate::set::BackendSet<S>, now: u64) -> Error {
    if let Some(until) = route.resting_until(set, now) {
        let retry_after_secs = (until - now).div_ceil(1_000_000_000).max(1);
        let whose = match route.model() {
            Some(model) => format!("every upstream of model `{model}`"),
            None => "every upstream".to_owned(),
        };
        return Error::UpstreamsResting {
            message: format!(
                "{whose} asked to be left alone (429, or 503 with retry-after) for \
                 {retry_after_secs} s more"
            ),
            retry_after_secs,
        };
    }
    Error::NoUpstreamAvailable(match route.model() {
        Some(model) => format!("no upstream could be tried for model `{model}`"),
        None => "no upstream is configured".to_owned(),
    })
}

/// Await `svc`'s readiness, then call it. Boxed and built in a plain `fn`:
/// holding `S::Future` inside an `async fn` trips the compiler's
/// higher-ranked `Send` check on `Body`'s boxed error type. One box, with
/// `S::Future` in it ([`ReadyThenCall`]).
pub(crate) fn call<S>(svc: S, req: Request<Body>) -> crate::ResponseFuture
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Send + 'static,
    S::Future: Send + 'static,
{
    Box::pin(ReadyThenCall::Ready {
        svc: Some((svc, req)),
    })
}

pin_project_lite::pin_project! {
    /// `svc` driven to readiness, then called with the request (tower's
    /// `Oneshot`, for a service that answers `Error`).
    #[project = ReadyThenCallProj]
    enum ReadyThenCall<S, F> {
        Ready { svc: Option<(S, Request<Body>)> },
        Calling { #[pin] fut: F },
    }
}

impl<S> Future for ReadyThenCall<S, S::Future>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project() {
                ReadyThenCallProj::Ready { svc } => {
                    let (service, _) = svc.as_mut().expect("polled after the call was made");
                    if let Err(e) = std::task::ready!(service.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let (mut service, req) = svc.take().expect("checked above");
                    let fut = service.call(req);
                    self.set(ReadyThenCall::Calling { fut });
                }
                ReadyThenCallProj::Calling { fut } => return fut.poll(cx),
            }
        }
    }
}

/// One attempt: count it, send it, record what it says about the backend,
/// and tie the in-flight count to the response body.
///
/// The call is made (boxed, not yet polled) before the future, which holds
/// it instead of the request.
fn send<'a, S>(
    shared: &'a Shared<S>,
    state: &'a Arc<BackendState>,
    svc: S,
    req: Request<Body>,
    rests: Rests<'a>,
) -> impl Future<Output = (Outcome, Verdict)> + Send + 'a
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Send + 'static,
    S::Future: Send + 'static,
{
    // Counted at decision time, before any await: a burst decided together
    // sees its own earlier picks.
    let guard = InFlight::new(state.clone());
    let ejections = state.ejections_seen();
    let call = call(svc, req);
    async move {
        let start = Instant::now();
        let mut waiting = Waiting {
            state,
            epoch: shared.epoch,
            start,
            armed: true,
        };
        let outcome = call.await;
        waiting.armed = false;
        let (now, elapsed) = shared.epoch.now_since(start);
        let (verdict, panic_routed) = judge(
            state,
            now,
            classify(&outcome),
            elapsed,
            Some(ejections),
            rests,
        );
        let mut sample = (verdict == Verdict::Success).then_some((shared.epoch, start));
        let outcome = outcome.map(|resp| {
            resp.map(|body| {
                // A body that is over at its head (`content-length: 0`, a
                // `HEAD`) may never be polled: it is whole now.
                if sample.is_some() && http_body::Body::is_end_stream(&body) {
                    sample = None;
                    state.observe(now, elapsed);
                    state.clean_end();
                    if panic_routed {
                        state.whole_of(now, ejections);
                    }
                }
                let timed = FirstFrame::new(
                    body,
                    sample.map(|(epoch, start)| (guard.state().clone(), epoch, start)),
                    panic_routed.then_some(ejections),
                );
                Guarded::new(timed, guard).boxed_unsync()
            })
        });
        (outcome, verdict)
    }
}

/// An attempt waiting for its answer's head. Dropped armed (the request was
/// cancelled: the client hung up, or a deadline above ran out), it tells the
/// backend's latency estimate it took at least this long
/// ([`BackendState::observe_at_least`]).
struct Waiting<'a> {
    state: &'a BackendState,
    epoch: Epoch,
    start: Instant,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            let (now, elapsed) = self.epoch.now_since(self.start);
            self.state.observe_at_least(now, elapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, retry_after: Option<&str>) -> Outcome {
        let mut r = Response::new(llm_proxy_core::empty());
        *r.status_mut() = StatusCode::from_u16(status).expect("valid status");
        if let Some(v) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, v.parse().expect("header value"));
        }
        Ok(r)
    }

    #[test]
    fn verdicts() {
        assert_eq!(classify(&resp(200, None)), Verdict::Success);
        assert_eq!(classify(&resp(404, None)), Verdict::Pass);
        assert_eq!(classify(&resp(501, None)), Verdict::Pass);
        assert_eq!(classify(&resp(503, None)), Verdict::Failure);
        // Overloaded, saying when to come back: a rest, not a failure.
        assert_eq!(
            classify(&resp(503, Some("3"))),
            Verdict::Shedding(3_000_000_000)
        );
        assert_eq!(
            classify(&resp(429, Some("7"))),
            Verdict::Throttled(7_000_000_000)
        );
        assert_eq!(
            classify(&resp(429, Some("soon"))),
            Verdict::Throttled(DEFAULT_RETRY_AFTER_NS)
        );
        assert_eq!(
            classify(&resp(429, None)),
            Verdict::Throttled(DEFAULT_RETRY_AFTER_NS)
        );
        // The HTTP-date form: until then; a date gone by is no rest.
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |secs: i64| {
            let when = if secs >= 0 {
                now + Duration::from_secs(secs.unsigned_abs())
            } else {
                now - Duration::from_secs(secs.unsigned_abs())
            };
            let mut h = http::HeaderMap::new();
            let date = httpdate::fmt_http_date(when);
            h.insert(header::RETRY_AFTER, date.parse().expect("header value"));
            retry_after_ns_at(&h, now)
        };
        assert_eq!(at(900), 900_000_000_000);
        assert_eq!(at(-60), DEFAULT_RETRY_AFTER_NS);
        assert_eq!(at(0), DEFAULT_RETRY_AFTER_NS);
        let gw = Error::BadGateway {
            upstream: "a".into(),
            reason: "refused".into(),
        };
        assert_eq!(classify(&Err(gw)), Verdict::Failure);
        assert_eq!(classify(&Err(Error::InvalidBody)), Verdict::Fatal);
    }
}
