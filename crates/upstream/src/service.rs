use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header, uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::dns::{Dns, Resolver};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use llm_proxy_core::{
    Body, BodyBudget, Endpoint, Error, RequestMeta, UPSTREAM_HEADER, UpstreamName, UpstreamSlot,
    Waited,
};
use tower_service::Service;

use crate::body::{UploadClock, Uploading, UpstreamBody};
use crate::config::{AuthStyle, BuildError, UpstreamConfig};
use crate::headers;
use crate::pool::{Lease, Pool, SendError};

/// TCP through the upstream's kept addresses ([`Dns`]), then TLS, within
/// the upstream's `connect_timeout`.
type Connector = TimedConnector;
type HttpClient = Client<Connector, Body>;
type TlsConnector = HttpsConnector<HttpConnector<Resolver>>;

/// A [`TlsConnector`] bounded as a whole (name lookup, TCP and TLS) by
/// the upstream's `connect_timeout`: `HttpConnector` times the TCP connect
/// alone, so a
/// server that takes the connection but never finishes its TLS handshake
/// would hold the request until its first-byte timeout (a minute, by
/// default), and its failover as long. Past it: an I/O `TimedOut`, which
/// [`Upstream::classify`] answers with 504 `upstream_timeout`, as a TCP
/// connect's.
#[derive(Clone)]
pub(crate) struct TimedConnector {
    inner: TlsConnector,
    timeout: Duration,
}

impl Service<Uri> for TimedConnector {
    type Response = <TlsConnector as Service<Uri>>::Response;
    type Error = llm_proxy_core::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connect = self.inner.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::time::timeout(timeout, connect)
                .await
                .unwrap_or_else(|_elapsed| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect (TCP and TLS) timed out",
                    )
                    .into())
                })
        })
    }
}

/// A tower `Service` that sends requests to one upstream LLM server.
///
/// Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Upstream {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    transport: Transport,
    pub(crate) name: UpstreamName,
    pub(crate) name_header: HeaderValue,
    pub(crate) scheme: uri::Scheme,
    pub(crate) authority: uri::Authority,
    /// The base URL's path without its trailing slash, e.g. `/v1`.
    pub(crate) base_path: String,
    pub(crate) credential: Option<(HeaderName, HeaderValue)>,
    /// [`UpstreamConfig::headers`], checked.
    pub(crate) headers: Box<[(HeaderName, HeaderValue)]>,
    /// The host's addresses, for the https clients' connects (the HTTP/1
    /// pools hold it too): forgotten when a connect fails.
    dns: Arc<Dns>,
    /// An Anthropic upstream: requests without `anthropic-version` get
    /// [`ANTHROPIC_VERSION`].
    pub(crate) anthropic: bool,
    /// `host[:port]` as the URL has it, for requests in origin form.
    pub(crate) host: HeaderValue,
    /// Connects for [`Upstream::upgrade`]: HTTP/1.1 only (an upgrade is an
    /// HTTP/1.1 exchange), TLS for `https://`. `None` unless enabled.
    pub(crate) upgrades: Option<Connector>,
    pub(crate) first_byte_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    /// TLS failures are logged at `warn` (a certificate expired, a root
    /// missing: the operator's to fix), at most one line per period of
    /// the clock that starts at `built`.
    tls_warnings: llm_proxy_core::throttle::LogThrottle,
    built: std::time::Instant,
}

/// The least time between two `warn` lines of an upstream's TLS failures.
const TLS_WARN_EVERY_MS: u64 = 10_000;

const ANTHROPIC_VERSION_HEADER: HeaderName = HeaderName::from_static("anthropic-version");

/// The receive window of an HTTP/2 upstream connection, all its streams
/// together (1 GiB; each stream's own stays hyper's 2 MiB). Data received
/// for a stream whose client does not read holds the connection's window
/// until it is read: with hyper's 5 MiB, three clients that stop reading
/// (each within `send_timeout`) would leave every other request on the
/// connection its response head and no body. What a stream holds stays
/// bounded by its own window, as an HTTP/1.1 request's by its socket's
/// buffers.
const H2_CONNECTION_WINDOW: u32 = 1 << 30;

