//! llm-proxy nested in an existing axum app: the app keeps its own routes and
//! mounts the whole proxy (routing, metrics, health) under `/llm`. SIGTERM or
//! Ctrl-C turns `/llm/readyz` to 503, stops accepting, and lets requests in
//! flight finish (up to 30 s).
//!
//! ```text
//! cargo run -p examples --example axum_embed -- [LISTEN] [UPSTREAM_BASE_URL]
//! curl localhost:3000/                      # the app's own route
//! curl localhost:3000/llm/v1/models         # the proxy
//! ```

use std::path::Path;
use std::time::Duration;

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
    let readiness = proxy.readiness();
    let (draining, mut drained) = tokio::sync::watch::channel(false);
    let signal = async move {
        llm_proxy::shutdown_signal().await;
        readiness.start_draining();
        let _ = draining.send(true);
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    // axum waits for every connection to finish: bound the wait.
    let deadline = async {
        let _ = drained.wait_for(|draining| *draining).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    };
    tokio::select! {
        served = server => served?,
        () = deadline => eprintln!("requests still in flight after 30 s; stopping"),
    }
    Ok(())
}
