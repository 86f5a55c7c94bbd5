//! The HTTP server: accept loop, connection limit, slow-client cut-off,
//! graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use llm_proxy_core::{Body, Guarded};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};

use crate::app::Proxy;

/// How many connections the kernel queues for a listener bound by
/// [`listen`] before they are accepted (capped by `net.core.somaxconn`,
/// 4096 on Linux since 5.4). Connections past `max_connections` wait
/// there: with the standard library's 128 (tokio's `TcpListener::bind`),
/// the 129th one's SYN is dropped and the client waits out its SYN retries
/// (1, 3, 7 s, …) before it is even queued.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener on `addr` for [`Proxy::serve`]: `SO_REUSEADDR`, as tokio's
/// `TcpListener::bind` sets it, and an accept queue of [`LISTEN_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
use crate::gated::Gated;
use crate::idle::{Activity, InFlight};

use crate::per_ip::{IpSlot, PerIp};
use crate::preface::FirstBytes;
use crate::routes::{ConnFace, HyperFace, ProxyService, ResponseFuture};
use crate::timer::CoarseTimer;

/// The HTTP/1 read buffer's bound, which bounds a request head.
const H1_MAX_BUF: usize = 64 << 10;

/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_STREAMS: u32 = 128;

/// Bytes of answer an HTTP/2 stream may have queued for the socket.
const H2_MAX_SEND_BUF: usize = 64 << 10;

/// What one HTTP/2 stream's request body may have unread by the proxy:
/// an upload's pace is at most this much a round trip (5 MB/s at 100 ms).
const H2_STREAM_WINDOW: u32 = 512 << 10;

/// What all of one HTTP/2 connection's request bodies may have unread:
/// eight stalled streams' worth (hyper's default is one stream's, 1 MiB).
const H2_CONNECTION_WINDOW: u32 = 8 * H2_STREAM_WINDOW;

/// How often an idle HTTP/2 connection is pinged.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Connection settings of one listener.
#[derive(Clone, Debug)]
struct ConnOptions {
    header_read_timeout: Duration,
    send_timeout: Duration,
    max_connections: usize,
    /// `max_connections_per_ip`, when set: shared by the listener's shards.
    per_ip: Option<Arc<PerIp>>,
}

impl ConnOptions {
    /// `max_connections` as a semaphore takes it: `Settings` has public
    /// fields, and one set by hand past tokio's bound must not panic.
    fn permits(&self) -> usize {
        self.max_connections.clamp(1, Semaphore::MAX_PERMITS)
    }
}