/// The API version sent to an Anthropic upstream when the request names
/// none (Anthropic refuses requests without one): what the proxy's own
/// requests (health checks) and clients that leave it out get.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// How requests reach the upstream; each holds one pool per shard, then the
/// shared one (the last).
enum Transport {
    /// `http://`: HTTP/1.1 over the crate's own lean pool, with the `Host`
    /// header to send.
    Http1 { pools: Box<[Arc<Pool>]> },
    /// `https://`: hyper-util's client, which negotiates HTTP/2 over ALPN.
    Client(Box<[HttpClient]>),
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.inner.name.0)
            .field("authority", &self.inner.authority)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// Build the client for one upstream.
    pub fn new(cfg: UpstreamConfig) -> Result<Self, BuildError> {
        let bad_url = |reason| BuildError::BadUrl {
            name: cfg.name.clone(),
            url: llm_proxy_core::redact::url(&cfg.url.to_string()).into_owned(),
            reason,
        };
        let not_absolute = || bad_url("must be an absolute http:// or https:// URL");
        let scheme = cfg.url.scheme().cloned().ok_or_else(not_absolute)?;
        if scheme != uri::Scheme::HTTP && scheme != uri::Scheme::HTTPS {
            return Err(not_absolute());
        }
        let authority = cfg.url.authority().cloned().ok_or_else(not_absolute)?;
        if authority.as_str().contains('@') {
            return Err(bad_url(
                "credentials in the URL are not sent: give the key as `api_key`",
            ));
        }
        let port = port_of(&authority).map_err(bad_url)?;
        let base_path = cfg.url.path().trim_end_matches('/').to_owned();

        let credential = match &cfg.api_key {
            None => None,
            Some(key) => {
                let (name, value) = match cfg.auth_style {
                    AuthStyle::Bearer => (header::AUTHORIZATION, format!("Bearer {key}")),
                    AuthStyle::XApiKey => (HeaderName::from_static("x-api-key"), key.clone()),
                };
                let mut value = HeaderValue::try_from(value)
                    .map_err(|_| BuildError::BadKey(cfg.name.clone()))?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };

        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(cfg.headers.len());
        for (name, value) in &cfg.headers {
            let bad = |reason| BuildError::BadHeader {
                name: cfg.name.clone(),
                header: name.clone(),
                reason,
            };
            headers::settable_header(name).map_err(bad)?;
            if credential.as_ref().is_some_and(|(key, _)| key == name) {
                return Err(bad("`api_key` sets this header"));
            }
            if headers.iter().any(|(seen, _)| seen == name) {
                return Err(bad("given twice"));
            }
            if value.is_empty()
                || value
                    .as_bytes()
                    .first()
                    .is_some_and(|b| b.is_ascii_whitespace())
                || value
                    .as_bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_whitespace())
            {
                // HTTP/2 calls a field value with space at an end malformed.
                return Err(bad("an empty value, or one with space at an end"));
            }
            let mut value = value.clone();
            value.set_sensitive(true);
            headers.push((name.clone(), value));
        }

        // `host[:port]` as the URL has it, without any `user:pass@`.
        let host = match authority.port() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_owned(),
        };
        let host = HeaderValue::try_from(host).map_err(|_| not_absolute())?;
        // One host, looked up for all of this upstream's pools and clients.
        let dns = Arc::new(Dns::new(authority.host()));
        let transport = if scheme == uri::Scheme::HTTP {
            let port = port.unwrap_or(80);
            let pools = (0..=cfg.shards)
                .map(|_| {
                    Arc::new(Pool::new(
                        dns.clone(),
                        port,
                        cfg.connect_timeout,
                        cfg.pool_idle_timeout,
                    ))
                })
                .collect();
            Transport::Http1 { pools }
        } else {
            Transport::Client(Self::https_clients(&cfg, &dns)?)
        };
        let upgrades = if cfg.upgrades {
            Some(Self::connector(&cfg, false, &dns)?)
        } else {
            None
        };

        let name_header =
            HeaderValue::from_str(&cfg.name).map_err(|_| BuildError::BadName(cfg.name.clone()))?;
        Ok(Upstream {
            inner: Arc::new(Inner {
                transport,
                name: UpstreamName(cfg.name),
                name_header,
                scheme,
                authority,
                base_path,
                credential,
                headers: headers.into_boxed_slice(),
                dns,
                anthropic: cfg.auth_style == AuthStyle::XApiKey,
                host,
                upgrades,
                first_byte_timeout: cfg.first_byte_timeout,
                idle_timeout: cfg.idle_timeout,
                tls_warnings: llm_proxy_core::throttle::LogThrottle::default(),
                built: std::time::Instant::now(),
            }),
        })
    }

    /// A TCP (and, for `https://`, rustls: webpki roots plus any extra
    /// ones) connector, offering HTTP/2 by ALPN when `http2`.
    fn connector(
        cfg: &UpstreamConfig,
        http2: bool,
        dns: &Arc<Dns>,
    ) -> Result<Connector, BuildError> {
        let tls = crate::tls::client_config(cfg.extra_roots_pem.as_deref()).map_err(|reason| {
            BuildError::BadRoots {
                name: cfg.name.clone(),
                reason,
            }
        })?;
        let mut http = HttpConnector::new_with_resolver(Resolver(dns.clone()));
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1();
        let inner = if http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.wrap_connector(http)
        };
        Ok(TimedConnector {
            inner,
            timeout: cfg.connect_timeout,
        })
    }

    /// hyper-util clients over [`Self::connector`].
    ///
    /// An HTTP/2 connection carries every request of its shard: one that
    /// goes silently dead (a NAT or firewall dropping the flow) would fail
    /// each of them at its first-byte timeout, for as long as requests keep
    /// it in the pool. It is pinged every [`h2_ping_interval`], in use or
    /// idle, and closed when a ping goes unanswered for as long (its
    /// requests fail as broken, and the next ones open a new connection).
    fn https_clients(
        cfg: &UpstreamConfig,
        dns: &Arc<Dns>,
    ) -> Result<Box<[HttpClient]>, BuildError> {
        let connector = Self::connector(cfg, cfg.http2, dns)?;
        let ping = h2_ping_interval(cfg.idle_timeout);
        Ok((0..=cfg.shards)
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(cfg.pool_idle_timeout)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
                    .http2_keep_alive_interval(ping)
                    .http2_keep_alive_timeout(ping)
                    .http2_keep_alive_while_idle(true)
                    .build(connector.clone())
            })
            .collect())
    }

    /// The upstream's configured name.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name.0
    }

    /// `<base path>/<rest>?<query>` for a client path `/v1/<rest>?<query>`.
    ///
    /// One trailing slash names the same route as none
    /// ([`Endpoint::from_path`]): a route the proxy reads (a model API,
    /// `models`, a response by id) goes upstream without it, so that its
    /// answer does not depend on the slash (a cached answer is served for
    /// either). Any other path goes as the client sent it.
    pub(crate) fn path_and_query(&self, client: &Uri) -> Result<uri::PathAndQuery, Error> {
        let sent = client.path();
        let slash = sent.len() > "/v1/".len()
            && sent.ends_with('/')
            && Endpoint::from_path(sent).is_some_and(|e| e != Endpoint::Passthrough);
        let path = if slash { &sent[..sent.len() - 1] } else { sent };
        let rest = match path.strip_prefix("/v1") {
            Some(r) if r.is_empty() || r.starts_with('/') => r,
            _ => path,
        };
        if !slash
            && self.inner.base_path.len() + rest.len() == path.len()
            && path.starts_with(&*self.inner.base_path)
        {
            // The usual `…/v1` upstream: the client's own path and query.
            if let Some(pq) = client.path_and_query() {
                return Ok(pq.clone());
            }
        }
        let mut pq = String::with_capacity(self.inner.base_path.len() + path.len() + 16);
        pq.push_str(&self.inner.base_path);
        pq.push_str(rest);
        if let Some(q) = client.query() {
            pq.push('?');
            pq.push_str(q);
        }
        uri::PathAndQuery::try_from(pq)
            .map_err(|e| self.bad_gateway(format!("cannot build the upstream URL: {e}")))
    }

    pub(crate) fn bad_gateway(&self, reason: String) -> Error {
        Error::BadGateway {
            upstream: self.inner.name.0.clone(),
            reason,
        }
    }
}

