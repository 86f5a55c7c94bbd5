//! [`Cache`]: the service that answers from the store, coalesces identical
//! requests in flight, and tees misses into the store.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, header};
use llm_proxy_core::canonical::holds_inexact_integer;
use llm_proxy_core::fallback::ServedByFallback;
use llm_proxy_core::{
    Body, BodyBudget, BudgetHold, Dialect, Endpoint, Error, RequestMeta, StreamKind, UsageFilter,
    Waited, empty,
};
use serde_json::{Map, Value};
use tower::ServiceExt;
use tower_service::Service;

use crate::body::{CacheBody, JsonRule, Tee, Watch};
use crate::flight::{Flights, Head, Joined, Leader};
use crate::replay::{self, CacheStatus};
use crate::stats::Counters;
use crate::{CacheConfig, CacheControl, CacheKey, Entry, EntryBody, Store, StoreError};
use llm_proxy_core::refusal::{
    StreamOptionsRefused, UsageAskedByLayer, copy_head, refuses_stream_options,
};

/// What every clone of a [`Cache`] shares.
pub(crate) struct Shared {
    pub config: CacheConfig,
    pub store: Arc<dyn Store>,
    pub counters: Arc<Counters>,
    pub flights: Arc<Flights>,
}

/// The cache service of [`CacheLayer`](crate::CacheLayer) around `S`.
#[derive(Clone)]
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("config", &self.shared.config)
            .field("store", &self.shared.store.kind())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// [`Store::get`]; the memory store without its boxed future.
    pub(crate) async fn get(&self, key: CacheKey) -> Result<Option<Entry>, StoreError> {
        match self.store.as_memory() {
            Some(memory) => Ok(memory.get_now(&key)),
            None => self.store.get(key).await,
        }
    }

    /// [`Store::put`] for the configured TTL; the memory store without its
    /// boxed future. `Ok(false)`: the memory store did not keep it (too
    /// large).
    pub(crate) async fn put(&self, key: CacheKey, entry: Entry) -> Result<bool, StoreError> {
        match self.store.as_memory() {
            Some(memory) => Ok(memory.put_now(key, entry, self.config.ttl)),
            None => self
                .store
                .put(key, entry, self.config.ttl)
                .await
                .map(|()| true),
        }
    }
}

impl<S> Cache<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Cache { inner, shared }
    }
}

use llm_proxy_core::BoxFuture;

/// What the cache will do with one request it serves.
struct Plan {
    key: CacheKey,
    control: CacheControl,
    /// A stream (chat/completions, Responses or Messages): stored as SSE
    /// frames once it ended cleanly in its own dialect. `None`: a JSON answer.
    stream: Option<StreamKind>,
    /// A Responses request: a JSON answer is stored only when `completed`.
    responses: bool,
    /// The request asks for the usage chunk (`stream_options.include_usage`).
    wants_usage: bool,
    /// The client asked for it (not a layer above for itself, see
    /// [`UsageAskedByLayer`]): a stream without it because the upstream
    /// refused `stream_options` is no answer to this request.
    client_wants_usage: bool,
    /// The body has no `stream_options`: asking for the usage chunk adds
    /// the field to its bytes, without building the body.
    no_stream_options: bool,
    /// Shared scope under auth: the requests coalesced on this one may
    /// come from keys with other model allowlists.
    shared_across_keys: bool,
    /// Whose error shape the client reads.
    dialect: Dialect,
    /// What the answer's frames kept, and the events a watched stream
    /// holds, count against.
    budget: Option<BodyBudget>,
}

