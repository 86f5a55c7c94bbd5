//! The auth layer: who is calling, may they use this, and how fast.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use llm_proxy_core::media::is_event_stream;
use llm_proxy_core::refusal::{self, StreamOptionsRefused, refuses_stream_options};
use llm_proxy_core::usage::Usage;
use llm_proxy_core::{
    Body, BoxFuture, CallerSlot, Dialect, Endpoint, Error, Identity, RequestMeta, Waited,
    call_boxed,
};
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use crate::backend::LimitBackend;
use crate::body::{Reconcile, UsageBody};
use crate::gate::Authenticated;
use crate::keys::{KeyEntry, KeySpec, KeyTable};
use crate::limit::{Decision, Status};

/// Authenticates callers, enforces model allowlists and per-key limits.
#[derive(Clone)]
pub struct AuthLayer {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) table: KeyTable,
    pub(crate) backend: Arc<LimitBackend>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("keys", &self.shared.table.len())
            .finish_non_exhaustive()
    }
}

impl AuthLayer {
    /// A layer over these keys, with in-process limits.
    pub fn new(keys: Vec<KeySpec>) -> Self {
        Self::with_backend(keys, LimitBackend::local())
    }

    /// A layer over these keys whose limits live in `backend`.
    pub fn with_backend(keys: Vec<KeySpec>, backend: LimitBackend) -> Self {
        AuthLayer {
            shared: Arc::new(Shared {
                table: KeyTable::new(keys),
                backend: Arc::new(backend),
            }),
        }
    }

    /// The key entry for the credential on `headers`, or 401.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<KeyEntry>, Error> {
        self.shared
            .table
            .authenticate(headers)
            .ok_or(Error::InvalidApiKey)
    }

    /// Every configured key (for metrics).
    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.shared.table.entries()
    }

    /// Admit one request whose tokens this layer cannot see (a WebSocket
    /// tunnel): it counts against `key`'s request limit and reserves no
    /// tokens. `Ok` with the limits' state (for [`rate_headers`]) to go
    /// on, `None` for a key without limits; `Err` with the 429 to answer,
    /// in `dialect`'s error shape.
    pub async fn acquire_request(
        &self,
        key: &KeyEntry,
        dialect: Dialect,
    ) -> Result<Option<Decision>, Response<Body>> {
        self.shared.acquire(key, 0, dialect).await
    }

    /// Admit one turn of a WebSocket session by `key` (a `response.create`
    /// message, read into `meta`): the model allowlist, then one request and
    /// the turn's token reservation against the key's limits, as the layer
    /// admits a request. Settle the [`Turn`] with its usage when it ends.
    ///
    /// # Errors
    ///
    /// [`Error::ModelNotAllowed`], or [`Error::RateLimited`] (counted in
    /// the key's `rate_limited`).
    pub async fn admit_turn(&self, key: &Arc<KeyEntry>, meta: &RequestMeta) -> Result<Turn, Error> {
        check_body(key, meta)?;
        let reserve = if key.limits.tokens.is_some() {
            key.limits.token_charge(estimate_tokens(meta))
        } else {
            0
        };
        let decision = self
            .shared
            .decide(key, reserve)
            .await
            .map_err(|denied| rate_limited(key, &denied))?;
        Ok(Turn {
            reconcile: Reconcile::new(
                self.shared.clone(),
                key.clone(),
                meta.model_arc().cloned(),
                reserve,
            )
            .held_by(decision.as_ref())
            .with_prompt(prompt_tokens(meta)),
            decision,
            given_back: None,
        })
    }

    /// Count a refused WebSocket turn (a model the key may not use, an id
    /// it may not name, …) against `key`'s request limit, as a refused
    /// request is counted over HTTP. `Err` with the 429 to answer instead
    /// when the limit is spent.
    ///
    /// # Errors
    ///
    /// [`Error::RateLimited`] (counted in the key's `rate_limited`).
    pub async fn count_refused_turn(&self, key: &Arc<KeyEntry>) -> Result<(), Error> {
        // (A refusal reserves no tokens: only a request limit can say no.)
        if key.limits.requests.is_none() {
            return Ok(());
        }
        self.shared
            .decide(key, 0)
            .await
            .map(drop)
            .map_err(|denied| rate_limited(key, &denied))
    }

    /// Charge `key` tokens it used outside any admitted turn (a response
    /// on a WebSocket whose turn cannot be told: its usage is not lost).
    pub fn charge_usage(&self, key: &Arc<KeyEntry>, model: Option<&str>, usage: Usage) {
        let mut turn = Reconcile::new(self.shared.clone(), key.clone(), None, 0);
        if let Some(model) = model {
            turn.default_model(model);
        }
        turn.settle(Some(usage));
    }

    /// Limit-store errors so far (the Redis backend's; 0 for local).
    pub fn store_errors(&self) -> u64 {
        self.shared.backend.errors()
    }
}

impl Shared {
    /// Ask `key`'s limits for one request reserving `reserve` tokens: the
    /// decision (`None` without limits), or the 429 answer.
    async fn acquire(
        &self,
        key: &KeyEntry,
        reserve: u64,
        dialect: Dialect,
    ) -> Result<Option<Decision>, Response<Body>> {
        self.decide(key, reserve).await.map_err(|denied| {
            let mut resp = rate_limited(key, &denied).into_response_in(dialect);
            rate_headers(resp.headers_mut(), &denied);
            resp
        })
    }

    /// Ask `key`'s limits for one request reserving `reserve` tokens: the
    /// decision (`None` without limits), or the denial (counted).
    async fn decide(&self, key: &KeyEntry, reserve: u64) -> Result<Option<Decision>, Decision> {
        if !key.limits.any() {
            return Ok(None);
        }
        let d = self.backend.acquire(key, reserve).await;
        if d.allowed {
            return Ok(Some(d));
        }
        key.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        Err(d)
    }
}