/// The future of [`Upstream`]'s `call`.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // The pool queues requests itself; there is no backpressure to report.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> ResponseFuture {
        let this = self.clone();
        ResponseFuture {
            inner: Box::pin(this.send(req)),
        }
    }
}

/// The upstream's request, as [`Upstream::prepare`] makes it.
struct Outgoing {
    req: Request<Body>,
    endpoint: Endpoint,
    /// For a body still coming from the client: the time it waits for the
    /// client's bytes.
    uploaded: Option<Arc<UploadClock>>,
    /// Where the wait for the answer's head is counted, if anywhere.
    waited: Option<Waited>,
    /// What a watched answer's held events count against.
    budget: Option<BodyBudget>,
}

/// An answer's head as it came (with the pool's connection, if it lent one),
/// or why none came.
type Sent = Result<(Response<Incoming>, Option<Lease>), Error>;

/// What the HTTP/1 pool's `send` is.
trait PoolSend: Future<Output = Result<(Response<Incoming>, Lease), SendError>> + Send {}

impl<F> PoolSend for F where
    F: Future<Output = Result<(Response<Incoming>, Lease), SendError>> + Send
{
}

pin_project_lite::pin_project! {
    /// The future of [`Upstream::send`]: the upstream's request on its way,
    /// then its answer made the client's ([`Upstream::answer`]).
    ///
    /// Written by hand, not as an `async fn`: that would hold the request
    /// as its argument, split, and rebuilt for the upstream (about 2 KiB,
    /// copied into every request's box); this holds it once, in the send.
    struct Exchange<P> {
        upstream: Upstream,
        endpoint: Endpoint,
        budget: Option<BodyBudget>,
        #[pin]
        state: Sending<P>,
    }
}

pin_project_lite::pin_project! {
    #[project = SendingProj]
    enum Sending<P> {
        Pool { #[pin] head: HeadWithin<P> },
        Client { #[pin] head: HeadWithin<ClientSend> },
        Refused { #[pin] refusal: std::future::Ready<Result<Response<Body>, Error>> },
    }
}

impl<P: PoolSend> Future for Exchange<P> {
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let upstream = &*this.upstream;
        let sent = match this.state.project() {
            SendingProj::Pool { head } => std::task::ready!(head.poll(cx)).map(|sent| {
                sent.map(|(resp, lease)| (resp, Some(lease)))
                    .map_err(|e| upstream.classify_pool(e))
            }),
            SendingProj::Client { head } => std::task::ready!(head.poll(cx)).map(|sent| {
                sent.map(|resp| (resp, None))
                    .map_err(|e| upstream.classify(&e))
            }),
            SendingProj::Refused { refusal } => return refusal.poll(cx),
        };
        Poll::Ready(upstream.answer(sent, *this.endpoint, this.budget.as_ref()))
    }
}

pin_project_lite::pin_project! {
    /// A request through hyper-util's client (`https://`). A safe request
    /// without a body (`GET`, `HEAD`, `OPTIONS`, `TRACE`) that a connection
    /// took and closed with no answer (a pooled one the server's
    /// keep-alive timeout closed as the request arrived) goes out once
    /// more, as [`crate::pool::Pool::send`] does on `http://`. (The client
    /// itself sends again only a request it never wrote.) Unlike the pool,
    /// the client does not say whether the connection was a reused one: a
    /// new one that closed unanswered sends it again too, which a safe
    /// request allows (RFC 9110, 9.2.2).
    struct ClientSend {
        #[pin]
        sent: hyper_util::client::legacy::ResponseFuture,
        // Boxed: rarely made, and inline it would take its room in every
        // request's future.
        again: Option<Box<(crate::pool::Replay, HttpClient)>>,
    }
}

impl ClientSend {
    fn new(client: &HttpClient, req: Request<Body>) -> Self {
        let again = crate::pool::Replay::of(&req).map(|replay| Box::new((replay, client.clone())));
        ClientSend {
            sent: client.request(req),
            again,
        }
    }
}

impl Future for ClientSend {
    type Output = Result<Response<Incoming>, hyper_util::client::legacy::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match std::task::ready!(this.sent.as_mut().poll(cx)) {
                Err(e) if !e.is_connect() && crate::pool::closed_unanswered(&e) => {
                    let Some(again) = this.again.take() else {
                        return Poll::Ready(Err(e));
                    };
                    let (replay, client) = *again;
                    tracing::debug!(error = %e, "sent again: the connection closed unanswered");
                    this.sent.set(client.request(replay.request()));
                }
                sent => return Poll::Ready(sent),
            }
        }
    }
}

