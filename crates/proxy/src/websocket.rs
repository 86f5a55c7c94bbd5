//! WebSocket on `/v1/responses`: Codex opens one before falling back to
//! HTTP streaming, then sends one `{"type": "response.create", …}` message
//! per turn and reads the turn's events back as messages.
//!
//! **The upgrade.** It carries no model (the model comes in each message),
//! so it cannot be routed like a request body. DESIGN.md pins what happens:
//! it goes to the first upstream in config order with `websocket = true`
//! that is healthy and that the caller's key may use (one of its models is
//! on the key's allowlist); it counts as one request against the key's
//! request limit; with no such upstream it is refused as a plain `GET
//! /v1/responses` is (405), and the client falls back to HTTP. An upstream
//! that cannot be reached is passed over for the next (up to the balancer's
//! `max_retries`), as a request would be retried elsewhere, and the failure
//! counts towards its ejection, as a request's would.
//!
//! **The session.** The proxy ends the WebSocket on both sides and relays
//! it message by message, so that a turn is held to what a request is:
//!
//! - only Codex's messages go on: `response.create` and `response.append`
//!   (turns), `response.processed` (another `type` could be a turn to a
//!   laxer upstream), none with a key given twice in any object (the
//!   upstream must read what was checked); any id a message names
//!   (`previous_response_id`, `response_id`) must belong to the key and
//!   live on this session's upstream, any model it names pass the checks;
//! - a turn names a model the key may use (403 otherwise) and the upstream
//!   serves (its `models`; 404 otherwise), and counts against the key's
//!   limits as a request does: one request, and a create's token estimate
//!   reserved (an append's only once a response begins for it); settled
//!   with the `usage` of its response's `response.completed` (or
//!   `.incomplete`, `.failed`), matched by the id its `response.created`
//!   gave it; an `error` answers the oldest turn nothing has answered yet
//!   (the upstream answers in order): its reservation is given back, and it
//!   stays open (taken again should a response begin for it after all); a
//!   response's usage that no turn is left to take is charged to the key
//!   all the same, so no reported usage goes uncounted and none twice;
//!   after the client leaves, the upstream is still read for a few seconds,
//!   for the usage of a turn the client did not wait for;
//! - a `previous_response_id` must belong to the key and live on this
//!   session's upstream (404 `response_not_found` otherwise: the upstream
//!   holds every tenant's responses under one key), and the id of every
//!   `response.created` is remembered with its owner, as for HTTP, so a
//!   client that falls back to HTTP mid-conversation finds its responses;
//! - a refused message is answered on the socket with an `error` message
//!   (`{"type": "error", "status": …, "error": {…}}`) and not sent on;
//!   client messages are bounded by `max_body_bytes` (1009 past it).
//!
//! Pings are answered at each hop and passed on (so liveness carries
//! through); the upstream is offered no extensions (`permessage-deflate`
//! would hide the messages), and one that switches to anything but a plain
//! WebSocket is a 502.
//!
//! The session lives on the client connection's task (it holds the
//! connection's `max_connections` permit, and a drain waits for it up to the
//! drain timeout), and ends when either side closes (the other is sent the
//! close), or when it is silent too long: the upstream's `idle_timeout_ms`
//! while a turn is open, its `websocket_idle_timeout_ms` between turns (a
//! person reading; Codex sends no pings). Then both sides get a 1001 close,
//! so the client reconnects for its next turn instead of failing it.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, Version, header};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use llm_proxy_auth::{
    AuthLayer, KeyEntry, Turn, check_body, rate_headers, strip_upstream_account_headers,
};
use llm_proxy_balance::BalanceHandle;
use llm_proxy_core::{
    Body, BodyBudget, BudgetHold, Dialect, Endpoint, Error, RequestMeta, Waited, header_lists,
    parse_object_within, usage,
};
use llm_proxy_upstream::{Upgrade, Upstream};
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::idle::Activity;
use crate::responses::{
    Found, Kind, MAX_ID, ResponseIds, conversation_id, conversation_not_found,
    id_store_unavailable, response_not_found,
};

/// A session to run once hyper has handed the client's connection over.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

const SEC_WEBSOCKET_EXTENSIONS: header::HeaderName =
    header::HeaderName::from_static("sec-websocket-extensions");
const SEC_WEBSOCKET_KEY: header::HeaderName = header::HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_VERSION: header::HeaderName =
    header::HeaderName::from_static("sec-websocket-version");
const SEC_WEBSOCKET_ACCEPT: header::HeaderName =
    header::HeaderName::from_static("sec-websocket-accept");

/// Messages waiting for a slow client, per session (and
/// [`CLIENT_QUEUE_BYTES`]).
const CLIENT_QUEUE: usize = 32;

/// The upstreams that take WebSocket upgrades, in config order, and what
/// their sessions share.
#[derive(Debug)]
pub(crate) struct Sockets {
    upstreams: Vec<SocketUpstream>,
    /// Upstreams tried per upgrade: the balancer's `max_retries` + 1.
    attempts: usize,
    /// Where response ids are remembered (the HTTP path's map).
    ids: Arc<ResponseIds>,
    /// The longest client message: `max_body_bytes`.
    max_message_bytes: usize,
    /// The bound on request bodies held at once, which a client message
    /// counts against from its first byte read, and with its parsed value
    /// while it is checked.
    budget: Option<BodyBudget>,
    /// The longest a client message may take to arrive, from its first
    /// byte: `request_body_timeout_ms`, as for a request body.
    message_timeout: Duration,
    counters: Arc<SocketCounters>,
}

/// What the metrics read.
#[derive(Debug, Default)]
pub(crate) struct SocketCounters {
    /// Sessions open now.
    pub(crate) open: AtomicU64,
    /// `response.create` messages sent on to an upstream.
    pub(crate) turns: AtomicU64,
    /// Client messages refused with an `error` message.
    pub(crate) refused: AtomicU64,
}

/// One upstream with `websocket = true`.
#[derive(Debug)]
pub(crate) struct SocketUpstream {
    /// Its client (with upgrades enabled).
    pub(crate) client: Upstream,
    /// The models it serves; `None`: any.
    pub(crate) models: Option<Vec<String>>,
    /// The longest silence of a session with it while a turn is open.
    pub(crate) idle_timeout: Duration,
    /// The longest silence of a session with it between turns.
    pub(crate) between_turns: Duration,
}

impl Sockets {
    pub(crate) fn new(
        upstreams: Vec<SocketUpstream>,
        max_retries: u32,
        ids: Arc<ResponseIds>,
        max_message_bytes: usize,
        budget: Option<BodyBudget>,
        message_timeout: Duration,
    ) -> Self {
        Sockets {
            upstreams,
            attempts: usize::try_from(max_retries).map_or(usize::MAX, |r| r.saturating_add(1)),
            ids,
            max_message_bytes,
            budget,
            message_timeout,
            counters: Arc::default(),
        }
    }

    /// Whether any upstream takes upgrades.
    pub(crate) fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The counters, for metrics.
    pub(crate) fn counters(&self) -> Arc<SocketCounters> {
        self.counters.clone()
    }
}

/// Whether `req` asks to switch to WebSocket the HTTP/1.1 way (RFC 6455
/// §4.1) on a connection hyper can hand over. (HTTP/2's extended CONNECT,
/// RFC 8441, is not served: such a request gets the plain 405.)
pub(crate) fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && req.version() == Version::HTTP_11
        && header_lists(req.headers(), &header::UPGRADE, "websocket")
        && header_lists(req.headers(), &header::CONNECTION, "upgrade")
        && req.extensions().get::<OnUpgrade>().is_some()
}

/// What [`open`] needs of the proxy.
/// The access log's line of an upgrade request (with `access_log = true`),
/// logged again when its session ends.
#[derive(Clone, Debug)]
pub(crate) struct SessionAccess(pub(crate) Box<crate::metrics::Access>);

/// The access line of a session's end, logged once: with how the session
/// ended, or, when its future is dropped before that (the connection
/// closed at the drain's timeout, an embedding app's runtime dropped), as
/// `cut`.
struct SessionLine {
    access: Option<Box<crate::metrics::Access>>,
    start: Instant,
    /// The session's [`Session::started`].
    turns: Arc<AtomicU64>,
}

impl SessionLine {
    fn log(&mut self, end: &'static str) {
        if let Some(access) = self.access.take() {
            let turns = self.turns.load(Ordering::Relaxed);
            access.log(self.start.elapsed(), end, Some(turns));
        }
    }
}

