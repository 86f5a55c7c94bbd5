//! Stateful Responses: a response lives on the upstream that created it, so
//! `previous_response_id` and `GET`/`DELETE`/`cancel`/`input_items` of a
//! response id must go there.
//!
//! The layer remembers `response id -> upstream name` from every `200`
//! answer to `POST /v1/responses` that the upstream keeps (not one to
//! `"store": false`, nor one translated from chat completions: the `id` of
//! a JSON answer, or of the `response.created` event of a stream), and pins later requests naming
//! that id to that upstream with [`PinnedUpstream`] — the balancer never
//! reroutes a pinned request. An id it does not know (never seen, expired,
//! or created through a proxy that does not share this one's Redis) is a
//! 404 `response_not_found`, never a silent guess that the upstream could
//! not honour.
//!
//! An id belongs to the key that created it: with auth on, the map keeps the
//! creating key's name beside the upstream, and a request by any other key
//! naming that id is told `response_not_found`, as if the id did not exist
//! (the upstream holds every tenant's responses under one upstream key, so
//! without this any key that learnt an id could read, continue, cancel or
//! delete another tenant's response). Without auth there is one tenant.
//!
//! The map is in memory (`max_response_ids`, each id kept
//! `response_id_ttl_days` unused, 30 by default; full, the key holding
//! the most ids loses its least recently used, see [`FairLru`]), and, when the cache or
//! auth backend is Redis, also Redis (`<prefix>resp:<id>`, same TTL), so that
//! every proxy on that Redis finds every id. An id is recorded before the
//! bytes that carry it are passed on, so a client's follow-up can never
//! outrun it on this proxy; with Redis, those bytes wait for Redis to
//! answer the id's claim (see [`IdTap`]), so it cannot outrun it on
//! another proxy on the same Redis either.
//!
//! Conversations (OpenAI's Conversations API) are kept the same way, in
//! their own map (`<prefix>conv:<id>` in Redis): recorded from answers to
//! `POST /v1/conversations`, and pinned when a Responses request names one
//! in `conversation` or a `/v1/conversations/{id}` path names one; each use
//! keeps one for another TTL. One difference, without auth only: a
//! conversation id the map does not know is routed as if it were not named
//! (conversations are long-lived and made outside the proxy too). With auth
//! it is a 404 `conversation_not_found`, as another key's is.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use llm_proxy_core::sse::{Outlines, SseError};
use llm_proxy_core::{
    Body, BodyBudget, BoxError, ConversationPath, Endpoint, Error, PinnedUpstream, RequestMeta,
    Translated, UpstreamName, conversation_path,
};
use tower_layer::Layer;
use tower_service::Service;

use crate::fair_lru::{FairLru, Owned};
use crate::metrics::lock;
use crate::redis_ids::{RedisIds, Unreachable};

/// Response id -> where it lives, and when it was recorded; full, it
/// drops the least recently used id of the key holding the most.
type IdMap = FairLru<Held>;

/// Where an id lives, since when, and what Redis said of it.
struct Held {
    home: Home,
    at: Instant,
    claim: Claim,
}

impl Owned for Held {
    type Owner = Option<Arc<str>>;

    fn owner(&self) -> &Option<Arc<str>> {
        &self.home.owner
    }
}

/// Redis's word on an id held in memory.
enum Claim {
    /// Granted (or no Redis: memory is the whole map).
    Held,
    /// Asked, not answered yet: the answer comes on this channel.
    Pending(tokio::sync::watch::Receiver<Option<bool>>),
    /// Redis could not be asked: a lookup asks it (and Redis wins) before
    /// taking memory's word.
    Unconfirmed,
}

/// The longest a lookup waits for Redis to answer an id's claim (its calls
/// are bounded at 250 ms; past this the id is taken as recorded here).
const CLAIM_WAIT: Duration = Duration::from_secs(1);

/// What [`ResponseIds::hold`] did.
enum Hold {
    /// Another holds the id: nothing.
    Refused,
    /// `home` held it, granted: renewed in place.
    Renewed,
    /// Held now, with the claim given.
    New,
    /// `home` held it, still to be claimed on Redis: renewed in place, and
    /// left to [`ResponseIds::reclaim`] (a claim per use while Redis is
    /// away would queue the id again each time).
    Waiting,
}

/// An answer carried an id another key or upstream holds.
fn collision(kind: Kind, home: &Home) {
    tracing::warn!(
        kind = kind.namespace(),
        upstream = %home.upstream,
        "an answer carried an id another key or upstream holds; it stays theirs"
    );
}

/// The upstream holding a response, and the auth key that created it
/// (`None` without auth).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Home {
    upstream: Arc<str>,
    owner: Option<Arc<str>>,
}

/// Separates the upstream from the owner in the Redis value (a control
/// character: in neither an upstream's nor a key's name in practice; a name
/// that holds one only makes its own ids unfindable).
const OWNER_SEPARATOR: char = '\u{1f}';

impl Home {
    fn encode(&self) -> String {
        match &self.owner {
            Some(owner) => format!("{}{OWNER_SEPARATOR}{owner}", self.upstream),
            None => self.upstream.to_string(),
        }
    }

    fn decode(value: &str) -> Home {
        match value.split_once(OWNER_SEPARATOR) {
            Some((upstream, owner)) => Home {
                upstream: upstream.into(),
                owner: Some(owner.into()),
            },
            None => Home {
                upstream: value.into(),
                owner: None,
            },
        }
    }
}

/// What an id names. Each kind has its own map, and its own Redis
/// namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A stored response (`resp_…`).
    Response,
    /// A conversation of OpenAI's Conversations API (`conv_…`).
    Conversation,
}

impl Kind {
    fn namespace(self) -> &'static str {
        match self {
            Kind::Response => "resp",
            Kind::Conversation => "conv",
        }
    }
}

/// What the map says of an id, to the key asking.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// The asking key's, on this upstream.
    Yours(Arc<str>),
    /// Another key's.
    NotYours,
    /// Never seen (or expired, or recorded by a proxy on another Redis).
    Unknown,
    /// Not in memory, and Redis, which may hold it, could not be asked.
    Unreachable,
}