/// `send`'s output, unless the first-byte timeout passes first: counted
/// from now, less, for a body streamed from the client, the time it waited
/// for the client's bytes (`uploaded`). The wait, however it ends, is
/// added to `waited`.
fn head_within<F: Future>(
    first_byte: Duration,
    uploaded: Option<Arc<UploadClock>>,
    waited: Option<Waited>,
    send: F,
) -> HeadWithin<F> {
    HeadWithin {
        send,
        timer: None,
        start: tokio::time::Instant::now(),
        first_byte,
        uploaded,
        waited,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`head_within`]. Not an `async fn`: its state would
    /// hold `send` twice (the argument, and the timeout's own), a KiB more
    /// in every request's future. Its timer is made when it is first
    /// polled: a service may be called outside the runtime that will run
    /// its future.
    struct HeadWithin<F> {
        #[pin]
        send: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        start: tokio::time::Instant,
        first_byte: Duration,
        uploaded: Option<Arc<UploadClock>>,
        waited: Option<Waited>,
    }
}

impl<F: Future> Future for HeadWithin<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(sent) = this.send.poll(cx) {
            if let Some(waited) = this.waited.take() {
                waited.add(this.start.elapsed());
            }
            return Poll::Ready(Some(sent));
        }
        if this.timer.is_none() {
            let deadline = *this.start + *this.first_byte;
            this.timer.set(Some(tokio::time::sleep_until(deadline)));
        }
        let mut timer = this.timer.as_pin_mut().expect("armed above");
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The time waiting for the client's bytes does not count: wait
            // out what the upstream has left.
            let spent = this
                .uploaded
                .as_ref()
                .map_or(*this.first_byte, |clock| clock.upstreams_time());
            let Some(left) = this.first_byte.checked_sub(spent).filter(|l| !l.is_zero()) else {
                if let Some(waited) = this.waited.take() {
                    waited.add(this.start.elapsed());
                }
                return Poll::Ready(None);
            };
            timer.as_mut().reset(tokio::time::Instant::now() + left);
        }
    }
}

impl Upstream {
    /// The request sent upstream, and its answer's head with the body to
    /// stream. The request is rebuilt for the upstream here, before the
    /// future ([`Exchange`]), which holds it once.
    fn send(self, req: Request<Body>) -> Exchange<impl PoolSend> {
        let Outgoing {
            req: out,
            endpoint,
            uploaded,
            waited,
            budget,
        } = match self.prepare(req) {
            Ok(outgoing) => outgoing,
            Err(e) => {
                return Exchange {
                    upstream: self,
                    endpoint: Endpoint::Passthrough,
                    budget: None,
                    state: Sending::Refused {
                        refusal: std::future::ready(Err(e)),
                    },
                };
            }
        };
        let first_byte = self.inner.first_byte_timeout;
        let shard = crate::shard::current();
        let state = match &self.inner.transport {
            Transport::Http1 { pools } => {
                let pool = shard
                    .and_then(|i| pools.get(i))
                    .unwrap_or(&pools[pools.len() - 1]);
                Sending::Pool {
                    head: head_within(first_byte, uploaded, waited, pool.clone().send(out)),
                }
            }
            Transport::Client(clients) => {
                let client = shard
                    .and_then(|i| clients.get(i))
                    .unwrap_or(&clients[clients.len() - 1]);
                Sending::Client {
                    head: head_within(first_byte, uploaded, waited, ClientSend::new(client, out)),
                }
            }
        };
        Exchange {
            upstream: self,
            endpoint,
            budget,
            state,
        }
    }

