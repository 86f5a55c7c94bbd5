//! The smallest useful llm-proxy: the parse layer and one upstream, served by
//! hyper. Requests are parsed once (413/415/400 answered here), the client's
//! key is replaced by the upstream's, and answers stream back as they come.
//!
//! ```text
//! cargo run -p examples --example minimal -- [LISTEN] [UPSTREAM_BASE_URL]
//! ```
//! Defaults: `127.0.0.1:8080` in front of `http://127.0.0.1:9001/v1`
//! (`cargo run -p examples --example mock_server` serves one there).

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
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

    let upstream = Upstream::new(UpstreamConfig::new("default", url.parse()?))?;
    let stack = ServiceBuilder::new()
        // Errors become OpenAI-style error responses at the edge.
        .layer(RenderErrorsLayer)
        .layer(ParseLayer::new(ParseLimits::default()))
        .service(upstream);

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("minimal llm-proxy on http://{listen} -> {url}");
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let service = TowerToHyperService::new(stack.clone());
        tokio::spawn(async move {
            let conn = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = conn.serve_connection(TokioIo::new(stream), service).await {
                eprintln!("connection error: {e}");
            }
        });
    }
}