/// The 429 of a denied decision.
fn rate_limited(key: &KeyEntry, denied: &Decision) -> Error {
    Error::RateLimited {
        retry_after_secs: denied.retry_after.as_secs_f64().ceil() as u64,
        message: format!("key `{}` is over its limit", key.name),
    }
}

/// A WebSocket turn admitted by [`AuthLayer::admit_turn`]: its token
/// reservation, to settle with the usage the upstream reports.
pub struct Turn {
    reconcile: Reconcile,
    /// The key's limits after admitting it (`None` without limits).
    pub decision: Option<Decision>,
    /// The reservation given back by [`Turn::give_back`], until
    /// [`Turn::reserve_again`].
    given_back: Option<u64>,
}

impl std::fmt::Debug for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turn")
            .field("decision", &self.decision)
            .finish_non_exhaustive()
    }
}

impl Turn {
    /// Nothing was generated, as far as anyone knows (the upstream answered
    /// an `error` before the turn's response began): give the reservation
    /// back. The turn stays open: should a response turn out to be its
    /// after all, [`Turn::reserve_again`] when it begins, and its usage is
    /// charged in full when it ends.
    pub fn give_back(&mut self) {
        if self.given_back.is_none() {
            self.given_back = Some(self.reconcile.give_back());
        }
    }

    /// Whether the reservation was given back (and not taken again).
    pub fn is_given_back(&self) -> bool {
        self.given_back.is_some()
    }

    /// A response began for a turn whose reservation was given back: charge
    /// it again, so that a session cut before the usage comes keeps it.
    pub fn reserve_again(&mut self) {
        if let Some(amount) = self.given_back.take() {
            self.reconcile.reserve(amount);
        }
    }

    /// The model its tokens are counted under when its message named none
    /// (a `response.append`): the one its response reports.
    pub fn default_model(&mut self, model: &str) {
        self.reconcile.default_model(model);
    }

    /// The turn is over. With `usage`, the reservation is replaced by it
    /// (and the tokens counted by model); without, it stands when the turn
    /// `succeeded` as far as anyone knows (a session cut before the usage
    /// came: as a stream cut before its usage chunk), and is given back
    /// when it failed (the upstream generated nothing).
    pub fn settle(self, usage: Option<Usage>, succeeded: bool) {
        let status = if succeeded {
            http::StatusCode::OK
        } else {
            http::StatusCode::INTERNAL_SERVER_ERROR
        };
        self.reconcile.answered(status).settle(usage);
    }

    /// The turn's response was cut before its usage came (the session
    /// ended), after `delivered` output deltas reached the client: charged
    /// its reservation, or the prompt's estimate plus one token a delta
    /// when that is more, as an HTTP stream cut before its usage is.
    pub fn settle_cut(self, delivered: u64) {
        self.reconcile
            .answered(http::StatusCode::OK)
            .settle_cut(None, delivered);
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let shared = self.shared.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let admitted = admit(&shared, &mut req);
        Box::pin(async move {
            let Admitted {
                key,
                reserve,
                mut strip_usage,
                unedited,
                model,
                endpoint,
                dialect,
                metered,
                prompt,
                budget,
            } = match admitted {
                Ok(admitted) => admitted,
                Err(Refused::Plain(e)) => return Err(e),
                Err(Refused::Counted(e, key, dialect)) => {
                    // A limited key hears its limits on this answer too
                    // (DESIGN.md: headers on every response to a limited
                    // key), as the request counts: one that keeps sending
                    // what it may not is limited like any other.
                    return Ok(match shared.acquire(&key, 0, dialect).await {
                        Ok(decision) => {
                            let mut resp = e.into_response_in(dialect);
                            if let Some(d) = &decision {
                                rate_headers(resp.headers_mut(), d);
                            }
                            resp
                        }
                        Err(refusal) => refusal,
                    });
                }
            };
            let decision = match shared.acquire(&key, reserve, dialect).await {
                Ok(d) => d,
                Err(refusal) => return Ok(refusal),
            };
            let reconcile = Reconcile::new(shared.clone(), key, model, reserve)
                .with_prompt(prompt)
                .held_by(decision.as_ref());
            // The request as the client sent it, to send again should the
            // upstream refuse the `stream_options` added to it.
            let again = unedited.map(|original| (original, inner.clone()));
            let sent = match (again, call_boxed(&mut inner, req).await) {
                (Some((mut original, mut inner)), Ok(first)) => {
                    match refuses_stream_options(first, original.extensions().get::<Waited>()).await
                    {
                        (true, _refusal) => {
                            tracing::debug!(
                                "the upstream refused stream_options; retrying without"
                            );
                            strip_usage = false;
                            original.extensions_mut().insert(StreamOptionsRefused);
                            // A clone: readied before its call.
                            match std::future::poll_fn(|cx| inner.poll_ready(cx)).await {
                                Ok(()) => call_boxed(&mut inner, original).await,
                                Err(e) => Err(e),
                            }
                        }
                        (false, first) => Ok(first),
                    }
                }
                (_, sent) => sent,
            };
            let resp = match sent {
                Ok(resp) => resp,
                Err(e) => {
                    // Nothing was generated: give the reservation back.
                    reconcile.refund();
                    let Some(d) = &decision else {
                        return Err(e);
                    };
                    // The request counted: a limited key hears how much
                    // it has left on this answer too (DESIGN: headers on
                    // every response to a limited key).
                    let mut resp = e.into_response_in(dialect);
                    rate_headers(resp.headers_mut(), d);
                    return Ok(resp);
                }
            };
            let (mut parts, body) = resp.into_parts();
            strip_upstream_account_headers(&mut parts.headers);
            if let Some(d) = &decision {
                rate_headers(&mut parts.headers, d);
            }
            if !metered {
                return Ok(Response::from_parts(parts, body));
            }
            let sse = endpoint
                .stream_kind()
                .filter(|_| is_event_stream(&parts.headers));
            let reconcile = reconcile.answered(parts.status);
            if strip_usage && sse.is_some() {
                // The chunk left out changes the length.
                parts.headers.remove(http::header::CONTENT_LENGTH);
            }
            let json = is_json(&parts.headers);
            let body =
                UsageBody::client_body(body, sse, json, strip_usage, reconcile, budget.as_ref());
            Ok(Response::from_parts(parts, body))
        })
    }
}