impl Proxy {
    /// Serve on `listener` (and on `metrics_listen`, if configured) until
    /// `shutdown` resolves; then stop accepting, mark `/readyz` as draining,
    /// and let in-flight requests finish for up to `drain_timeout`; then close
    /// the connections still open, and return once they are closed.
    ///
    /// Connections are served on the calling runtime; see
    /// [`Proxy::serve_sharded`] for the thread-per-core server of the binary.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let opts = self.conn_options();
        let metrics_task = self.spawn_metrics().await?;
        let graceful = Drain::new();
        let permits = Arc::new(Semaphore::new(opts.permits()));
        accept_loop(
            &listener,
            HyperFace(self.service.clone()),
            opts,
            permits,
            &graceful,
            shutdown,
            None,
        )
        .await;
        self.readiness.start_draining();
        drop(listener);
        self.log_draining();
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        let cut = Arc::new(AtomicBool::new(false));
        drain(graceful, self.settings.drain_timeout, &cut).await;
        if let Some(metrics) = metrics_task {
            metrics.finish(deadline, cut.clone()).await;
        }
        log_drained(&cut);
        Ok(())
    }

    /// Like [`Proxy::serve`], on `workers` threads (from the settings), each
    /// with its own single-threaded tokio runtime and its own accept loop on
    /// `listener`: a connection, its requests, their upstream connections
    /// (one pool per shard, see `llm_proxy_upstream::shard`) and responses
    /// stay on the thread that accepted it, with no cross-thread wake-up per
    /// request. `max_connections` is shared by all shards.
    ///
    /// The calling runtime keeps `shutdown`, the `metrics_listen` server and
    /// whatever [`Proxy::build`] spawned (in-process mocks, health checks).
    /// When `shutdown` resolves every shard stops accepting and drains for up
    /// to `drain_timeout`, then closes its connections still open; the shard
    /// runtimes are dropped only once all shards are done (a background task
    /// may live on any of them).
    pub async fn serve_sharded(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let opts = self.conn_options();
        let workers = self.settings.workers.max(1);
        let drain_timeout = self.settings.drain_timeout;
        let listener = listener.into_std()?;
        let metrics_task = self.spawn_metrics().await?;
        let permits = Arc::new(Semaphore::new(opts.permits()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (exit_tx, exit_rx) = tokio::sync::watch::channel(false);
        // Each shard holds a sender until it has drained; the channel closes
        // when every shard has drained (or its thread ended early).
        let (drained_tx, mut drained_rx) = tokio::sync::mpsc::channel::<()>(1);
        // Whether any shard's drain timed out.
        let cut = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(workers);
        // One shard alone has nobody to spread its connections to.
        let mut spreads = (workers > 1).then(|| {
            let spreads = Spread::shards(workers);
            self.metrics
                .add_source(shard_metrics(spreads[0].loads.clone()));
            spreads.into_iter()
        });
        for index in 0..workers {
            let spread = spreads.as_mut().and_then(Iterator::next);
            let listener = listener.try_clone()?;
            let service = HyperFace(self.service.clone());
            let permits = permits.clone();
            let opts = opts.clone();
            let mut stop_rx = stop_rx.clone();
            let mut exit_rx = exit_rx.clone();
            let drained_tx = drained_tx.clone();
            let cut = cut.clone();
            let thread = std::thread::Builder::new()
                .name(format!("llm-proxy-{index}"))
                .spawn(move || {
                    llm_proxy_upstream::shard::set_current(Some(index));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(shard = index, error = %e, "cannot start the shard's runtime");
                            return;
                        }
                    };
                    runtime.block_on(async move {
                        let listener = match TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(shard = index, error = %e, "cannot use the listener");
                                return;
                            }
                        };
                        let graceful = Drain::new();
                        let stop = async move {
                            let _ = stop_rx.wait_for(|stop| *stop).await;
                        };
                        accept_loop(&listener, service, opts, permits, &graceful, stop, spread).await;
                        drop(listener);
                        drain(graceful, drain_timeout, &cut).await;
                        drop(drained_tx);
                        let _ = exit_rx.wait_for(|exit| *exit).await;
                    });
                })?;
            threads.push(thread);
        }
        // Each shard has its own handle on the socket, and drops it when it
        // stops accepting: this one must not keep the socket listening (and
        // the kernel completing handshakes nobody serves) through the drain.
        drop(listener);
        drop(drained_tx);
        let early_end = tokio::select! {
            () = shutdown => false,
            _ = drained_rx.recv() => true,
        };
        self.readiness.start_draining();
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let _ = stop_tx.send(true);
        if !early_end {
            self.log_draining();
            while drained_rx.recv().await.is_some() {}
        }
        let _ = exit_tx.send(true);
        let mut panicked = false;
        for thread in threads {
            panicked |= thread.join().is_err();
        }
        if let Some(metrics) = metrics_task {
            metrics.finish(deadline, cut.clone()).await;
        }
        if !early_end {
            log_drained(&cut);
        }
        if early_end || panicked {
            return Err(std::io::Error::other(
                "the server's shard threads ended early",
            ));
        }
        Ok(())
    }

    fn conn_options(&self) -> ConnOptions {
        let per_ip = PerIp::new(self.settings.max_connections_per_ip);
        if let Some(per_ip) = &per_ip {
            self.metrics
                .add_source(crate::per_ip::metrics(per_ip.clone()));
        }
        ConnOptions {
            header_read_timeout: self.settings.header_read_timeout,
            send_timeout: self.settings.send_timeout,
            max_connections: self.settings.max_connections,
            per_ip,
        }
    }

    async fn spawn_metrics(&mut self) -> std::io::Result<Option<MetricsServer>> {
        let listener = match (self.metrics_listener.take(), self.settings.metrics_listen) {
            (Some(bound), Some(_)) => Some(bound),
            (Some(_), None) => {
                // The face answers `/metrics` on `listen` (decided when
                // the proxy was built): not served twice.
                tracing::warn!(
                    "a metrics listener was given without `metrics_listen`: /metrics stays on `listen`, and that listener is closed"
                );
                None
            }
            (None, Some(addr)) => Some(listen(addr).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (`metrics_listen`): {e}"),
                )
            })?),
            (None, None) => None,
        };
        Ok(match listener {
            Some(listener) => {
                // The port bound (a configured port 0 is the system's pick).
                match listener.local_addr() {
                    Ok(addr) => tracing::info!(%addr, "serving /metrics"),
                    Err(_) => tracing::info!("serving /metrics"),
                }
                let (stop, stopped) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(serve_metrics(
                    listener,
                    self.service.clone(),
                    stopped,
                    self.settings.drain_timeout,
                ));
                Some(MetricsServer { stop, task })
            }
            None => None,
        })
    }

    fn log_draining(&self) {
        tracing::info!(
            drain_timeout_secs = self.settings.drain_timeout.as_secs_f64(),
            "shutting down: draining in-flight requests"
        );
    }
}