impl Drop for SessionLine {
    fn drop(&mut self) {
        self.log("cut");
    }
}

pub(crate) struct Ctx<'a> {
    pub(crate) sockets: &'a Sockets,
    pub(crate) auth: Option<&'a AuthLayer>,
    pub(crate) balance: &'a BalanceHandle<crate::app::UpstreamService>,
    /// The client connection's watch, whose task runs the session; `None`
    /// outside the proxy's server (an embedding app's), where the session
    /// gets a task of its own.
    pub(crate) conn: Option<&'a Arc<Activity>>,
}

/// Answer an upgrade request on `/v1/responses` (see the module docs): the
/// upstream's `101` with the session set up behind it, the upstream's own
/// refusal, or the proxy's error.
pub(crate) async fn open<B>(ctx: Ctx<'_>, mut req: Request<B>) -> Result<Response<Body>, Error> {
    let access = req.extensions_mut().remove::<SessionAccess>();
    // The connection is the client's WebSocket once switched: a body sent
    // with the upgrade would be read as its first frames.
    if req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
    {
        return Err(Error::UnreadableBody(
            "a WebSocket upgrade carries none".into(),
        ));
    }
    let key = match ctx.auth {
        Some(auth) => Some(auth.authenticate(req.headers())?),
        None => None,
    };
    if let (Some(key), Some(caller)) = (&key, req.extensions().get::<llm_proxy_core::CallerSlot>())
    {
        caller.set(&key.name);
    }
    let authenticated = key.is_some();
    let mut candidates = ctx
        .sockets
        .upstreams
        .iter()
        .filter(|u| {
            key.as_ref()
                .is_none_or(|k| k.allows_any_model(u.models.as_deref()))
                && ctx.balance.is_healthy(u.client.name())
        })
        .take(ctx.sockets.attempts)
        .collect::<Vec<_>>()
        .into_iter();
    if candidates.len() == 0 {
        tracing::debug!("no WebSocket upstream for this key: refused");
        return Err(Error::MethodNotAllowed {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            allow: "POST",
        });
    }
    // The proxy reads the session's frames as version 13, the only one
    // (RFC 6455 §4.2.2: any other is answered 426 naming the versions
    // spoken), whatever version an upstream would have agreed to.
    if req
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .map(http::HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut resp = Error::UnsupportedParameter {
            param: "sec-websocket-version".into(),
            message: "this proxy speaks WebSocket version 13".into(),
        }
        .into_response();
        *resp.status_mut() = http::StatusCode::UPGRADE_REQUIRED;
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, http::HeaderValue::from_static("13"));
        return Ok(resp);
    }
    let decision = match (ctx.auth, &key) {
        (Some(auth), Some(key)) => match auth.acquire_request(key, Dialect::OpenAi).await {
            Ok(decision) => decision,
            Err(refusal) => return Ok(refusal),
        },
        _ => None,
    };
    let client_side = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    // The proxy reads the messages: no extension may change their bytes.
    parts.headers.remove(SEC_WEBSOCKET_EXTENSIONS);
    // An upstream that cannot be reached (or breaks the exchange, or does
    // not answer in time) is passed over for the next one: an upgrade is
    // a `GET`, and nothing of the session has happened yet.
    let mut failed = None;
    let (upstream, head, io) = loop {
        let Some(upstream) = candidates.next() else {
            return Err(failed.unwrap_or_else(|| {
                Error::NoUpstreamAvailable("no WebSocket upstream could be tried".into())
            }));
        };
        let mut attempt = Request::new(());
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = parts.uri.clone();
        *attempt.version_mut() = parts.version;
        *attempt.headers_mut() = parts.headers.clone();
        let started = Instant::now();
        let name = upstream.client.name();
        let sent = ctx.balance.seen(name);
        let upgraded = upstream.client.upgrade(attempt).await;
        // The upstream's handshake, however it went, is not the proxy's
        // overhead.
        if let Some(waited) = parts.extensions.get::<Waited>() {
            waited.add(started.elapsed());
        }
        match upgraded {
            Ok(Upgrade::Switched { head, io }) => {
                // Its failure count stands until the session ends: one
                // that breaks every session is ejected like a server that
                // breaks every stream.
                if let Some(sent) = sent {
                    ctx.balance.answered(name, sent);
                }
                break (upstream, head, io);
            }
            Ok(Upgrade::Refused(mut resp)) => {
                // A 429 rests the upstream, a 5xx counts against it, as a
                // request's answer would.
                ctx.balance
                    .refused(name, resp.status(), resp.headers(), started.elapsed());
                key_rate_headers(&mut resp, authenticated, decision.as_ref());
                return Ok(resp);
            }
            Err(e @ (Error::BadGateway { .. } | Error::UpstreamTimeout { .. })) => {
                tracing::debug!(upstream = %name, error = %e, "WebSocket upgrade failed");
                // As a failed request would: towards the upstream's ejection.
                ctx.balance.report(name, Err(started.elapsed()));
                failed = Some(e);
            }
            Err(e) => return Err(e),
        }
    };
    // The key went upstream as the client sent it: the answer must be the
    // one RFC 6455 derives from it (§4.1: else the client fails the
    // connection), not a 101 from something that does not speak WebSocket.
    let accepts = match parts.headers.get(SEC_WEBSOCKET_KEY) {
        Some(key) => head
            .headers()
            .get(SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|accept| {
                accept.as_bytes() == derive_accept_key(key.as_bytes()).as_bytes()
            }),
        None => true,
    };
    if !accepts
        || !header_lists(head.headers(), &header::UPGRADE, "websocket")
        || head.headers().contains_key(SEC_WEBSOCKET_EXTENSIONS)
    {
        // Dropping `io` closes the upstream's connection.
        return Err(Error::BadGateway {
            upstream: upstream.client.name().clone(),
            reason: "the upstream switched to something other than a plain WebSocket".into(),
        });
    }
    let session = Session {
        auth: ctx.auth.cloned(),
        owner: key.as_ref().map(|k| k.name.clone()),
        key,
        ids: ctx.sockets.ids.clone(),
        upstream: upstream.client.name().clone(),
        answered: ctx.balance.seen(upstream.client.name()),
        balance: ctx.balance.clone(),
        client_done: AtomicBool::new(false),
        broke: AtomicBool::new(false),
        waiting_on_client: AtomicBool::new(false),
        models: upstream.models.clone(),
        turns: Mutex::default(),
        open_turns: AtomicUsize::new(0),
        deltas: AtomicU64::new(0),
        next_sequence: AtomicU64::new(0),
        creates: Mutex::default(),
        ended: Mutex::default(),
        budget: ctx.sockets.budget.clone(),
        counters: ctx.sockets.counters.clone(),
        started: Arc::default(),
    };
    let started = session.started.clone();
    let run = relay(
        client_side,
        io,
        session,
        Silence {
            in_turn: upstream.idle_timeout,
            between_turns: upstream.between_turns,
        },
        Incoming {
            max_bytes: ctx.sockets.max_message_bytes,
            timeout: ctx.sockets.message_timeout,
            budget: ctx.sockets.budget.clone(),
        },
        ctx.conn.cloned(),
    );
    // Made before the future and moved into it: a session whose future is
    // dropped unfinished (its connection closed at the drain's timeout) is
    // logged as it goes.
    let line = access.map(|SessionAccess(mut access)| {
        access.status = 101;
        access.upstream = Some(upstream.client.name().clone());
        SessionLine {
            access: Some(access),
            start: Instant::now(),
            turns: started,
        }
    });
    let run = async move {
        let end = run.await;
        if let Some(mut line) = line {
            line.log(end);
        }
    };
    match ctx.conn {
        Some(conn) => conn.hold(Box::pin(run)),
        None => drop(tokio::spawn(run)),
    }
    let mut resp = head.map(|()| llm_proxy_core::empty());
    key_rate_headers(&mut resp, authenticated, decision.as_ref());
    Ok(resp)
}

/// With auth on, what the auth layer does to every answer through it: the
/// upstream's `x-ratelimit-*` headers (its provider account's) removed, and
/// a limited key's own added.
fn key_rate_headers<B>(
    resp: &mut Response<B>,
    authenticated: bool,
    decision: Option<&llm_proxy_auth::limit::Decision>,
) {
    if authenticated {
        strip_upstream_account_headers(resp.headers_mut());
    }
    if let Some(decision) = decision {
        rate_headers(resp.headers_mut(), decision);
    }
}

