//! llm-proxy nested in an existing axum app: the app keeps its own routes and
//! mounts the whole proxy (routing, metrics, health) under `/llm`.
//!
//! ```text
//! cargo run -p examples --example axum_embed -- [LISTEN] [UPSTREAM_BASE_URL]
//! curl localhost:3000/                      # the app's own route
//! curl localhost:3000/llm/v1/models         # the proxy
//! ```

use std::path::Path;

use axum::Router;
use axum::routing::get;
use llm_proxy::Proxy;
use llm_proxy::config::Settings;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:3000".into());
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:9001/v1".into());

    // The same settings the llm-proxy binary reads from its TOML file.
    let config = format!("[[upstream]]\nname = \"local\"\nurl = \"{url}\"\n");
    let proxy = Proxy::build(Settings::from_str(Path::new("<inline>"), &config)?).await?;

    let app = Router::new()
        .route("/", get(|| async { "my app\n" }))
        .nest_service("/llm", proxy.service());

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("app on http://{listen}, llm-proxy under /llm -> {url}");
    axum::serve(listener, app).await?;
    Ok(())
}