struct Admitted {
    key: Arc<KeyEntry>,
    /// Tokens charged up front: the estimate as the token limit charges it.
    reserve: u64,
    /// The layer asked for the usage chunk: it is left out of the answer.
    strip_usage: bool,
    /// With `strip_usage`, the request before that edit.
    unedited: Option<Request<Body>>,
    model: Option<Arc<str>>,
    endpoint: Endpoint,
    /// Whose error shape the request is answered in.
    dialect: Dialect,
    /// The endpoint consumes tokens: reserve, and reconcile with its usage.
    metered: bool,
    /// The prompt's estimate in tokens (bytes / 4), for a metered endpoint.
    prompt: u64,
    /// What the events a watched answer holds count against.
    budget: Option<llm_proxy_core::BodyBudget>,
}

/// The synchronous part: key, route, model, identity, token reservation and
/// the usage request on streams.
/// Why [`admit`] refused a request.
enum Refused {
    /// Before (or without) a key whose limits the request counts against.
    Plain(Error),
    /// The body asked what the key may not have (a model off its
    /// allowlist, …): counted against the key's request limit, answered
    /// with its headers, in the request's dialect.
    Counted(Error, Arc<KeyEntry>, Dialect),
}

impl From<Error> for Refused {
    fn from(e: Error) -> Self {
        Refused::Plain(e)
    }
}

fn admit(shared: &Arc<Shared>, req: &mut Request<Body>) -> Result<Admitted, Refused> {
    if req
        .extensions()
        .get::<RequestMeta>()
        .is_some_and(RequestMeta::passed_cache)
    {
        return Err(Refused::Plain(Error::Misconfigured(
            "the auth layer sits below the cache layer, which would answer requests whose key \
             was never checked: stack the cache below auth"
                .into(),
        )));
    }
    // The gate in front of the parse layer, if any, already checked the head.
    let key = match req
        .extensions_mut()
        .remove::<Authenticated>()
        .and_then(|a| a.key_for(shared))
    {
        Some(key) => key,
        None => shared.admit_head(req)?,
    };
    if let Some(slot) = req.extensions().get::<CallerSlot>() {
        slot.set(&key.name);
    }
    let no_body = http_body::Body::is_end_stream(req.body());
    // Sent again by a layer above whose `stream_options` the upstream refused.
    let refused = req.extensions().get::<StreamOptionsRefused>().is_some();
    if let Some(allowlist) = key.allowlist() {
        req.extensions_mut().insert(allowlist);
    }
    let Some(meta) = req.extensions_mut().get_mut::<RequestMeta>() else {
        if Endpoint::from_path(req.uri().path()).is_some_and(Endpoint::has_model_body) {
            // Unparsed, its model and size are unknown: let through, it
            // would pass every allowlist and limit.
            return Err(Refused::Plain(Error::Misconfigured(
                "the auth layer needs the parse layer in front of it".into(),
            )));
        }
        return Ok(Admitted {
            key,
            reserve: 0,
            strip_usage: false,
            unedited: None,
            model: None,
            endpoint: Endpoint::Passthrough,
            dialect: Endpoint::Passthrough.dialect_at(req.uri().path()),
            metered: consumes_tokens(Endpoint::Passthrough),
            prompt: 0,
            budget: None,
        });
    };
    if let Err(e) = check_body(&key, meta) {
        let dialect = meta.endpoint().dialect_at(req.uri().path());
        return Err(if key.limits.any() {
            Refused::Counted(e, key, dialect)
        } else {
            Refused::Plain(e)
        });
    }
    meta.set_identity(Identity {
        name: key.name.clone(),
    });
    let endpoint = meta.endpoint();
    let metered = consumes_tokens(endpoint);
    let limited = metered && key.limits.tokens.is_some();
    // A request without a body (a passthrough `GET`) runs no model: it
    // reserves nothing, and its answer's `usage`, if any, is charged.
    let reserve = if limited && (meta.has_json_body() || !no_body) {
        key.limits.token_charge(estimate_tokens(meta))
    } else {
        0
    };
    // What a stream without a final count is counted as having read (an
    // unlimited key's, for which the proxy asks for none, or one cut
    // before it): the prompt's estimate.
    let prompt = if metered { prompt_tokens(meta) } else { 0 };
    let model = meta.model_arc().cloned();
    let budget = metered.then(|| meta.budget().cloned()).flatten();
    let wants_usage = limited && lacks_stream_usage(meta) && !refused;
    let unedited = wants_usage.then(|| refusal::copy_request(req));
    let strip_usage = wants_usage
        && req
            .extensions_mut()
            .get_mut::<RequestMeta>()
            .is_some_and(request_stream_usage);
    if strip_usage {
        req.extensions_mut().insert(refusal::UsageAskedByLayer);
    }
    Ok(Admitted {
        key,
        reserve,
        strip_usage,
        unedited: unedited.filter(|_| strip_usage),
        model,
        endpoint,
        dialect: endpoint.dialect_at(req.uri().path()),
        metered,
        prompt,
        budget,
    })
}

