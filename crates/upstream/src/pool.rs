//! A pool of HTTP/1.1 connections to one plain-`http://` upstream.
//!
//! hyper-util's general client is built for any number of hosts, schemes and
//! protocols: per request it hashes a pool key, races a checkout against a
//! lazy connect, formats the `Host` header and spawns a task that waits for
//! the connection to be ready again. For one known `http://` upstream on a
//! shard's thread none of that is needed: this pool keeps hyper's low-level
//! HTTP/1.1 connections in a stack (most recently used first), hands out one
//! that is ready, and takes it back when the response body has ended
//! ([`Lease`], held by the body). `https://` upstreams keep hyper-util's
//! client, which negotiates HTTP/2 with ALPN.
//!
//! A connection has no task of its own. hyper's connection future (the
//! "driver", which writes requests and reads responses) is polled by whoever
//! holds the connection: the request's future until the response head has
//! come, then the response body whenever hyper's body channel is empty. The
//! usual design, a spawned driver task, hands every body chunk from that
//! task to the request's through the channel, one chunk per task switch; so a
//! burst of SSE events read in one `recvfrom` reached hyper's server one at a
//! time, with a `Pending` — and a `writev` — after each. Driven inline, the
//! burst flows through in one poll. An idle connection is not polled by
//! anyone: a close by the server is noticed when it is next taken out
//! (`settle`), before a request is committed to it, or by the pool's
//! reaper: while connections sit idle, a task of the thread that last put
//! one back wakes when the oldest expires (up to 100 ms later, to take
//! those expiring meanwhile with it), and closes the expired ones and
//! those the server closed. Without it a pool no request takes from keeps
//! its connections (and their sockets, in `CLOSE_WAIT` once the server
//! closed them) for as long as no request comes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock, which the reaper sleeps on (and a paused test's clock).
use tokio::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use llm_proxy_core::Body;
use tokio::net::TcpStream;

use crate::dns::Dns;

/// At most this many idle connections are kept per pool; more are closed
/// when their response ends.
const MAX_IDLE: usize = 1024;

/// Idle HTTP/1.1 connections to one upstream, for one shard (or shared).
#[derive(Debug)]
pub(crate) struct Pool {
    idle: Mutex<Stack>,
    /// The host's addresses, looked up now and then ([`Dns`]), shared
    /// with the upstream's other pools.
    dns: Arc<Dns>,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

/// The idle connections, and whether a reaper watches them (set and
/// cleared under the lock, so that a connection put back as the reaper
/// leaves an empty stack starts another).
#[derive(Debug, Default)]
struct Stack {
    /// Oldest first: `since` never decreases along the stack.
    conns: Vec<Idle>,
    reaped: bool,
}

#[derive(Debug)]
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// A connection: hyper's sender and the connection's driver, which whoever
/// holds the connection polls (no task of its own; see the module docs).
/// Boxed once when it is opened (hyper's connection state with its buffers
/// is hundreds of bytes): taking it from the stack, lending it to a body and
/// putting it back then moves a pointer each time, not the whole state.
#[derive(Debug)]
struct Conn {
    sender: SendRequest<Body>,
    driver: http1::Connection<TokioIo<TcpStream>, Body>,
    /// The driver has returned: the connection is closed.
    ended: bool,
}

impl Conn {
    /// Let the connection do what it can: write the request, read the
    /// response head or body into hyper's channel, notice a close. Ready
    /// once the connection is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.ended {
            match Pin::new(&mut self.driver).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            }
            self.ended = true;
        }
        Poll::Ready(())
    }

    /// Whether the connection can take a request now, after letting it
    /// settle (finish its last exchange, or notice that the server closed
    /// it while it was idle). The waker does nothing: the next holder's
    /// polls register their own.
    fn settle(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.drive(&mut cx).is_pending() && self.sender.is_ready()
    }
}

/// How late the reaper may wake after the oldest idle connection expired:
/// those that expire meanwhile go with it, so that connections put back at
/// scattered times cost at most one wake (and one scan) per this.
const REAP_SLACK: Duration = Duration::from_millis(100);

