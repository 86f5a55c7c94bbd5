//! A pool of HTTP/1.1 connections to one plain-`http://` upstream.
//!
//! hyper-util's general client is built for any number of hosts, schemes and
//! protocols: per request it hashes a pool key, races a checkout against a
//! lazy connect, formats the `Host` header and spawns a task that waits for
//! the connection to be ready again. For one known `http://` upstream on a
//! shard's thread none of that is needed: this pool keeps hyper's low-level
//! HTTP/1.1 senders in a stack (most recently used first), hands out one
//! that is ready, and takes it back when the response body has ended
//! ([`Lease`], held by the body). `https://` upstreams keep hyper-util's
//! client, which negotiates HTTP/2 with ALPN.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use llm_proxy_core::Body;
use tokio::net::TcpStream;

/// At most this many idle connections are kept per pool; more are closed
/// when their response ends.
const MAX_IDLE: usize = 1024;

/// Idle HTTP/1.1 connections to one upstream, for one shard (or shared).
#[derive(Debug)]
pub(crate) struct Pool {
    /// Oldest first: `since` never decreases along the stack.
    idle: Mutex<Vec<Idle>>,
    /// The host to resolve, without IPv6 brackets.
    host: Box<str>,
    port: u16,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
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
    sender: SendRequest<Body>,
}

impl Lease {
    /// The response is over: the connection may serve another request.
    pub(crate) fn release(self) {
        self.pool.put(self.sender);
    }
}

impl Pool {
    pub(crate) fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Pool {
            idle: Mutex::new(Vec::new()),
            host: host.into(),
            port,
            connect_timeout,
            idle_timeout,
        }
    }

    /// Send `req` on an idle connection, or on a new one. A request that a
    /// reused connection could not take (the server had closed it while it
    /// was idle; hyper hands the request back unsent) goes out again.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: the connect future is large and rarely needed; inline
                // it would be moved (copied) with every request's future.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease {
                        pool: self.clone(),
                        sender,
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that can take a request now.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut idle = self.lock();
        while let Some(entry) = idle.pop() {
            // A connection still finishing its last exchange, closed by the
            // server, or idle for too long is dropped (which closes it).
            if entry.sender.is_ready() && entry.since.elapsed() < self.idle_timeout {
                return Some(entry.sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        // Expired connections sit at the bottom of the stack: close them.
        let expired = idle.partition_point(|e| now.duration_since(e.since) >= self.idle_timeout);
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Idle>> {
        // The stack holds no invariant a panic could break.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection, its driver spawned on the current runtime.
    async fn connect(&self) -> Result<SendRequest<Body>, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, self.tcp())
            .await
            .map_err(|_elapsed| SendError::ConnectTimeout)?
            .map_err(|e| SendError::Connect(e.into()))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Resolve the host (no lookup for an IP literal) and connect to the
    /// first address that answers.
    async fn tcp(&self) -> std::io::Result<TcpStream> {
        let mut last = None;
        for addr in tokio::net::lookup_host((&*self.host, self.port)).await? {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("`{}` resolves to no address", self.host),
            )
        }))
    }
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

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        let pool = Pool::new("[::1]", 80, Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(&*pool.host, "::1");
    }
}
