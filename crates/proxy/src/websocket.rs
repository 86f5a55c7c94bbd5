//! WebSocket on `/v1/responses`: Codex opens one before falling back to
//! HTTP streaming.
//!
//! The upgrade request carries no model (the model comes later, in each
//! `response.create` message), so it cannot be routed like a request body.
//! DESIGN.md pins what happens: the upgrade goes to the first upstream in
//! config order with `websocket = true` that is healthy and that the
//! caller's key may use; it counts as one request against the key's request
//! limit; with no such upstream it is refused as a plain `GET
//! /v1/responses` is (405), and the client falls back to HTTP. One that
//! cannot be reached is passed over for the next (up to the balancer's
//! `max_retries`), as a request would be retried elsewhere.
//!
//! Once switched, the connection is a byte tunnel: the proxy does not read
//! the frames. So a key may use an upstream over a WebSocket only when
//! nothing the proxy enforces per request would be skipped: its allowlist
//! covers every model the upstream serves (an upstream that serves any
//! model is only for keys without an allowlist), and it has no token limit
//! (the tunnel's tokens cannot be counted). Such keys get the 405 and use
//! HTTP, where both are enforced.
//!
//! The tunnel lives on the client connection's task (it holds the
//! connection's `max_connections` permit, and a drain waits for it up to the
//! drain timeout), and is closed when either side closes, or when neither
//! has sent a byte for the upstream's `idle_timeout_ms` (nginx's
//! `proxy_read_timeout` for WebSockets, which defaults to 60 s as well).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use llm_proxy_auth::{AuthLayer, rate_headers};
use llm_proxy_balance::BalanceHandle;
use llm_proxy_core::{Body, Dialect, Error, header_lists};
use llm_proxy_upstream::{Upgrade, Upstream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::idle::Activity;

/// A tunnel to run once hyper has handed the client's connection over.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The upstreams that take WebSocket upgrades, in config order.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    upstreams: Vec<SocketUpstream>,
    /// Upstreams tried per upgrade: the balancer's `max_retries` + 1.
    attempts: usize,
    /// Tunnels open now.
    open: Arc<AtomicU64>,
}

/// One upstream with `websocket = true`.
#[derive(Debug)]
pub(crate) struct SocketUpstream {
    /// Its client (with upgrades enabled).
    pub(crate) client: Upstream,
    /// The models it serves; `None`: any.
    pub(crate) models: Option<Vec<String>>,
    /// The longest silence of a tunnel to it.
    pub(crate) idle_timeout: Duration,
}

impl Sockets {
    pub(crate) fn new(upstreams: Vec<SocketUpstream>, max_retries: u32) -> Self {
        Sockets {
            upstreams,
            attempts: usize::try_from(max_retries).map_or(usize::MAX, |r| r.saturating_add(1)),
            open: Arc::default(),
        }
    }

