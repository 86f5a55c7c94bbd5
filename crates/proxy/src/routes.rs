//! The proxy's HTTP face: request ids, metrics, the fixed routes, and the
//! model API stack behind them.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use llm_proxy_auth::AuthLayer;
use llm_proxy_core::{
    Body, BoxError, CLIENT_CLOSED_REQUEST, CallerSlot, Dialect, Endpoint, Error, UPSTREAM_HEADER,
    UpstreamName, UpstreamSlot, Waited, full,
};
use tower_service::Service;

use crate::idle::{Activity, InFlight};
use crate::metrics::Metrics;
use crate::read_timeout::ReadTimeout;
use crate::stack::Stack;
use crate::websocket::{self, Sockets};
use llm_proxy_balance::BalanceHandle;

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Whether the proxy is draining; `/readyz` answers 503 from then on.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    /// Mark the proxy as draining.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// What a path is, for routing and for the metrics `route` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Own(Own),
    Api(Endpoint),
    NotFound,
}

/// The routes the proxy answers itself, on its listener and on
/// `metrics_listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Own {
    Healthz,
    Readyz,
    Metrics,
}

impl Own {
    pub(crate) fn of(path: &str) -> Option<Own> {
        match path {
            "/healthz" => Some(Own::Healthz),
            "/readyz" => Some(Own::Readyz),
            "/metrics" => Some(Own::Metrics),
            _ => None,
        }
    }
}

impl Route {
    fn of(path: &str, method: &Method, serve_metrics: bool) -> Route {
        match Own::of(path) {
            Some(Own::Metrics) if !serve_metrics => Route::NotFound,
            Some(own) => Route::Own(own),
            // OpenAI's "retrieve model": the models API, as the list is.
            // (`DELETE` of a fine-tuned model goes upstream.)
            None if Endpoint::described_model(method, path).is_some() => {
                Route::Api(Endpoint::Models)
            }
            None => Endpoint::from_path(path).map_or(Route::NotFound, Route::Api),
        }
    }

    /// Whose error shape this route answers in, for a request to `path`
    /// ([`Endpoint::dialect_at`]: a path under `/v1/messages` the proxy
    /// does not route is answered as one it passes through there).
    fn dialect(self, path: &str) -> Dialect {
        match self {
            Route::Api(e) => e.dialect_at(path),
            Route::Own(_) | Route::NotFound => Endpoint::Passthrough.dialect_at(path),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Own(Own::Healthz) => "healthz",
            Route::Own(Own::Readyz) => "readyz",
            Route::Own(Own::Metrics) => "metrics",
            Route::Api(e) => e.as_str(),
            Route::NotFound => "not_found",
        }
    }

    /// The methods this route answers, for 405 and `allow`.
    fn allow(self, path: &str) -> Option<(&'static [Method], &'static str)> {
        const GET: &[Method] = &[Method::GET, Method::HEAD];
        const POST: &[Method] = &[Method::POST];
        const GET_DELETE: &[Method] = &[Method::GET, Method::HEAD, Method::DELETE];
        // What an API may use. Not `TRACE`, which an upstream that serves it
        // echoes with the upstream's key the proxy added, nor `CONNECT`,
        // whose 2xx hyper takes for a tunnel nobody opens, nor methods
        // nobody defined: nginx and Envoy refuse them too.
        const API: &[Method] = &[
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ];
        // One trailing slash is the same route.
        let path = path.strip_suffix('/').unwrap_or(path);
        match self {
            Route::Api(Endpoint::ResponseById) => Some(if path.ends_with("/cancel") {
                (POST, "POST")
            } else if path.ends_with("/input_items") {
                (GET, "GET, HEAD")
            } else {
                (GET_DELETE, "GET, HEAD, DELETE")
            }),
            Route::Own(_) | Route::Api(Endpoint::Models) => Some((GET, "GET, HEAD")),
            Route::Api(e) if e.method() == Some(Method::POST) => Some((POST, "POST")),
            Route::Api(_) => Some((API, "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")),
            Route::NotFound => None,
        }
    }
}