/// Tells the connections of a listener to finish, and waits until they
/// have (what hyper-util's `GracefulShutdown` does, for connections that
/// may also be shut down for being idle: see [`serve_connection`]).
#[derive(Debug)]
struct Drain {
    tx: watch::Sender<Phase>,
}

/// Where a [`Drain`] is: what its connections are to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish what is under way, take nothing new.
    Draining,
    /// The drain timeout passed: close now, finished or not.
    Cut,
}

impl Drain {
    fn new() -> Self {
        Drain {
            tx: watch::channel(Phase::Serving).0,
        }
    }

    /// For one connection: changes when it is to finish, and again when it
    /// is to close at once; dropped when it has. (One channel for both, so
    /// that a connection polls one watch per wake-up, not two.) A dropped
    /// `Drain` reads as `Draining`.
    fn watcher(&self) -> watch::Receiver<Phase> {
        self.tx.subscribe()
    }
}

/// What a connection's `watcher` says now that it changed (or its `Drain`
/// was dropped: `Draining`, and `watching` turns off, as a dropped sender
/// reads as changed at every poll).
fn phase_now(
    changed: Result<(), watch::error::RecvError>,
    stop: &mut watch::Receiver<Phase>,
    watching: &mut bool,
) -> Phase {
    match changed {
        Ok(()) => *stop.borrow_and_update(),
        Err(_) => {
            *watching = false;
            Phase::Draining
        }
    }
}

/// Let the connections of `graceful` finish, for up to `timeout`; then close
/// those still open, and wait until they have. Without the cut, a stream
/// past the timeout would live on after `serve` returned on an embedder's
/// runtime (still holding its upstream request), where the binary's shard
/// runtimes merely happened to drop it.
///
/// The timeout is logged when it strikes, once for all the shards that
/// share `cut` (set then); "drained" is the caller's to log, once all are
/// done and none was cut: one shard's "drained" would read as the whole
/// server's while another still drains.
async fn drain(graceful: Drain, timeout: Duration, cut: &AtomicBool) {
    graceful.tx.send_replace(Phase::Draining);
    if tokio::time::timeout(timeout, graceful.tx.closed())
        .await
        .is_ok()
    {
        return;
    }
    if !cut.swap(true, Ordering::Relaxed) {
        tracing::warn!("drain timeout reached: closing the connections still open");
    }
    graceful.tx.send_replace(Phase::Cut);
    graceful.tx.closed().await;
}

/// The line that says the drain ended with nothing cut.
fn log_drained(cut: &AtomicBool) {
    if !cut.load(Ordering::Relaxed) {
        tracing::info!("drained");
    }
}

/// What serves the server's connections: the proxy's [`HyperFace`], or the
/// metrics listener's [`MetricsFace`]; shared by a shard's connections,
/// each of which gets its own [`ConnService::Conn`] to call with its watch.
trait ConnService: Send + Sync + 'static {
    /// What one connection calls.
    type Conn: Send + 'static;

    /// The connection's own, made when it is accepted.
    fn conn(&self) -> Self::Conn;

    /// One request on the connection watched by `activity`.
    fn call_on(
        conn: &Self::Conn,
        req: Request<Incoming>,
        activity: &Arc<Activity>,
    ) -> ResponseFuture;
}

impl ConnService for HyperFace {
    type Conn = ConnFace;

    fn conn(&self) -> ConnFace {
        HyperFace::conn(self)
    }

    fn call_on(
        conn: &ConnFace,
        req: Request<Incoming>,
        activity: &Arc<Activity>,
    ) -> ResponseFuture {
        conn.call_on(req, activity)
    }
}

/// A [`ConnService`] as hyper calls it, on one connection.
struct OnConn<S: ConnService> {
    inner: S::Conn,
    activity: Arc<Activity>,
}

impl<S: ConnService> hyper::service::Service<Request<Incoming>> for OnConn<S> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        self.activity.saw(req.version());
        S::call_on(&self.inner, req, &self.activity)
    }
}

/// The metrics listener: `/metrics`, `/healthz`, `/readyz`
/// ([`ProxyService::serve_own`]).
#[derive(Clone)]
struct MetricsFace(ProxyService);

impl ConnService for MetricsFace {
    type Conn = MetricsFace;

    fn conn(&self) -> MetricsFace {
        self.clone()
    }