impl Session {
    /// The upstream broke off a turn (it went, closed or stalled while the
    /// client waited): towards its ejection, as a stream it broke would be.
    /// Reported once per session: a stall the proxy closes on is not
    /// reported again when the upstream's side then ends.
    fn broke_off(&self) {
        if !self.broke.swap(true, Ordering::Relaxed) {
            self.balance.report(&self.upstream, Err(Duration::ZERO));
        }
    }
}

/// One client's session with one upstream.
struct Session {
    auth: Option<AuthLayer>,
    key: Option<Arc<KeyEntry>>,
    /// The key's name: the owner of the responses created here.
    owner: Option<Arc<str>>,
    ids: Arc<ResponseIds>,
    upstream: Arc<str>,
    /// Told how the session ended, for the upstream's health.
    balance: BalanceHandle<crate::app::UpstreamService>,
    /// What the balancer had counted of the upstream when it answered the
    /// upgrade: a session that ends whole resets its failure count only
    /// if none was counted since.
    answered: Option<llm_proxy_balance::Seen>,
    /// The client's side is done (it closed, went, or the proxy closed the
    /// session): the upstream's side ends because of that.
    client_done: AtomicBool,
    /// The upstream broke off a turn ([`Session::broke_off`]).
    broke: AtomicBool,
    /// The upstream pump waits for room in the client's queue (the client
    /// does not read): a silence then is not the upstream's.
    waiting_on_client: AtomicBool,
    models: Option<Vec<String>>,
    /// Turns sent on and not ended yet, oldest first.
    turns: Mutex<VecDeque<Pending>>,
    /// `response.create` messages sent on whose response has not ended
    /// (with or without a key): which silence bound applies.
    open_turns: AtomicUsize,
    /// Output deltas the upstream sent so far (counted with a key only).
    deltas: AtomicU64,
    /// One past the highest `sequence_number` of the upstream's messages
    /// since the last `response.created`.
    next_sequence: AtomicU64,
    /// The open creates, in order: the id of the response each began, once
    /// its `response.created` came (at most [`MAX_PENDING`]).
    /// `open_turns` is its length, read without the lock.
    creates: Mutex<VecDeque<Option<Box<str>>>>,
    /// The responses that ended last (at most [`ENDED_KEPT`]): a second end
    /// of one is ignored, not charged again.
    ended: Mutex<VecDeque<Box<str>>>,
    /// See [`Sockets`].
    budget: Option<BodyBudget>,
    counters: Arc<SocketCounters>,
    /// Turns this session passed on (`response.create` and
    /// `response.append`, as [`SocketCounters::turns`]): its access line's
    /// `turns`.
    started: Arc<AtomicU64>,
}

/// How many ended responses a session remembers, to ignore a repeated end.
const ENDED_KEPT: usize = 16;

impl Session {
    /// Check a client's text message: `Ok` with the reservation of the
    /// turn it starts (a `response.create`, with a key), or the error to
    /// answer with. A refusal counts against the key's request limit, as a
    /// refused request does over HTTP (a 429 instead once it is spent), but
    /// for a message that is no JSON object or too large: those the parse
    /// layer refuses over HTTP, before the key's limits.
    async fn admit(&self, text: &str) -> Result<Admitted, Error> {
        let refused = match self.check(text).await {
            Ok(admitted) => return Ok(admitted),
            Err(e) => e,
        };
        let counted = !matches!(
            refused,
            Error::RateLimited { .. }
                | Error::InvalidJson(_)
                | Error::InvalidBody
                | Error::BodyBufferFull { .. }
                | Error::ParsedTooLarge { .. }
                | Error::IdStoreUnavailable(_)
        );
        if let (true, Some(auth), Some(key)) = (counted, &self.auth, &self.key) {
            auth.count_refused_turn(key).await?;
        }
        Err(refused)
    }

    /// [`admit`](Self::admit), before a refusal is counted.
    async fn check(&self, text: &str) -> Result<Admitted, Error> {
        // Repeated top-level keys are refused: the upstream must read the
        // `type`, `model` and ids checked here.
        // Held in the body budget while it is checked.
        let (json, _held) = parse_object_within(text.as_bytes(), self.budget.as_ref())?;
        let kind = json.get("type").and_then(Value::as_str);
        let create = kind == Some("response.create");
        let turn = match kind {
            // A turn; and (older Codex) more input, which may start one:
            // counted as one, so nothing generates uncounted.
            Some("response.create" | "response.append") => true,
            // That Codex has read a response: nothing else in it (what an
            // upstream might answer with an `error`, or act on, unchecked).
            Some("response.processed") => {
                if let Some(other) = json
                    .keys()
                    .find(|k| !matches!(k.as_str(), "type" | "response_id"))
                {
                    return Err(Error::UnsupportedParameter {
                        param: other.clone(),
                        message: format!(
                            "`response.processed` takes `response_id` only, not `{other}`"
                        ),
                    });
                }
                false
            }
            other => {
                return Err(Error::UnsupportedParameter {
                    param: "type".into(),
                    message: format!(
                        "messages of type {} are not supported here; send response.create",
                        other.map_or_else(|| "(none)".to_owned(), |t| format!("`{t}`"))
                    ),
                });
            }
        };
        let meta = RequestMeta::parsed(
            Endpoint::Responses,
            Bytes::copy_from_slice(text.as_bytes()),
            json,
        );
        // In the order HTTP checks them, where the auth layer comes before
        // routing: what the key may name first (its models; a
        // `conversation` needs `passthrough`), so that a key learns nothing
        // of the models it may not use; then what this upstream serves,
        // the responses it continues and where a conversation lives.
        if let Some(key) = &self.key {
            check_body(key, &meta)?;
        }
        match meta.model() {
            Some(model) => self.check_model(model)?,
            None if create => return Err(Error::MissingModel),
            None => {}
        }
        let json = meta.json();
        for param in ["previous_response_id", "response_id"] {
            if let Some(id) = json.and_then(|j| j.get(param)).filter(|id| !id.is_null()) {
                let Some(id) = id.as_str() else {
                    return Err(Error::UnsupportedParameter {
                        param: param.into(),
                        message: format!("`{param}` must be a string"),
                    });
                };
                self.check_id(param, id).await?;
            }
        }
        if let Some(id) = json.and_then(conversation_id) {
            self.check_conversation(id).await?;
        }
        let admitted = |reservation| Admitted {
            turn,
            create,
            reservation,
        };
        let Some(key) = &self.key else {
            return Ok(admitted(None));
        };
        match (&self.auth, turn) {
            (Some(auth), true) => Ok(admitted(Some(auth.admit_turn(key, &meta).await?))),
            _ => Ok(admitted(None)),
        }
    }

    /// A model named by a message: one the upstream serves (the key's
    /// allowlist is the auth layer's [`check_body`]).
    fn check_model(&self, model: &str) -> Result<(), Error> {
        if let Some(models) = &self.models
            && !models.iter().any(|m| m == model)
        {
            return Err(Error::ApiNotServed(format!(
                "model `{model}` is not served by `{}`, this WebSocket's upstream; send it over HTTP",
                self.upstream
            )));
        }
        Ok(())
    }

    /// A response id named by a message (as `param`): the key's, on this
    /// upstream.
    async fn check_id(&self, param: &str, id: &str) -> Result<(), Error> {
        match self
            .ids
            .lookup(Kind::Response, id, self.owner.as_deref())
            .await
        {
            Found::Yours(home) if home == self.upstream => Ok(()),
            // Over HTTP it could not be continued either.
            Found::Yours(home) if self.balance.seen(&home).is_none() => {
                Err(Error::ResponseNotFound(format!(
                    "{param} `{id}` lives on upstream `{home}`, which is not configured any more"
                )))
            }
            Found::Yours(home) => Err(Error::ResponseNotFound(format!(
                "{param} `{id}` lives on upstream `{home}`, not on this WebSocket's; continue it over HTTP"
            ))),
            Found::NotYours | Found::Unknown => Err(response_not_found(&format!("{param} `{id}`"))),
            Found::Unreachable => Err(id_store_unavailable(&format!("{param} `{id}`"))),
        }
    }