impl Plan {
    /// `None` for a request the cache does not serve.
    fn of(req: &Request<Body>, config: &CacheConfig) -> Option<Plan> {
        let meta = req.extensions().get::<RequestMeta>()?;
        let endpoint = meta.endpoint();
        let Keyed {
            key,
            wants_usage,
            no_stream_options,
        } = match Plan::keyed_flat(req, meta, config) {
            Some(keyed) => keyed?,
            None => Plan::keyed_built(req, meta, config)?,
        };
        Some(Plan {
            key,
            control: CacheControl::from_headers(req.headers()),
            stream: meta.is_stream().then(|| endpoint.stream_kind()).flatten(),
            responses: endpoint == Endpoint::Responses,
            wants_usage,
            client_wants_usage: wants_usage
                && req.extensions().get::<UsageAskedByLayer>().is_none(),
            no_stream_options,
            shared_across_keys: config.scope == crate::CacheScope::Shared
                && meta.identity().is_some(),
            dialect: endpoint.dialect(),
            budget: meta.budget().cloned(),
        })
    }

    /// The key of a chat completions, completions or embeddings request,
    /// and what its `stream_options` ask, made from its
    /// bytes in one pass ([`CacheKey::for_flat_request`]); `Some(None)`
    /// when the cache does not serve it, `None` when it must be read from
    /// the parsed body ([`Plan::keyed_built`]). Decides as that does.
    fn keyed_flat(
        req: &Request<Body>,
        meta: &RequestMeta,
        config: &CacheConfig,
    ) -> Option<Option<Keyed>> {
        let chat = meta.endpoint() == Endpoint::ChatCompletions;
        let mut served = true;
        let flat = CacheKey::for_flat_request(
            meta,
            req.headers(),
            req.uri().query(),
            config.scope,
            &config.key_headers,
            |field, value| {
                // `set` and `asks_to_be_stored`, on the canonical bytes.
                served &= !(chat
                    && match field {
                        "web_search_options" => value != b"null",
                        "store" => value != b"null" && value != b"false",
                        _ => false,
                    });
            },
        )?;
        let served = served && !flat.inexact_integer;
        let wants_usage = flat
            .stream_options
            .as_ref()
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        Some(served.then_some(Keyed {
            key: flat.key,
            wants_usage,
            no_stream_options: flat.stream_options.is_none(),
        }))
    }

    /// The key of a request the cache serves, and what its `stream_options`
    /// ask, read from its parsed body.
    fn keyed_built(req: &Request<Body>, meta: &RequestMeta, config: &CacheConfig) -> Option<Keyed> {
        let json = meta.json()?;
        let served = match meta.endpoint() {
            Endpoint::ChatCompletions => {
                !set(json, "web_search_options") && !asks_to_be_stored(json)
            }
            Endpoint::Completions | Endpoint::Embeddings => true,
            Endpoint::Messages => {
                !reads_outside_state(json, MESSAGES_SERVER_TOOLS)
                    && !set(json, "container")
                    && !set(json, "mcp_servers")
            }
            Endpoint::Responses => {
                is_stateless_response(json) && !reads_outside_state(json, RESPONSES_HOSTED_TOOLS)
            }
            _ => false,
        };
        // An integer beyond 64 bits was parsed to the nearest `f64`: bodies
        // that differ in it would share a key (and one would get the other's
        // answer), so such a body is not served at all.
        let served = served && !json.values().any(holds_inexact_integer);
        if !served {
            return None;
        }
        let key = CacheKey::for_request_with(
            meta,
            req.headers(),
            req.uri().query(),
            config.scope,
            &config.key_headers,
        )?;
        Some(Keyed {
            key,
            wants_usage: include_usage(json) == Some(true),
            no_stream_options: !json.contains_key("stream_options"),
        })
    }

    /// A chat or completions stream whose client did not ask for the usage
    /// chunk: the cache asks for it, stores it, and keeps it from the client.
    /// Responses and Messages streams always carry their usage: never.
    fn strips_usage(&self) -> bool {
        self.stream == Some(StreamKind::Chat) && !self.wants_usage
    }
}

