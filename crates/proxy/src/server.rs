//! The HTTP server: accept loop, connection limit, slow-client cut-off,
//! graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::app::Proxy;
use crate::metrics::Metrics;
use crate::routes::HyperFace;
use crate::timer::CoarseTimer;

/// Connection settings of one listener.
#[derive(Clone, Copy, Debug)]
struct ConnOptions {
    header_read_timeout: Duration,
    max_connections: usize,
}

impl Proxy {
    /// Serve on `listener` (and on `metrics_listen`, if configured) until
    /// `shutdown` resolves; then stop accepting, mark `/readyz` as draining,
    /// and let in-flight requests finish for up to `drain_timeout`.
    ///
    /// Connections are served on the calling runtime; see
    /// [`Proxy::serve_sharded`] for the thread-per-core server of the binary.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let opts = self.conn_options();
        let metrics_task = self.spawn_metrics().await?;
        let graceful = GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(opts.max_connections));
        accept_loop(
            &listener,
            HyperFace(self.service.clone()),
            opts,
            permits,
            &graceful,
            shutdown,
        )
        .await;
        self.readiness.start_draining();
        drop(listener);
        self.log_draining();
        drain(graceful, self.settings.drain_timeout).await;
        if let Some(task) = metrics_task {
            task.abort();
        }
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
    /// to `drain_timeout`; the shard runtimes are dropped only once all shards
    /// are done (a background task may live on any of them).
    pub async fn serve_sharded(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let opts = self.conn_options();
        let workers = self.settings.workers.max(1);
        let drain_timeout = self.settings.drain_timeout;
        let listener = listener.into_std()?;
        let metrics_task = self.spawn_metrics().await?;
        let permits = Arc::new(Semaphore::new(opts.max_connections));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (exit_tx, exit_rx) = tokio::sync::watch::channel(false);
        // Each shard holds a sender until it has drained; the channel closes
        // when every shard has drained (or its thread ended early).
        let (drained_tx, mut drained_rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut threads = Vec::with_capacity(workers);
        for index in 0..workers {
            let listener = listener.try_clone()?;
            let service = HyperFace(self.service.clone());
            let permits = permits.clone();
            let mut stop_rx = stop_rx.clone();
            let mut exit_rx = exit_rx.clone();
            let drained_tx = drained_tx.clone();
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
                        let graceful = GracefulShutdown::new();
                        let stop = async move {
                            let _ = stop_rx.wait_for(|stop| *stop).await;
                        };
                        accept_loop(&listener, service, opts, permits, &graceful, stop).await;
                        drop(listener);
                        drain(graceful, drain_timeout).await;
                        drop(drained_tx);
                        let _ = exit_rx.wait_for(|exit| *exit).await;
                    });
                })?;
            threads.push(thread);
        }
        drop(drained_tx);
        let early_end = tokio::select! {
            () = shutdown => false,
            _ = drained_rx.recv() => true,
        };
        self.readiness.start_draining();
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
        if let Some(task) = metrics_task {
            task.abort();
        }
        if early_end || panicked {
            return Err(std::io::Error::other(
                "the server's shard threads ended early",
            ));
        }
        Ok(())
    }

    fn conn_options(&self) -> ConnOptions {
        ConnOptions {
            header_read_timeout: self.settings.header_read_timeout,
            max_connections: self.settings.max_connections,
        }
    }

    async fn spawn_metrics(&self) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
        Ok(match self.settings.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await?;
                tracing::info!(%addr, "serving /metrics");
                Some(tokio::spawn(serve_metrics(listener, self.metrics.clone())))
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

/// Let the connections watched by `graceful` finish, for up to `timeout`.
async fn drain(graceful: GracefulShutdown, timeout: Duration) {
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained"),
        () = tokio::time::sleep(timeout) => {
            tracing::warn!("drain timeout reached; closing remaining connections");
        }
    }
}

async fn accept_loop<S>(
    listener: &TcpListener,
    service: S,
    opts: ConnOptions,
    permits: Arc<Semaphore>,
    graceful: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) where
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<llm_proxy_core::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
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
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    tokio::pin!(shutdown);
    loop {
        // Beyond max_connections, new connections wait in the kernel's queue.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service.clone())
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    let service = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let metrics = metrics.clone();
        async move {
            let resp = if req.uri().path() == "/metrics" {
                let mut r = http::Response::new(llm_proxy_core::full(metrics.encode()));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            } else {
                llm_proxy_core::Error::RouteNotFound(req.uri().path().to_owned()).into_response()
            };
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let graceful = GracefulShutdown::new();
    let opts = ConnOptions {
        header_read_timeout: Duration::from_secs(10),
        max_connections: 64,
    };
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    accept_loop(
        &listener,
        TowerToHyperService::new(service),
        opts,
        permits,
        &graceful,
        std::future::pending(),
    )
    .await;
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