    /// A conversation named by a message: the key's, on this upstream, when
    /// this proxy saw it made; one it never saw goes on without auth and is
    /// refused with it, as over HTTP.
    async fn check_conversation(&self, id: &str) -> Result<(), Error> {
        match self
            .ids
            .lookup(Kind::Conversation, id, self.owner.as_deref())
            .await
        {
            Found::Yours(home) if home != self.upstream && self.balance.seen(&home).is_none() => {
                Err(Error::ConversationNotFound(format!(
                    "conversation `{id}` lives on upstream `{home}`, which is not configured any more"
                )))
            }
            Found::Yours(home) if home != self.upstream => {
                Err(Error::ConversationNotFound(format!(
                    "conversation `{id}` lives on upstream `{home}`, not on this WebSocket's; continue it over HTTP"
                )))
            }
            Found::Yours(home) => {
                self.ids.keep_conversation(id, home, self.owner.clone());
                Ok(())
            }
            Found::NotYours => Err(conversation_not_found(id)),
            Found::Unknown if self.owner.is_some() => Err(conversation_not_found(id)),
            Found::Unknown => Ok(()),
            Found::Unreachable => Err(id_store_unavailable(&format!("conversation `{id}`"))),
        }
    }

    /// Read an upstream's text message: remember the ids it creates, settle
    /// the turns it ends.
    fn observe(&self, text: &str) {
        // Output deltas, counted for a key's turns: a turn cut before its
        // usage is charged at least one token a delta it delivered (a
        // substring, as `StreamUsage` counts them on HTTP).
        if self.key.is_some() && text.contains(".delta\"") {
            self.deltas.fetch_add(1, Ordering::Relaxed);
        }
        let mut numbers = llm_proxy_core::sse::SequenceNumbers::default();
        numbers.observe(text.as_bytes());
        let next = numbers.next();
        self.next_sequence.fetch_max(next, Ordering::Relaxed);
        // Most messages are deltas: skip them without parsing. (What is
        // decided below is decided on the parsed top-level `type`.)
        const ENDS: [&str; 5] = [
            "response.created",
            "response.completed",
            "response.incomplete",
            "response.failed",
            "\"error\"",
        ];
        // (An escaped type, `response.complete\u0064`, reads the same to
        // the client: any escape is parsed too.)
        if !text.contains("\\u") && !ENDS.iter().any(|k| text.contains(k)) {
            return;
        }
        let Ok(event) = llm_proxy_core::object_from_str::<Event<'_>>(text) else {
            return;
        };
        // An id over the id map's cap is no id (an upstream's messages run
        // to 16 MiB: the books below would keep it).
        let id = event
            .response
            .as_ref()
            .and_then(|r| r.id.as_deref())
            .filter(|id| id.len() <= MAX_ID);
        let model = event.response.as_ref().and_then(|r| r.model.as_deref());
        let ends = matches!(
            &*event.kind,
            "response.completed" | "response.incomplete" | "response.failed"
        );
        if ends
            && let Some(id) = id
            && !self.first_end(id)
        {
            // A response that already ended (an upstream that repeats
            // itself): its turn is settled, its tokens charged.
            return;
        }
        // Which creates are open: one whose response began ends with that
        // response's end (or the session); an `error` ends only a create no
        // response began for (an `error` may answer a message that opened
        // no turn, as a `response.processed`).
        if ends || matches!(&*event.kind, "response.created" | "error") {
            self.with_creates(|creates| match &*event.kind {
                "response.created" => {
                    if let (Some(id), Some(slot)) = (id, creates.iter_mut().find(|c| c.is_none())) {
                        *slot = Some(id.into());
                    }
                }
                "error" if !ends => {
                    if let Some(at) = creates.iter().position(Option::is_none) {
                        creates.remove(at);
                    }
                }
                _ => {
                    let at = creates
                        .iter()
                        .position(|c| c.is_some() && c.as_deref() == id)
                        .or_else(|| creates.iter().position(Option::is_none));
                    if let Some(at) = at {
                        creates.remove(at);
                    }
                }
            });
        }
        match &*event.kind {
            "response.created" => {
                // Each response numbers its events from its own start, as
                // on HTTP: a turn broken off is told one past its own.
                self.next_sequence.store(next, Ordering::Relaxed);
                let Some(id) = id else { return };
                self.ids
                    .remember(id, self.upstream.clone(), self.owner.clone());
                self.with_turns(|turns| {
                    if let Some(at) = unstarted(turns) {
                        let pending = &mut turns[at];
                        // Held from now on (an append's, or one an `error`
                        // was taken for): a cut keeps it.
                        pending.turn.reserve_again();
                        pending.id = Some(id.into());
                        pending.deltas_from = self.deltas.load(Ordering::Relaxed);
                    }
                });
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                let usage = event
                    .response
                    .as_ref()
                    .and_then(|r| r.usage.as_ref())
                    .and_then(usage::from_usage_value);
                // The turn that created this response; else the oldest one
                // without a response (an upstream that sent no
                // `response.created`).
                let pending = self.with_turns(|turns| {
                    let at = turns
                        .iter()
                        .position(|p| p.id.is_some() && p.id.as_deref() == id)
                        .or_else(|| unstarted(turns))?;
                    turns.remove(at)
                });
                match (pending, usage) {
                    (Some(mut pending), usage) => {
                        if let Some(model) = model {
                            pending.turn.default_model(model);
                        }
                        pending.turn.settle(usage, true);
                    }
                    // No turn to settle: the tokens are still the key's.
                    (None, Some(usage)) => {
                        if let (Some(auth), Some(key)) = (&self.auth, &self.key) {
                            auth.charge_usage(key, model, usage);
                        }
                    }
                    (None, None) => {}
                }
            }
            "error" => {
                // The upstream answers in order: an error answers the oldest
                // message no response or error has answered yet. That turn
                // generated nothing: its reservation is given back, and it
                // stays open (should a response turn out to be its after
                // all, the reservation is taken again, and the usage
                // charged). An error once every turn has begun is a started
                // turn's: it stands, settled by its response's end or the
                // session's.
                self.with_turns(|turns| {
                    if let Some(pending) = turns.iter_mut().find(|p| p.id.is_none() && !p.errored) {
                        pending.errored = true;
                        pending.turn.give_back();
                    }
                });
            }
            _ => {}
        }
    }

    /// Whether response `id` ends for the first time (as far as the last
    /// [`ENDED_KEPT`] ends tell); remembers it.
    fn first_end(&self, id: &str) -> bool {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if ended.iter().any(|e| &**e == id) {
            return false;
        }
        if ended.len() == ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back(id.into());
        true
    }

    /// Book a turn sent on (see [`Pending`] and [`MAX_PENDING`]).
    fn push(&self, mut turn: Turn, create: bool) {
        if !create {
            turn.give_back();
        }
        self.with_turns(|turns| {
            if turns.len() >= MAX_PENDING
                && let Some(at) = turns.iter().position(|p| p.id.is_none())
                && let Some(dropped) = turns.remove(at)
            {
                dropped.turn.settle(None, true);
            }
            turns.push_back(Pending {
                turn,
                deltas_from: 0,
                create,
                errored: false,
                id: None,
            });
        });
    }

    /// The turn booked last was never sent (the upstream's connection
    /// failed): its reservation is given back.
    fn unbook_last(&self) {
        let unsent = self.with_turns(|turns| {
            if turns.back().is_some_and(|p| p.id.is_none()) {
                turns.pop_back()
            } else {
                None
            }
        });
        if let Some(pending) = unsent {
            pending.turn.settle(None, false);
        }
    }

    fn with_creates<R>(&self, f: impl FnOnce(&mut VecDeque<Option<Box<str>>>) -> R) -> R {
        let mut creates = self.creates.lock().unwrap_or_else(PoisonError::into_inner);
        let r = f(&mut creates);
        if creates.len() > MAX_PENDING {
            creates.pop_front();
        }
        self.open_turns.store(creates.len(), Ordering::Relaxed);
        r
    }

    fn with_turns<R>(&self, f: impl FnOnce(&mut VecDeque<Pending>) -> R) -> R {
        f(&mut self.turns.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What [`Session::admit`] made of a client message.
struct Admitted {
    /// It may start a response: a `response.create` or `.append`.
    turn: bool,
    /// A `response.create`.
    create: bool,
    /// The turn's reservation, with a key.
    reservation: Option<Turn>,
}

/// A turn sent on, and the id of the response it created once known.
struct Pending {
    turn: Turn,
    /// The session's count of output deltas when its response began: the
    /// deltas after it, up to the next response's start, are its (the
    /// upstream runs one response at a time).
    deltas_from: u64,
    /// A `response.create`. An append may start no response (it adds input
    /// to one in progress): it holds no reservation until one begins for it.
    create: bool,
    /// An `error` was taken to answer it.
    errored: bool,
    id: Option<Box<str>>,
}

/// Turns sent on and not ended, at most, per session: past it the oldest
/// without a response is dropped from the books (a create keeps its
/// reservation, an append holds none), so a client whose messages the
/// upstream never answers cannot grow the queue.
const MAX_PENDING: usize = 256;

/// The turn a response that begins belongs to: the oldest without one,
/// creates before appends (an append may start none), turns no `error` was
/// taken for before those.
fn unstarted(turns: &VecDeque<Pending>) -> Option<usize> {
    let first = |matches: &dyn Fn(&Pending) -> bool| {
        turns
            .iter()
            .position(|p| p.create && matches(p))
            .or_else(|| turns.iter().position(matches))
    };
    first(&|p| p.id.is_none() && !p.errored).or_else(|| first(&|p| p.id.is_none()))
}

/// An upstream's message: its top-level type, and its response's id and
/// usage when it carries a response.
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    response: Option<EventResponse<'a>>,
}

#[derive(serde::Deserialize)]
struct EventResponse<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
    usage: Option<Value>,
}