/// Where response and conversation ids are remembered.
pub struct ResponseIds {
    responses: Mutex<IdMap>,
    conversations: Mutex<IdMap>,
    redis: Option<RedisIds>,
    /// Ids recorded while Redis could not be asked, oldest first: claimed
    /// there once it answers again, so that every proxy on it finds them.
    unconfirmed: Mutex<VecDeque<(Kind, Box<str>)>>,
    /// The most `unconfirmed` holds.
    unconfirmed_cap: usize,
    /// Whether the queue's overflow was logged.
    overflowed: std::sync::atomic::AtomicBool,
    /// How long an id is remembered unused.
    ttl: Duration,
}

/// The most ids waiting to be claimed on Redis again (and no more than the
/// map holds); past it the oldest are given up (they stay known to this
/// proxy alone).
const MAX_UNCONFIRMED: usize = 100_000;
/// How often ids recorded while Redis was away are claimed again.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);
/// The most claimed again at each turn (a turn stops at the first failure).
const RECLAIM_BATCH: usize = 1_000;

impl std::fmt::Debug for ResponseIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseIds")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl ResponseIds {
    /// A map in memory holding up to `capacity` ids of each kind, each
    /// remembered `ttl` unused (at least a second: Redis counts whole
    /// seconds), and in Redis when `redis` is given.
    ///
    /// With Redis, and called on a runtime, a task on it claims on Redis
    /// the ids recorded while Redis could not be asked, once a second,
    /// until the map is dropped.
    pub fn new(redis: Option<RedisIds>, capacity: usize, ttl: Duration) -> Arc<Self> {
        let ttl = ttl.max(Duration::from_secs(1));
        let with_redis = redis.is_some();
        let ids = Arc::new(ResponseIds {
            responses: Mutex::new(FairLru::new(capacity)),
            conversations: Mutex::new(FairLru::new(capacity)),
            redis,
            unconfirmed: Mutex::default(),
            unconfirmed_cap: capacity.clamp(1, MAX_UNCONFIRMED),
            overflowed: std::sync::atomic::AtomicBool::new(false),
            ttl,
        });
        if let (true, Ok(runtime)) = (with_redis, tokio::runtime::Handle::try_current()) {
            let weak = Arc::downgrade(&ids);
            runtime.spawn(async move {
                let mut every = tokio::time::interval(RECLAIM_EVERY);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    every.tick().await;
                    let Some(ids) = weak.upgrade() else {
                        return;
                    };
                    ids.reclaim().await;
                }
            });
        }
        ids
    }

    /// Claim on Redis ids recorded while it could not be asked, oldest
    /// first, until one fails (Redis is still away: the rest wait for the
    /// next turn) or [`RECLAIM_BATCH`] are done. An id Redis gives another
    /// home leaves memory (Redis wins, as a lookup would find).
    async fn reclaim(&self) {
        let Some(redis) = &self.redis else {
            return;
        };
        for _ in 0..RECLAIM_BATCH {
            let Some((kind, id)) = lock(&self.unconfirmed).pop_front() else {
                return;
            };
            let still = {
                let mut memory = self.memory(kind);
                match memory.peek_mut(&id) {
                    Some(held) if matches!(held.claim, Claim::Unconfirmed) => self
                        .ttl
                        .checked_sub(held.at.elapsed())
                        .map(|left| (held.home.clone(), left)),
                    _ => None,
                }
            };
            let Some((home, left)) = still else {
                continue;
            };
            let answer = redis
                .claim(kind.namespace(), &id, &home.encode(), left)
                .await;
            let mut memory = self.memory(kind);
            let ours = memory
                .peek_mut(&id)
                .filter(|held| held.home == home && matches!(held.claim, Claim::Unconfirmed));
            match (answer, ours) {
                (Some(true), Some(held)) => held.claim = Claim::Held,
                (Some(false), Some(_)) => {
                    memory.pop(&id);
                    drop(memory);
                    collision(kind, &home);
                }
                (None, ours) => {
                    let ours = ours.is_some();
                    drop(memory);
                    if ours {
                        lock(&self.unconfirmed).push_front((kind, id));
                    }
                    // Redis is still away: the rest wait for the next turn.
                    return;
                }
                _ => {}
            }
        }
    }

    /// Queue `id` to be claimed on Redis again.
    fn unconfirmed(&self, kind: Kind, id: &str) {
        let mut queue = lock(&self.unconfirmed);
        if queue.len() >= self.unconfirmed_cap {
            queue.pop_front();
            if !self
                .overflowed
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    queued = queue.len(),
                    "too many ids wait for Redis to come back; the oldest stay known to this proxy alone"
                );
            }
        }
        queue.push_back((kind, id.into()));
    }

    fn memory(&self, kind: Kind) -> std::sync::MutexGuard<'_, IdMap> {
        match kind {
            Kind::Response => &self.responses,
            Kind::Conversation => &self.conversations,
        }
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
    }

    /// Record that `id` lives at `home`, unless it is another's: the first
    /// to record an id keeps it for its TTL (and renews it by recording it
    /// again). An answer that carries an id already held by another key or
    /// upstream (a client that made the upstream reuse it: vLLM takes a
    /// `request_id`, and names chat completions after `x-request-id`; or
    /// two upstreams that make the same id) changes nothing: an id is
    /// never taken from its owner. With Redis the claim is made there too
    /// (one script, for every proxy on it); until Redis answers, a lookup
    /// of the id waits for it, so a follow-up neither outruns the record
    /// nor finds an id Redis then refuses. With Redis unreachable, memory
    /// alone decides.
    ///
    /// A new claim on Redis comes back as [`Verdict`], which ends once
    /// Redis answered (or could not): what holds the id back from its
    /// client until then, so that a follow-up through another proxy on the
    /// same Redis finds it.
    fn record(self: &Arc<Self>, kind: Kind, id: &str, home: &Home) -> Option<Verdict> {
        // Not an id worth keeping (an answer's or a WebSocket message's
        // `id` is the upstream's to choose).
        if id.is_empty() || id.len() > MAX_ID {
            return None;
        }
        let Some((redis, runtime)) = self
            .redis
            .clone()
            .zip(tokio::runtime::Handle::try_current().ok())
        else {
            self.hold(kind, id, home, || Claim::Held);
            return None;
        };
        let (verdict, pending) = tokio::sync::watch::channel(None);
        // Held and granted already, a renewal is made on Redis in the
        // background while lookups go on from memory.
        let renewal = match self.hold(kind, id, home, || Claim::Pending(pending.clone())) {
            Hold::Refused | Hold::Waiting => return None,
            Hold::Renewed => true,
            Hold::New => false,
        };
        let waited = (!renewal).then(|| {
            let mut pending = pending.clone();
            let wait: Verdict = Box::pin(async move {
                // Ends once the claim sent its verdict (or went: a runtime
                // shutting down); bounded as a lookup's wait is, whatever
                // the Redis call's own bound.
                let _ = tokio::time::timeout(CLAIM_WAIT, pending.wait_for(Option::is_some)).await;
            });
            wait
        });
        let (this, id, home) = (self.clone(), id.to_owned(), home.clone());
        runtime.spawn(async move {
            let answer = redis
                .claim(kind.namespace(), &id, &home.encode(), this.ttl)
                .await;
            let mut memory = this.memory(kind);
            let ours = memory.peek_mut(id.as_str()).filter(|held| {
                held.home == home
                    && match &held.claim {
                        Claim::Pending(rx) => rx.same_channel(&pending),
                        _ => renewal,
                    }
            });
            let unconfirmed = match (answer, ours) {
                (Some(true), Some(held)) => {
                    held.claim = Claim::Held;
                    false
                }
                (None, Some(held)) => {
                    held.claim = Claim::Unconfirmed;
                    true
                }
                (Some(false), Some(_)) => {
                    memory.pop(id.as_str());
                    false
                }
                _ => false,
            };
            drop(memory);
            if unconfirmed {
                this.unconfirmed(kind, &id);
            }
            if answer == Some(false) {
                collision(kind, &home);
            }
            let _ = verdict.send(Some(answer != Some(false)));
        });
        waited
    }

    /// Hold `id` at `home` in memory, unless another holds it there: a new
    /// entry gets `claim()`; one `home` already holds is renewed in place.
    fn hold(&self, kind: Kind, id: &str, home: &Home, claim: impl FnOnce() -> Claim) -> Hold {
        let mut memory = self.memory(kind);
        if let Some(held) = memory.get_mut(id)
            && held.at.elapsed() < self.ttl
        {
            if held.home != *home {
                drop(memory);
                collision(kind, home);
                return Hold::Refused;
            }
            match held.claim {
                Claim::Held => {
                    held.at = Instant::now();
                    return Hold::Renewed;
                }
                Claim::Unconfirmed => {
                    held.at = Instant::now();
                    return Hold::Waiting;
                }
                Claim::Pending(_) => {}
            }
        }
        memory.put(
            id,
            Held {
                home: home.clone(),
                at: Instant::now(),
                claim: claim(),
            },
        );
        Hold::New
    }

    /// Where `id` lives, as `owner` (the asking key, `None` without auth)
    /// may know it.
    pub(crate) async fn lookup(&self, kind: Kind, id: &str, owner: Option<&str>) -> Found {
        // Never recorded (see `record`): not worth a trip to Redis with a
        // key as long as the client cared to make it.
        if id.is_empty() || id.len() > MAX_ID {
            return Found::Unknown;
        }
        let local = {
            let mut memory = self.memory(kind);
            match memory.get_mut(id) {
                Some(held) if held.at.elapsed() < self.ttl => Some((
                    held.home.clone(),
                    match &held.claim {
                        Claim::Held => None,
                        Claim::Pending(rx) => Some(Some(rx.clone())),
                        Claim::Unconfirmed => Some(None),
                    },
                )),
                Some(_) => {
                    memory.pop(id);
                    None
                }
                None => None,
            }
        };
        let local = match local {
            Some((home, None)) => Some(home),
            // Recorded here a moment ago, and Redis has not answered its
            // claim yet: that answer decides (refused: the id is another's,
            // which Redis tells below).
            Some((home, Some(Some(mut pending)))) => {
                let answered =
                    tokio::time::timeout(CLAIM_WAIT, pending.wait_for(Option::is_some)).await;
                match answered {
                    Ok(Ok(verdict)) if *verdict == Some(false) => None,
                    _ => Some(home),
                }
            }
            // Recorded while Redis could not be asked: Redis, when it
            // answers now, wins.
            Some((home, Some(None))) => match &self.redis {
                Some(redis) => match redis.get(kind.namespace(), id).await {
                    Ok(Some(value)) => Some(Home::decode(&value)),
                    Ok(None) | Err(Unreachable) => Some(home),
                },
                None => Some(home),
            },
            None => None,
        };
        let home = match (local, &self.redis) {
            (Some(home), _) => home,
            (None, Some(redis)) => match redis.get(kind.namespace(), id).await {
                Ok(Some(value)) => Home::decode(&value),
                Ok(None) => return Found::Unknown,
                // Redis may well hold it: not a 404, which a client takes
                // as final.
                Err(Unreachable) => return Found::Unreachable,
            },
            (None, None) => return Found::Unknown,
        };
        if home.owner.as_deref() == owner {
            Found::Yours(home.upstream)
        } else {
            Found::NotYours
        }
    }

    /// Keep conversation `id` (of `owner`, on `upstream`) for another TTL:
    /// a conversation in use is not forgotten.
    pub(crate) fn keep_conversation(
        self: &Arc<Self>,
        id: &str,
        upstream: Arc<str>,
        owner: Option<Arc<str>>,
    ) {
        let _ = self.record(Kind::Conversation, id, &Home { upstream, owner });
    }

    /// Remember that response `id` lives on `upstream` and belongs to
    /// `owner` (a WebSocket turn's, read from its `response.created`
    /// message).
    pub(crate) fn remember(
        self: &Arc<Self>,
        id: &str,
        upstream: Arc<str>,
        owner: Option<Arc<str>>,
    ) {
        // (A WebSocket turn's later messages go on meanwhile: the client
        // continues on the same socket, through this proxy, which waits
        // for the claim itself.)
        let _ = self.record(Kind::Response, id, &Home { upstream, owner });
    }
}