/// What a key may name in a request body: a model on its allowlist; a
/// Responses `conversation` only with `passthrough`; and, under a token
/// limit, a Responses `background` only with a bound on its output
/// (`max_output_tokens`).
///
/// Conversations are made and read through `/v1/conversations`, a
/// passthrough route, so a key without it has none of its own; and the
/// proxy knows which key made a conversation only when it saw it made (the
/// upstream holds every tenant's under one upstream key), so an id learnt
/// elsewhere must not open one.
pub fn check_body(key: &KeyEntry, meta: &RequestMeta) -> Result<(), Error> {
    if let Some(model) = meta.model()
        && !key.allows_model(model)
    {
        return Err(Error::ModelNotAllowed(model.to_owned()));
    }
    if !key.passthrough
        && matches!(
            meta.endpoint(),
            Endpoint::Responses | Endpoint::ResponsesCompact | Endpoint::ResponsesInputTokens
        )
        // Only a body that names state can hold a `conversation`: the
        // others are not built for this (see `RequestMeta::names_state`).
        && meta.names_state()
        && meta
            .json()
            .and_then(|j| j.get("conversation"))
            .is_some_and(|c| !c.is_null())
    {
        return Err(Error::RouteNotAllowed(
            "the `conversation` parameter (conversations are a passthrough API; the key lacks `passthrough`)"
                .into(),
        ));
    }
    check_background(key, meta)
}

/// A background response (`"background": true`) generates after its answer
/// has gone: its usage never passes through the proxy, so the reservation
/// is all it is charged. Under a token limit it must therefore bound itself
/// with `max_output_tokens`, its estimate (prompt bytes / 4 plus the
/// largest cap it names) must fit in the limit, which caps any one
/// reservation, and it may not continue a `previous_response_id` or a
/// `conversation` (input the estimate cannot see); otherwise a key could
/// generate without limit for 256 tokens a request.
fn check_background(key: &KeyEntry, meta: &RequestMeta) -> Result<(), Error> {
    let Some(tokens) = key.limits.tokens else {
        return Ok(());
    };
    if meta.endpoint() != Endpoint::Responses {
        return Ok(());
    }
    // Anything but absent, `null` or `false` may read as true upstream (a
    // lax server takes `"true"` or `1`): held to the checks. The parse
    // layer's check learned it: a request without one is not built here.
    if !meta.generation_caps().background {
        return Ok(());
    }
    let Some(json) = meta.json() else {
        return Ok(());
    };
    let refuse = |message: String| {
        Err(Error::UnsupportedParameter {
            param: "max_output_tokens".into(),
            message,
        })
    };
    if json
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .is_none()
    {
        return refuse(
            "a background response needs `max_output_tokens` under this key's token limit: its usage never reaches the proxy, so its estimate is its charge".into(),
        );
    }
    // Context kept upstream is input the estimate cannot see.
    for state in ["previous_response_id", "conversation"] {
        if json.get(state).is_some_and(|v| !v.is_null()) {
            return Err(Error::UnsupportedParameter {
                param: state.into(),
                message: format!(
                    "a background response cannot continue `{state}` under this key's token limit: its usage never reaches the proxy, and the context it adds is not in the request"
                ),
            });
        }
    }
    // So is what the upstream fetches or runs itself: a file or image it
    // reads by id or URL, a stored prompt, a hosted tool's results.
    if let Some((param, what)) = unseen_input(json) {
        return Err(Error::UnsupportedParameter {
            param: param.into(),
            message: format!(
                "a background response cannot use {what} under this key's token limit: its usage never reaches the proxy, and the input it adds is not in the request"
            ),
        });
    }
    let estimate = estimate_tokens(meta);
    if estimate > u64::from(tokens.limit) {
        return refuse(format!(
            "a background response is charged its estimate ({estimate} tokens: prompt bytes / 4 plus `max_output_tokens`), which must fit in this key's limit of {} tokens per minute",
            tokens.limit
        ));
    }
    Ok(())
}

/// What in a Responses body adds input the upstream gets elsewhere than
/// from the body (so that no estimate of the body counts it): the
/// parameter that names it and what it is. A stored prompt (`prompt`), a
/// hosted tool (any `tools` entry but `function`, `custom` and `namespace`,
/// a group of those: web search,
/// file search, MCP, … run upstream and feed it their results), or an
/// input part that names a file or an image by id or by URL (an image
/// written out as a `data:` URL is in the body).
fn unseen_input(json: &serde_json::Map<String, Value>) -> Option<(&'static str, &'static str)> {
    if json.get("prompt").is_some_and(|v| !v.is_null()) {
        return Some(("prompt", "a stored `prompt`"));
    }
    let hosted = |tool: &Value| {
        !matches!(
            tool.get("type").and_then(Value::as_str),
            Some("function" | "custom" | "namespace")
        )
    };
    if let Some(Value::Array(tools)) = json.get("tools")
        && tools.iter().any(hosted)
    {
        return Some(("tools", "a hosted tool (one the upstream runs)"));
    }
    let fetched = |part: &Value| {
        let Some(part) = part.as_object() else {
            return false;
        };
        let named = |field: &str| part.get(field).is_some_and(|v| !v.is_null());
        let by_url = |field: &str| {
            part.get(field)
                .and_then(Value::as_str)
                .is_some_and(|url| !url.starts_with("data:"))
        };
        named("file_id") || by_url("file_url") || by_url("image_url")
    };
    let Some(Value::Array(items)) = json.get("input") else {
        return None;
    };
    if llm_proxy_core::references_stored_items(json) {
        return Some(("input", "an item stored upstream (`item_reference`)"));
    }
    // Parts sit in a message's `content`, or a tool output's `output`.
    fn nested(item: &Value) -> impl Iterator<Item = &Value> {
        ["content", "output"]
            .into_iter()
            .filter_map(|field| item.get(field)?.as_array())
            .flatten()
    }
    let fetching = items.iter().any(fetched) || items.iter().flat_map(nested).any(fetched);
    fetching.then_some(("input", "a file or an image named by id or URL"))
}