/// Settings of the HTTP face.
#[derive(Clone, Debug)]
pub struct FaceOptions {
    /// Send `x-llm-proxy-upstream`.
    pub upstream_header: bool,
    /// Send `x-llm-proxy-overhead-ms` on the answers to `/v1/*`.
    pub overhead_header: bool,
    /// Log one line per request when its response ends (target
    /// `llm_proxy::access`, level `info`).
    pub access_log: bool,
    /// Answer `/metrics` here (false when metrics have their own listener).
    pub serve_metrics: bool,
    /// The longest wait for each piece of a request body ([`ReadTimeout`]).
    pub body_read_timeout: Duration,
    /// The longest a body the proxy buffers may take to come whole
    /// ([`ReadTimeout::with_deadline`]).
    pub buffered_body_timeout: Duration,
    /// The origins browser apps may call from (`None`: no CORS).
    pub cors: Option<crate::Cors>,
}

/// The proxy as one tower `Service` over any request body: what the server
/// runs and what an axum app can nest.
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
    stack: Stack,
}

impl Shared {
    /// The answer to a route the proxy serves itself: `/healthz`,
    /// `/readyz`, `/metrics`.
    fn own(&self, route: Own) -> Response<Body> {
        match route {
            Own::Healthz => text(StatusCode::OK, "text/plain", "ok\n"),
            Own::Readyz if self.readiness.is_draining() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            }
            Own::Readyz if !self.balance.any_healthy() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no healthy upstream\n",
            ),
            Own::Readyz => text(StatusCode::OK, "text/plain", "ready\n"),
            Own::Metrics => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
        }
    }
}

struct Shared {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    auth: Option<AuthLayer>,
    models: Vec<String>,
    /// The list without auth, in OpenAI's and in Anthropic's shape.
    models_json: [Bytes; 2],
    /// An upstream serves every model (it has no `models` list).
    every_model: bool,
    balance: BalanceHandle<crate::app::UpstreamService>,
    sockets: Sockets,
    ids: llm_proxy_core::ids::UniqueIds,
    options: FaceOptions,
}

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService").finish_non_exhaustive()
    }
}

/// What the HTTP face answers from itself, beside the stack: `/v1/models`,
/// `/readyz` and WebSocket upgrades.
pub(crate) struct Face {
    pub(crate) auth: Option<AuthLayer>,
    pub(crate) models: Vec<String>,
    /// An upstream serves every model (it has no `models` list): a model
    /// the config does not name may still exist there.
    pub(crate) every_model: bool,
    pub(crate) balance: BalanceHandle<crate::app::UpstreamService>,
    pub(crate) sockets: Sockets,
}

impl ProxyService {
    pub(crate) fn new(
        stack: Stack,
        face: Face,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        options: FaceOptions,
    ) -> Self {
        let Face {
            auth,
            models,
            every_model,
            balance,
            sockets,
        } = face;
        ProxyService {
            shared: Arc::new(Shared {
                metrics,
                readiness,
                auth,
                models_json: [
                    models_json(&models, Dialect::OpenAi),
                    models_json(&models, Dialect::Anthropic),
                ],
                models,
                every_model,
                balance,
                sockets,
                ids: llm_proxy_core::ids::UniqueIds::new(),
                options,
            }),
            stack,
        }
    }
}

/// `GET /v1/models` in `dialect`'s list shape: OpenAI's, or Anthropic's
/// (one page holding every model).
fn models_json<S: AsRef<str>>(models: &[S], dialect: Dialect) -> Bytes {
    let data: Vec<serde_json::Value> = models
        .iter()
        .map(|id| model_object(id.as_ref(), dialect))
        .collect();
    let list = match dialect {
        Dialect::OpenAi => serde_json::json!({"object": "list", "data": data}),
        Dialect::Anthropic => serde_json::json!({
            "data": data,
            "has_more": false,
            "first_id": models.first().map(AsRef::as_ref),
            "last_id": models.last().map(AsRef::as_ref),
        }),
    };
    Bytes::from(list.to_string())
}