/// A request's key, and what its `stream_options` ask.
struct Keyed {
    key: CacheKey,
    /// `stream_options.include_usage` is `true`.
    wants_usage: bool,
    /// There is no `stream_options`.
    no_stream_options: bool,
}

/// Whether a `POST /v1/responses` body leaves no state on the server and
/// reads none, so that its answer may be cached: `store` explicitly `false`
/// (the API stores by default), no `previous_response_id`, no `conversation`
/// (`null` counts as absent), no `background: true`, and no input item that
/// is a reference to an item the upstream keeps (`item_reference`).
fn is_stateless_response(json: &Map<String, Value>) -> bool {
    json.get("store") == Some(&Value::Bool(false))
        && !set(json, "previous_response_id")
        && !set(json, "conversation")
        && json.get("background") != Some(&Value::Bool(true))
        && !llm_proxy_core::references_stored_items(json)
}

/// Whether a chat completions body asks the upstream to keep its answer
/// (OpenAI's stored completions: `store` there and neither `null` nor
/// `false`; a lax server may read `"true"` or `1` as true). The stored
/// answer is fetched, listed and evaluated by its id upstream: a replay
/// would record nothing there, and hand the client an id made for another
/// request.
fn asks_to_be_stored(json: &Map<String, Value>) -> bool {
    set(json, "store") && json.get("store") != Some(&Value::Bool(false))
}

/// Whether `field` is in the body and not `null`.
fn set(json: &Map<String, Value>, field: &str) -> bool {
    json.get(field).is_some_and(|v| !v.is_null())
}

/// Types (prefixes) of the Responses tools the upstream runs itself, whose
/// results come from outside the request: files in vector stores, the web,
/// a code container, MCP servers, image generation.
const RESPONSES_HOSTED_TOOLS: &[&str] = &[
    "code_interpreter",
    "file_search",
    "image_generation",
    "mcp",
    "web_search",
];

/// Types (prefixes) of Anthropic's server tools (run by the API, not the
/// client): web search and fetch, code execution in a container.
const MESSAGES_SERVER_TOOLS: &[&str] = &["code_execution", "web_fetch", "web_search"];

/// Whether a tool of the body has a type starting with one of `types`: the
/// answer then depends on more than the body.
fn reads_outside_state(json: &Map<String, Value>, types: &[&str]) -> bool {
    let Some(Value::Array(tools)) = json.get("tools") else {
        return false;
    };
    tools.iter().any(|tool| {
        tool.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| types.iter().any(|prefix| t.starts_with(prefix)))
    })
}

fn include_usage(json: &Map<String, Value>) -> Option<bool> {
    json.get("stream_options")?.get("include_usage")?.as_bool()
}

impl<S> Service<Request<Body>> for Cache<S>
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
        // An embedder's own auth names the caller in the extensions (see
        // `CacheScope::PerKey`). A model request the parse layer did not
        // read: the cache cannot key it, and bypassing it quietly would hide
        // that the stack is built wrong (an embedder's, without the parse
        // layer in front).
        let named = req.extensions().get::<llm_proxy_core::Identity>().cloned();
        let unparsed = match req.extensions_mut().get_mut::<RequestMeta>() {
            Some(meta) => {
                // (An auth layer below refuses it: it must sit above the
                // cache.)
                meta.mark_passed_cache();
                if let Some(identity) = named.filter(|_| meta.identity().is_none()) {
                    meta.set_identity(identity);
                }
                false
            }
            None => true,
        };
        if unparsed && Endpoint::from_path(req.uri().path()).is_some_and(Endpoint::has_model_body) {
            // What `poll_ready` reserved goes back with the readied service.
            let clone = self.inner.clone();
            drop(std::mem::replace(&mut self.inner, clone));
            return Box::pin(async {
                Err(Error::Misconfigured(
                    "the cache needs the parse layer in front of it: it keys model requests \
                     by their parsed body"
                        .into(),
                ))
            });
        }
        let plan = Plan::of(&req, &self.shared.config).filter(|plan| !plan.control.no_store);
        let Some(plan) = plan else {
            Counters::bump(&self.shared.counters.bypasses);
            let dialect = req
                .extensions()
                .get::<RequestMeta>()
                .map_or(Dialect::OpenAi, |meta| meta.endpoint().dialect());
            if CacheControl::from_headers(req.headers()).only_if_cached {
                // Nothing stored can answer it (`no-store`, or a request the
                // cache does not serve), and it may not go upstream: what
                // `poll_ready` reserved goes back with the readied service.
                let clone = self.inner.clone();
                drop(std::mem::replace(&mut self.inner, clone));
                let response = not_cached(dialect, CacheStatus::Bypass);
                return Box::pin(async move { Ok(response) });
            }
            let clone = self.inner.clone();
            let mut ready = std::mem::replace(&mut self.inner, clone);
            let future: BoxFuture = Box::pin(ready.call(req));
            return Box::pin(async move { marked(future.await, dialect, CacheStatus::Bypass) });
        };
        // The service `poll_ready` readied goes with the request (a clone
        // takes its place): what it reserved is this request's, held while
        // the request waits (for the store, for a flight) and given back
        // when it is answered without the inner service.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(serve(ready, self.shared.clone(), plan, req))
    }
}