/// Whether requests to `endpoint` consume tokens, so that they reserve
/// tokens and are reconciled with their `usage`. Counting tokens
/// (`count_tokens`, `input_tokens`), reading, cancelling or deleting a stored
/// response and listing models run no model: they count against the request
/// limit only. (`GET /v1/responses/{id}` carries the stored response's usage,
/// already charged when it was created.) Generation, embeddings, compaction
/// and passthrough routes (which may generate) are metered.
fn consumes_tokens(endpoint: Endpoint) -> bool {
    !matches!(
        endpoint,
        Endpoint::ResponsesInputTokens
            | Endpoint::ResponseById
            | Endpoint::MessagesCountTokens
            | Endpoint::Models
    )
}

/// The token reservation: prompt bytes / 4, plus the completion cap the
/// request names (`max_tokens`, `max_completion_tokens`, `max_output_tokens`;
/// the largest, when it names several), else 256, times the completions it
/// asks for (`n`, or completions' `best_of` when larger: each is generated
/// whole), times the prompts a completions `prompt` array holds (each is
/// generated for). An embedding generates nothing: its prompt alone.
/// Read from what the parse layer's check learned
/// ([`RequestMeta::generation_caps`]): the body is not built for it.
pub fn estimate_tokens(meta: &RequestMeta) -> u64 {
    if meta.endpoint() == Endpoint::Embeddings {
        return prompt_tokens(meta);
    }
    let caps = meta.generation_caps();
    if caps.unreadable {
        // `"n": 100.0` is 100 completions to a lax server: an estimate
        // that cannot read it reserves all the key may (the charge is
        // capped at the key's limit).
        return u64::MAX;
    }
    let cap = caps.max_tokens.unwrap_or(256);
    let prompts = match meta.endpoint() {
        Endpoint::Completions => caps.prompts.unwrap_or(1).max(1),
        _ => 1,
    };
    let completions = caps.choices.unwrap_or(1).max(1).saturating_mul(prompts);
    prompt_tokens(meta).saturating_add(cap.saturating_mul(completions))
}

/// The prompt's part of [`estimate_tokens`]: the body's bytes / 4.
fn prompt_tokens(meta: &RequestMeta) -> u64 {
    meta.original_body().map_or(0, |b| b.len() as u64) / 4
}

/// For a streamed chat or completions request, make sure the upstream sends
/// a usage chunk. Returns true when the client did not ask for it, so the
/// chunk must be stripped from what the client receives; false also when
/// the request's `stream_options` cannot take the ask (not an object: the
/// upstream refuses it, or the stream is counted without it).
fn request_stream_usage(meta: &mut RequestMeta) -> bool {
    if !lacks_stream_usage(meta) {
        return false;
    }
    let absent = meta
        .json()
        .is_some_and(|json| !json.contains_key("stream_options"));
    meta.ask_for_stream_usage(absent)
}

/// Whether an answer is JSON, as far as its `content-type` says (none says
/// nothing: an upstream that leaves it out answers JSON all the same).
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            ct.as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"json"))
        })
}

/// A streamed chat or completions request whose client did not ask for the
/// usage chunk.
fn lacks_stream_usage(meta: &RequestMeta) -> bool {
    meta.is_stream()
        && meta.endpoint().streams_done_sentinel()
        && meta
            .json()
            .and_then(|j| j.get("stream_options"))
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            != Some(true)
}

/// Remove from an answer what the upstream says of the operator's account
/// with the provider, not of the client's key: its rate-limit state
/// (`x-ratelimit-*`, Anthropic's `anthropic-ratelimit-*`), which falls as
/// every other key spends the account and, beside the proxy's headers (a
/// key limited in requests only), would read as the key's other limit; and
/// the account's ids (`openai-organization`, `openai-project`,
/// `anthropic-organization-id`). The auth layer does it on every answer; an
/// answer that does not pass through it (a WebSocket upgrade's) calls it
/// with [`rate_headers`].
pub fn strip_upstream_account_headers(headers: &mut HeaderMap) {
    const ACCOUNT: [&str; 3] = [
        "openai-organization",
        "openai-project",
        "anthropic-organization-id",
    ];
    // One pass over the names first: most answers have none.
    let upstream: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.starts_with("x-ratelimit-")
                || name.starts_with("anthropic-ratelimit-")
                || ACCOUNT.contains(&name)
        })
        .cloned()
        .collect();
    for name in upstream {
        headers.remove(name);
    }
}

/// The `x-ratelimit-*` headers of a decision.
pub fn rate_headers(headers: &mut HeaderMap, d: &Decision) {
    use http::HeaderName;
    // Names built once, at compile time: nothing formatted or validated per request.
    const REQUESTS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-requests"),
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-reset-requests"),
    ];
    const TOKENS: [HeaderName; 3] = [
        HeaderName::from_static("x-ratelimit-limit-tokens"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ];
    let mut put = |[limit, remaining, reset]: [HeaderName; 3], s: &Status| {
        headers.insert(limit, HeaderValue::from(s.limit));
        headers.insert(remaining, HeaderValue::from(s.remaining));
        if let Ok(value) = HeaderValue::try_from(format_reset(s.reset)) {
            headers.insert(reset, value);
        }
    };
    if let Some(s) = &d.requests {
        put(REQUESTS, s);
    }
    if let Some(s) = &d.tokens {
        put(TOKENS, s);
    }
}