/// One model in `dialect`'s shape, as the list holds it.
fn model_object(id: &str, dialect: Dialect) -> serde_json::Value {
    match dialect {
        Dialect::OpenAi => {
            serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llm-proxy"})
        }
        Dialect::Anthropic => serde_json::json!({
            "type": "model",
            "id": id,
            "display_name": id,
            "created_at": "1970-01-01T00:00:00Z",
        }),
    }
}

/// The dialect of a `/v1/models` request: Anthropic's for a client that
/// sends `anthropic-version` (its SDKs list models at the same path, and
/// send the header on every request), else OpenAI's.
fn models_dialect(headers: &http::HeaderMap) -> Dialect {
    if headers.contains_key("anthropic-version") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A response to `HEAD`, without its body but with the length a `GET`
/// would have had. hyper's HTTP/1 server leaves a `HEAD` answer's body out
/// itself; its HTTP/2 server sends it, which the client must treat as a
/// protocol error.
pub(crate) fn head_only(mut resp: Response<Body>) -> Response<Body> {
    // (An upstream's answer to `HEAD` has no body of its own to measure:
    // its headers stand as they came.)
    if let Some(len) = http_body::Body::size_hint(resp.body())
        .exact()
        .filter(|len| *len > 0)
        && !resp.headers().contains_key(header::CONTENT_LENGTH)
    {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp.map(|_| llm_proxy_core::empty())
}

/// The future of a [`ProxyService`] call.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// [`ProxyService`] as the server serves it: shared by a shard's
/// connections, each of which calls it through its own [`ConnFace`].
#[derive(Clone, Debug)]
pub(crate) struct HyperFace(pub(crate) ProxyService);

impl HyperFace {
    /// What one connection calls.
    pub(crate) fn conn(&self) -> ConnFace {
        ConnFace {
            shared: self.0.shared.clone(),
            stack: RefCell::new(self.0.stack.clone()),
        }
    }
}

/// [`ProxyService`] as one connection calls it: with the connection's
/// watch (idle HTTP/2, stalled client; `crate::idle`), and with its own
/// handle on the stack. A request is handed to the stack in place, as long
/// as the stack answers ready at once (all of its layers do): no clone of
/// the stack per request. hyper calls a connection's service through a
/// shared reference, one call at a time, hence the `RefCell`.
pub(crate) struct ConnFace {
    shared: Arc<Shared>,
    stack: RefCell<Stack>,
}

impl ConnFace {
    pub(crate) fn call_on(
        &self,
        req: Request<hyper::body::Incoming>,
        conn: &Arc<Activity>,
    ) -> ResponseFuture {
        // Not held past the call: the stack's call is synchronous and does
        // not come back here.
        let mut stack = self.stack.borrow_mut();
        let req = crate::linger::Lingering::wrap(req);
        serve(&self.shared, &mut stack, req, Some(InFlight::new(conn)))
    }
}

impl<B> Service<Request<B>> for ProxyService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The stack below is always ready (it has no backpressure of its own);
        // it is driven to readiness per call (`call_stack`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        serve(&self.shared, &mut self.stack, req, None)
    }
}

impl ProxyService {
    /// What the `metrics_listen` listener answers: `/metrics`, and
    /// `/healthz` and `/readyz` as the main listener does (a readiness probe
    /// on this port sees a drain as 503 once the main listener has closed);
    /// 404 for anything else.
    pub(crate) fn serve_own<B>(&self, req: &Request<B>) -> Response<Body> {
        let start = Instant::now();
        let shared = &self.shared;
        let request_id = shared.request_id(req.headers());
        let access = shared.access_line(req, &request_id);
        let path = req.uri().path();
        let route = Own::of(path).map(Route::Own);
        let label = route.unwrap_or(Route::NotFound).label();
        let allowed = |route: &Route| {
            route
                .allow(path)
                .filter(|(methods, _)| !methods.contains(req.method()))
        };
        let resp = match route {
            Some(route) if let Some((_, allow)) = allowed(&route) => Error::MethodNotAllowed {
                method: req.method().to_string(),
                path: path.to_owned(),
                allow,
            }
            .into_response(),
            Some(Route::Own(own)) => shared.own(own),
            _ => Error::RouteNotFound(path.to_owned()).into_response(),
        };
        let mut resp = if req.method() == Method::HEAD {
            head_only(resp)
        } else {
            resp
        };
        // Counted, logged and marked as on `listen`.
        resp.headers_mut().insert(REQUEST_ID, request_id.clone());
        let status = resp.status().as_u16();
        shared.metrics.count_answer(label, status, None, None);
        let access = access.map(|mut access| {
            access.status = status;
            access
        });
        resp.map(|body| {
            shared
                .metrics
                .observe_on(label, start, body, None, Some(request_id))
                .with_access(access)
                .boxed_unsync()
        })
    }
}