    /// The upstream's request: the client's, with its hop-by-hop headers
    /// and credential replaced, the buffered body, and the upstream's path.
    fn prepare(&self, req: Request<Body>) -> Result<Outgoing, Error> {
        let (mut parts, body) = req.into_parts();
        let meta = parts.extensions.get::<RequestMeta>();
        let endpoint = meta
            .map(RequestMeta::endpoint)
            .or_else(|| Endpoint::from_path(parts.uri.path()))
            .unwrap_or(Endpoint::Passthrough);
        let buffered = meta.and_then(RequestMeta::body_for_upstream);
        let budget = meta.and_then(RequestMeta::budget).cloned();
        let waited = parts.extensions.get::<Waited>().cloned();
        if let Some(slot) = parts.extensions.get::<UpstreamSlot>() {
            slot.set(&self.inner.name.0);
        }
        let buffered_body = buffered.is_some();
        let client_length = parts.headers.remove(header::CONTENT_LENGTH);
        headers::strip_request(&mut parts.headers, false);
        let body = match buffered {
            Some(bytes) => {
                // The client's own value when it still holds (the body
                // went unedited): no new header value to allocate.
                let length = client_length
                    .filter(|v| states_length(v, bytes.len()))
                    .unwrap_or_else(|| bytes.len().into());
                parts.headers.insert(header::CONTENT_LENGTH, length);
                llm_proxy_core::full(bytes)
            }
            None => {
                if let Some(length) = client_length {
                    parts.headers.insert(header::CONTENT_LENGTH, length);
                } else if !http_body::Body::is_end_stream(&body)
                    && matches!(parts.method, http::Method::GET | http::Method::HEAD)
                {
                    // A body of unknown length (chunked) on a method that
                    // seldom has one: hyper's HTTP/1 client sends none
                    // unless told the coding (an HTTP/2 one drops the
                    // header, and sends the body as it does any).
                    parts.headers.insert(
                        header::TRANSFER_ENCODING,
                        HeaderValue::from_static("chunked"),
                    );
                }
                body
            }
        };
        // A body still coming from the client: the time it waits for the
        // client's bytes is not the upstream's (a slow, steady upload is
        // bounded by the client's own read timeout).
        let (body, uploaded) = if buffered_body {
            (body, None)
        } else {
            let clock = UploadClock::start();
            (
                Uploading::new(body, clock.clone()).boxed_unsync(),
                Some(clock),
            )
        };
        self.present(&mut parts.headers);

        let pq = self.path_and_query(&parts.uri)?;
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.headers_mut() = parts.headers;
        match &self.inner.transport {
            Transport::Http1 { .. } => {
                *out.uri_mut() = Uri::from(pq);
                out.headers_mut()
                    .insert(header::HOST, self.inner.host.clone());
            }
            Transport::Client(_) => {
                *out.uri_mut() = Uri::builder()
                    .scheme(self.inner.scheme.clone())
                    .authority(self.inner.authority.clone())
                    .path_and_query(pq)
                    .build()
                    .map_err(|e| self.bad_gateway(format!("cannot build the upstream URL: {e}")))?;
            }
        }
        Ok(Outgoing {
            req: out,
            endpoint,
            uploaded,
            waited,
            budget,
        })
    }

