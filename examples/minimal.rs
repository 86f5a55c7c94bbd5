//! The smallest useful llm-proxy: the parse layer and one upstream, served by
//! hyper. Requests are parsed once (413/415/400 answered here), the client's
//! key is replaced by the upstream's (`UPSTREAM_API_KEY`, if set: else none
//! is sent), and answers stream back as they come. Ctrl-C stops accepting
//! and lets requests in flight finish (up to 30 s).
//!
//! ```text
//! cargo run -p examples --example minimal -- [LISTEN] [UPSTREAM_BASE_URL]
//! ```
//! Defaults: `127.0.0.1:8080` in front of `http://127.0.0.1:9001/v1`
//! (`cargo run -p examples --example mock_server` serves one there).

use std::pin::pin;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use llm_proxy_core::{ParseLayer, ParseLimits, RenderErrorsLayer};
use llm_proxy_upstream::{Upstream, UpstreamConfig};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9001/v1".into());

    let mut upstream = UpstreamConfig::new("default", url.parse()?);
    upstream.api_key = std::env::var("UPSTREAM_API_KEY").ok();
    let stack = ServiceBuilder::new()
        // Errors become OpenAI-style error responses at the edge.
        .layer(RenderErrorsLayer)
        .layer(ParseLayer::new(ParseLimits::default()))
        .service(Upstream::new(upstream)?);

    let mut http = auto::Builder::new(TokioExecutor::new());
    // A timer turns on hyper's header-read timeout (30 s): a client that
    // never finishes its request head does not hold a connection for ever.
    http.http1().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut ctrl_c = pin!(tokio::signal::ctrl_c());

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("minimal llm-proxy on http://{listen} -> {url}");
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors, or a connection reset before it
                // was accepted: the listener itself is fine.
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut ctrl_c => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(stack.clone());
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("connection error: {e}");
            }
        });
    }
    drop(listener);
    println!("draining");
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        eprintln!("requests still in flight after 30 s; stopping");
    }
    Ok(())
}