    /// Whether any upstream takes upgrades.
    pub(crate) fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    /// The gauge of open tunnels.
    pub(crate) fn open_gauge(&self) -> Arc<AtomicU64> {
        self.open.clone()
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
pub(crate) struct Ctx<'a> {
    pub(crate) sockets: &'a Sockets,
    pub(crate) auth: Option<&'a AuthLayer>,
    pub(crate) balance: &'a BalanceHandle<crate::app::UpstreamService>,
    /// The client connection's watch, whose task runs the tunnel; `None`
    /// outside the proxy's server (an embedding app's), where the tunnel
    /// gets a task of its own.
    pub(crate) conn: Option<&'a Arc<Activity>>,
}

/// Answer an upgrade request on `/v1/responses` (see the module docs): the
/// upstream's `101` with the tunnel set up behind it, the upstream's own
/// refusal, or the proxy's error.
pub(crate) async fn open<B>(ctx: Ctx<'_>, mut req: Request<B>) -> Result<Response<Body>, Error> {
    let key = match ctx.auth {
        Some(auth) => Some(auth.authenticate(req.headers())?),
        None => None,
    };
    let mut candidates = ctx
        .sockets
        .upstreams
        .iter()
        .filter(|u| {
            key.as_ref().is_none_or(|k| {
                k.limits.tokens.is_none() && k.allows_every_model(u.models.as_deref())
            }) && ctx.balance.is_healthy(u.client.name())
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
    let decision = match (ctx.auth, &key) {
        (Some(auth), Some(key)) => match auth.acquire_request(key, Dialect::OpenAi).await {
            Ok(decision) => decision,
            Err(refusal) => return Ok(refusal),
        },
        _ => None,
    };
    let client_side = hyper::upgrade::on(&mut req);
    let (parts, _body) = req.into_parts();
    // An upstream that cannot be reached (or breaks the exchange, or does
    // not answer in time) is passed over for the next one, up to the
    // balancer's retry count: an upgrade is a `GET`, and nothing of the
    // session has happened yet.
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
        match upstream.client.upgrade(attempt).await {
            Ok(Upgrade::Switched { head, io }) => break (upstream, head, io),
            Ok(Upgrade::Refused(resp)) => return Ok(resp),
            Err(e @ (Error::BadGateway { .. } | Error::UpstreamTimeout { .. })) => {
                tracing::debug!(upstream = %upstream.client.name(), error = %e, "WebSocket upgrade failed");
                failed = Some(e);
            }
            Err(e) => return Err(e),
        }
    };
    let tunnel = splice(
        client_side,
        io,
        upstream.idle_timeout,
        ctx.sockets.open.clone(),
    );
    match ctx.conn {
        Some(conn) => conn.hold(Box::pin(tunnel)),
        None => drop(tokio::spawn(tunnel)),
    }
    let mut resp = head.map(|()| llm_proxy_core::empty());
    if let Some(decision) = &decision {
        rate_headers(resp.headers_mut(), decision);
    }
    Ok(resp)
}

/// Copy bytes both ways between the client's connection, once hyper hands
/// it over, and the upstream's, until both directions end or neither side
/// sends a byte for `idle`.
async fn splice(
    client: OnUpgrade,
    upstream: TokioIo<hyper::upgrade::Upgraded>,
    idle: Duration,
    open: Arc<AtomicU64>,
) {
    let client = match client.await {
        Ok(client) => TokioIo::new(client),
        Err(e) => {
            tracing::debug!(error = %e, "the client's connection was not handed over");
            return;
        }
    };
    open.fetch_add(1, Ordering::Relaxed);
    let epoch = Instant::now();
    let heard = AtomicU64::new(0);
    let mut client = Stamped {
        io: client,
        epoch,
        heard: &heard,
    };
    let mut upstream = Stamped {
        io: upstream,
        epoch,
        heard: &heard,
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    let mut copy = std::pin::pin!(copy);
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let silent_ms = millis_since(epoch).saturating_sub(heard.load(Ordering::Relaxed));
        let left_ms = idle_ms.saturating_sub(silent_ms);
        if left_ms == 0 {
            tracing::debug!(idle_ms, "closing a silent WebSocket tunnel");
            break;
        }
        tokio::select! {
            copied = copy.as_mut() => {
                match copied {
                    Ok((up, down)) => tracing::debug!(up, down, "WebSocket tunnel closed"),
                    Err(e) => tracing::debug!(error = %e, "WebSocket tunnel broke"),
                }
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(left_ms)) => {}
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One end of a tunnel, stamping `heard` whenever bytes come from it.
struct Stamped<'a, T> {
    io: T,
    epoch: Instant,
    /// Milliseconds since `epoch` at which either end last sent bytes.
    heard: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin> AsyncRead for Stamped<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard
                .store(millis_since(self.epoch), Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn upgrade_tokens_are_found_in_lists_in_any_case() {
        let mut h = http::HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.append(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(header_lists(&h, &header::CONNECTION, "upgrade"));
        assert!(header_lists(&h, &header::UPGRADE, "websocket"));
        assert!(!header_lists(&h, &header::CONNECTION, "close"));
        let req = Request::get("/v1/responses")
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        // Without a connection to hand over (not from hyper's server).
        assert!(!wants_upgrade(&req));
    }
}