/// The reaper of a pool's idle connections ([`Pool::expire`]), as long as
/// the pool lives and holds any.
async fn reap(pool: std::sync::Weak<Pool>) {
    /// A reaper dropped unfinished (its runtime shut down) is no longer
    /// watching: the next connection put back starts another.
    struct Watching(std::sync::Weak<Pool>, bool);
    impl Drop for Watching {
        fn drop(&mut self) {
            if self.1
                && let Some(pool) = self.0.upgrade()
            {
                pool.lock().reaped = false;
            }
        }
    }
    let mut watching = Watching(pool, true);
    loop {
        let Some(next) = watching.0.upgrade().and_then(|pool| pool.expire()) else {
            // (`expire` said so under the lock.)
            watching.1 = false;
            return;
        };
        tokio::time::sleep_until(next + REAP_SLACK).await;
    }
}

/// Why a request could not be sent.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// The TCP connection or the HTTP/1.1 handshake failed.
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The request failed on an established connection.
    Request(hyper::Error),
}

/// A connection lent to one request: give it back with [`Lease::release`]
/// once the response body has ended, or drop it to close the connection.
#[derive(Debug)]
pub(crate) struct Lease {
    pool: Arc<Pool>,
    conn: Box<Conn>,
}

impl Lease {
    /// The response is over: the connection may serve another request.
    pub(crate) fn release(self) {
        Pool::put(&self.pool, self.conn);
    }

    /// Drive the connection (its body's reader calls this when hyper's
    /// channel has no chunk for it). Ready once the connection is closed.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.conn.drive(cx)
    }
}

impl Pool {
    pub(crate) fn new(
        dns: Arc<Dns>,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        Pool {
            idle: Mutex::new(Stack::default()),
            dns,
            port,
            connect_timeout,
            idle_timeout,
        }
    }

    /// Send `req` on an idle connection, or on a new one. A request that a
    /// reused connection could not take (the server had closed it while it
    /// was idle; hyper hands the request back unsent) goes out again. So
    /// does, once, a safe request without a body (`GET`, `HEAD`, `OPTIONS`,
    /// `TRACE`) that a reused connection took and then closed with no
    /// answer: the server's keep-alive timeout ran out as the request
    /// arrived. As Go's client and browsers do (RFC 9110, 9.2.2); a request
    /// that may have taken effect is not sent twice. The replay goes on a
    /// new connection: the other idle ones may be in the same race (opened
    /// together, they time out together).
    ///
    /// Not an `async fn`, whose future would hold the request twice (as
    /// its argument and as the local sent and sent again).
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn's future holds its arguments twice"
    )]
    pub(crate) fn send(
        self: Arc<Self>,
        mut req: Request<Body>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), SendError>> + Send + 'static {
        // Boxed: rarely made (a safe request without a body), and inline it
        // would take its room in every request's future.
        let mut replay = Replay::of(&req).map(Box::new);
        async move {
            let mut replayed = false;
            loop {
                let idle = if replayed { None } else { self.checkout() };
                let (mut conn, reused) = match idle {
                    Some(conn) => (conn, true),
                    // Boxed: the connect future is large and rarely needed;
                    // inline it would be moved (copied) with every request's
                    // future.
                    None => (Box::pin(self.connect()).await?, false),
                };
                // A pooled connection the server closed while it sat idle is
                // noticed here, before a request is committed to it.
                if reused && !conn.settle() {
                    continue;
                }
                let mut response = std::pin::pin!(conn.sender.try_send_request(req));
                let sent = std::future::poll_fn(|cx| {
                    // The connection writes the request and reads the head
                    // only while it is driven.
                    let _ = conn.drive(cx);
                    response.as_mut().poll(cx)
                })
                .await;
                match sent {
                    Ok(resp) => {
                        let lease = Lease { pool: self, conn };
                        return Ok((resp, lease));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if reused => req = unsent,
                        _ => {
                            let e = e.into_error();
                            match replay.take() {
                                Some(again) if reused && closed_unanswered(&e) => {
                                    req = again.request();
                                    replayed = true;
                                }
                                _ => return Err(SendError::Request(e)),
                            }
                        }
                    },
                }
            }
        }
    }

    /// The most recently used idle connection that has not expired (the
    /// caller lets it settle before using it).
    fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.lock();
        while let Some(entry) = idle.conns.pop() {
            // A connection idle for too long is dropped (which closes it).
            if entry.since.elapsed() < self.idle_timeout {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(pool: &Arc<Self>, mut conn: Box<Conn>) {
        // Not ready: still busy with its last exchange, or closed.
        if !conn.settle() {
            return;
        }
        let now = Instant::now();
        let mut idle = pool.lock();
        // Expired connections sit at the bottom of the stack: close them.
        let expired = idle
            .conns
            .partition_point(|e| now.duration_since(e.since) >= pool.idle_timeout);
        idle.conns.drain(..expired);
        if idle.conns.len() < MAX_IDLE {
            idle.conns.push(Idle { conn, since: now });
            // (Outside a runtime, as a test's thread may be, expiry waits
            // for the next checkout or put, as it did before the reaper.)
            if !idle.reaped
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                idle.reaped = true;
                runtime.spawn(reap(Arc::downgrade(pool)));
            }
        }
    }

    /// Close the expired idle connections and those the server closed;
    /// when the next one expires, if any is left (none: the reaper stops,
    /// under the lock).
    fn expire(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut idle = self.lock();
        let timeout = self.idle_timeout;
        idle.conns
            .retain_mut(|e| now.duration_since(e.since) < timeout && e.conn.settle());
        let next = idle.conns.first().map(|e| e.since + timeout);
        idle.reaped = next.is_some();
        next
    }

    fn lock(&self) -> MutexGuard<'_, Stack> {
        // The stack holds no invariant a panic could break.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection.
    async fn connect(&self) -> Result<Box<Conn>, SendError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let stream = tokio::time::timeout_at(deadline, self.tcp(deadline))
            .await
            .map_err(|_elapsed| SendError::ConnectTimeout)?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut => SendError::ConnectTimeout,
                _ => SendError::Connect(e.into()),
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Box::new(Conn {
            sender,
            driver: conn,
            ended: false,
        }))
    }

    /// Resolve the host (no lookup for an IP literal, none while a recent
    /// one's addresses are kept) and connect to the first address that
    /// answers by `deadline`; none answering, the addresses are forgotten
    /// (the upstream may have moved).
    async fn tcp(&self, deadline: tokio::time::Instant) -> std::io::Result<TcpStream> {
        let mut addrs = self.dns.resolve().await?;
        for addr in &mut addrs {
            addr.set_port(self.port);
        }
        let connected = connect_any(&addrs, deadline).await;
        if connected.is_err() {
            self.dns.forget();
        }
        connected
    }
}