/// Pins requests that name a response id to the upstream holding it.
#[derive(Clone, Debug)]
pub struct ResponseAffinityLayer {
    ids: Arc<ResponseIds>,
}

impl ResponseAffinityLayer {
    /// A layer over this id map.
    pub fn new(ids: Arc<ResponseIds>) -> Self {
        ResponseAffinityLayer { ids }
    }
}

impl<S> Layer<S> for ResponseAffinityLayer {
    type Service = ResponseAffinity<S>;

    fn layer(&self, inner: S) -> ResponseAffinity<S> {
        ResponseAffinity {
            inner,
            ids: self.ids.clone(),
        }
    }
}

/// The service of [`ResponseAffinityLayer`].
#[derive(Clone, Debug)]
pub struct ResponseAffinity<S> {
    inner: S,
    ids: Arc<ResponseIds>,
}

use llm_proxy_core::BoxFuture;

impl<S> Service<Request<Body>> for ResponseAffinity<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let endpoint = req
            .extensions()
            .get::<RequestMeta>()
            .map_or(Endpoint::Passthrough, RequestMeta::endpoint);
        if !Named::may_name(endpoint) {
            // Chat, completions, embeddings, Messages, models: no id to
            // follow or record. Straight through, without a future of its
            // own.
            return self.inner.call(req);
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let ids = self.ids.clone();
        Box::pin(async move {
            let meta = req.extensions().get::<RequestMeta>();
            let owner = meta
                .and_then(RequestMeta::identity)
                .map(|identity| identity.name.clone());
            let budget = meta.and_then(RequestMeta::budget).cloned();
            // An answer the upstream does not keep: its id can be neither
            // fetched nor continued, and is not worth a place in the map
            // (nor in Redis for the TTL).
            let unstored = meta.is_some_and(|m| m.generation_caps().unstored);
            let streamed = meta.is_some_and(RequestMeta::is_stream);
            let named = Named::of(&req, endpoint)?;
            let mut pinned = false;
            if let Some((id, param)) = named.response {
                let upstream = match ids.lookup(Kind::Response, &id, owner.as_deref()).await {
                    Found::Yours(upstream) => upstream,
                    Found::Unreachable => {
                        return Err(id_store_unavailable(&format!("{param} `{id}`")));
                    }
                    Found::NotYours | Found::Unknown => {
                        return Err(response_not_found(&format!("{param} `{id}`")));
                    }
                };
                req.extensions_mut().insert(PinnedUpstream(upstream));
                pinned = true;
            }
            // A conversation this proxy saw made is pinned to its upstream
            // and kept to its key (each use keeps it for another TTL). One
            // it never saw (made before it, or elsewhere) is, without auth,
            // routed as the request would be without it; with auth it is
            // refused, as a response id is: the proxy cannot tell whose it
            // is (it may be one evicted from the map, or one Redis could
            // not answer for).
            let mut by_conversation = None;
            if let Some(id) = named.conversation {
                match ids.lookup(Kind::Conversation, &id, owner.as_deref()).await {
                    Found::Yours(upstream) => {
                        ids.keep_conversation(&id, upstream.clone(), owner.clone());
                        if !pinned {
                            req.extensions_mut()
                                .insert(PinnedUpstream(upstream.clone()));
                            by_conversation = Some((id, upstream));
                        }
                    }
                    Found::NotYours => return Err(conversation_not_found(&id)),
                    Found::Unknown if owner.is_some() => return Err(conversation_not_found(&id)),
                    Found::Unknown => {}
                    Found::Unreachable => {
                        return Err(id_store_unavailable(&format!("conversation `{id}`")));
                    }
                }
            }
            let creates = match endpoint {
                Endpoint::Responses if unstored => None,
                Endpoint::Responses => Some(Kind::Response),
                Endpoint::Passthrough
                    if req.method() == http::Method::POST
                        && conversation_path(req.uri().path())
                            == Some(ConversationPath::Collection) =>
                {
                    Some(Kind::Conversation)
                }
                _ => None,
            };
            let resp = match inner.call(req).await {
                // The balancer's answer to a pin on an upstream gone from
                // the config.
                Err(Error::ResponseNotFound(_)) if let Some((id, upstream)) = by_conversation => {
                    return Err(Error::ConversationNotFound(format!(
                        "conversation `{id}` lives on upstream `{upstream}`, which is not configured any more"
                    )));
                }
                other => other?,
            };
            // An answer translated from chat completions is kept nowhere
            // (it says `"store": false`): its id is not worth a place
            // either.
            let Some(kind) = creates.filter(|_| {
                resp.status().is_success() && resp.extensions().get::<Translated>().is_none()
            }) else {
                return Ok(resp);
            };
            let Some(UpstreamName(upstream)) = resp.extensions().get::<UpstreamName>().cloned()
            else {
                return Ok(resp);
            };
            let framing = if kind != Kind::Response {
                Framing::Json
            } else if llm_proxy_core::media::is_event_stream(resp.headers()) {
                Framing::Sse(budget)
            } else if streamed {
                Framing::Unsure(budget)
            } else {
                Framing::Json
            };
            let home = Home { upstream, owner };
            Ok(resp.map(|body| IdTap::new(body, framing, ids, kind, home).boxed_unsync()))
        })
    }
}