impl Drop for Session {
    /// The session is over (or dropped mid-way): turns cut before their end
    /// keep their reservation, as a stream cut before its usage does; an
    /// append no response began for fed another turn's response (whose
    /// usage counts it) or started nothing: given back.
    fn drop(&mut self) {
        let turns =
            std::mem::take(&mut *self.turns.get_mut().unwrap_or_else(PoisonError::into_inner));
        let deltas = *self.deltas.get_mut();
        // A begun response's deltas run to the next one's start.
        let mut starts: Vec<u64> = turns
            .iter()
            .filter(|p| p.id.is_some())
            .map(|p| p.deltas_from)
            .collect();
        starts.sort_unstable();
        for pending in turns {
            if pending.id.is_some() {
                let end = starts
                    .iter()
                    .find(|&&s| s > pending.deltas_from)
                    .copied()
                    .unwrap_or(deltas);
                pending
                    .turn
                    .settle_cut(end.saturating_sub(pending.deltas_from));
                continue;
            }
            let started = pending.create;
            pending.turn.settle(None, started);
        }
    }
}

/// Counts a session open while it lives.
struct Open(Arc<SocketCounters>);

impl Open {
    fn new(counters: Arc<SocketCounters>) -> Self {
        counters.open.fetch_add(1, Ordering::Relaxed);
        Open(counters)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `error` message answering a refused client message.
fn error_message(e: &Error) -> Message {
    let value = serde_json::json!({
        "type": "error",
        "status": e.status().as_u16(),
        "error": {
            "type": e.error_type(),
            "code": e.code(),
            "message": e.message(),
            "param": e.param(),
        },
    });
    Message::text(value.to_string())
}

/// Relay the session's messages between the client's connection, once
/// hyper hands it over, and the upstream's, until either side closes,
/// neither sends a message for `idle`, or the server drains (`conn`'s
/// drain: the session is closed once no turn is open).
async fn relay(
    client: OnUpgrade,
    upstream: TokioIo<Upgraded>,
    session: Session,
    silence: Silence,
    incoming: Incoming,
    conn: Option<Arc<Activity>>,
) -> &'static str {
    let meter = Arc::new(Meter::new(incoming.budget.as_ref(), BudgetHold::for_bodies));
    // What the upstream sends, as it is read and until it is written to
    // the client, counts in the answers' pool.
    let answers = Arc::new(Meter::new(incoming.budget.as_ref(), BudgetHold::for_answer));
    let upstream = Metered {
        io: upstream,
        meter: answers.clone(),
    };
    let client = match client.await {
        Ok(client) => Metered {
            io: TokioIo::new(client),
            meter: meter.clone(),
        },
        Err(e) => {
            tracing::debug!(error = %e, "the client's connection was not handed over");
            return "not switched";
        }
    };
    let _open = Open::new(session.counters.clone());
    let from_client = WebSocketConfig::default()
        .max_message_size(Some(incoming.max_bytes))
        .max_frame_size(Some(incoming.max_bytes));
    let from_upstream = WebSocketConfig::default()
        .max_message_size(Some(MAX_UPSTREAM_MESSAGE))
        .max_frame_size(Some(MAX_UPSTREAM_MESSAGE));
    let client = WebSocketStream::from_raw_socket(client, Role::Server, Some(from_client)).await;
    let upstream =
        WebSocketStream::from_raw_socket(upstream, Role::Client, Some(from_upstream)).await;
    let (client_tx, client_rx) = client.split();
    let (upstream_tx, upstream_rx) = upstream.split();
    let (to_client, queued) = mpsc::channel(CLIENT_QUEUE);
    let queue = ClientQueue {
        tx: to_client,
        bytes: Arc::new(Semaphore::new(CLIENT_QUEUE_BYTES)),
    };
    let clock = Clock::new();
    let closing = Closing::default();

    let talk = async {
        let to_client = queue.clone();
        let up = pin!(pump_up(
            &session,
            client_rx,
            upstream_tx,
            to_client,
            &clock,
            &closing,
            (&meter, incoming.timeout),
        ));
        let mut down = pin!(pump_down(&session, upstream_rx, queue, &clock, &answers));
        tokio::select! {
            () = &mut down => {}
            // The client closed or went (or the session is closing): the
            // upstream was sent a close; give it a moment to answer.
            () = up => {
                let _ = tokio::time::timeout(CLOSE_GRACE, down).await;
            }
        }
    };
    // Once the proxy has closed the session on the client (for its
    // conduct), what is still queued for it has `CLOSE_GRACE` to go: a
    // client that reads nothing would hold the writer, and the session,
    // until its silence ran out.
    let writer = async {
        let write = write_client(queued, client_tx);
        let cut = async {
            closing.client_cut.notified().await;
            tokio::time::sleep(CLOSE_GRACE).await;
        };
        tokio::select! {
            () = write => {}
            () = cut => tracing::debug!("a WebSocket client took none of its last messages"),
        }
    };
    let mut all = pin!(async { tokio::join!(talk, writer) });
    let bound = || {
        if session.open_turns.load(Ordering::Relaxed) > 0 {
            silence.in_turn
        } else {
            silence.between_turns
        }
    };
    // The server drains: the turn under way (if any) ends as it would,
    // then the session is closed as a silent one is.
    let drained = async {
        match &conn {
            Some(conn) => conn.draining().await,
            None => std::future::pending().await,
        }
        while session.open_turns.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    };
    let reason = tokio::select! {
        _ = &mut all => return "closed",
        () = clock.silent_for(bound, silence.in_turn.min(silence.between_turns)) => {
            tracing::debug!("closing a silent WebSocket session");
            if session.open_turns.load(Ordering::Relaxed) > 0
                && !session.waiting_on_client.load(Ordering::Relaxed)
            {
                // The upstream owed an answer and stalled: as a stream
                // that stalls, a failure of it, and the client hears so
                // before the close.
                session.client_done.store(true, Ordering::Relaxed);
                session.broke_off();
                let reason = format!(
                    "no message from the upstream for {} ms during a turn",
                    silence.in_turn.as_millis()
                );
                closing.tell_first(interrupted(&session, &reason));
            }
            "idle"
        }
        () = drained => {
            tracing::debug!("closing a WebSocket session: the server is shutting down");
            "shutting down"
        }
    };
    // Both sides are told (1001, going away), so a client marks its socket
    // closed before it sends the next turn on it.
    closing.close(reason);
    let _ = tokio::time::timeout(CLOSE_GRACE, all).await;
    reason
}

/// How often a drained session looks whether its open turn has ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Tells the client pump to close both sides with 1001, and why.
#[derive(Default)]
struct Closing {
    notify: Notify,
    /// The client pump closed the session on the client (1008): the writer
    /// gets [`CLOSE_GRACE`] for what is left.
    client_cut: Notify,
    reason: std::sync::OnceLock<&'static str>,
    /// A message for the client before the close (a turn's error).
    first: Mutex<Option<Message>>,
}

impl Closing {
    /// Send the client `message` before the close.
    fn tell_first(&self, message: Message) {
        *self.first.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    fn take_first(&self) -> Option<Message> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn close(&self, reason: &'static str) {
        let _ = self.reason.set(reason);
        self.notify.notify_one();
    }

    async fn closed(&self) -> &'static str {
        self.notify.notified().await;
        self.reason.get().copied().unwrap_or("going away")
    }
}

/// How long a session may be silent.
#[derive(Clone, Copy, Debug)]
struct Silence {
    /// While a turn is open (the upstream owes an answer): the upstream's
    /// `idle_timeout_ms`.
    in_turn: Duration,
    /// Between turns (a person reading or typing): `websocket_idle_timeout_ms`.
    between_turns: Duration,
}

/// The longest message taken from an upstream: a `response.completed`
/// carries the whole response (a long answer is hundreds of KiB).
const MAX_UPSTREAM_MESSAGE: usize = 16 << 20;

/// Bytes of upstream messages waiting for a slow client, per session (one
/// message larger than this still goes, alone).
const CLIENT_QUEUE_BYTES: usize = 4 << 20;

/// How long the upstream may take to answer a close once the client left.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

type ClientRx = futures_util::stream::SplitStream<WebSocketStream<Metered<TokioIo<Upgraded>>>>;
type ClientTx =
    futures_util::stream::SplitSink<WebSocketStream<Metered<TokioIo<Upgraded>>>, Message>;
type UpstreamRx = futures_util::stream::SplitStream<WebSocketStream<Metered<TokioIo<Upgraded>>>>;
type UpstreamTx =
    futures_util::stream::SplitSink<WebSocketStream<Metered<TokioIo<Upgraded>>>, Message>;

/// Messages for the client, bounded in number and in bytes: each holds
/// permits for its size until it is written.
#[derive(Clone)]
struct ClientQueue {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
}

/// A message on its way to the client: its room in the session's queue,
/// and, for an upstream's, what it holds of the answers' pool.
type Queued = (Message, Option<OwnedSemaphorePermit>, Option<BudgetHold>);

impl ClientQueue {
    /// Queue `message`, waiting while the queue is full; `false` once the
    /// client's writer is gone.
    async fn send(&self, message: Message) -> bool {
        self.send_held(message, None).await
    }