/// OpenAI's reset format: `20ms`, `20s`, `6m0s`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64().ceil() as u64;
    if secs < 60 {
        format!("{secs}s")
    } else {
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use llm_proxy_core::{ParseLayer, ParseLimits, full};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    #[tokio::test]
    async fn a_responses_body_is_built_for_its_conversation_only_when_it_names_state() {
        let table = crate::KeyTable::new(vec![crate::KeySpec::from_key("k", "sk-k")]);
        let key = table.entries().next().unwrap().clone();
        for (body, built, allowed) in [
            (r#"{"model":"m","input":"hi"}"#, false, true),
            (r#"{"model":"m","conversation":null}"#, true, true),
            (r#"{"model":"m","conversation":"conv_1"}"#, true, false),
        ] {
            let req = http::Request::post("/v1/responses")
                .body(llm_proxy_core::full(body))
                .unwrap();
            let req = llm_proxy_core::parse(req, 1000).await.unwrap();
            let meta = req.extensions().get::<RequestMeta>().unwrap();
            assert_eq!(check_body(&key, meta).is_ok(), allowed, "{body}");
            assert_eq!(meta.is_built(), built, "{body}");
        }
    }

    /// An auth stack with one key, `sk`, of `tpm` tokens per minute, over an
    /// upstream that answers `status` with `body`.
    fn stack(
        tpm: u32,
        status: u16,
        body: &'static str,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone {
        stack_typed(tpm, status, "application/json", body)
    }

    /// [`stack`] whose upstream answers with `content_type`.
    fn stack_typed(
        tpm: u32,
        status: u16,
        content_type: &'static str,
        body: &'static str,
    ) -> impl Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone {
        let mut key = KeySpec::from_key("k", "sk");
        key.tokens_per_minute = Some(tpm);
        ServiceBuilder::new()
            .layer(ParseLayer::new(ParseLimits::default()))
            .layer(AuthLayer::new(vec![key]))
            .service(service_fn(move |_req: Request<Body>| async move {
                let mut resp = Response::new(full(body));
                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type),
                );
                Ok::<_, Error>(resp)
            }))
    }

    /// Send `body` to `path` and read the whole answer (which settles it).
    async fn call(
        svc: &(impl Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone),
        path: &str,
        body: String,
    ) -> (u16, Option<u32>) {
        let req = Request::post(path)
            .header("authorization", "Bearer sk")
            .header("content-type", "application/json")
            .header("anthropic-version", "2023-06-01")
            .body(full(body))
            .unwrap();
        let resp = svc.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let remaining = resp
            .headers()
            .get("x-ratelimit-remaining-tokens")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        resp.into_body().collect().await.unwrap();
        (status, remaining)
    }

    /// A chat request of about `prompt` estimated prompt tokens.
    fn chat_body(prompt: usize, max_tokens: u64) -> String {
        serde_json::json!({"model": "m", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "x".repeat(prompt * 4)}]})
        .to_string()
    }

    const USAGE_610: &str = r#"{"usage":{"prompt_tokens":602,"completion_tokens":8}}"#;

    #[tokio::test]
    async fn a_huge_max_tokens_settles_against_what_was_charged() {
        let svc = stack(1000, 200, USAGE_610);
        let (status, remaining) =
            call(&svc, "/v1/chat/completions", chat_body(600, 1_000_000)).await;
        assert_eq!(
            (status, remaining),
            (200, Some(0)),
            "charged the whole limit"
        );
        // Settled at 610 used: 390 left, so the next whole-limit charge waits.
        let (status, remaining) =
            call(&svc, "/v1/chat/completions", chat_body(600, 1_000_000)).await;
        assert_eq!((status, remaining), (429, Some(390)));
    }

    #[tokio::test]
    async fn a_token_reservation_does_not_build_the_body() {
        let mut key = KeySpec::from_key("k", "sk");
        key.tokens_per_minute = Some(10_000);
        let built = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = built.clone();
        let svc = ServiceBuilder::new()
            .layer(ParseLayer::new(ParseLimits::default()))
            .layer(AuthLayer::new(vec![key]))
            .service(service_fn(move |req: Request<Body>| {
                let meta = req.extensions().get::<RequestMeta>().unwrap();
                seen.lock()
                    .unwrap()
                    .push((meta.is_built(), meta.is_edited()));
                async { Ok::<_, Error>(Response::new(full("{}"))) }
            }));
        // 40 bytes of prompt (10 tokens), two completions of at most 300.
        let body = format!("{:<40}", r#"{"model":"m","max_tokens":300,"n":2}"#);
        let (status, remaining) = call(&svc, "/v1/chat/completions", body).await;
        assert_eq!((status, remaining), (200, Some(10_000 - 610)));
        // Nor a Responses request (its `background` is learned by the
        // check), streamed or not, nor a streamed Messages request (its usage
        // comes without asking). A streamed chat request is: its
        // `stream_options` are read; lacking, they are added to the client's
        // bytes, which are sent as they are (not re-serialised).
        for (path, body) in [
            (
                "/v1/responses",
                r#"{"model":"m","input":"hi","background":false}"#,
            ),
            (
                "/v1/responses",
                r#"{"model":"m","input":"hi","stream":true}"#,
            ),
            (
                "/v1/messages",
                r#"{"model":"m","max_tokens":9,"messages":[],"stream":true}"#,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"m","messages":[],"stream":true}"#,
            ),
        ] {
            let (status, _) = call(&svc, path, body.to_owned()).await;
            assert_eq!(status, 200, "{path} {body}");
        }
        let plain = (false, false);
        assert_eq!(
            *built.lock().unwrap(),
            [plain, plain, plain, plain, (true, false)]
        );
    }

    #[tokio::test]
    async fn counting_tokens_and_reading_a_response_cost_no_tokens() {
        // The stored response's usage must not be charged again on a read.
        let svc = stack(1000, 200, USAGE_610);
        for path in [
            "/v1/messages/count_tokens",
            "/v1/responses/input_tokens",
            "/v1/responses/resp_1/cancel",
        ] {
            for _ in 0..3 {
                let (status, remaining) = call(&svc, path, chat_body(500, 100)).await;
                assert_eq!((status, remaining), (200, Some(1000)), "{path}");
            }
        }
        let (status, remaining) = call(&svc, "/v1/chat/completions", chat_body(10, 10)).await;
        assert_eq!(status, 200);
        assert!(remaining.unwrap() < 1000, "generation is still charged");
    }

    #[tokio::test]
    async fn an_error_answer_without_usage_is_refunded() {
        let err = r#"{"error":{"message":"bad","type":"invalid_request_error"}}"#;
        for status in [400, 500] {
            let svc = stack(2000, status, err);
            let (got, remaining) = call(&svc, "/v1/chat/completions", chat_body(5, 1500)).await;
            assert_eq!(got, status);
            assert!(remaining.unwrap() < 1000, "reserved while in flight");
            let (got, remaining) = call(&svc, "/v1/chat/completions", chat_body(5, 1500)).await;
            assert_eq!(got, status, "the first reservation was given back");
            assert!(remaining.unwrap() < 1000);
        }
        // A success without usage (e.g. a stream cut short) keeps its charge.
        let svc = stack(2000, 200, "{}");
        assert_eq!(
            call(&svc, "/v1/chat/completions", chat_body(5, 1500))
                .await
                .0,
            200
        );
        assert_eq!(
            call(&svc, "/v1/chat/completions", chat_body(5, 1500))
                .await
                .0,
            429
        );
    }

    /// An error status sent as an event stream generated nothing, however
    /// many events it has: refunded like any error answer.
    #[tokio::test]
    async fn an_error_status_as_a_stream_is_refunded() {
        let err = "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
        let svc = stack_typed(2000, 503, "text/event-stream", err);
        let body = || {
            serde_json::json!({"model": "m", "max_tokens": 1500, "stream": true,
                "messages": [{"role": "user", "content": "x"}]})
            .to_string()
        };
        assert_eq!(call(&svc, "/v1/chat/completions", body()).await.0, 503);
        assert_eq!(
            call(&svc, "/v1/chat/completions", body()).await.0,
            503,
            "the first reservation was given back"
        );
    }

    /// A body that is neither JSON nor an event stream (a file) is not read
    /// for usage, whatever bytes it holds.
    #[tokio::test]
    async fn a_file_is_not_read_for_usage() {
        // Over the 1 MiB kept whole, with a usage-looking tail.
        let file: &'static str = format!(
            "PK\u{3}\u{4}{}{{\"usage\":{{\"prompt_tokens\":900,\"completion_tokens\":90}}}}",
            "x".repeat(2 << 20)
        )
        .leak();
        let svc = stack_typed(1000, 200, "application/octet-stream", file);
        call(&svc, "/v1/chat/completions", chat_body(1, 10)).await;
        let (_, remaining) = call(&svc, "/v1/chat/completions", chat_body(1, 10)).await;
        assert!(remaining.unwrap() > 900, "{remaining:?}");
    }

    #[tokio::test]
    async fn huge_upstream_usage_is_no_usage_and_charges_the_reservation() {
        // Past any context window (core's `MAX_TOKENS`): neither a credit
        // (a sum that wraps) nor a year of the limit overdrawn.
        for n in ["1000000001", "9223372036854775808", "18446744073709551615"] {
            let body: &'static str =
                format!(r#"{{"usage":{{"prompt_tokens":{n},"completion_tokens":{n}}}}}"#).leak();
            let svc = stack(1000, 200, body);
            let (status, first) = call(&svc, "/v1/chat/completions", chat_body(5, 10)).await;
            assert_eq!(status, 200);
            let (status, second) = call(&svc, "/v1/chat/completions", chat_body(5, 10)).await;
            assert_eq!(status, 200, "usage {n}");
            let (first, second) = (first.unwrap(), second.unwrap());
            assert!(
                second < first && second > 900,
                "usage {n}: {first} then {second}"
            );
        }
    }

    #[test]
    fn reset_format() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_secs(20)), "20s");
        assert_eq!(format_reset(Duration::from_millis(19_200)), "20s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }

    /// `body` for `endpoint`, as the parse layer leaves it.
    fn meta_of(endpoint: Endpoint, body: &str) -> RequestMeta {
        RequestMeta::parsed(
            endpoint,
            bytes::Bytes::from(body.to_owned()),
            serde_json::from_str(body).unwrap(),
        )
    }

    #[test]
    fn estimate_uses_prompt_bytes_and_cap() {
        let body = r#"{"model":"m","max_tokens":100,"messages":[]}"#;
        let meta = meta_of(Endpoint::ChatCompletions, body);
        assert_eq!(estimate_tokens(&meta), body.len() as u64 / 4 + 100);
        let body = r#"{"model":"m"}"#;
        let meta = meta_of(Endpoint::ChatCompletions, body);
        assert_eq!(estimate_tokens(&meta), body.len() as u64 / 4 + 256);
        // Each of `n` completions (or `best_of`, the larger) is generated
        // whole; zero counts as one. Each prompt of a completions `prompt`
        // array is generated for, `n` times; token ids are one prompt; only
        // a completions body's `prompt` is a list of prompts.
        let (chat, completions) = (Endpoint::ChatCompletions, Endpoint::Completions);
        for (endpoint, body, generated) in [
            (chat, r#"{"model":"m","max_tokens":10,"n":100}"#, 100),
            (
                chat,
                r#"{"model":"m","max_tokens":10,"n":2,"best_of":5}"#,
                5,
            ),
            (chat, r#"{"model":"m","max_tokens":10,"n":0}"#, 1),
            (
                chat,
                r#"{"model":"m","max_tokens":10,"prompt":["a","b","c"]}"#,
                1,
            ),
            (
                completions,
                r#"{"model":"m","max_tokens":10,"prompt":["a","b","c"]}"#,
                3,
            ),
            (
                completions,
                r#"{"model":"m","max_tokens":10,"prompt":["a","b"],"n":4}"#,
                8,
            ),
            (
                completions,
                r#"{"model":"m","max_tokens":10,"prompt":[[1,2],[3]]}"#,
                2,
            ),
            (
                completions,
                r#"{"model":"m","max_tokens":10,"prompt":[1,2,3]}"#,
                1,
            ),
            (
                completions,
                r#"{"model":"m","max_tokens":10,"prompt":"a"}"#,
                1,
            ),
            (
                completions,
                r#"{"model":"m","max_tokens":10,"prompt":[]}"#,
                1,
            ),
        ] {
            let meta = meta_of(endpoint, body);
            assert_eq!(
                estimate_tokens(&meta),
                body.len() as u64 / 4 + 10 * generated,
                "{endpoint:?} {body}"
            );
        }
        // A count a lax server reads as 9 (or 100), which the estimate
        // cannot: all there is (capped at the key's limit when charged).
        for body in [
            r#"{"model":"m","max_tokens":10,"n":"9"}"#,
            r#"{"model":"m","max_tokens":10,"n":100.0}"#,
        ] {
            let meta = meta_of(Endpoint::ChatCompletions, body);
            assert_eq!(estimate_tokens(&meta), u64::MAX, "{body}");
        }
        // An embedding generates nothing, however many `n` it names.
        let body = r#"{"model":"m","input":"hello","n":4}"#;
        let meta = meta_of(Endpoint::Embeddings, body);
        assert_eq!(estimate_tokens(&meta), body.len() as u64 / 4);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod stacking_tests {
    use super::*;
    use http_body_util::BodyExt;
    use llm_proxy_core::{ParseLayer, ParseLimits, full};
    use std::sync::atomic::AtomicUsize;
    use tower::limit::ConcurrencyLimitLayer;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    fn limited_key() -> KeySpec {
        let mut key = KeySpec::from_key("k", "sk");
        key.tokens_per_minute = Some(100_000);
        key.models = Some(vec!["allowed".into()]);
        key
    }

    fn chat(model: &str, stream: bool) -> Request<Body> {
        let body = serde_json::json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "x"}]});
        Request::post("/v1/chat/completions")
            .header("authorization", "Bearer sk")
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap()
    }

    /// The resend without `stream_options` goes through an inner service
    /// that pushes back (which panics when called unready).
    #[tokio::test]
    async fn the_resend_without_stream_options_readies_its_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let upstream = service_fn(move |_req: Request<Body>| {
            let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                let mut resp = if first {
                    let mut resp = Response::new(full(
                        r#"{"error":{"message":"unknown field stream_options"}}"#,
                    ));
                    *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                    resp
                } else {
                    Response::new(full("data: {\"choices\":[]}\n\ndata: [DONE]\n\n"))
                };
                let kind = if first {
                    "application/json"
                } else {
                    "text/event-stream"
                };
                resp.headers_mut()
                    .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(kind));
                Ok::<_, Error>(resp)
            }
        });
        let svc = ServiceBuilder::new()
            .layer(ParseLayer::new(ParseLimits::default()))
            .layer(AuthLayer::new(vec![limited_key()]))
            .layer(ConcurrencyLimitLayer::new(1))
            .service(upstream);
        let resp = svc.oneshot(chat("allowed", true)).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "sent again without it");
    }

    /// Without the parse layer in front, a model request is refused as a
    /// misconfiguration, not let past the key's allowlist.
    #[tokio::test]
    async fn a_model_request_unparsed_is_refused() {
        let upstream = service_fn(|_req: Request<Body>| async {
            Ok::<_, Error>(Response::new(full("generated")))
        });
        let svc = ServiceBuilder::new()
            .layer(AuthLayer::new(vec![limited_key()]))
            .layer(ParseLayer::new(ParseLimits::default()))
            .service(upstream);
        let err = svc.oneshot(chat("forbidden", false)).await.unwrap_err();
        assert!(matches!(err, Error::Misconfigured(_)), "{err}");
        assert_eq!(err.status(), 500);
    }

    /// A key without limits is not run through the limiter: no decision
    /// (so no `x-ratelimit-*` headers, and with Redis no round trip per
    /// request); a limited key gets one.
    #[tokio::test]
    async fn a_key_without_limits_gets_no_decision() {
        let mut rpm = KeySpec::from_key("rpm", "sk-rpm");
        rpm.requests_per_minute = Some(5);
        let layer = AuthLayer::new(vec![KeySpec::from_key("free", "sk-free"), rpm]);
        let key = |name: &str| layer.keys().find(|k| &*k.name == name).unwrap().clone();
        let free = layer.acquire_request(&key("free"), Dialect::OpenAi).await;
        assert!(free.unwrap().is_none());
        let limited = layer.acquire_request(&key("rpm"), Dialect::OpenAi).await;
        assert!(limited.unwrap().is_some());
    }
}