/// The answer to a key naming a conversation it cannot use: as if it did
/// not exist.
pub(crate) fn conversation_not_found(id: &str) -> Error {
    Error::ConversationNotFound(format!(
        "conversation `{id}` is not known to this proxy for this API key (made by another key, made elsewhere, or unused too long)"
    ))
}

/// The 503 for an id (`what`: "previous_response_id `resp_1`") that only
/// Redis could place, when Redis could not be asked.
pub(crate) fn id_store_unavailable(what: &str) -> Error {
    Error::IdStoreUnavailable(format!(
        "{what} cannot be looked up now: the proxy's id store (Redis) is unreachable; retry"
    ))
}

/// The 404 for a response id (`what`: "previous_response_id `resp_1`")
/// the map does not give the asking key.
pub(crate) fn response_not_found(what: &str) -> Error {
    Error::ResponseNotFound(format!(
        "{what} is not known to this proxy (never seen, expired, answered by translation, which keeps nothing, or created through a proxy that does not share its Redis)"
    ))
}

/// The ids a request names.
#[derive(Default)]
struct Named {
    /// A response id, and the name of what named it.
    response: Option<(String, &'static str)>,
    /// A conversation id.
    conversation: Option<String>,
}

impl Named {
    /// Whether a request to `endpoint` may name an id, or make one to
    /// record ([`Named::of`] and the ids an answer creates).
    fn may_name(endpoint: Endpoint) -> bool {
        matches!(
            endpoint,
            Endpoint::ResponseById
                | Endpoint::Responses
                | Endpoint::ResponsesCompact
                | Endpoint::ResponsesInputTokens
                | Endpoint::Passthrough
        )
    }