    /// The upstream's answer (`None`: no head within the first-byte
    /// timeout) made the client's: checked, its head marked, its body
    /// watched and tied to its connection.
    fn answer(
        &self,
        sent: Option<Sent>,
        endpoint: Endpoint,
        budget: Option<&BodyBudget>,
    ) -> Result<Response<Body>, Error> {
        let (resp, lease) = match sent {
            None => {
                return Err(Error::UpstreamTimeout {
                    upstream: self.inner.name.0.clone(),
                    phase: Error::WAITING_FOR_HEAD,
                });
            }
            Some(sent) => sent?,
        };

        let (mut parts, incoming) = resp.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            // Only `upgrade` asks for a protocol switch: relayed, this one
            // would leave the client a connection in no known protocol.
            return Err(self.bad_gateway("an unasked-for 101 Switching Protocols".into()));
        }
        if let Some(coding) =
            headers::unreadable_coding(&parts.headers, endpoint != Endpoint::Passthrough)
        {
            return Err(self.bad_gateway(format!("the upstream sent {coding}")));
        }
        // The client's version is this hop's, not the upstream's (an
        // HTTP/1.0 server's answer goes to an HTTP/1.1 client as 1.1).
        parts.version = http::Version::HTTP_11;
        self.mark(&mut parts);
        let is_sse = llm_proxy_core::media::is_event_stream(&parts.headers);
        let watch = endpoint.stream_kind().filter(|_| is_sse);
        if watch.is_some() {
            // A watched stream may gain a final error event: its length is not
            // the upstream's.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = UpstreamBody::new(
            incoming,
            self.inner.idle_timeout,
            watch,
            self.inner.name.0.clone(),
        )
        .bounded_by(budget)
        .with_lease(lease);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    /// Set the upstream's own credential (the client's was stripped) and
    /// headers (replacing the client's of the same names) and, for an
    /// Anthropic upstream, a default `anthropic-version`.
    pub(crate) fn present(&self, headers: &mut http::HeaderMap) {
        if let Some((name, value)) = &self.inner.credential {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.inner.headers {
            headers.insert(name.clone(), value.clone());
        }
        if self.inner.anthropic && !headers.contains_key(&ANTHROPIC_VERSION_HEADER) {
            headers.insert(
                ANTHROPIC_VERSION_HEADER,
                HeaderValue::from_static(ANTHROPIC_VERSION),
            );
        }
    }

    /// Strip a response head of its hop-by-hop headers and mark it with
    /// the upstream's name (header and extension).
    pub(crate) fn mark(&self, parts: &mut http::response::Parts) {
        headers::strip_response(&mut parts.headers);
        parts
            .headers
            .insert(UPSTREAM_HEADER, self.inner.name_header.clone());
        parts.extensions.insert(self.inner.name.clone());
    }

    /// A connection the proxy could not open for want of its own
    /// resources: 503, and no failure of this upstream's.
    fn out_of_resources(&self, reason: String) -> Error {
        tracing::debug!(upstream = %self.inner.name.0, %reason, "no resources to connect");
        Error::OutOfResources {
            upstream: self.inner.name.0.to_string(),
            reason,
        }
    }

    /// A connect (TCP, and TLS for `https://`) that did not end within
    /// `connect_timeout_ms`.
    fn connect_timed_out(&self) -> Error {
        tracing::debug!(upstream = %self.inner.name.0, "could not connect: timed out");
        Error::UpstreamTimeout {
            upstream: self.inner.name.0.clone(),
            phase: "connecting",
        }
    }

    pub(crate) fn classify_pool(&self, e: SendError) -> Error {
        if let SendError::Request(e) = &e
            && let Some(client) = client_fault(e)
        {
            return client;
        }
        let (what, root) = match e {
            SendError::ConnectTimeout => return self.connect_timed_out(),
            SendError::Connect(e) => {
                if let Some(reason) = out_of_resources(&*e).or_else(descriptors_exhausted) {
                    return self.out_of_resources(reason);
                }
                // A connect (TCP and TLS) past its time, as the client's
                // connector bounds it ([`TimedConnector`]).
                if timed_out(&*e) {
                    return self.connect_timed_out();
                }
                ("could not connect", root_cause(&*e))
            }
            SendError::Request(e) => ("request failed", root_cause(&e)),
        };
        tracing::debug!(upstream = %self.inner.name.0, error = %root, "{what}");
        self.bad_gateway(format!("{what}: {root}"))
    }

    fn classify(&self, e: &hyper_util::client::legacy::Error) -> Error {
        if let Some(client) = client_fault(e) {
            return client;
        }
        if e.is_connect() {
            // None of the kept addresses took it: the upstream may have
            // moved, and the next connect looks it up again.
            self.inner.dns.forget();
        }
        if e.is_connect()
            && let Some(reason) = out_of_resources(e).or_else(descriptors_exhausted)
        {
            return self.out_of_resources(reason);
        }
        if timed_out(e) {
            return self.connect_timed_out();
        }
        if let Some(reason) = unprocessed(e) {
            tracing::debug!(upstream = %self.inner.name.0, reason, "request not taken");
            return Error::UpstreamRefused {
                upstream: self.inner.name.0.clone(),
                reason: reason.to_owned(),
            };
        }
        let root = root_cause(e);
        let what = if e.is_connect() {
            "could not connect"
        } else {
            "request failed"
        };
        let Some(tls) = tls_failure(e) else {
            tracing::debug!(upstream = %self.inner.name.0, error = %root, "{what}");
            return self.bad_gateway(format!("{what}: {root}"));
        };
        // (A monotonic clock: a wall clock set back would silence it.)
        let now = u64::try_from(self.inner.built.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(suppressed) = self.inner.tls_warnings.due(now, TLS_WARN_EVERY_MS) {
            tracing::warn!(upstream = %self.inner.name.0, error = %root, suppressed, "TLS with the upstream failed");
        } else {
            tracing::debug!(upstream = %self.inner.name.0, error = %root, "{what}");
        }
        self.bad_gateway(format!("{what}: {tls}"))
    }
}

/// What the client is told of a TLS failure in `e`'s chain: its kind, not
/// rustls' account of it, which names the upstream certificate's host
/// names and addresses (internal ones, often) and its validity dates. The
/// proxy's log has the whole: a `warn` line at most every 10 s per
/// upstream, `debug` for the others.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    rustls_error(e).map(|tls| match tls {
        rustls::Error::InvalidCertificate(_) => {
            "the upstream's TLS certificate was not accepted (the proxy's log says why)"
        }
        rustls::Error::InvalidMessage(_) => {
            "the upstream did not answer in TLS (is it an http:// server?)"
        }
        rustls::Error::AlertReceived(_) => "the upstream refused the TLS handshake",
        _ => "TLS failed (the proxy's log says why)",
    })
}

/// The rustls error in `e`'s chain, also inside an `io::Error` (whose
/// `source` skips the error it wraps).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        && let Some(tls) = rustls_error(inner)
    {
        return Some(tls);
    }
    e.source().and_then(rustls_error)
}

/// Whether an I/O error in `e`'s chain timed out.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    source_chain(e).any(|s| {
        s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// How often an HTTP/2 connection to an upstream is pinged, and how long
/// its answer may take: half the upstream's `idle_timeout` (a connection
/// silent that long is as dead as a stream would be), at least 1 s and at
/// most 30 s (a long `idle_timeout` for slow models is no reason to notice
/// a dead connection late).
fn h2_ping_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Why the upstream surely processed none of a request that failed, if it
/// did not (RFC 9113 §8.7): its HTTP/2 stream was refused
/// (`REFUSED_STREAM`), or was past the last stream the upstream said it
/// would process when it went away (a `GOAWAY` without error: an HTTP/2
/// server rotating its connections, as nginx's `keepalive_requests` does),
/// or the connection closed before the request was sent.
fn unprocessed(e: &hyper_util::client::legacy::Error) -> Option<&'static str> {
    source_chain(e).find_map(|s| {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return match h2.reason() {
                Some(h2::Reason::REFUSED_STREAM) if h2.is_remote() => {
                    Some("its HTTP/2 stream was refused (REFUSED_STREAM)")
                }
                Some(h2::Reason::NO_ERROR) if h2.is_go_away() && h2.is_remote() => {
                    Some("its HTTP/2 connection went away (GOAWAY) before the stream")
                }
                _ => None,
            };
        }
        s.downcast_ref::<hyper::Error>()
            .filter(|e| e.is_canceled())
            .map(|_| "its connection closed before it was sent")
    })
}

