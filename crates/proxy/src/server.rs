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
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let opts = ConnOptions {
            header_read_timeout: self.settings.header_read_timeout,
            max_connections: self.settings.max_connections,
        };
        let metrics_task = match self.settings.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await?;
                tracing::info!(%addr, "serving /metrics");
                Some(tokio::spawn(serve_metrics(listener, self.metrics.clone())))
            }
            None => None,
        };
        let graceful = GracefulShutdown::new();
        accept_loop(&listener, self.service.clone(), opts, &graceful, shutdown).await;
        self.readiness.start_draining();
        drop(listener);
        tracing::info!(
            drain_timeout_secs = self.settings.drain_timeout.as_secs_f64(),
            "shutting down: draining in-flight requests"
        );
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("drained"),
            () = tokio::time::sleep(self.settings.drain_timeout) => {
                tracing::warn!("drain timeout reached; closing remaining connections");
            }
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        Ok(())
    }
}

async fn accept_loop<S>(
    listener: &TcpListener,
    service: S,
    opts: ConnOptions,
    graceful: &GracefulShutdown,
    shutdown: impl Future<Output = ()>,
) where
    S: tower_service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<llm_proxy_core::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let permits = Arc::new(Semaphore::new(opts.max_connections));
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
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            )
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
    accept_loop(&listener, service, opts, &graceful, std::future::pending()).await;
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
