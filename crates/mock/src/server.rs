//! The mock as a standalone HTTP server: HTTP/1.1 and h2c on one port.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::{Mock, MockStats};

/// How long to pause accepting after an accept error (such as running out of
/// file descriptors), instead of spinning on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `mock` on `listener` forever: HTTP/1.1 and HTTP/2 without TLS
/// (h2c, prior knowledge), with `TCP_NODELAY` on every connection.
///
/// Connections are tasks owned by this future: dropping or aborting it closes
/// them all.
pub async fn serve(listener: TcpListener, mock: Mock) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %error, "mock: could not set TCP_NODELAY");
                    }
                    let builder = builder.clone();
                    let service = TowerToHyperService::new(mock.clone());
                    connections.spawn(async move {
                        if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
                            tracing::debug!(%peer, %error, "mock: connection ended with an error");
                        }
                    });
                }
                Err(error) => {
                    tracing::warn!(%error, "mock: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// A mock served on `127.0.0.1` by [`spawn`]. Dropping it stops the server
/// and closes its connections.
#[derive(Debug)]
pub struct MockServer {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The served mock's counters.
    pub stats: MockStats,
    task: JoinHandle<()>,
}

impl MockServer {
    /// The OpenAI base URL of the server: `http://{addr}/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `mock` on a fresh port of `127.0.0.1` in a new tokio task.
///
/// # Errors
///
/// When the port cannot be bound.
pub async fn spawn(mock: Mock) -> std::io::Result<MockServer> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let stats = mock.stats();
    let task = tokio::spawn(serve(listener, mock));
    Ok(MockServer { addr, stats, task })
}