    /// [`send`](Self::send), `held` given back once it is written.
    async fn send_held(&self, message: Message, held: Option<BudgetHold>) -> bool {
        let size = u32::try_from(message.len().clamp(1, CLIENT_QUEUE_BYTES)).unwrap_or(u32::MAX);
        let Ok(permit) = self.bytes.clone().acquire_many_owned(size).await else {
            return false;
        };
        self.tx.send((message, Some(permit), held)).await.is_ok()
    }
}

/// End the session for the client's conduct: it is sent a close (1008,
/// `reason`), and the upstream one (given [`CLOSE_GRACE`]).
async fn close_for_policy(
    session: &Session,
    closing: &Closing,
    to_client: &ClientQueue,
    upstream: &mut UpstreamTx,
    reason: &'static str,
) {
    session.client_done.store(true, Ordering::Relaxed);
    // Before the close is queued: the queue may be full of what the client
    // does not read.
    closing.client_cut.notify_one();
    let close = CloseFrame {
        code: CloseCode::Policy,
        reason: reason.into(),
    };
    to_client.send(Message::Close(Some(close))).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, upstream.send(Message::Close(None))).await;
}

/// Client -> upstream: each message checked, refused ones answered.
async fn pump_up(
    session: &Session,
    mut client: ClientRx,
    mut upstream: UpstreamTx,
    to_client: ClientQueue,
    clock: &Clock,
    closing: &Closing,
    (meter, message_timeout): (&Meter, Duration),
) {
    // Pings since the client's connection last took a write, and how much
    // it had taken then.
    let (mut pings_unread, mut written_at_ping) = (0usize, 0u64);
    loop {
        let message = tokio::select! {
            message = client.next() => {
                // Whole: what its bytes held is counted again, with what it
                // is parsed into, while it is checked.
                meter.finished(message.as_ref());
                message
            }
            () = meter.overdue(message_timeout) => {
                tracing::debug!("a WebSocket client message took too long to arrive");
                close_for_policy(session, closing, &to_client, &mut upstream, "message too slow")
                    .await;
                return;
            }
            reason = closing.closed() => {
                let away = || {
                    Message::Close(Some(CloseFrame {
                        code: CloseCode::Away,
                        reason: reason.into(),
                    }))
                };
                session.client_done.store(true, Ordering::Relaxed);
                // The upstream first: a client that reads nothing must not
                // keep it from hearing the close.
                let _ = tokio::time::timeout(CLOSE_GRACE, upstream.send(away())).await;
                if let Some(first) = closing.take_first() {
                    to_client.send(first).await;
                }
                to_client.send(away()).await;
                return;
            }
        };
        let Some(message) = message else { break };
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket client message unreadable");
                // The client's fault, said with RFC 6455 §7.4.1's code (not
                // left to read as the upstream's: the relay closes that
                // side next). A connection already gone hears nothing.
                let close = match e {
                    e if is_budget_full(&e) => {
                        Some((CloseCode::Again, "the proxy's memory for requests is full"))
                    }
                    WsError::Capacity(_) => Some((CloseCode::Size, "message too big")),
                    WsError::Utf8(_) => Some((CloseCode::Invalid, "text message not UTF-8")),
                    WsError::Protocol(_) | WsError::AttackAttempt => {
                        Some((CloseCode::Protocol, "WebSocket protocol error"))
                    }
                    _ => None,
                };
                if let Some((code, reason)) = close {
                    let close = CloseFrame {
                        code,
                        reason: reason.into(),
                    };
                    to_client.send(Message::Close(Some(close))).await;
                }
                break;
            }
        };
        // A client's pings do not keep a session alive, nor do the
        // upstream's answers to them (see `pump_down`).
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            clock.heard();
        }
        let (mut booked, mut created) = (false, false);
        let refusal = match &message {
            Message::Text(text) => match session.admit(text.as_str()).await {
                Ok(admitted) => {
                    if let Some(turn) = admitted.reservation {
                        session.push(turn, admitted.create);
                        booked = true;
                    }
                    if admitted.create {
                        session.with_creates(|c| c.push_back(None));
                        created = true;
                    }
                    if admitted.turn {
                        session.counters.turns.fetch_add(1, Ordering::Relaxed);
                        session.started.fetch_add(1, Ordering::Relaxed);
                    }
                    None
                }
                Err(e) => Some(e),
            },
            Message::Binary(_) => Some(Error::UnsupportedParameter {
                param: "message".into(),
                message: "binary messages are not supported; send JSON text".into(),
            }),
            // Answered by this hop; the upstream gets its own.
            Message::Pong(_) | Message::Frame(_) => continue,
            // Each ping's pong waits in the connection's write buffer
            // while the client reads nothing: a client that pings on
            // without reading would grow it without bound. Pings with no
            // byte written to the client between them are counted.
            Message::Ping(_) => {
                let written = meter.written();
                if written == written_at_ping {
                    pings_unread += 1;
                } else {
                    (pings_unread, written_at_ping) = (0, written);
                }
                if pings_unread > MAX_PINGS_UNREAD {
                    tracing::debug!("a WebSocket client pings on and reads nothing");
                    let reason = "pings while reading nothing";
                    close_for_policy(session, closing, &to_client, &mut upstream, reason).await;
                    return;
                }
                None
            }
            Message::Close(_) => {
                session.client_done.store(true, Ordering::Relaxed);
                // Tungstenite has queued the client's answer: the writer
                // flushes it when it finds the socket closing.
                to_client.send(Message::Close(None)).await;
                let _ = upstream.send(message).await;
                return;
            }
        };
        if let Some(e) = refusal {
            session.counters.refused.fetch_add(1, Ordering::Relaxed);
            if !to_client.send(error_message(&e)).await {
                break;
            }
            continue;
        }
        if upstream.send(message).await.is_err() {
            // Never sent: the turn just booked generated nothing, and
            // opened no turn the upstream owes an answer.
            if booked {
                session.unbook_last();
            }
            if created {
                session.with_creates(|c| {
                    if c.back().is_some_and(Option::is_none) {
                        c.pop_back();
                    }
                });
            }
            break;
        }
    }
    // The client went without a close: close the upstream's side.
    session.client_done.store(true, Ordering::Relaxed);
    let _ = upstream.close().await;
}