impl Shared {
    /// A request's id: the client's `x-request-id` when it is 1 to 200
    /// visible ASCII characters, else a fresh one.
    #[inline]
    fn request_id(&self, headers: &http::HeaderMap) -> HeaderValue {
        headers
            .get(REQUEST_ID)
            .filter(|v| {
                (1..=200).contains(&v.len()) && v.as_bytes().iter().all(u8::is_ascii_graphic)
            })
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_bytes(&self.ids.next_id())
                    .expect("hex digits are a valid header value")
            })
    }

    /// The request's access log line, with `access_log` (nothing is copied
    /// for it otherwise): a 499 until it is answered.
    fn access_line<B>(
        &self,
        req: &Request<B>,
        request_id: &HeaderValue,
    ) -> Option<Box<crate::metrics::Access>> {
        self.options.access_log.then(|| {
            Box::new(crate::metrics::Access {
                method: req.method().clone(),
                path: req.uri().path().to_owned(),
                request_id: request_id.clone(),
                status: CLIENT_CLOSED_REQUEST.as_u16(),
                upstream: None,
                tried: UpstreamSlot::new(),
                caller: CallerSlot::new(),
            })
        })
    }
}

/// One request, through the HTTP face: its id, its route, the stack (or
/// the face's own answer), its metrics. `conn` follows the request for its
/// connection's watch, into the response body.
fn serve<B>(
    shared: &Arc<Shared>,
    stack: &mut Stack,
    mut req: Request<B>,
    conn: Option<InFlight>,
) -> ResponseFuture
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let start = Instant::now();
    let route = Route::of(req.uri().path(), req.method(), shared.options.serve_metrics);
    let request_id = shared.request_id(req.headers());
    let head = req.method() == Method::HEAD;
    let h1 = req.version() < http::Version::HTTP_2;
    // An allowed browser origin: its answer says it may read it.
    let cors_origin = shared
        .options
        .cors
        .as_ref()
        .and_then(|cors| cors.allowed(req.headers()).cloned());
    let mut access = shared.access_line(&req, &request_id);
    if let Some(access) = &access {
        // The auth layer writes the key's name into it, the upstream client
        // the upstream's.
        req.extensions_mut().insert(access.caller.clone());
        req.extensions_mut().insert(access.tried.clone());
        // A WebSocket session gets a line of its own when it ends.
        if websocket::wants_upgrade(&req) {
            req.extensions_mut()
                .insert(websocket::SessionAccess(access.clone()));
        }
    }
    // A model route's body is buffered, whatever its head says.
    let buffered = match route {
        Route::Api(endpoint) => {
            endpoint.has_model_body()
                || llm_proxy_core::buffers_body(req.method(), req.uri().path(), req.headers())
        }
        Route::Own(_) | Route::NotFound => false,
    };
    let whole = buffered.then_some(shared.options.buffered_body_timeout);
    // What the request waits on others (its body, its upstreams), left out
    // of the proxy's overhead.
    let waited = matches!(route, Route::Api(_)).then(Waited::new);
    if let Some(waited) = &waited {
        req.extensions_mut().insert(waited.clone());
    }
    let req = req.map(|body| {
        ReadTimeout::new(body, shared.options.body_read_timeout)
            .with_deadline(whole)
            .counting_in(waited.clone().filter(|_| buffered))
    });
    // The stack is called here, before the future: what it answers is all
    // the future holds of it.
    let dialect = route.dialect(req.uri().path());
    // A Message Batches answer's `results_url` is moved to the proxy.
    let batches_origin = matches!(route, Route::Api(Endpoint::Passthrough))
        .then(|| crate::batches::origin(&req))
        .flatten();
    let way = Way::of(shared, route, &req);
    let preflight = matches!(way, Way::Face(FaceRoute::Preflight));
    let answer = match way {
        Way::Stack => {
            let (mut parts, body) = req.into_parts();
            parts.headers.insert(REQUEST_ID, request_id.clone());
            let req = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
            call_stack(stack, req)
        }
        Way::Face(face) => Box::pin(respond(
            shared.clone(),
            face,
            req,
            request_id.clone(),
            conn.as_ref().map(|c| c.activity().clone()),
        )),
    };
    // Counted as 499 (nginx's "client closed request") should the client
    // go before the head: the future is then dropped, perhaps before it
    // was first polled (a client that closes right after its request).
    let mut abandoned = Abandoned {
        shared: shared.clone(),
        armed: true,
        route: route.label(),
        start,
        access: access.take(),
    };
    Box::pin(async move {
        let mut resp = match answer.await {
            Ok(resp) => resp,
            Err(e) => e.into_response_in(dialect),
        };
        if resp.status() == CLIENT_CLOSED_REQUEST
            && matches!(
                resp.extensions().get::<Error>(),
                Some(Error::ClientClosedRequest)
            )
        {
            // The client went while sending its body: abandoned, as one
            // gone before its answer (the guard counts it 499 and logs it
            // `cut`, in no histogram). An answer reaches only a client that
            // shut down its sending side; the connection ends with it.
            drop(abandoned);
            if h1 {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp.headers_mut().insert(REQUEST_ID, request_id.clone());
            return Ok(resp);
        }
        if let Some(origin) = &batches_origin {
            // Boxed: inline, its state would grow every request's future.
            resp = Box::pin(crate::batches::rewrite(resp, origin)).await;
        }
        let access = abandoned.answered();
        let shared = &abandoned.shared;
        if head {
            resp = head_only(resp);
        }
        let status = resp.status();
        // The proxy's own 408 (the body stopped coming) ends the connection
        // (hyper closes one whose request was not read to its end): said so,
        // as RFC 9110 §15.5.9 asks; so does a body whose framing broke (a
        // bad chunk), after which nothing on the connection can be read.
        // An upstream's own 408 is its business.
        if h1
            && matches!(
                status,
                StatusCode::REQUEST_TIMEOUT | StatusCode::BAD_REQUEST
            )
            && matches!(
                resp.extensions().get::<Error>(),
                Some(
                    Error::RequestTimeout { .. }
                        | Error::RequestBodyTooSlow { .. }
                        | Error::UnreadableBody(_)
                )
            )
        {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if !shared.options.upstream_header {
            resp.headers_mut().remove(UPSTREAM_HEADER);
        }
        resp.headers_mut().insert(REQUEST_ID, request_id.clone());
        // Anthropic's SDKs read `request-id` (`_request_id`, and Claude
        // Code's error reports): an answer that has none of an Anthropic
        // upstream's own carries the proxy's, which its log knows.
        if dialect == llm_proxy_core::Dialect::Anthropic
            && !resp.headers().contains_key(ANTHROPIC_REQUEST_ID)
        {
            resp.headers_mut()
                .insert(ANTHROPIC_REQUEST_ID, request_id.clone());
        }
        if let Some(cors) = &shared.options.cors {
            cors.mark(cors_origin, resp.headers_mut(), preflight);
        }
        let overhead = waited.map(|waited| start.elapsed().saturating_sub(waited.total()));
        if let Some(overhead) = overhead
            && shared.options.overhead_header
        {
            resp.headers_mut()
                .insert(OVERHEAD_HEADER, overhead_value(overhead));
        }
        let upstream = resp.extensions().get::<UpstreamName>().map(|u| &u.0);
        let access = access.map(|mut access| {
            access.status = status.as_u16();
            access.upstream = upstream.cloned();
            access
        });
        shared
            .metrics
            .count_answer(route.label(), status.as_u16(), upstream, overhead);
        tracing::debug!(
            request_id = request_id.to_str().unwrap_or(""),
            route = route.label(),
            status = status.as_u16(),
            upstream = upstream.map(|u| &**u).unwrap_or(""),
            "response head"
        );
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        Ok(resp.map(|body| {
            let observed = shared
                .metrics
                .observe_on(route.label(), start, body, conn, Some(request_id))
                .with_access(access);
            if switched {
                observed.untimed().boxed_unsync()
            } else {
                observed.boxed_unsync()
            }
        }))
    })
}

/// The stack's answer to `req`: called at once when the stack is ready at
/// once, as every layer of it is; otherwise a clone is driven to readiness
/// in the answer's future (the tower idiom). A layer that reserves capacity
/// in `poll_ready` (none of the proxy's does) would then keep what its
/// not-ready answer went on to reserve in the connection's own handle,
/// until that connection's next request.
fn call_stack(stack: &mut Stack, req: Request<Body>) -> llm_proxy_core::BoxFuture {
    let mut cx = Context::from_waker(Waker::noop());
    match stack.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => stack.call(req),
        Poll::Ready(Err(e)) => Box::pin(std::future::ready(Err(e))),
        Poll::Pending => {
            let mut stack = stack.clone();
            Box::pin(async move {
                std::future::poll_fn(|cx| stack.poll_ready(cx)).await?;
                stack.call(req).await
            })
        }
    }
}