/// The inner service a request will call, if it calls one: the one
/// `poll_ready` readied (what it reserved held for this request), or, once
/// the request has given that back, a clone to ready when it calls.
enum Inner<S> {
    Ready(S),
    Unready(S),
}

impl<S> Inner<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Give back what `poll_ready` reserved (a follower waits for another
    /// request's answer: a slot of a concurrency limit below would be held
    /// for nothing, and might be the one its leader needs).
    fn unready(&mut self) {
        if let Inner::Ready(ready) = self {
            *self = Inner::Unready(ready.clone());
        }
    }

    fn call(self, req: Request<Body>) -> BoxFuture {
        match self {
            Inner::Ready(mut ready) => boxed(ready.call(req)),
            Inner::Unready(inner) => boxed(inner.oneshot(req)),
        }
    }

    fn clone_unready(&self) -> S {
        match self {
            Inner::Ready(s) | Inner::Unready(s) => s.clone(),
        }
    }
}

/// `ready` has been polled ready: its first call needs no `poll_ready`.
///
/// Not an `async fn`, whose future would hold its arguments twice (as
/// arguments and as locals), the request among them.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn's future holds its arguments twice"
)]
fn serve<S>(
    ready: S,
    shared: Arc<Shared>,
    plan: Plan,
    req: Request<Body>,
) -> impl Future<Output = Result<Response<Body>, Error>> + Send + 'static
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    async move {
        let counters = &shared.counters;
        if plan.control.only_if_cached {
            // The inner service, readied, is dropped unused: what it reserved
            // goes back.
            drop(ready);
            return Ok(from_store_only(&shared, &plan).await);
        }
        let mut inner = Inner::Ready(ready);
        if plan.control.no_cache {
            Counters::bump(&counters.bypasses);
            let leader = Leader::detached(plan.key);
            return fetch(inner, &shared, &plan, req, leader, CacheStatus::Bypass).await;
        }
        // One wait for the whole request: a follower whose leader fails
        // follows the next one, but not for another `max_wait` each time (N
        // identical requests to a hung upstream would be answered one
        // `first_byte_timeout` after another).
        let mut deadline = None;
        loop {
            match shared.flights.join(plan.key) {
                Joined::Lead(leader) => {
                    if let Some(entry) = lookup(&shared, &plan).await {
                        Counters::bump(&counters.hits);
                        let response = replay_entry(&plan, &entry);
                        leader.serve(|| (head_of(&entry), entry_frames(&entry)));
                        return Ok(response);
                    }
                    Counters::bump(&counters.misses);
                    return fetch(inner, &shared, &plan, req, leader, CacheStatus::Miss).await;
                }
                Joined::Follow(follower) => {
                    inner.unready();
                    // A request, once: not again when it follows the next
                    // leader after its first one failed.
                    if deadline.is_none() {
                        Counters::bump(&counters.coalesced);
                    }
                    let head = poll_fn(|cx| follower.poll_head(cx));
                    // (Set on the first wait: a leader reads no clock for it.)
                    let until = *deadline.get_or_insert_with(|| {
                        tokio::time::Instant::now() + shared.config.max_wait
                    });
                    // The wait for the leader's answer is the upstream's
                    // time, not the proxy's.
                    let waited = req.extensions().get::<Waited>();
                    let alone = match Waited::timing(waited, tokio::time::timeout_at(until, head))
                        .await
                    {
                        Ok(Ok(head)) => {
                            let age = head
                                .stored_at_ms
                                .map_or(0, |at| crate::clock::now_ms().saturating_sub(at));
                            let age = std::time::Duration::from_millis(age);
                            if plan.control.max_age.is_some_and(|max| age > max) {
                                // A stored answer too old for this request: the
                                // flight has left the map, so this one leads next.
                                continue;
                            }
                            match plan.stream {
                                // A stream that lacks the usage chunk this
                                // request's client asked for, because the
                                // upstream refused `stream_options`: the
                                // upstream's own answer to it is what it
                                // gets.
                                Some(_) if head.usage_refused && plan.client_wants_usage => {
                                    follower
                                }
                                Some(kind) => {
                                    Counters::bump(&counters.hits);
                                    let filter = plan.strips_usage();
                                    return Ok(replay::from_flight(
                                        follower,
                                        &head,
                                        kind,
                                        filter,
                                        age.as_secs(),
                                    ));
                                }
                                None => {
                                    // A JSON answer: read whole before it
                                    // is answered (see
                                    // `Follower::poll_whole`).
                                    let mut frames = Vec::new();
                                    let whole = poll_fn(|cx| follower.poll_whole(&mut frames, cx));
                                    if Waited::timing(waited, whole).await.is_ok() {
                                        Counters::bump(&counters.hits);
                                        return Ok(replay::whole_from_flight(
                                            &head,
                                            frames,
                                            age.as_secs(),
                                        ));
                                    }
                                    // No answer to share (an error sent
                                    // with `200`, say), or none at all: each
                                    // follower asks the upstream itself, at
                                    // once, as it would without a cache,
                                    // rather than lead the next flight in
                                    // turn.
                                    follower
                                }
                            }
                        }
                        // The leader failed before its head: start over.
                        Ok(Err(_retry)) => continue,
                        Err(_elapsed) => follower,
                    };
                    drop(alone);
                    Counters::bump(&counters.misses);
                    let leader = Leader::detached(plan.key);
                    return fetch(inner, &shared, &plan, req, leader, CacheStatus::Miss).await;
                }
            }
        }
    }
}