/// Upstream -> client: each message read for ids and usage, then queued;
/// once the client is gone, still read (for the usage of a turn it did not
/// wait for) until the upstream closes or the relay stops it.
async fn pump_down(
    session: &Session,
    mut upstream: UpstreamRx,
    to_client: ClientQueue,
    clock: &Clock,
    answers: &Meter,
) {
    let mut client_gone = false;
    let mut broke = None;
    let mut too_big = false;
    while let Some(message) = upstream.next().await {
        // What its bytes held goes with it to the client's queue.
        let held = answers.hold_for(answers.finished(Some(&message)));
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upstream message unreadable");
                // A message over the proxy's own bound, or past its memory
                // for answers, is no fault of the upstream's health.
                too_big = matches!(e, WsError::Capacity(_)) || is_budget_full(&e);
                broke = Some(e);
                break;
            }
        };
        // Pings and pongs prove the peer is up, not that a turn moves or a
        // person is there: a server that pings on its own (uvicorn and
        // Python's `websockets` do, every 20 s) would otherwise hold a stuck
        // turn open past `idle_timeout_ms`, and an idle session for ever.
        if !matches!(
            message,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_)
        ) {
            clock.heard();
        }
        match &message {
            Message::Text(text) => session.observe(text.as_str()),
            // Answers to the pings passed on; the client had its own.
            Message::Pong(_) | Message::Frame(_) => continue,
            Message::Close(_) => {
                let mut message = message;
                if session.open_turns.load(Ordering::Relaxed) > 0
                    && !session.client_done.load(Ordering::Relaxed)
                {
                    // It closed on a turn the client waited for: broken off,
                    // and so the client's close says (1011), whatever code
                    // the upstream closed with.
                    session.broke_off();
                    if !client_gone {
                        let reason = "the upstream closed the session during a turn";
                        to_client.send(interrupted(session, reason)).await;
                    }
                    message = Message::Close(Some(CloseFrame {
                        code: CloseCode::Error,
                        reason: "the upstream closed the session during a turn".into(),
                    }));
                } else if !session.broke.load(Ordering::Relaxed) {
                    // Ended whole: its failure count starts over (unless
                    // failures were counted since it began).
                    if let Some(answered) = session.answered {
                        session.balance.ended_whole(&session.upstream, answered);
                    }
                }
                if !client_gone {
                    to_client.send(message).await;
                }
                // Tungstenite queued the answer to its close: the next read
                // flushes it (and then ends).
                let _ = tokio::time::timeout(CLOSE_GRACE, upstream.next()).await;
                return;
            }
            Message::Ping(_) | Message::Binary(_) => {}
        }
        if !client_gone {
            session.waiting_on_client.store(true, Ordering::Relaxed);
            client_gone = !to_client.send_held(message, Some(held)).await;
            session.waiting_on_client.store(false, Ordering::Relaxed);
        }
    }
    // The upstream went without a close (it broke, or sent what cannot be
    // read): never a clean-looking end. A turn under way gets the error
    // event an interrupted HTTP stream ends with, then the close says 1011.
    let in_turn = session.open_turns.load(Ordering::Relaxed) > 0;
    if in_turn && !too_big && !session.client_done.load(Ordering::Relaxed) {
        // It broke off a turn the client still waited for. (Once the
        // client's side is done, the proxy closed the session: no fault of
        // the upstream.)
        session.broke_off();
    }
    if !client_gone {
        if in_turn {
            let reason = match &broke {
                Some(e) => format!("the upstream's WebSocket failed: {e}"),
                None => "the upstream's WebSocket closed without a close frame".to_owned(),
            };
            to_client.send(interrupted(session, &reason)).await;
        }
        to_client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Error,
                reason: "upstream connection lost".into(),
            })))
            .await;
    }
}

/// The `error` message for a turn the upstream broke off: as an
/// interrupted Responses stream's, code `stream_interrupted`.
fn interrupted(session: &Session, reason: &str) -> Message {
    let value = serde_json::json!({
        "type": "error",
        "status": 502,
        "error": {
            "type": "upstream_error",
            "code": "stream_interrupted",
            "message": format!("upstream `{}`: {reason}", session.upstream),
            "param": null,
        },
        // Numbered after the upstream's messages, as an HTTP stream's
        // error event is.
        "sequence_number": session.next_sequence.load(Ordering::Relaxed),
    });
    Message::text(value.to_string())
}

/// Send the queued messages to the client, then close its side (which also
/// sends the answer to a close of the client's, if one is waiting).
async fn write_client(mut queued: mpsc::Receiver<Queued>, mut client: ClientTx) {
    while let Some((message, _permit, _held)) = queued.recv().await {
        if let Message::Close(_) = message {
            // The session is over: a client that reads nothing has as
            // long to take the close as an upstream has to answer one.
            let close = async {
                // Closed either way: the send fails when the client's own
                // close came first (its answer is queued: `close` sends it).
                let sent = client.send(message).await;
                sent.and(client.close().await)
            };
            if let Ok(Err(e)) = tokio::time::timeout(CLOSE_GRACE, close).await {
                tracing::debug!(error = %e, "WebSocket client write ended");
            }
            return;
        }
        if let Err(e) = client.send(message).await {
            tracing::debug!(error = %e, "WebSocket client write ended");
            break;
        }
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, client.close()).await;
}

/// The most bytes a frame's header takes: two, an 8-byte length, a 4-byte
/// mask.
const FRAME_HEADER_MAX: usize = 14;

/// The most bytes a control frame's header takes: two (its payload is at
/// most 125 bytes), and a client's 4-byte mask. (An upstream's are
/// unmasked: up to 4 bytes of what follows one go uncounted.)
const CONTROL_HEADER_MAX: usize = 6;

/// What may be left counted after a whole data message with nothing under
/// way: the headers of a fragmented message's other frames. Of a message
/// begun in the same read, less than this is not counted, and its clock
/// starts with its next bytes (too few to matter).
const UNDER_WAY_SLACK: usize = 4096;

/// The most pings a client may send while its connection takes no write
/// (each pong waits in the write buffer: at most 125 bytes and a header):
/// past it, the session is closed with 1008.
const MAX_PINGS_UNREAD: usize = 256;

/// What the client's messages may be: their size, how long one may take
/// to arrive, and the budget their bytes count against as they come.
struct Incoming {
    max_bytes: usize,
    timeout: Duration,
    budget: Option<BodyBudget>,
}

/// One side's bytes read since its last whole message, counted in a pool
/// of the budget (the message they belong to is held meanwhile, in part, by
/// the WebSocket reader), and when they began to come.
struct Meter {
    held: Mutex<BudgetHold>,
    budget: Option<BodyBudget>,
    /// A new, empty hold in the pool counted in.
    fresh: fn(Option<&BodyBudget>) -> BudgetHold,
    epoch: Instant,
    /// Milliseconds since `epoch` (plus one) when the first byte of the
    /// message under way came; 0: none under way.
    began: AtomicU64,
    /// A message began.
    begun: Notify,
    /// Bytes written to this side's connection (a peer that reads nothing
    /// leaves it still once its socket's send buffer is full).
    written: AtomicU64,
}

/// Why a side's connection could not be read on: its pool of the budget
/// is spent.
#[derive(Debug)]
struct BudgetFull;

impl std::fmt::Display for BudgetFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the proxy's memory for messages is full")
    }
}

impl std::error::Error for BudgetFull {}

/// Whether a WebSocket error is a [`Meter`]'s full pool.
fn is_budget_full(e: &WsError) -> bool {
    matches!(e, WsError::Io(e) if e.get_ref().is_some_and(|e| e.is::<BudgetFull>()))
}

impl Meter {
    fn new(budget: Option<&BodyBudget>, fresh: fn(Option<&BodyBudget>) -> BudgetHold) -> Self {
        Meter {
            held: Mutex::new(fresh(budget)),
            budget: budget.cloned(),
            fresh,
            epoch: Instant::now(),
            began: AtomicU64::new(0),
            begun: Notify::new(),
            written: AtomicU64::new(0),
        }
    }

    /// Bytes written to this side's connection so far.
    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Count a write's outcome.
    fn wrote(&self, polled: &std::task::Poll<std::io::Result<usize>>) {
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }

    /// `n` bytes more came; `false` when the budget has no room for them.
    fn read(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        if self.began.load(Ordering::Relaxed) == 0 {
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.began.store(now.saturating_add(1), Ordering::Relaxed);
            self.begun.notify_one();
        }
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let total = held.held().saturating_add(n);
        held.hold(total)
    }