/// The client's fault, not the upstream's: a streamed request body that
/// went over `max_body_bytes` while it was being sent (the parse layer's
/// body fails with [`Error::RequestTooLarge`]), stopped coming (the
/// server's body fails with [`Error::RequestTimeout`]) or could not be read
/// (broken chunks: [`Error::UnreadableBody`], see `Uploading`) or was cut
/// by the client leaving ([`Error::ClientClosedRequest`]). It is the
/// client's 413, 408, 400 or 499, and the balancer must not hold it against
/// the upstream.
fn client_fault(e: &(dyn std::error::Error + 'static)) -> Option<Error> {
    source_chain(e)
        .filter_map(|s| s.downcast_ref::<Error>())
        .find(|e| {
            matches!(
                e,
                Error::RequestTooLarge { .. }
                    | Error::RequestTimeout { .. }
                    | Error::RequestBodyTooSlow { .. }
                    | Error::UnreadableBody(_)
                    | Error::ClientClosedRequest
            )
        })
        .cloned()
}

/// The innermost error's message.
/// What the proxy ran short of, when an error (or one it wraps) says it
/// could not open a connection for want of its own resources: open files
/// (its own limit or the system's), socket buffers, memory. Not a missing
/// local address (`EADDRNOTAVAIL`): that is as often an address the
/// machine cannot reach as a lack of free ports, and the first is the
/// upstream's to be judged for.
fn out_of_resources(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    source_chain(e).find_map(|s| {
        let io = s.downcast_ref::<std::io::Error>()?;
        short_of_resources(io).then(|| io.to_string())
    })
}

/// Whether this process is out of file descriptors now, asked after a
/// connect failed with no error that says so: a name lookup out of them
/// fails as a name not found (glibc's resolver, unable to open
/// `/etc/hosts` or a socket to the DNS server, reports `EAI_NONAME`). One
/// descriptor asked for, and given back at once, tells; only on the
/// failure path.
#[cfg(unix)]
fn descriptors_exhausted() -> Option<String> {
    match std::fs::File::open("/dev/null") {
        Err(e) if short_of_resources(&e) => Some(e.to_string()),
        _ => None,
    }
}

#[cfg(not(unix))]
fn descriptors_exhausted() -> Option<String> {
    None
}

#[cfg(unix)]
fn short_of_resources(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

#[cfg(not(unix))]
fn short_of_resources(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::OutOfMemory
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    source_chain(e)
        .last()
        .map_or_else(|| e.to_string(), ToString::to_string)
}

pub(crate) fn source_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The port `authority` names, if any: `Err` for one that is no TCP port
/// (`http::Uri` takes any digits; `:99999` must not mean port 80).
pub fn port_of(authority: &uri::Authority) -> Result<Option<u16>, &'static str> {
    let text = authority.as_str();
    let text = text.rsplit_once('@').map_or(text, |(_, host)| host);
    let host_end = if text.starts_with('[') {
        text.find(']').map_or(text.len(), |close| close + 1)
    } else {
        text.rfind(':').unwrap_or(text.len())
    };
    match text[host_end..].strip_prefix(':') {
        // `host:` names no port: the scheme's.
        None | Some("") => Ok(None),
        Some(digits) => match digits.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Some(port)),
            _ => Err("the port must be a number from 1 to 65535"),
        },
    }
}