/// The stored entry for the plan, if there is one fresh enough. A store
/// error is a miss.
async fn lookup(shared: &Shared, plan: &Plan) -> Option<Entry> {
    if !shared.counters.store_allowed() {
        return None;
    }
    let entry = match shared.get(plan.key).await {
        Ok(entry) => {
            shared.counters.store_ok();
            entry?
        }
        Err(error) => {
            shared
                .counters
                .store_error(shared.store.kind(), "get", &error);
            return None;
        }
    };
    // An entry of the wrong kind for the request can only come from a
    // damaged or foreign store (`stream` is in the key): never replayed.
    if plan.stream.is_some() != matches!(entry.body, crate::EntryBody::Stream { .. }) {
        let error = StoreError::Corrupt(crate::entry::DecodeError::wrong_kind());
        shared
            .counters
            .store_error(shared.store.kind(), "get", &error);
        return None;
    }
    // This proxy's own TTL too: a shared store holds entries for as long as
    // the proxy that wrote them said (an older config's, another
    // instance's).
    let age = entry.age(crate::clock::now_ms());
    let too_old = age > shared.config.ttl || plan.control.max_age.is_some_and(|max| age > max);
    // Stored without the usage chunk this request's client asked for,
    // because the upstream refused `stream_options`: not its answer.
    let refused = plan.client_wants_usage && entry.usage_refused();
    (!too_old && !refused).then_some(entry)
}