    /// What the request names; an error for a `previous_response_id` that
    /// is neither a string nor `null` (as on a WebSocket): passed on, it
    /// would reach an upstream the proxy chose without the id's check,
    /// leaving the refusal to the upstream.
    fn of(req: &Request<Body>, endpoint: Endpoint) -> Result<Named, Error> {
        let path = req.uri().path();
        Ok(match endpoint {
            Endpoint::ResponseById => Named {
                response: llm_proxy_core::response_id(path)
                    .map(|id| (id.to_owned(), "response id")),
                conversation: None,
            },
            Endpoint::Responses | Endpoint::ResponsesCompact | Endpoint::ResponsesInputTokens => {
                // A body that names no state is not built for it.
                let Some(json) = req
                    .extensions()
                    .get::<RequestMeta>()
                    .filter(|meta| meta.names_state())
                    .and_then(RequestMeta::json)
                else {
                    return Ok(Named::default());
                };
                let response = match json.get("previous_response_id") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(id)) => {
                        Some((id.clone(), "previous_response_id"))
                    }
                    Some(_) => {
                        return Err(Error::UnsupportedParameter {
                            param: "previous_response_id".into(),
                            message: "`previous_response_id` must be a string".into(),
                        });
                    }
                };
                Named {
                    response,
                    conversation: conversation_id(json).map(str::to_owned),
                }
            }
            Endpoint::Passthrough => Named {
                response: None,
                conversation: match conversation_path(path) {
                    Some(ConversationPath::Id(id)) => Some(id.to_owned()),
                    _ => None,
                },
            },
            _ => Named::default(),
        })
    }
}

/// The conversation a Responses request adds to: `conversation` is its id,
/// or an object with its `id`.
pub(crate) fn conversation_id(json: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
    match json.get("conversation")? {
        serde_json::Value::String(id) => Some(id),
        serde_json::Value::Object(c) => c.get("id")?.as_str(),
        _ => None,
    }
}

enum Tap {
    /// A streamed request's answer under another media type than
    /// `text/event-stream` (some servers stream under none, `text/plain` or
    /// `application/json`, and the SDKs read events whatever the type): its
    /// start so far, until it tells events from JSON.
    Sniff(Vec<u8>, Option<BodyBudget>),
    Json(Box<TopLevelId>),
    Sse(Box<Outlines>),
    Done,
}

/// Ends once Redis answered a new claim (see [`ResponseIds::record`]).
type Verdict = Pin<Box<dyn Future<Output = ()> + Send>>;

pin_project_lite::pin_project! {
    /// An answer to `POST /v1/responses` (or `POST /v1/conversations`) on
    /// its way out, read for its id. The frame that shows the id is held
    /// until the id's claim on Redis is answered: a client that has seen
    /// the id may at once follow it up through another proxy on the same
    /// Redis (behind a load balancer, the next request may go anywhere).
    pub struct IdTap {
        #[pin]
        inner: Body,
        tap: Tap,
        ids: Arc<ResponseIds>,
        kind: Kind,
        home: Home,
        held: Option<(Frame<Bytes>, Verdict)>,
    }
}

/// What an answer is, as its head tells.
enum Framing {
    Json,
    /// An event stream, whose held event counts against the budget.
    Sse(Option<BodyBudget>),
    /// A streamed request's answer without the `text/event-stream` type:
    /// its first bytes tell.
    Unsure(Option<BodyBudget>),
}

impl Tap {
    fn sse(budget: Option<&BodyBudget>) -> Tap {
        Tap::Sse(Box::new(Outlines::new().counted_in(budget)))
    }
}

impl IdTap {
    fn new(inner: Body, framing: Framing, ids: Arc<ResponseIds>, kind: Kind, home: Home) -> Self {
        let tap = match framing {
            Framing::Json => Tap::Json(Box::default()),
            Framing::Sse(budget) => Tap::sse(budget.as_ref()),
            Framing::Unsure(budget) => Tap::Sniff(Vec::new(), budget),
        };
        IdTap {
            inner,
            tap,
            ids,
            kind,
            home,
            held: None,
        }
    }
}

/// The `id` of the `response` object in a `response.created` event's data.
///
/// The event repeats the whole response (its instructions, tools, metadata:
/// kilobytes), and the id is among the response's first keys, so the data is
/// read up to the id and no further. `None` when the data is not a JSON
/// object, has no `response` object, or that object has no string `id` (up
/// to where the read stopped).
fn created_response_id(data: &str) -> Option<String> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_str(data);
    // Finding the id ends the read with an error on purpose: it is the one
    // way to leave serde_json's map before its closing brace.
    let _ = serde::Deserializer::deserialize_map(
        &mut de,
        Field {
            name: "response",
            then: Then::Object(&mut found),
        },
    );
    found
}

/// Visits a JSON object for one key, and reads that key's value with `then`.
struct Field<'f> {
    name: &'static str,
    then: Then<'f>,
}

enum Then<'f> {
    /// The value is the response object: read its `id`.
    Object(&'f mut Option<String>),
    /// The value is the id: keep it, then stop.
    Id(&'f mut Option<String>),
}

/// Whether a key is the wanted one, without allocating for it.
struct KeyIs(&'static str);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeyIs {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<bool, E> {
        Ok(key == self.0)
    }
}