/// Whether a `content-length` value is exactly `len` in plain decimal (no
/// sign, no leading zero, no space): one that may be forwarded as it is.
fn states_length(value: &HeaderValue, len: usize) -> bool {
    let digits = value.as_bytes();
    (digits == b"0" || digits.first().is_some_and(|d| (b'1'..=b'9').contains(d)))
        && digits.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<usize>().ok())
            == Some(len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;

    /// The future is made at `call` and may be run by a runtime that was
    /// not current then: nothing that needs one (a timer) is made before it
    /// is polled.
    #[test]
    fn a_call_made_outside_a_runtime_runs_in_one() {
        // Nothing listens on the discard port: refused at once.
        let cfg = UpstreamConfig::new("u", "http://127.0.0.1:9/v1".parse().unwrap());
        let mut upstream = Upstream::new(cfg).unwrap();
        let req = Request::post("/v1/models")
            .body(llm_proxy_core::empty())
            .unwrap();
        let answer = upstream.call(req);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answer = runtime.block_on(answer);
        assert!(
            matches!(answer, Err(Error::BadGateway { .. })),
            "{answer:?}"
        );
    }

    fn mapped(base: &str, client: &str) -> String {
        let cfg = UpstreamConfig::new("u", base.parse().unwrap());
        let upstream = Upstream::new(cfg).unwrap();
        let client: Uri = client.parse().unwrap();
        upstream.path_and_query(&client).unwrap().to_string()
    }

    #[test]
    fn only_a_plain_length_that_holds_is_forwarded_as_sent() {
        let states = |v: &'static str, len| states_length(&HeaderValue::from_static(v), len);
        assert!(states("16", 16));
        assert!(states("0", 0));
        assert!(states("18446744073709551615", usize::MAX));
        for (v, len) in [
            ("17", 16),
            ("016", 16),
            ("+16", 16),
            (" 16", 16),
            ("16 ", 16),
            ("", 0),
            ("00", 0),
            ("1e1", 10),
            ("18446744073709551616", usize::MAX),
        ] {
            assert!(!states(v, len), "{v:?}");
        }
    }

    #[test]
    fn a_port_out_of_range_or_credentials_are_refused() {
        let port = |authority: &str| port_of(&authority.parse().unwrap());
        assert_eq!(port("h"), Ok(None));
        assert_eq!(port("h:"), Ok(None));
        assert_eq!(port("h:8080"), Ok(Some(8080)));
        assert_eq!(port("[::1]"), Ok(None));
        assert_eq!(port("[::1]:65535"), Ok(Some(65535)));
        assert!(port("h:99999").is_err());
        assert!(port("[::1]:65536").is_err());
        assert!(port("h:0").is_err());
        for url in [
            "http://127.0.0.1:99999/v1",
            "http://u:s3cret@127.0.0.1:1/v1",
        ] {
            let cfg = UpstreamConfig::new("u", url.parse().unwrap());
            let e = Upstream::new(cfg).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    /// An upstream's headers: none the proxy sets itself, not the key's
    /// header beside an `api_key`, no name twice; the rest go on every
    /// request, replacing the client's, marked sensitive.
    #[test]
    fn an_upstreams_headers_are_checked_and_presented() {
        fn build(
            key: Option<&str>,
            style: AuthStyle,
            headers: &[(&'static str, &'static str)],
        ) -> Result<Upstream, BuildError> {
            let mut cfg = UpstreamConfig::new("u", "http://127.0.0.1:1/v1".parse().unwrap());
            cfg.api_key = key.map(str::to_owned);
            cfg.auth_style = style;
            cfg.headers = headers
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect();
            Upstream::new(cfg)
        }
        let refused = |key, style, headers: &[(&'static str, &'static str)]| {
            build(key, style, headers).err().map(|e| e.to_string())
        };
        for name in [
            "content-length",
            "host",
            "accept-encoding",
            "sec-websocket-key",
            "te",
        ] {
            let e = refused(None, AuthStyle::Bearer, &[(name, "x")]).expect(name);
            assert!(e.contains("sets this header itself"), "{e}");
        }
        let e = refused(Some("k"), AuthStyle::Bearer, &[("authorization", "x")]).unwrap();
        assert!(e.contains("`api_key` sets this header"), "{e}");
        let e = refused(Some("k"), AuthStyle::XApiKey, &[("x-api-key", "x")]).unwrap();
        assert!(e.contains("`api_key` sets this header"), "{e}");
        let e = refused(None, AuthStyle::Bearer, &[("x-a", "1"), ("x-a", "2")]).unwrap();
        assert!(e.contains("given twice"), "{e}");
        let e = refused(None, AuthStyle::Bearer, &[("x-request-id", "1")]).unwrap();
        assert!(e.contains("each request's own id"), "{e}");
        for value in ["", " v", "v\t"] {
            let e = refused(None, AuthStyle::Bearer, &[("x-a", value)]).expect(value);
            assert!(e.contains("space at an end"), "{e}");
        }
        // Without an `api_key`, its header is the operator's to set.
        let up = build(
            None,
            AuthStyle::Bearer,
            &[("authorization", "Bearer gw"), ("x-a", "1")],
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("client"));
        headers.append("x-a", HeaderValue::from_static("client too"));
        headers.insert("x-b", HeaderValue::from_static("kept"));
        up.present(&mut headers);
        let x_a: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(x_a, ["1"]);
        assert!(x_a[0].is_sensitive());
        assert_eq!(headers["authorization"], "Bearer gw");
        assert_eq!(headers["x-b"], "kept");
    }

    #[tokio::test]
    async fn the_client_path_goes_under_the_upstream_base_path() {
        let chat = "/v1/chat/completions?x=1";
        assert_eq!(mapped("http://127.0.0.1:1/v1", chat), chat);
        assert_eq!(mapped("http://127.0.0.1:1/v1/", chat), chat);
        assert_eq!(
            mapped("http://127.0.0.1:1/openai/v1", chat),
            "/openai/v1/chat/completions?x=1"
        );
        assert_eq!(
            mapped("http://127.0.0.1:1/api", "/v1/messages"),
            "/api/messages"
        );
        assert_eq!(mapped("http://127.0.0.1:1", chat), "/chat/completions?x=1");
        // A path outside /v1 keeps its whole self.
        assert_eq!(mapped("http://127.0.0.1:1/v1", "/v10/x"), "/v1/v10/x");
        assert_eq!(mapped("http://127.0.0.1:1/v2", "/v1/models"), "/v2/models");
        // A route the proxy reads goes without its trailing slash; another
        // path goes as sent.
        let v1 = "http://127.0.0.1:1/v1";
        assert_eq!(mapped(v1, "/v1/chat/completions/?x=1"), chat);
        assert_eq!(mapped(v1, "/v1/messages/"), "/v1/messages");
        assert_eq!(mapped(v1, "/v1/responses/resp_1/"), "/v1/responses/resp_1");
        assert_eq!(
            mapped("http://127.0.0.1:1/openai/v1", "/v1/models/"),
            "/openai/v1/models"
        );
        assert_eq!(mapped(v1, "/v1/files/"), "/v1/files/");
        assert_eq!(mapped(v1, "/v1/"), "/v1/");
    }
}