/// The answer to an `only-if-cached` request: a stored entry, or a 504.
/// It joins no flight: an answer still on its way from the upstream is not
/// stored yet, and waiting for the upstream is what the client ruled out.
async fn from_store_only(shared: &Shared, plan: &Plan) -> Response<Body> {
    let counters = &shared.counters;
    if plan.control.no_cache {
        // No stored answer may be used without the upstream's say.
        Counters::bump(&counters.bypasses);
        return not_cached(plan.dialect, CacheStatus::Bypass);
    }
    match lookup(shared, plan).await {
        Some(entry) => {
            Counters::bump(&counters.hits);
            replay_entry(plan, &entry)
        }
        None => {
            Counters::bump(&counters.misses);
            not_cached(plan.dialect, CacheStatus::Miss)
        }
    }
}

/// A hit on `entry`, with the usage chunk only if the client asked for it.
fn replay_entry(plan: &Plan, entry: &Entry) -> Response<Body> {
    let age = entry.age(crate::clock::now_ms());
    replay::from_entry(entry, !plan.strips_usage(), age.as_secs())
}

/// The 504 of an `only-if-cached` request the cache cannot answer, in the
/// client's dialect, marked with the cache's verdict.
fn not_cached(dialect: Dialect, status: CacheStatus) -> Response<Body> {
    let mut response = Error::NotCached.into_response_in(dialect);
    replay::mark(&mut response, status);
    response
}

fn head_of(entry: &Entry) -> Head {
    Head {
        content_type: Some(crate::replay::content_type(entry)),
        stored_at_ms: Some(entry.stored_at_ms),
        usage_refused: entry.usage_refused(),
    }
}

fn entry_frames(entry: &Entry) -> Vec<bytes::Bytes> {
    match &entry.body {
        EntryBody::Json(bytes) => vec![bytes.clone()],
        EntryBody::Stream { frames, .. } => frames.to_vec(),
    }
}