    fn call_on(
        conn: &MetricsFace,
        req: Request<Incoming>,
        activity: &Arc<Activity>,
    ) -> ResponseFuture {
        // In flight until its body is sent: an HTTP/2 scrape is not idle.
        let in_flight = InFlight::new(activity);
        let resp = conn.0.serve_own(&req);
        let resp = resp.map(|body| Guarded::new(body, in_flight).boxed_unsync());
        Box::pin(std::future::ready(Ok(resp)))
    }
}

/// A connection one shard accepted and handed to another, with its share of
/// the connection limits.
type Handoff = (std::net::TcpStream, Admitted);

/// A connection's share of the connection limits, held for its life: one of
/// `max_connections`, and one of its address's `max_connections_per_ip`
/// when that is set.
#[derive(Debug)]
struct Admitted {
    _all: OwnedSemaphorePermit,
    _ip: Option<IpSlot>,
}

/// Spreads the connections of [`Proxy::serve_sharded`] evenly over its
/// shards, as Envoy's `exact_balance` does: whichever shard accepts a
/// connection, the one serving the fewest takes it. All shards accept from
/// one socket, and the one whose thread wakes first takes a whole burst of
/// new connections; a shard keeps its keep-alive connections for their life,
/// so without spreading, one core would serve most of a client's pool while
/// the other idled. A handed-off connection costs one cross-thread wake-up
/// once, not per request.
struct Spread {
    me: usize,
    /// Connections each shard serves or is being handed.
    loads: Arc<[AtomicUsize]>,
    inboxes: Arc<[mpsc::UnboundedSender<Handoff>]>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
}

impl Spread {
    /// One `Spread` per shard of `shards`.
    fn shards(shards: usize) -> Vec<Spread> {
        let loads: Arc<[AtomicUsize]> = (0..shards).map(|_| AtomicUsize::new(0)).collect();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let inboxes: Arc<[_]> = senders.into();
        receivers
            .into_iter()
            .enumerate()
            .map(|(me, inbox)| Spread {
                me,
                loads: loads.clone(),
                inboxes: inboxes.clone(),
                inbox,
            })
            .collect()
    }

    /// The shard with the fewest connections (this one on a tie), counted
    /// as serving one more.
    fn pick(&self) -> usize {
        let mine = self.loads[self.me].load(Ordering::Relaxed);
        let (best, _) = self
            .loads
            .iter()
            .map(|load| load.load(Ordering::Relaxed))
            .enumerate()
            .fold((self.me, mine), |best, (i, load)| {
                if load < best.1 { (i, load) } else { best }
            });
        self.loads[best].fetch_add(1, Ordering::Relaxed);
        best
    }

    /// Hand `stream` to shard `to`, which [`pick`](Self::pick) counted it
    /// in. When `to` has stopped taking connections (its drain began first),
    /// the connection comes back, counted in this shard's load, to be served
    /// here: it was accepted, so it is answered.
    fn hand(&self, to: usize, stream: TcpStream, permit: Admitted) -> Option<Handoff> {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot hand a connection to another shard");
                self.loads[to].fetch_sub(1, Ordering::Relaxed);
                return None;
            }
        };
        let mpsc::error::SendError(back) = self.inboxes[to].send((stream, permit)).err()?;
        self.loads[to].fetch_sub(1, Ordering::Relaxed);
        self.loads[self.me].fetch_add(1, Ordering::Relaxed);
        Some(back)
    }

    /// Stop taking connections from other shards, and return those handed
    /// over already: they are served like this shard's own (and drained).
    fn close(&mut self) -> Vec<Handoff> {
        self.inbox.close();
        std::iter::from_fn(|| self.inbox.try_recv().ok()).collect()
    }

    fn guard(&self) -> Load {
        Load {
            loads: self.loads.clone(),
            shard: self.me,
        }
    }
}

/// `llm_proxy_shard_connections{shard}`: what [`Spread`] balances.
fn shard_metrics(loads: Arc<[AtomicUsize]>) -> crate::metrics::Source {
    Box::new(move || {
        vec![crate::metrics::Series {
            name: "shard_connections",
            help: "Client connections each server thread serves",
            counter: false,
            samples: loads
                .iter()
                .enumerate()
                .map(|(shard, load)| {
                    let load = load.load(Ordering::Relaxed) as u64;
                    (vec![("shard", shard.to_string())], load)
                })
                .collect(),
        }]
    })
}

/// One connection in a shard's load; dropped when the connection ends.
struct Load {
    loads: Arc<[AtomicUsize]>,
    shard: usize,
}