/// Connect to the first of `addrs` that answers by `deadline`. What time is
/// left is shared out among the addresses still to try, as hyper-util's
/// connector does: an address that swallows its SYN (an unreachable IPv6
/// address listed first) gets its share, not the whole connect timeout, and
/// the next one is tried in time.
async fn connect_any(
    addrs: &[std::net::SocketAddr],
    deadline: tokio::time::Instant,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Some(e),
            Err(_elapsed) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
}

/// What it takes to send a safe, bodiless request again: its head.
pub(crate) struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Replay {
    /// A copy of `req`'s head if it may be sent twice.
    pub(crate) fn of(req: &Request<Body>) -> Option<Replay> {
        use http::Method;
        let safe = matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        (safe && http_body::Body::is_end_stream(req.body())).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    pub(crate) fn request(self) -> Request<Body> {
        let mut req = Request::new(llm_proxy_core::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Whether the server closed the connection before any of its answer came:
/// an end of the stream, or a reset, while hyper waited for a head (over
/// TLS, an end without `close_notify` is rustls' `UnexpectedEof`).
pub(crate) fn closed_unanswered(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    crate::service::source_chain(e).any(|s| {
        s.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || s.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
                )
            })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tower_service::Service;

    use crate::{Upstream, UpstreamConfig};

    /// An HTTP/1.1 server on 127.0.0.1 that answers every request with
    /// `ok` and counts the connections it accepts. `keep_alive: false`
    /// closes each connection after one response.
    async fn counting_server(keep_alive: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(llm_proxy_core::full("ok")))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (addr, accepted)
    }

    fn upstream(addr: std::net::SocketAddr, idle: Duration) -> Upstream {
        let mut cfg = UpstreamConfig::new("u", format!("http://{addr}/v1").parse().unwrap());
        cfg.pool_idle_timeout = idle;
        Upstream::new(cfg).unwrap()
    }

    async fn get(upstream: &mut Upstream) -> String {
        let req = Request::get("/v1/models")
            .body(llm_proxy_core::empty())
            .unwrap();
        let resp = upstream.call(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = counting_server(true).await;
        let mut up = upstream(addr, Duration::from_secs(30));
        for _ in 0..20 {
            assert_eq!(get(&mut up).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_open_more_connections_then_reuse_them() {
        let (addr, accepted) = counting_server(true).await;
        let up = upstream(addr, Duration::from_secs(30));
        for _ in 0..3 {
            let calls = (0..4).map(|_| {
                let mut up = up.clone();
                async move { get(&mut up).await }
            });
            for body in futures_util::future::join_all(calls).await {
                assert_eq!(body, "ok");
            }
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            (1..=4).contains(&opened),
            "{opened} connections for 4 at a time"
        );
    }

    #[tokio::test]
    async fn a_connection_the_server_closes_is_not_reused() {
        let (addr, accepted) = counting_server(false).await;
        let mut up = upstream(addr, Duration::from_secs(30));
        for _ in 0..5 {
            assert_eq!(get(&mut up).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn an_idle_connection_expires() {
        let (addr, accepted) = counting_server(true).await;
        let mut up = upstream(addr, Duration::from_millis(50));
        assert_eq!(get(&mut up).await, "ok");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(get(&mut up).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An idle connection no request takes is closed when it expires (one
    /// the server closed then too: no socket is left in `CLOSE_WAIT`): the
    /// pool's reaper, with no request to do it.
    #[tokio::test]
    async fn idle_connections_are_closed_without_a_request() {
        // Counts the connections open at the server: its side ends when
        // the proxy's closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let count = count.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(llm_proxy_core::full("ok")))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let mut up = upstream(addr, Duration::from_millis(100));
        assert_eq!(get(&mut up).await, "ok");
        assert_eq!(open.load(Ordering::SeqCst), 1, "kept for the next request");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while open.load(Ordering::SeqCst) > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "an idle connection outlived its timeout"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_dropped_body_closes_its_connection() {
        let (addr, accepted) = counting_server(true).await;
        let mut up = upstream(addr, Duration::from_secs(30));
        let req = Request::get("/v1/models")
            .body(llm_proxy_core::empty())
            .unwrap();
        drop(up.call(req).await.unwrap());
        assert_eq!(get(&mut up).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A server that answers one request with a chunked body: the head and
    /// `first` chunks at once, then, once `go` fires, `rest` more chunks.
    async fn chunked_server(
        first: usize,
        rest: usize,
        go: tokio::sync::oneshot::Receiver<()>,
    ) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = stream.read(&mut buf).await.unwrap();
            let chunks = |from: usize, n: usize| -> String {
                (from..from + n)
                    .map(|i| format!("5\r\nc{i:04}\r\n"))
                    .collect()
            };
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            let out = format!("{head}{}", chunks(0, first));
            stream.write_all(out.as_bytes()).await.unwrap();
            let _ = go.await;
            let out = format!("{}0\r\n\r\n", chunks(first, rest));
            stream.write_all(out.as_bytes()).await.unwrap();
            let _ = stream.read(&mut buf).await;
        });
        addr
    }

    /// Poll `body` once: `Some(frame length)`, or `None` when pending.
    fn poll_once(body: &mut Body, cx: &mut std::task::Context<'_>) -> Option<Option<usize>> {
        use http_body::Body as _;
        match Pin::new(body).poll_frame(cx) {
            Poll::Pending => None,
            Poll::Ready(None) => Some(None),
            Poll::Ready(Some(frame)) => Some(Some(frame.unwrap().into_data().unwrap().len())),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_burst_read_at_once_is_handed_on_together() {
        let (_tx, go) = tokio::sync::oneshot::channel();
        let addr = chunked_server(10, 0, go).await;
        let mut up = upstream(addr, Duration::from_secs(30));
        let req = Request::get("/v1/x").body(llm_proxy_core::empty()).unwrap();
        let mut body = up.call(req).await.unwrap().into_body();
        // Until the first frame comes out, yield to the scheduler like a
        // server would; the whole burst must come out in that frame.
        let mut lens = Vec::new();
        loop {
            let polled = std::future::poll_fn(|cx| Poll::Ready(poll_once(&mut body, cx))).await;
            match polled {
                Some(Some(len)) => lens.push(len),
                Some(None) => break,
                None if lens.iter().sum::<usize>() == 50 => break,
                None => tokio::task::yield_now().await,
            }
        }
        assert_eq!(
            lens,
            [50],
            "ten chunks of five bytes, sent at once, leave as one frame"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_gathered_frame_stops_growing_at_the_bound() {
        let (_tx, go) = tokio::sync::oneshot::channel();
        let addr = chunked_server(4000, 0, go).await;
        let mut up = upstream(addr, Duration::from_secs(30));
        let req = Request::get("/v1/x").body(llm_proxy_core::empty()).unwrap();
        let mut body = up.call(req).await.unwrap().into_body();
        let mut lens = Vec::new();
        while lens.iter().sum::<usize>() < 20_000 {
            match std::future::poll_fn(|cx| Poll::Ready(poll_once(&mut body, cx))).await {
                Some(Some(len)) => lens.push(len),
                Some(None) => break,
                None => tokio::task::yield_now().await,
            }
        }
        assert_eq!(lens.iter().sum::<usize>(), 20_000);
        assert!(
            (2..=10).contains(&lens.len()),
            "gathered, up to the bound: {lens:?}"
        );
        assert!(
            lens.iter().all(|&len| len < crate::body::GATHER_MAX + 5),
            "{lens:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_is_not_held_back_waiting_for_more() {
        use http_body_util::BodyExt;
        let (tx, go) = tokio::sync::oneshot::channel();
        let addr = chunked_server(1, 1, go).await;
        let mut up = upstream(addr, Duration::from_secs(30));
        let req = Request::get("/v1/x").body(llm_proxy_core::empty()).unwrap();
        let mut body = up.call(req).await.unwrap().into_body();
        // The second chunk is only sent once the first has come out: a body
        // that waited for more would never see it.
        let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the first chunk comes out on its own");
        assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "c0000");
        tx.send(()).unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "c0001");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn the_host_header_is_the_urls_host_and_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| {
                let host = req.headers().get(http::header::HOST).cloned();
                async move {
                    let host = host.map(|h| h.to_str().unwrap().to_owned());
                    Ok::<_, std::convert::Infallible>(Response::new(llm_proxy_core::full(
                        host.unwrap_or_default(),
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let url = format!("http://{addr}/v1").parse().unwrap();
        let mut up = Upstream::new(UpstreamConfig::new("u", url)).unwrap();
        assert_eq!(get(&mut up).await, addr.to_string());
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Answers one request per connection with a kept-alive response,
        // then closes the connection 20 ms later, as a server's keep-alive
        // timeout would.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            }
        });
        let mut up = upstream(addr, Duration::from_secs(30));
        assert_eq!(get(&mut up).await, "ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            get(&mut up).await,
            "ok",
            "a new connection, not the closed one"
        );
    }

    /// A server whose first connection answers one request, then takes the
    /// next one and closes without an answer (its keep-alive timeout ran
    /// out as the request came). Later connections answer every request.
    /// Counts the requests that reached it.
    async fn closes_on_the_second_request() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        first_connections_close_on_the_second_request(1).await
    }

    /// [`closes_on_the_second_request`] for the first `closing` connections.
    async fn first_connections_close_on_the_second_request(
        closing: usize,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = count.clone();
                let closes = accepted < closing;
                accepted += 1;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for n in 0.. {
                        // Each test request fits one read.
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        if closes && n == 1 {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_safe_request_a_reused_connection_drops_goes_out_again() {
        let (addr, seen) = closes_on_the_second_request().await;
        let mut up = upstream(addr, Duration::from_secs(30));
        assert_eq!(get(&mut up).await, "ok");
        assert_eq!(get(&mut up).await, "ok", "sent again on a new connection");
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    /// The keep-alive race on every idle connection at once (they were
    /// opened together by a burst, and the server's timeout runs out for
    /// all of them together): the request goes out once more on a new
    /// connection, not on another idle one that drops it too.
    #[tokio::test]
    async fn a_safe_request_goes_out_again_on_a_new_connection() {
        let (addr, seen) = first_connections_close_on_the_second_request(2).await;
        let up = upstream(addr, Duration::from_secs(30));
        let (mut a, mut b) = (up.clone(), up.clone());
        // Two requests at once: two connections, both idle after.
        let (x, y) = tokio::join!(get(&mut a), get(&mut b));
        assert_eq!((x.as_str(), y.as_str()), ("ok", "ok"));
        let mut up = up;
        assert_eq!(get(&mut up).await, "ok", "sent again on a new connection");
        assert_eq!(seen.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_post_a_reused_connection_drops_is_not_sent_twice() {
        let (addr, seen) = closes_on_the_second_request().await;
        let mut up = upstream(addr, Duration::from_secs(30));
        assert_eq!(get(&mut up).await, "ok");
        let req = Request::post("/v1/files")
            .body(llm_proxy_core::full("{}"))
            .unwrap();
        assert!(up.call(req).await.is_err(), "it may have taken effect");
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        // A GET with a body is not replayed either.
        let (addr, seen) = closes_on_the_second_request().await;
        let mut up = upstream(addr, Duration::from_secs(30));
        assert_eq!(get(&mut up).await, "ok");
        let req = Request::get("/v1/x")
            .body(llm_proxy_core::full("{}"))
            .unwrap();
        assert!(up.call(req).await.is_err());
        assert_eq!(seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_queued_as_the_server_closes_comes_back_unsent() {
        // The server closes the connection while it sits idle, settled,
        // just before a request is queued on it: nothing polled it in
        // between, so its driver first learns of the close with the request
        // waiting in hyper's channel.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let _ = close_rx.await;
            drop(conn);
        });
        let pool = Pool::new(
            Arc::new(Dns::new("127.0.0.1")),
            addr.port(),
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        let mut conn = pool.connect().await.unwrap();
        assert!(conn.settle(), "open and ready");
        close_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let req = Request::get("/v1/models")
            .body(llm_proxy_core::empty())
            .unwrap();
        let mut response = std::pin::pin!(conn.sender.try_send_request(req));
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| {
                let _ = conn.drive(cx);
                response.as_mut().poll(cx)
            }),
        )
        .await
        .expect("an answer, not a wait for the first-byte timeout");
        let mut err = sent.expect_err("the connection is closed");
        assert!(err.take_message().is_some(), "handed back unsent");
    }

    /// A listener that takes no connection: its accept queue (of one) is
    /// full, so the kernel drops further SYNs and a connect hangs, as one to
    /// an unreachable address does. Keep the returned filler alive.
    async fn black_hole() -> (std::net::SocketAddr, tokio::net::TcpListener, TcpStream) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let filler = TcpStream::connect(addr).await.unwrap();
        (addr, listener, filler)
    }

    #[tokio::test]
    async fn an_address_that_swallows_the_connect_leaves_time_for_the_next() {
        let (hole, _listener, _filler) = black_hole().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        // Bounded as `Pool::connect` bounds it: the whole connect timeout.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let stream = tokio::time::timeout_at(deadline, connect_any(&[hole, good_addr], deadline))
            .await
            .expect("the second address, within the connect timeout")
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), good_addr);
        // Only addresses that swallow it: a timeout, which the pool reports
        // as its connect timeout (504), not as a refusal (502).
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        let err = connect_any(&[hole, hole], deadline).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }

    /// A connect that no kept address takes forgets them: an upstream
    /// that moved is looked up again by the next connect, not in 5 s.
    #[tokio::test]
    async fn a_failed_connect_forgets_the_kept_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dns = Arc::new(Dns::new("localhost"));
        let pool = Pool::new(
            dns.clone(),
            port,
            Duration::from_secs(1),
            Duration::from_secs(30),
        );
        assert!(pool.connect().await.is_ok());
        assert!(dns.keeps());
        drop(listener);
        assert!(pool.connect().await.is_err());
        assert!(!dns.keeps());
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        let dns = Arc::new(Dns::new("[::1]"));
        let pool = Pool::new(dns, 80, Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(pool.dns.host(), "::1");
    }
}