impl<'de> serde::de::Visitor<'de> for Field<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::{Error as _, IgnoredAny};
        let Field { name, then } = self;
        while let Some(wanted) = map.next_key_seed(KeyIs(name))? {
            if !wanted {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            return match then {
                Then::Object(found) => map.next_value_seed(Field {
                    name: "id",
                    then: Then::Id(found),
                }),
                Then::Id(found) => {
                    *found = map.next_value::<Option<String>>()?;
                    Err(A::Error::custom("stop"))
                }
            };
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Field<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

/// Look at one frame.
fn observe(tap: &mut Tap, data: &[u8]) -> Option<String> {
    let id = match tap {
        Tap::Sniff(start, budget) => {
            // Kept only while too short to tell (a few bytes, or blank
            // lines): most answers tell by their first frame, read in place.
            let told = if start.is_empty() {
                llm_proxy_core::media::events_start(data)
            } else {
                start.extend_from_slice(data);
                llm_proxy_core::media::events_start(start)
            };
            let Some(events) = told else {
                if start.is_empty() {
                    start.extend_from_slice(data);
                }
                if start.len() >= llm_proxy_core::media::MAX_SNIFF_BYTES {
                    *tap = Tap::Done;
                }
                return None;
            };
            let start = std::mem::take(start);
            *tap = if events {
                Tap::sse(budget.as_ref())
            } else {
                Tap::Json(Box::default())
            };
            return observe(tap, if start.is_empty() { data } else { &start });
        }
        Tap::Json(scan) => match scan.feed(data) {
            Scan::Found(id) => Some(id),
            Scan::Absent => {
                *tap = Tap::Done;
                return None;
            }
            Scan::More => None,
        },
        Tap::Sse(outlines) => match created_id(outlines, data) {
            Some(Ok(id)) => Some(id),
            Some(Err(())) => {
                *tap = Tap::Done;
                return None;
            }
            None => None,
        },
        Tap::Done => None,
    };
    if id.is_some() {
        *tap = Tap::Done;
    }
    id
}

/// What a [`TopLevelId`] made of the bytes so far.
enum Scan {
    Found(String),
    /// No top-level string `id` (or not a JSON object): stop looking.
    Absent,
    More,
}

/// Reads the string `id` of a JSON object's top level as its bytes go by,
/// without keeping them: a response object's `id` comes early (first in
/// OpenAI's and vLLM's answers, among the first keys when sorted), and the
/// answer may be megabytes long. Strings are skipped with their escapes;
/// nested objects and arrays are skipped by depth.
#[derive(Default)]
struct TopLevelId {
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a key.
    want_key: bool,
    /// The depth-1 key just read is `id`.
    id_key: bool,
    /// The depth-1 value about to come is the `id`'s.
    id_value: bool,
    capture: Capture,
    buf: Vec<u8>,
}

#[derive(Default, PartialEq)]
enum Capture {
    #[default]
    None,
    Key,
    Value,
}

/// Longest id kept (a response id is a few dozen bytes).
pub(crate) const MAX_ID: usize = 1024;

impl TopLevelId {
    fn feed(&mut self, data: &[u8]) -> Scan {
        for &b in data {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'"' {
                    self.in_string = false;
                    if let Some(done) = self.end_string() {
                        return done;
                    }
                    continue;
                } else if b == b'\\' {
                    self.escaped = true;
                }
                if self.capture != Capture::None {
                    self.buf.push(b);
                    let max = if self.capture == Capture::Key {
                        2
                    } else {
                        MAX_ID
                    };
                    if self.buf.len() > max {
                        // Not the key `id`, or not an id worth keeping.
                        self.capture = Capture::None;
                    }
                }
                continue;
            }
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    if self.depth == 0 {
                        return Scan::Absent;
                    }
                    self.in_string = true;
                    self.buf.clear();
                    self.capture = match (self.depth, self.want_key, self.id_value) {
                        (1, true, _) => Capture::Key,
                        (1, false, true) => Capture::Value,
                        _ => Capture::None,
                    };
                }
                b'{' | b'[' => {
                    if self.depth == 0 && b == b'[' {
                        return Scan::Absent;
                    }
                    self.id_value = false;
                    self.depth = self.depth.saturating_add(1);
                    self.want_key = self.depth == 1;
                }
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Scan::Absent;
                    }
                }
                b',' if self.depth == 1 => {
                    self.want_key = true;
                    self.id_key = false;
                    self.id_value = false;
                }
                b':' if self.depth == 1 => {
                    self.id_value = self.id_key;
                    self.want_key = false;
                }
                _ if self.depth == 0 => return Scan::Absent,
                // A number or literal as a depth-1 value: not a string id.
                _ if self.depth == 1 => self.id_value = false,
                _ => {}
            }
        }
        Scan::More
    }

    /// A string ended; `Some` when that decides the scan.
    fn end_string(&mut self) -> Option<Scan> {
        match std::mem::take(&mut self.capture) {
            Capture::Key => {
                self.id_key = self.buf == b"id";
                self.want_key = false;
                None
            }
            Capture::Value => {
                let mut quoted = Vec::with_capacity(self.buf.len() + 2);
                quoted.push(b'"');
                quoted.extend_from_slice(&self.buf);
                quoted.push(b'"');
                Some(match serde_json::from_slice::<String>(&quoted) {
                    Ok(id) if !id.is_empty() => Scan::Found(id),
                    _ => Scan::Absent,
                })
            }
            Capture::None => {
                if self.depth == 1 && self.want_key {
                    // A key too long to be `id`.
                    self.id_key = false;
                    self.want_key = false;
                }
                if self.depth == 1 && self.id_value {
                    // An id value too long to keep.
                    return Some(Scan::Absent);
                }
                None
            }
        }
    }
}

/// How reading a stream for its id ended early.
enum Stop {
    /// The `response.created` event's id.
    Found(String),
    /// The stream cannot be read (the tap gives up).
    Unreadable,
}