/// Who answers a request: the stack, or the face itself.
enum Way {
    Stack,
    Face(FaceRoute),
}

/// What the face answers itself.
enum FaceRoute {
    /// A WebSocket upgrade on `/v1/responses`.
    Socket,
    /// A method the route does not take.
    NotAllowed(&'static str),
    Own(Own),
    Models,
    NotFound,
    /// A body sent with a transfer coding besides `chunked`.
    TransferCoding(String),
    /// A CORS preflight from an allowed origin.
    Preflight,
}

impl Way {
    fn of<B>(shared: &Shared, route: Route, req: &Request<B>) -> Way {
        if let Some(coding) = transfer_coding_beyond_chunked(req.headers()) {
            return Way::Face(FaceRoute::TransferCoding(coding));
        }
        if let Some(cors) = &shared.options.cors
            && cors.is_preflight(req.method(), req.headers())
        {
            return Way::Face(FaceRoute::Preflight);
        }
        if route == Route::Api(Endpoint::Responses)
            && !shared.sockets.is_empty()
            && websocket::wants_upgrade(req)
        {
            return Way::Face(FaceRoute::Socket);
        }
        if let Some((methods, allow)) = route.allow(req.uri().path())
            && !methods.contains(req.method())
        {
            return Way::Face(FaceRoute::NotAllowed(allow));
        }
        match route {
            Route::Own(own) => Way::Face(FaceRoute::Own(own)),
            // A model the config does not name, with an upstream that
            // serves every model: that upstream may know it (passthrough).
            Route::Api(Endpoint::Models)
                if shared.every_model
                    && Endpoint::model_of_path(req.uri().path())
                        .is_some_and(|id| !shared.models.iter().any(|m| *m == id)) =>
            {
                Way::Stack
            }
            Route::Api(Endpoint::Models) => Way::Face(FaceRoute::Models),
            Route::Api(_) => Way::Stack,
            Route::NotFound => Way::Face(FaceRoute::NotFound),
        }
    }
}

/// A request in progress until its head is ready: dropped before that (the
/// client went away and hyper dropped the request's future), it is counted
/// with status 499, as nginx logs it.
struct Abandoned {
    shared: Arc<Shared>,
    /// Not answered yet: counted when dropped.
    armed: bool,
    route: &'static str,
    start: Instant,
    /// The access log's line, logged here when the client goes first.
    access: Option<Box<crate::metrics::Access>>,
}

impl Abandoned {
    /// The head is ready: the access line goes on with the body.
    fn answered(&mut self) -> Option<Box<crate::metrics::Access>> {
        self.armed = false;
        self.access.take()
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed {
            let metrics = &self.shared.metrics;
            metrics.count_request(self.route, CLIENT_CLOSED_REQUEST.as_u16(), None);
            if let Some(access) = &self.access {
                access.log(self.start.elapsed(), "cut", None);
            }
        }
    }
}

/// The request id header Anthropic's API sends, and its SDKs read.
const ANTHROPIC_REQUEST_ID: HeaderName = HeaderName::from_static("request-id");

/// The proxy's own time on a request, to its answer's head: all but what
/// it waited for its client's body and its upstreams' heads.
const OVERHEAD_HEADER: HeaderName = HeaderName::from_static("x-llm-proxy-overhead-ms");

/// `overhead` in milliseconds with three decimals (`0.042`), written by
/// hand: `fmt` costs some 500 instructions more per request.
fn overhead_value(overhead: Duration) -> HeaderValue {
    let micros = u64::try_from(overhead.as_micros()).unwrap_or(u64::MAX);
    // u64::MAX has 20 digits; a dot, and a zero before it when under 1 ms.
    let mut buf = [0u8; 22];
    let mut at = buf.len();
    let mut rest = micros;
    let mut digits = 0;
    while digits < 4 || rest > 0 {
        if digits == 3 {
            at -= 1;
            buf[at] = b'.';
        }
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        digits += 1;
    }
    HeaderValue::from_bytes(&buf[at..]).expect("digits and a dot are a valid header value")
}

/// `GET /v1/models`: the models of the config, with auth only those the
/// key may use; a request against the key's request limit, answered with
/// its rate-limit headers. `GET /v1/models/{id}`: one of them, or 404
/// `model_not_found` (also for a model the key may not use, as OpenAI
/// answers for another account's model).
async fn models(
    shared: &Shared,
    path: &str,
    headers: &http::HeaderMap,
    caller: Option<&CallerSlot>,
) -> Result<Response<Body>, Error> {
    const JSON: &str = "application/json";
    let dialect = models_dialect(headers);
    let one = Endpoint::model_of_path(path);
    let one = one.as_deref();
    let listed = |id: &str| shared.models.iter().any(|m| m == id);
    let Some(auth) = &shared.auth else {
        return Ok(match one {
            None => {
                let list = &shared.models_json[usize::from(dialect == Dialect::Anthropic)];
                text(StatusCode::OK, JSON, list.clone())
            }
            Some(id) if listed(id) => {
                text(StatusCode::OK, JSON, model_object(id, dialect).to_string())
            }
            Some(id) => Error::ModelNotFound(id.to_owned()).into_response_in(dialect),
        });
    };
    let key = match auth.authenticate(headers) {
        Ok(key) => key,
        Err(e) => return Ok(e.into_response_in(dialect)),
    };
    if let Some(caller) = caller {
        caller.set(&key.name);
    }
    let decision = match auth.acquire_request(&key, dialect).await {
        Ok(decision) => decision,
        Err(refusal) => return Ok(refusal),
    };
    let answer = match one {
        None => {
            let allowed: Vec<&String> = shared
                .models
                .iter()
                .filter(|m| key.allows_model(m))
                .collect();
            Ok(models_json(&allowed, dialect))
        }
        Some(id) if listed(id) && key.allows_model(id) => {
            Ok(Bytes::from(model_object(id, dialect).to_string()))
        }
        Some(id) => Err(Error::ModelNotFound(id.to_owned())),
    };
    let mut resp = match answer {
        Ok(body) => text(StatusCode::OK, JSON, body),
        Err(e) => e.into_response_in(dialect),
    };
    if let Some(d) = &decision {
        llm_proxy_auth::rate_headers(resp.headers_mut(), d);
    }
    Ok(resp)
}

/// The face's own answer (its future boxed apart from the request's, whose
/// size it would set).
async fn respond<B>(
    shared: Arc<Shared>,
    face: FaceRoute,
    req: Request<B>,
    request_id: HeaderValue,
    conn: Option<Arc<Activity>>,
) -> Result<Response<Body>, Error>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    match face {
        FaceRoute::Socket => {
            let ctx = websocket::Ctx {
                sockets: &shared.sockets,
                auth: shared.auth.as_ref(),
                balance: &shared.balance,
                conn: conn.as_ref(),
            };
            let (mut parts, body) = req.into_parts();
            parts.headers.insert(REQUEST_ID, request_id);
            // Boxed, as `models` below: inline, the largest branch sets the
            // size of this future (4.5 KiB for the socket's).
            Box::pin(websocket::open(ctx, Request::from_parts(parts, body))).await
        }
        FaceRoute::NotAllowed(allow) => Err(Error::MethodNotAllowed {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            allow,
        }),
        FaceRoute::Own(own) => Ok(shared.own(own)),
        FaceRoute::Models => {
            let caller = req.extensions().get::<CallerSlot>();
            Box::pin(models(&shared, req.uri().path(), req.headers(), caller)).await
        }
        FaceRoute::NotFound => Err(Error::RouteNotFound(req.uri().path().to_owned())),
        FaceRoute::TransferCoding(coding) => Err(Error::UnsupportedTransferCoding(coding)),
        FaceRoute::Preflight => match &shared.options.cors {
            Some(cors) => Ok(cors.preflight(req.headers())),
            None => Err(Error::RouteNotFound(req.uri().path().to_owned())),
        },
    }
}