/// Ask the inner service, and tee a `200` into the flight and the store
/// (not the store when a fallback model answered: the key is the client's
/// model's).
async fn fetch<S>(
    inner: Inner<S>,
    shared: &Arc<Shared>,
    plan: &Plan,
    req: Request<Body>,
    mut leader: Leader,
    status: CacheStatus,
) -> Result<Response<Body>, Error>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let (mut parts, _empty) = req.into_parts();
    // The upstream refused `stream_options` (asked by a layer above, or
    // below by the cache itself): its stream has no usage chunk, and a
    // client that asks for one must not be served it
    // ([`UsageChunk::Refused`]).
    let mut usage_refused = parts.extensions.get::<StreamOptionsRefused>().is_some();
    // Ask for the usage chunk on the client's behalf, so the stored stream
    // has it; keep the unedited request in case the upstream refuses
    // `stream_options`.
    let unedited = if plan.strips_usage() && !usage_refused {
        let original = copy_head(&parts);
        let edited = parts
            .extensions
            .get_mut::<RequestMeta>()
            .is_some_and(|meta| meta.ask_for_stream_usage(plan.no_stream_options));
        edited.then_some(original)
    } else {
        None
    };
    // A second call, should there be one, readies a clone of its own.
    let again = unedited.map(|original| (original, inner.clone_unready()));
    let first = inner.call(Request::from_parts(parts, empty()));
    let response = first.await;
    let response = match (again, response) {
        (Some((original, inner)), Ok(first)) => {
            match refuses_stream_options(first, original.extensions.get::<Waited>()).await {
                (true, _refusal) => {
                    tracing::debug!("the upstream refused stream_options; retrying without");
                    usage_refused = true;
                    let mut original = original;
                    original.extensions.insert(StreamOptionsRefused);
                    boxed(inner.oneshot(Request::from_parts(original, empty()))).await
                }
                (false, first) => Ok(first),
            }
        }
        (_, response) => response,
    };
    let response = match response {
        Ok(response) if response.status() == StatusCode::OK => response,
        other => {
            leader.fail();
            Counters::bump(&shared.counters.not_stored);
            return marked(other, plan.dialect, status);
        }
    };
    let (parts, body) = response.into_parts();
    let fallback = parts.extensions.get::<ServedByFallback>().is_some();
    if fallback && plan.shared_across_keys {
        // A fallback model answered, within this key's allowlist: the
        // requests coalesced on it may be another key's, which may not use
        // that model. They start over, each with its own request.
        leader.fail();
        Counters::bump(&shared.counters.not_stored);
        return Ok(to_client(parts, body, plan, status));
    }
    let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
    let usage_refused = usage_refused && plan.stream == Some(StreamKind::Chat);
    leader.start(Head {
        content_type: content_type.clone(),
        stored_at_ms: None,
        usage_refused,
    });
    let tee = Tee {
        leader,
        shared: shared.clone(),
        key: plan.key,
        content_type,
        watch: match plan.stream {
            Some(kind) => Watch::sse(kind, plan.budget.as_ref(), usage_refused),
            None if plan.responses => Watch::Json(JsonRule::CompletedResponse),
            None => Watch::Json(JsonRule::Any),
        },
        bytes: 0,
        too_large: false,
        held: plan
            .budget
            .as_ref()
            .map(|budget| BudgetHold::for_answer(Some(budget))),
        storable: !fallback,
    };
    let body = Body::new(CacheBody::new(body, tee));
    Ok(to_client(parts, body, plan, status))
}

/// Boxed: awaiting `S::Future` inside the caller's `async fn` trips
/// rustc's higher-ranked `Send` inference over the `dyn Error` in [`Body`]
/// (as in core's parse layer).
fn boxed<F>(future: F) -> BoxFuture
where
    F: Future<Output = Result<Response<Body>, Error>> + Send + 'static,
{
    Box::pin(future)
}

/// The answer for the client: without the usage chunk the cache asked for
/// on its behalf, marked with the cache's verdict.
fn to_client(
    mut parts: http::response::Parts,
    body: Body,
    plan: &Plan,
    status: CacheStatus,
) -> Response<Body> {
    let body = if plan.strips_usage() {
        parts.headers.remove(header::CONTENT_LENGTH);
        Body::new(UsageFilter::new(body).counted_in(plan.budget.as_ref()))
    } else {
        body
    };
    let mut response = Response::from_parts(parts, body);
    replay::mark(&mut response, status);
    response
}

/// The inner service's answer, marked with the cache's verdict. The
/// upstreams' failures (502, 504, 503 when none could be tried) are answered
/// here, in the client's dialect, so that they carry the cache header like
/// any answer the cache passed on; other errors (a route the balancer
/// refused, say) go up as they are, to the layers that answer them.
fn marked(
    result: Result<Response<Body>, Error>,
    dialect: Dialect,
    status: CacheStatus,
) -> Result<Response<Body>, Error> {
    let mut response = match result {
        Ok(response) => response,
        Err(
            e @ (Error::BadGateway { .. }
            | Error::UpstreamRefused { .. }
            | Error::UpstreamTimeout { .. }
            | Error::NoUpstreamAvailable(_)
            | Error::UpstreamsResting { .. }),
        ) => e.into_response_in(dialect),
        Err(e) => return Err(e),
    };
    replay::mark(&mut response, status);
    Ok(response)
}