impl Drop for Load {
    fn drop(&mut self) {
        self.loads[self.shard].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The next handed-off connection, or never without an inbox.
async fn handed(spread: &mut Option<Spread>) -> Option<Handoff> {
    match spread {
        Some(spread) => spread.inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// A connection accepted with its share of the connection limits. Beyond
/// `max_connections`, new connections wait in the kernel's queue; one past
/// its address's `max_connections_per_ip` is closed at once (see
/// [`crate::per_ip`]), and the next one accepted in its place. Cancel-safe:
/// nothing awaits between taking a connection and returning it.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    per_ip: Option<&Arc<PerIp>>,
) -> Option<std::io::Result<(TcpStream, Admitted)>> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => return Some(Err(e)),
        };
        let ip = match per_ip.map(|per_ip| per_ip.admit(peer.ip())) {
            None => None,
            Some(Some(slot)) => Some(slot),
            Some(None) => {
                tracing::debug!(peer = %peer.ip(), "closing a connection past `max_connections_per_ip`");
                drop(stream);
                continue;
            }
        };
        return Some(Ok((
            stream,
            Admitted {
                _all: permit,
                _ip: ip,
            },
        )));
    }
}

async fn accept_loop<S>(
    listener: &TcpListener,
    service: S,
    opts: ConnOptions,
    permits: Arc<Semaphore>,
    graceful: &Drain,
    shutdown: impl Future<Output = ()>,
    mut spread: Option<Spread>,
) where
    S: ConnService,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Swept 8 times per timeout, at most every 250 ms: a 10 s cut-off fires
    // within 10.25 s.
    let resolution =
        (opts.header_read_timeout / 8).clamp(Duration::from_millis(1), Duration::from_millis(250));
    builder
        .http1()
        .timer(CoarseTimer::new(resolution))
        .header_read_timeout(opts.header_read_timeout)
        // Flatten writes into one buffer: hyper's vectored writes take at
        // most 16 buffers per `writev`, so a burst of SSE events (one buffer
        // each) would take two system calls; copying a few KiB is cheaper.
        .writev(false)
        // A request head of at most 64 KiB (hyper's default is ~400 KiB,
        // which 10 000 slow connections hold for the header timeout: 4 GB;
        // nginx takes at most 4 × 8 KiB). A larger one is answered 431.
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    // A peer that stops answering pings is gone: close its connection
    // instead of holding its permit (and cancel the upstream work of its
    // requests). The ping's answer comes after the client has read every
    // byte queued before the ping, in both sockets' buffers (megabytes: a
    // large answer read slowly is seconds behind), so it may take as long
    // as a client may take nothing (`send_timeout`), not a header's time.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(opts.header_read_timeout.max(opts.send_timeout))
        // What a client may send before the proxy reads it: a stream's
        // share small, the connection's many streams' worth, so that a few
        // uploads an upstream is slow to take cannot hold the whole window
        // and starve the connection's other requests (hyper gives both
        // 1 MiB: one stalled upload could hold it all). As nginx, whose
        // connection window is far larger than a stream's preread.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        // What one connection may hold for a client: nginx's 128 streams,
        // each with at most 64 KiB of answer queued (hyper: 200 × 400 KiB,
        // ~80 MiB a connection that reads nothing). A token stream never
        // comes near; a large JSON answer waits for the socket instead.
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_MAX_SEND_BUF);
    // A connection another shard accepted, counted in this shard's load.
    let serve_handed =
        |spread: &Spread, (stream, permit): Handoff| match TcpStream::from_std(stream) {
            Ok(stream) => {
                let load = Some(spread.guard());
                serve_connection(&builder, &opts, graceful, &service, stream, permit, load);
            }
            Err(e) => {
                drop(spread.guard());
                tracing::warn!(error = %e, "cannot take a handed-off connection");
            }
        };
    tokio::pin!(shutdown);
    // Out of file descriptors, accept fails every 20 ms until one is
    // closed: a line per 10 s of it, with how many were left out.
    let warnings = llm_proxy_core::throttle::LogThrottle::default();
    let started = std::time::Instant::now();
    loop {
        let (stream, permit) = tokio::select! {
            () = &mut shutdown => {
                if let Some(spread) = &mut spread {
                    for handoff in spread.close() {
                        serve_handed(spread, handoff);
                    }
                }
                return;
            }
            Some(handoff) = handed(&mut spread) => {
                if let Some(spread) = &spread {
                    serve_handed(spread, handoff);
                }
                continue;
            }
            accepted = accept(listener, &permits, opts.per_ip.as_ref()) => match accepted {
                None => return,
                Some(Ok(accepted)) => accepted,
                Some(Err(e)) => {
                    // EMFILE and friends: back off instead of spinning.
                    let now_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    if let Some(left_out) = warnings.due(now_ms, 10_000) {
                        tracing::warn!(error = %e, left_out, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        match &spread {
            None => serve_connection(&builder, &opts, graceful, &service, stream, permit, None),
            Some(spread) => match spread.pick() {
                to if to == spread.me => {
                    let load = Some(spread.guard());
                    serve_connection(&builder, &opts, graceful, &service, stream, permit, load);
                }
                to => {
                    if let Some(back) = spread.hand(to, stream, permit) {
                        serve_handed(spread, back);
                    }
                }
            },
        }
    }
}

/// Serve one connection on a task of this runtime. Its first bytes must come
/// within the header read timeout ([`FirstBytes`]).
fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    opts: &ConnOptions,
    graceful: &Drain,
    service: &S,
    stream: TcpStream,
    permit: Admitted,
    load: Option<Load>,
) where
    S: ConnService,
{
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let service = OnConn::<S> {
        inner: service.conn(),
        activity: activity.clone(),
    };
    let conn = builder
        .serve_connection_with_upgrades(
            TokioIo::new(
                FirstBytes::new(stream, opts.header_read_timeout).telling(activity.clone()),
            ),
            service,
        )
        .into_owned();
    let mut stop = graceful.watcher();
    // An HTTP/2 connection without a request for as long as an HTTP/1 one
    // may wait for its next request's head is closed too; a connection
    // whose client does not take its answers' bytes is closed after
    // `send_timeout` (`crate::idle`).
    let idle_timeout = opts.header_read_timeout;
    let send_timeout = opts.send_timeout;
    tokio::spawn(async move {
        let mut conn = std::pin::pin!(conn);
        // Made once: it keeps its own count of how long the client has
        // taken nothing, which a fresh one each turn of the loop (every
        // `idle_timeout` while an idle HTTP/2 connection told to go still
        // has a request) would start over.
        let mut stalled = std::pin::pin!(activity.stalled(send_timeout));
        let mut closing = false;
        let mut drained = false;
        // Until the cut (or the `Drain` dropped), `stop` has more to say.
        let mut watching = true;
        let mut cut = false;
        // Drained while a request was under way: shut down once taken.
        let mut awaiting_request = false;
        // An idle HTTP/2 connection told to go (GOAWAY) that does not close
        // is closed at the next timeout: hyper waits for the answer to a
        // ping it then sends, for as long as its keep-alive allows.
        let mut gone_by = None;
        let ended = loop {
            let step = {
                let watched = async {
                    tokio::select! {
                        () = sleep_until_some(gone_by) => Watched::GoneBy,
                        changed = stop.changed(), if watching => Watched::Stop(changed),
                        () = activity.request_taken(), if awaiting_request => Watched::RequestTaken,
                        () = activity.idle(idle_timeout), if !closing => Watched::Idle,
                        () = stalled.as_mut() => Watched::Stalled,
                    }
                };
                // The task is woken for every read and write of its
                // requests: the watchers are polled only when one of them
                // woke it.
                let watched = std::pin::pin!(Gated::new(watched));
                tokio::select! {
                    biased;
                    ended = conn.as_mut() => Err(ended),
                    watched = watched => Ok(watched),
                }
            };
            match step {
                Err(ended) => break ended,
                Ok(Watched::GoneBy) => {
                    // A request the client sent before it saw the GOAWAY
                    // was taken, and is answered: wait for it (a client
                    // that stops reading it is `stalled`), and a timeout
                    // more once none is in flight (the last answer's tail
                    // may still be on its way out).
                    match activity.quiet_for() {
                        Some(quiet) if quiet >= idle_timeout => {}
                        quiet => {
                            let left = idle_timeout - quiet.unwrap_or_default();
                            gone_by = Some(tokio::time::Instant::now() + left);
                            continue;
                        }
                    }
                    tracing::debug!("an idle HTTP/2 connection did not close when told");
                    break Ok(());
                }
                Ok(Watched::Stop(changed)) => match phase_now(changed, &mut stop, &mut watching) {
                    Phase::Cut => {
                        cut = true;
                        break Ok(());
                    }
                    Phase::Draining if !closing => {
                        closing = true;
                        drained = true;
                        activity.drain();
                        // hyper closes an HTTP/1 connection between requests at
                        // once, even with part of the next one read: let that
                        // one come (the header timeout bounds it), answer it,
                        // then close, as nginx does.
                        if activity.request_under_way() {
                            awaiting_request = true;
                        } else {
                            // An HTTP/2 client that answers neither the
                            // GOAWAY's ping nor with an open request (gone
                            // silent: a dead peer) is closed a timeout on,
                            // not at the drain's end. (hyper closes an
                            // HTTP/1 connection itself once its answer is
                            // out; an upload it refused is lingered on.)
                            if !activity.is_http1() {
                                gone_by = Some(tokio::time::Instant::now() + idle_timeout);
                            }
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                    Phase::Draining | Phase::Serving => {}
                },
                Ok(Watched::RequestTaken) => {
                    awaiting_request = false;
                    conn.as_mut().graceful_shutdown();
                }
                Ok(Watched::Idle) => {
                    tracing::debug!("closing an idle HTTP/2 connection");
                    closing = true;
                    gone_by = Some(tokio::time::Instant::now() + idle_timeout);
                    conn.as_mut().graceful_shutdown();
                }
                Ok(Watched::Stalled) => {
                    tracing::debug!("closing a connection whose client stopped reading");
                    break Ok(());
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "connection ended with an error");
        }
        // Switched protocols: the connection lives on as a tunnel, still
        // holding its permit, and a drain still waits for it. It is told
        // when the drain begins, to end its session (a WebSocket closes
        // with 1001 once no turn is open), and closed at the cut.
        if let Some(mut tunnel) = activity.take_tunnel().filter(|_| !cut) {
            loop {
                tokio::select! {
                    () = &mut tunnel => break,
                    changed = stop.changed(), if watching => match phase_now(changed, &mut stop, &mut watching) {
                        Phase::Cut => {
                            cut = true;
                            break;
                        }
                        Phase::Draining if !drained => {
                            drained = true;
                            activity.drain();
                        }
                        Phase::Draining | Phase::Serving => {}
                    },
                }
            }
        }
        if cut {
            tracing::debug!("closing a connection still open at the drain timeout");
        }
        drop((permit, load, stop));
    });
}

/// What a connection's watchers saw (see `serve_connection`).
enum Watched {
    /// An HTTP/2 connection told to go is still open.
    GoneBy,
    /// The drain's phase changed (or its sender is gone).
    Stop(Result<(), watch::error::RecvError>),
    /// The request under way when the drain began was taken.
    RequestTaken,
    /// An HTTP/2 connection has had no request for the idle timeout.
    Idle,
    /// The client stopped taking its answers' bytes.
    Stalled,
}

/// Resolves at `deadline`; never without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The `metrics_listen` server, serving beside the proxy's listener (and
/// through its drain: a scrape then shows the requests still in flight).
#[derive(Debug)]
struct MetricsServer {
    stop: tokio::sync::oneshot::Sender<DrainEnd>,
    task: tokio::task::JoinHandle<()>,
}

/// When a drain that began on the proxy's listener is over, and whether it
/// has cut connections already (said once in the log).
type DrainEnd = (tokio::time::Instant, Arc<AtomicBool>);

impl MetricsServer {
    /// Stop accepting, let the scrapes under way finish, close the rest,
    /// and return once its connections are closed: like the proxy's own,
    /// they must not outlive `serve` on an embedder's runtime. Called once
    /// the proxy's listener has drained, by `deadline`, the end of that
    /// drain's time: the whole shutdown takes `drain_timeout` at most.
    async fn finish(self, deadline: tokio::time::Instant, cut: Arc<AtomicBool>) {
        let _ = self.stop.send((deadline, cut));
        let _ = self.task.await;
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `stop`
/// fires (or its sender is dropped), then drain as the proxy does.
async fn serve_metrics(
    listener: TcpListener,
    service: ProxyService,
    stop: tokio::sync::oneshot::Receiver<DrainEnd>,
    drain_timeout: Duration,
) {
    let graceful = Drain::new();
    let opts = ConnOptions {
        header_read_timeout: Duration::from_secs(10),
        send_timeout: Duration::from_secs(60),
        max_connections: 64,
        per_ip: None,
    };
    let permits = Arc::new(Semaphore::new(opts.permits()));
    let (end_tx, end_rx) = tokio::sync::oneshot::channel();
    accept_loop(
        &listener,
        MetricsFace(service),
        opts,
        permits,
        &graceful,
        async move {
            let _ = end_tx.send(stop.await.ok());
        },
        None,
    )
    .await;
    drop(listener);
    // (A sender dropped unused: a drain of its own.)
    let (deadline, cut) = end_rx.await.ok().flatten().unwrap_or_else(|| {
        (
            tokio::time::Instant::now() + drain_timeout,
            Arc::new(AtomicBool::new(false)),
        )
    });
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    drain(graceful, left, &cut).await;
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C) from the time it is
/// first polled. A binary that must not miss a signal sent before then
/// listens with [`ShutdownSignals`], made before it starts serving.
pub async fn shutdown_signal() {
    match ShutdownSignals::new() {
        Ok(mut signals) => signals.recv().await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for shutdown signals");
            std::future::pending::<()>().await;
        }
    }
}

/// SIGTERM and SIGINT, listened for from the moment this is made: a signal
/// that comes before [`ShutdownSignals::recv`] is polled is kept, not lost
/// (and does not kill the process with the default action), and the same
/// listener serves a second signal after the first.
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    /// SIGHUP: nginx's and systemd's `ExecReload` signal, whose default
    /// action would end the process with no drain. Reloading is not
    /// built: it is logged and ignored.
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Start listening (inside a tokio runtime with signals enabled).
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// The next SIGTERM or SIGINT (a SIGHUP meanwhile is logged and
    /// ignored).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.term.recv() => break tracing::info!("SIGTERM received"),
                _ = self.int.recv() => break tracing::info!("SIGINT received"),
                _ = self.hup.recv() => tracing::warn!(
                    "SIGHUP received and ignored: reloading the config is not built \
                     (restart the proxy to change it)"
                ),
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C received");
        }
    }
}

#[cfg(test)]
mod tests {
    /// Connections the server has not accepted yet are queued, not
    /// dropped, past the standard library's 128: all of 300 (or as many as
    /// the kernel's `somaxconn` allows) complete their handshake while
    /// nothing accepts. With a queue of 128, the rest have their SYN
    /// dropped and wait a second or more for a retry.
    #[tokio::test]
    async fn unaccepted_connections_queue_past_128() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(128);
        let n = somaxconn.min(300);
        let listener = super::listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..n)
            .map(|_| tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)));
        let done = futures_util::future::join_all(connects).await;
        let connected = done.iter().filter(|c| matches!(c, Ok(Ok(_)))).count();
        assert_eq!(connected, n, "of {n} (somaxconn {somaxconn})");
        drop(listener);
    }

    #[test]
    fn any_max_connections_makes_a_semaphore() {
        for (max, permits) in [(0, 1), (10, 10), (usize::MAX, Semaphore::MAX_PERMITS)] {
            let opts = ConnOptions {
                header_read_timeout: Duration::from_secs(1),
                send_timeout: Duration::from_secs(1),
                max_connections: max,
                per_ip: None,
            };
            assert_eq!(opts.permits(), permits);
            let _semaphore = Semaphore::new(opts.permits());
        }
    }

    use super::*;

    /// Each shard's load as `spread` sees it.
    fn loads(spread: &Spread) -> Vec<usize> {
        spread
            .loads
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn the_shard_with_the_fewest_connections_takes_the_next() {
        let spreads = Spread::shards(3);
        // A tie goes to the shard that accepted.
        assert_eq!(spreads[1].pick(), 1);
        assert_eq!(spreads[1].pick(), 0);
        assert_eq!(spreads[1].pick(), 2);
        assert_eq!(loads(&spreads[0]), [1, 1, 1]);
        let guard = spreads[2].guard();
        drop(guard);
        assert_eq!(spreads[0].pick(), 2);
        assert_eq!(loads(&spreads[0]), [1, 1, 1]);
    }

    /// A connection on 127.0.0.1, the server's end, with a permit.
    async fn accepted(
        listener: &TcpListener,
        permits: &Arc<Semaphore>,
    ) -> (TcpStream, Admitted, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, permit) = accept(listener, permits, None).await.unwrap().unwrap();
        (server, permit, client)
    }

    #[tokio::test]
    async fn a_connection_for_a_stopped_shard_comes_back_and_one_handed_before_is_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let permits = Arc::new(Semaphore::new(8));
        let mut spreads = Spread::shards(2);
        // Shard 1 is emptier: it is handed the next connection, and keeps it
        // in its inbox until it serves it.
        spreads[0].loads[0].store(3, Ordering::Relaxed);
        let (server, permit, _client_a) = accepted(&listener, &permits).await;
        let to = spreads[0].pick();
        assert_eq!(to, 1);
        assert!(spreads[0].hand(to, server, permit).is_none());
        assert_eq!(loads(&spreads[0]), [3, 1]);
        // Shard 1's drain begins: what it was handed is returned to serve,
        // not dropped unanswered with the inbox.
        let kept = spreads[1].close();
        assert_eq!(kept.len(), 1);
        assert_eq!(permits.available_permits(), 7);
        // Shard 1 takes no more: the next connection comes back to shard 0,
        // counted there, with its permit.
        let (server, permit, _client_b) = accepted(&listener, &permits).await;
        let to = spreads[0].pick();
        assert_eq!(to, 1);
        let back = spreads[0].hand(to, server, permit).expect("handed back");
        assert_eq!(loads(&spreads[0]), [4, 1]);
        assert_eq!(permits.available_permits(), 6);
        drop((back, kept));
        assert_eq!(permits.available_permits(), 8);
    }
}