/// The request's `transfer-encoding`, when it says more than `chunked`
/// once. hyper refuses a coding list that does not end in `chunked`, but
/// reads `gzip, chunked` (or `chunked` twice) as chunked and leaves the
/// rest on the body, which would then go upstream coded and unlabelled.
/// nginx answers such a request 501, as RFC 9112 §6.1 has it.
fn transfer_coding_beyond_chunked(headers: &http::HeaderMap) -> Option<String> {
    let values = headers.get_all(header::TRANSFER_ENCODING);
    let mut codings = values
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match (codings.next(), codings.next()) {
        (None, _) => None,
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => None,
        _ => Some(
            values
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use llm_proxy_core::BoxFuture;

    use super::*;

    #[test]
    fn the_overhead_is_told_in_milliseconds_with_three_decimals() {
        for (micros, told) in [
            (0, "0.000"),
            (7, "0.007"),
            (42, "0.042"),
            (999, "0.999"),
            (1000, "1.000"),
            (12_345, "12.345"),
            (u64::MAX, "18446744073709551.615"),
        ] {
            let value = overhead_value(Duration::from_micros(micros));
            assert_eq!(value.to_str().unwrap(), told, "{micros}");
        }
        // Under a microsecond rounds down; past u64 saturates.
        assert_eq!(overhead_value(Duration::from_nanos(999)), "0.000");
        assert_eq!(overhead_value(Duration::MAX), "18446744073709551.615");
    }

    /// A service that answers not ready to its first `poll_ready` (and
    /// wakes the task), ready from then on; it counts its calls.
    #[derive(Clone)]
    struct Slow {
        polled: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
    }

    impl Service<Request<Body>> for Slow {
        type Response = Response<Body>;
        type Error = Error;
        type Future = BoxFuture;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
            if self.polled.swap(true, Ordering::SeqCst) {
                Poll::Ready(Ok(()))
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }

        fn call(&mut self, _req: Request<Body>) -> BoxFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready(Ok(Response::new(
                llm_proxy_core::empty(),
            ))))
        }
    }

    /// What `call_stack` does with a stack ready at once or not: the calls
    /// made before its answer is awaited, then after.
    async fn calls_of(ready_at_once: bool) -> (usize, usize) {
        let calls = Arc::new(AtomicUsize::new(0));
        let mut stack = Stack::new(Slow {
            polled: Arc::new(AtomicBool::new(ready_at_once)),
            calls: calls.clone(),
        });
        let answer = call_stack(&mut stack, Request::new(llm_proxy_core::empty()));
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(answer.await.unwrap().status(), StatusCode::OK);
        (before, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_stack_ready_at_once_is_called_in_place() {
        assert_eq!(calls_of(true).await, (1, 1));
    }

    #[tokio::test]
    async fn a_stack_not_ready_is_driven_to_ready_in_the_future() {
        assert_eq!(calls_of(false).await, (0, 1));
    }
}