impl From<SseError> for Stop {
    fn from(_: SseError) -> Self {
        Stop::Unreadable
    }
}

/// Feed `chunk` to the stream's reader; `Some(Ok(id))` at the
/// `response.created` event's id, `Some(Err(()))` when the stream cannot be
/// read (the tap gives up), `None` while no id was seen. The read stops at
/// the id: a stream read in one go holds every event in one frame, and
/// `response.created` comes first.
fn created_id(outlines: &mut Outlines, chunk: &[u8]) -> Option<Result<String, ()>> {
    let read = outlines.push(chunk, |event| {
        if memchr::memmem::find(event.data, b"response.created").is_some()
            && let Some(id) = created_response_id(&event.text())
        {
            return Err(Stop::Found(id));
        }
        Ok(())
    });
    match read {
        Ok(()) => None,
        Err(Stop::Found(id)) => Some(Ok(id)),
        Err(Stop::Unreadable) => Some(Err(())),
    }
}

impl HttpBody for IdTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some((_, verdict)) = this.held {
            std::task::ready!(verdict.as_mut().poll(cx));
            return Poll::Ready(this.held.take().map(|(frame, _)| Ok(frame)));
        }
        let frame = match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let seen = frame.data_ref().and_then(|d| observe(this.tap, d));
        let verdict = seen.and_then(|id| this.ids.record(*this.kind, &id, this.home));
        let Some(mut verdict) = verdict else {
            return Poll::Ready(Some(Ok(frame)));
        };
        if verdict.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(frame)));
        }
        *this.held = Some((frame, verdict));
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let held = self
            .held
            .as_ref()
            .and_then(|(frame, _)| frame.data_ref())
            .map_or(0, |data| data.len() as u64);
        let mut hint = self.inner.size_hint();
        let lower = hint.lower().saturating_add(held);
        match hint.upper() {
            Some(upper) => {
                hint.set_upper(upper.saturating_add(held));
                hint.set_lower(lower);
            }
            None => hint.set_lower(lower),
        }
        hint
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;

    const CREATED: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"object\":\"response\",\"id\":\"resp_1\",\"status\":\"in_progress\"}}\n\n";
    const DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"response.created is a name\"}\n\n";

    #[test]
    fn a_created_events_response_id_is_read_up_to_the_id() {
        let read = |data: &str| created_response_id(data);
        assert_eq!(
            read(
                r#"{"type":"response.created","item":{"id":"no"},"response":{"output":[{"id":"msg"}],"i\u0064":"resp_1"}}"#
            ),
            Some("resp_1".into())
        );
        // The read stops at the id: what follows is not looked at.
        assert_eq!(
            read(r#"{"response":{"id":"resp_2","tools":[oops"#),
            Some("resp_2".into())
        );
        for data in [
            r#"{"type":"response.output_text.delta","delta":"response.created"}"#,
            r#"{"response":null}"#,
            r#"{"response":{"id":7}}"#,
            r#"{"response":{"id":null,"x":1}}"#,
            r#"{"response":{"object":"response"}}"#,
            r#"{"response":{"object":"resp"#,
            r#"["response",{"id":"x"}]"#,
            "response.created",
        ] {
            assert_eq!(read(data), None, "{data}");
        }
    }

    fn sse() -> Tap {
        Tap::Sse(Box::default())
    }

    #[tokio::test]
    async fn only_a_body_that_names_state_is_built_to_read_it() {
        for (body, built, named) in [
            (r#"{"model":"m","input":"hi"}"#, false, None),
            (
                r#"{"model":"m","previous_response_id":"resp_1","input":"hi"}"#,
                true,
                Some("resp_1"),
            ),
            (r#"{"model":"m","conversation":null}"#, true, None),
        ] {
            let req = Request::post("/v1/responses")
                .body(llm_proxy_core::full(body))
                .unwrap();
            let req = llm_proxy_core::parse(req, 1000).await.unwrap();
            let named_now = Named::of(&req, Endpoint::Responses).unwrap();
            let meta = req.extensions().get::<RequestMeta>().unwrap();
            assert_eq!(meta.is_built(), built, "{body}");
            assert_eq!(
                named_now.response.map(|(id, _)| id).as_deref(),
                named,
                "{body}"
            );
        }
    }

    /// An id in use while Redis is away waits once in the queue of ids to
    /// claim again, however often it is used; memory still finds it.
    #[tokio::test]
    async fn an_id_used_again_while_redis_is_away_is_queued_once() {
        // Nothing listens on port 1: every call fails at once.
        let redis = RedisIds::new("redis://127.0.0.1:1/", "t:").unwrap();
        let ids = ResponseIds::new(Some(redis), 100, Duration::from_secs(3600));
        let up: Arc<str> = Arc::from("up");
        ids.keep_conversation("conv_1", up.clone(), None);
        let queued = || lock(&ids.unconfirmed).len();
        let started = std::time::Instant::now();
        while queued() == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..50 {
            ids.keep_conversation("conv_1", up.clone(), None);
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(queued(), 1);
        assert_eq!(
            ids.lookup(Kind::Conversation, "conv_1", None).await,
            Found::Yours(up)
        );
    }

    #[tokio::test]
    async fn an_id_too_long_to_keep_is_neither_kept_nor_looked_up() {
        let ids = ResponseIds::new(None, 100_000, Duration::from_secs(3600));
        let long = "r".repeat(MAX_ID + 1);
        ids.remember(&long, Arc::from("a"), None);
        ids.remember("", Arc::from("a"), None);
        ids.remember("resp_ok", Arc::from("a"), None);
        assert!(matches!(
            ids.lookup(Kind::Response, &long, None).await,
            Found::Unknown
        ));
        assert!(matches!(
            ids.lookup(Kind::Response, "", None).await,
            Found::Unknown
        ));
        assert!(matches!(
            ids.lookup(Kind::Response, "resp_ok", None).await,
            Found::Yours(_)
        ));
        assert_eq!(ids.memory(Kind::Response).len(), 1);
    }

    #[test]
    fn the_id_comes_from_the_created_event_however_the_stream_is_cut() {
        let stream = format!("{CREATED}{DELTA}{DELTA}");
        // Whole, in one frame.
        assert_eq!(
            observe(&mut sse(), stream.as_bytes()).as_deref(),
            Some("resp_1")
        );
        // Cut anywhere: the id once the event is complete.
        for cut in 1..stream.len() {
            let mut tap = sse();
            let first = observe(&mut tap, &stream.as_bytes()[..cut]);
            let second = observe(&mut tap, &stream.as_bytes()[cut..]);
            let id = first.or(second);
            assert_eq!(id.as_deref(), Some("resp_1"), "cut at {cut}");
        }
    }

    /// A streamed request's answer without the event-stream type: told
    /// events or JSON by its start, however its frames cut it (a blank
    /// line first, the start split in two).
    #[test]
    fn an_answer_of_no_known_type_is_told_by_its_start() {
        let sniff = || Tap::Sniff(Vec::new(), None);
        let stream = format!("\n{CREATED}{DELTA}");
        let json = r#" {"id":"resp_2","object":"response"}"#;
        for body in [stream.as_str(), json] {
            let want = if body == json { "resp_2" } else { "resp_1" };
            assert_eq!(
                observe(&mut sniff(), body.as_bytes()).as_deref(),
                Some(want)
            );
            for cut in 1..body.len() {
                let mut tap = sniff();
                let first = observe(&mut tap, &body.as_bytes()[..cut]);
                let second = observe(&mut tap, &body.as_bytes()[cut..]);
                assert_eq!(first.or(second).as_deref(), Some(want), "cut at {cut}");
            }
        }
        // Blank past the bound: no id looked for.
        let mut tap = sniff();
        let blank = vec![b'\n'; llm_proxy_core::media::MAX_SNIFF_BYTES];
        assert_eq!(observe(&mut tap, &blank), None);
        assert!(matches!(tap, Tap::Done));
    }

    #[test]
    fn a_delta_naming_response_created_before_the_event_does_not_hide_it() {
        let stream = format!("{DELTA}{CREATED}");
        assert_eq!(
            observe(&mut sse(), stream.as_bytes()).as_deref(),
            Some("resp_1")
        );
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(
            observe(&mut sse(), crlf.as_bytes()).as_deref(),
            Some("resp_1")
        );
    }

    #[test]
    fn a_json_answer_gives_its_top_level_id() {
        let mut tap = Tap::Json(Box::default());
        let body = br#"{"id":"resp_2","object":"response","output":[{"id":"msg_1"}]}"#;
        assert_eq!(observe(&mut tap, &body[..10]), None);
        assert_eq!(observe(&mut tap, &body[10..]).as_deref(), Some("resp_2"));
    }

    fn scan(body: &[u8]) -> Option<String> {
        match TopLevelId::default().feed(body) {
            Scan::Found(id) => Some(id),
            _ => None,
        }
    }

    #[test]
    fn the_top_level_id_is_found_wherever_it_is_and_nested_ids_are_not() {
        let sorted =
            br#"{"background":false,"created_at":1,"error":null,"id":"resp_3","output":[]}"#;
        assert_eq!(scan(sorted).as_deref(), Some("resp_3"));
        let nested_first = br#"{"output":[{"id":"msg_1","content":[{"text":"\"id\":\"x\""}]}], "meta":{"id":"no"} , "id" : "resp_4"}"#;
        assert_eq!(scan(nested_first).as_deref(), Some("resp_4"));
        let tricky_keys = br#"{"idx":"a","i\"d":"b","\u0069d2":"c","id":"resp_\u0035"}"#;
        assert_eq!(scan(tricky_keys).as_deref(), Some("resp_5"));
        for none in [
            &br#"{"error":{"id":"x","message":"m"}}"#[..],
            br#"{"id":5,"x":"y"}"#,
            br#"[{"id":"a"}]"#,
            br#""id""#,
            br#"{"id":"#,
        ] {
            assert_eq!(scan(none), None, "{}", String::from_utf8_lossy(none));
        }
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_ID + 1));
        assert_eq!(scan(long.as_bytes()), None);
    }

    #[test]
    fn the_id_is_found_however_the_answer_is_cut_and_however_long_it_is() {
        let body = format!(
            r#"{{"output":[{{"content":"{}"}}],"id":"resp_6","tail":"{}"}}"#,
            "y\\\"".repeat(3000),
            "z".repeat(5 << 20)
        );
        let bytes = body.as_bytes();
        for cut in (0..bytes.len().min(20_000)).step_by(7) {
            let mut tap = Tap::Json(Box::default());
            let first = observe(&mut tap, &bytes[..cut]);
            let found = first.or_else(|| observe(&mut tap, &bytes[cut..]));
            assert_eq!(found.as_deref(), Some("resp_6"), "cut at {cut}");
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "[a-z\"\\\\{}\\[\\],: \u{e9}]{0,12}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(serde_json::Value::Array),
                prop::collection::vec(
                    (prop_oneof![Just("id".to_owned()), "[a-z\"]{0,4}"], inner),
                    0..5
                )
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Whatever the object and wherever it is cut, the scanner finds
        /// what serde_json reads as the top-level string `id`.
        #[test]
        fn the_scanner_agrees_with_serde_json(
            fields in proptest::collection::vec(
                (proptest::prelude::prop_oneof![
                    proptest::strategy::Just("id".to_owned()),
                    "[a-z\"]{0,4}"
                ], json_value()),
                0..6,
            ),
            cut in 0usize..400,
        ) {
            let object = serde_json::Value::Object(fields.into_iter().collect());
            let bytes = serde_json::to_vec(&object).unwrap();
            let want = object
                .get("id")
                .and_then(serde_json::Value::as_str)
                .filter(|id| !id.is_empty() && id.len() <= MAX_ID)
                .map(str::to_owned);
            let cut = cut.min(bytes.len());
            let mut tap = Tap::Json(Box::default());
            let got = observe(&mut tap, &bytes[..cut]).or_else(|| observe(&mut tap, &bytes[cut..]));
            proptest::prop_assert_eq!(got, want, "{}", String::from_utf8_lossy(&bytes));
        }
    }
}