    /// The reader gave `message` (`None`: the connection ended): what
    /// was read beyond it stays counted (the start of another message read
    /// with its end; after a control frame, the message it came in the
    /// middle of, and its clock runs on). Returns the bytes its own reading
    /// held, for the caller to count further on.
    fn finished(&self, message: Option<&Result<Message, WsError>>) -> usize {
        let (len, control) = match message {
            Some(Ok(message)) => (
                message.len(),
                matches!(message, Message::Ping(_) | Message::Pong(_)),
            ),
            _ => (usize::MAX, false),
        };
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let total = held.held();
        let header = if control {
            CONTROL_HEADER_MAX
        } else {
            FRAME_HEADER_MAX
        };
        let rest = total.saturating_sub(len.saturating_add(header));
        // A control frame is never fragmented: anything read beyond it is
        // a message under way, however short, which keeps its clock.
        let slack = if control { 0 } else { UNDER_WAY_SLACK };
        if rest <= slack {
            // Nothing under way: what is left is a fragmented message's
            // other headers, or too little to matter.
            held.hold(0);
            self.began.store(0, Ordering::Relaxed);
            return total;
        }
        held.hold(rest);
        if !control {
            // Another message began in what was read.
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            self.began.store(now.saturating_add(1), Ordering::Relaxed);
            self.begun.notify_one();
        }
        total - rest
    }

    /// A hold of `bytes` in this meter's pool (or less, when it has not the
    /// room: the bytes are read already).
    fn hold_for(&self, bytes: usize) -> BudgetHold {
        let mut hold = (self.fresh)(self.budget.as_ref());
        hold.hold(bytes);
        hold
    }

    /// Resolves once a message under way has taken `limit` since its first
    /// byte.
    async fn overdue(&self, limit: Duration) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        loop {
            let began = self.began.load(Ordering::Relaxed);
            if began == 0 {
                self.begun.notified().await;
                continue;
            }
            let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            let due = (began - 1).saturating_add(limit_ms);
            if now >= due {
                return;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
    }
}

/// A side's connection, its bytes read counted by a [`Meter`].
struct Metered<T> {
    io: T,
    meter: Arc<Meter>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled
            && !self.meter.read(buf.filled().len() - before)
        {
            return std::task::Poll::Ready(Err(std::io::Error::other(BudgetFull)));
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.meter.wrote(&polled);
        polled
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.meter.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// When either side of a session last sent a message.
struct Clock {
    epoch: Instant,
    /// Milliseconds since `epoch`.
    heard: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Clock {
            epoch: Instant::now(),
            heard: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn heard(&self) {
        self.heard.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Resolves once nothing was heard for `idle()`, which may change
    /// meanwhile: it is asked again at least every `recheck`.
    async fn silent_for(&self, idle: impl Fn() -> Duration, recheck: Duration) {
        let recheck_ms = u64::try_from(recheck.as_millis()).unwrap_or(u64::MAX);
        loop {
            let idle_ms = u64::try_from(idle().as_millis()).unwrap_or(u64::MAX);
            let silent_ms = self
                .now_ms()
                .saturating_sub(self.heard.load(Ordering::Relaxed));
            let left_ms = idle_ms.saturating_sub(silent_ms);
            if left_ms == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(left_ms.min(recheck_ms).max(1))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session of key `sk-k` (with `tokens_per_minute`, when given).
    fn session(tokens_per_minute: Option<u32>) -> Session {
        let auth = AuthLayer::new(vec![llm_proxy_auth::KeySpec {
            tokens_per_minute,
            ..llm_proxy_auth::KeySpec::from_key("k", "sk-k")
        }]);
        let mut headers = http::HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer sk-k".parse().unwrap());
        let key = auth.authenticate(&headers).unwrap();
        Session {
            auth: Some(auth),
            owner: Some(key.name.clone()),
            key: Some(key),
            ids: ResponseIds::new(None, 100_000, Duration::from_secs(3600)),
            upstream: "up".into(),
            answered: None,
            balance: llm_proxy_balance::Balance::<crate::app::UpstreamService>::new(
                Vec::new(),
                llm_proxy_balance::BalanceConfig::default(),
            )
            .handle(),
            client_done: AtomicBool::new(false),
            broke: AtomicBool::new(false),
            waiting_on_client: AtomicBool::new(false),
            models: None,
            turns: Mutex::default(),
            open_turns: AtomicUsize::new(0),
            deltas: AtomicU64::new(0),
            next_sequence: AtomicU64::new(0),
            creates: Mutex::default(),
            ended: Mutex::default(),
            budget: None,
            counters: Arc::default(),
            started: Arc::default(),
        }
    }

    /// A turn booked and then never sent (the upstream's connection
    /// failed under the send) gives its reservation back.
    #[tokio::test]
    async fn a_turn_never_sent_gives_its_reservation_back() {
        let session = session(Some(10_000));
        let create =
            r#"{"type":"response.create","model":"m","input":"x","max_output_tokens":1000}"#;
        let remaining = |admitted: &Admitted| {
            admitted
                .reservation
                .as_ref()
                .and_then(|t| t.decision)
                .and_then(|d| d.tokens)
                .map(|t| t.remaining)
                .unwrap()
        };
        let first = session.admit(create).await.unwrap();
        let after_one = remaining(&first);
        assert!(after_one < 9_000, "{after_one}");
        session.push(first.reservation.unwrap(), true);
        session.unbook_last();
        assert_eq!(session.with_turns(|t| t.len()), 0);
        let second = session.admit(create).await.unwrap();
        assert!(
            remaining(&second) + 5 >= after_one,
            "the unsent turn's reservation came back: {} then {after_one}",
            remaining(&second)
        );
    }

    /// Appends the upstream never answers (it takes them as more input)
    /// do not grow a session's books without bound.
    #[tokio::test]
    async fn unanswered_appends_do_not_grow_the_turn_queue() {
        let session = session(None);
        for i in 0..5_000 {
            let text = if i % 100 == 0 {
                r#"{"type":"response.create","model":"m","input":"x"}"#
            } else {
                r#"{"type":"response.append","input":"x"}"#
            };
            let admitted = session.admit(text).await.unwrap();
            session.push(admitted.reservation.unwrap(), admitted.create);
            if i % 100 == 0 {
                let id = format!("r{i}");
                session.observe(&format!(
                    r#"{{"type":"response.created","response":{{"id":"{id}"}}}}"#
                ));
                session.observe(&format!(
                    r#"{{"type":"response.completed","response":{{"id":"{id}","usage":{{"input_tokens":1,"output_tokens":1}}}}}}"#
                ));
            }
        }
        assert!(session.with_turns(|t| t.len()) <= MAX_PENDING);
    }

    /// A hostile upstream's ids run to its 16 MiB message bound: one over
    /// the id map's cap is no id, and none is kept in a session's books.
    #[tokio::test]
    async fn an_upstreams_overlong_ids_are_not_kept() {
        let session = session(None);
        let create = r#"{"type":"response.create","model":"m","input":"x"}"#;
        let admitted = session.admit(create).await.unwrap();
        session.push(admitted.reservation.unwrap(), true);
        session.with_creates(|c| c.push_back(None));
        let long = "r".repeat(1 << 20);
        session.observe(&format!(
            r#"{{"type":"response.created","response":{{"id":"{long}"}}}}"#
        ));
        for i in 0..ENDED_KEPT {
            session.observe(&format!(
                r#"{{"type":"response.completed","response":{{"id":"{i}{long}"}}}}"#
            ));
        }
        let ended: usize = session.ended.lock().unwrap().iter().map(|e| e.len()).sum();
        let creates: usize = session.with_creates(|c| c.iter().flatten().map(|id| id.len()).sum());
        let turns: usize = session.with_turns(|t| {
            t.iter()
                .filter_map(|p| p.id.as_ref())
                .map(|id| id.len())
                .sum()
        });
        assert_eq!((ended, creates, turns), (0, 0, 0));
        assert_eq!(session.open_turns.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_upgrade_needs_a_connection_to_hand_over() {
        let req = Request::get("/v1/responses")
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "WebSocket")
            .body(())
            .unwrap();
        // Not from hyper's server: nothing to hand over.
        assert!(!wants_upgrade(&req));
    }

    #[test]
    fn refusals_are_error_messages_with_status_and_code() {
        let Message::Text(text) = error_message(&Error::ModelNotAllowed("m".into())) else {
            panic!("a text message");
        };
        let value: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(value["type"], "error");
        assert_eq!(value["status"], 403);
        assert_eq!(value["error"]["code"], "model_not_allowed");
    }
}
