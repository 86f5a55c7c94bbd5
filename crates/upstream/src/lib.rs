//! The upstream client: a tower `Service` that sends requests to one LLM
//! server and streams its answers back.
//!
//! It sits at the bottom of the llm-proxy stack, below the balancer. For each
//! request it
//!
//! - joins the configured base URL (with its version prefix, like an SDK's
//!   `base_url`) with the client path: `/v1/<rest>?<q>` goes to `<url>/<rest>?<q>`;
//! - removes the client's credentials (`authorization`, `x-api-key`,
//!   `api-key`) and the hop-by-hop headers, and sets the upstream's own key;
//! - sends the body from [`RequestMeta`](llm_proxy_core::RequestMeta) (the
//!   client's bytes unless a layer edited the parsed body) or, for unparsed
//!   routes, streams the request body through;
//! - bounds the connect, the wait for the response head and every silence
//!   between two body chunks;
//! - streams the response frame by frame. A chat or completions stream that
//!   breaks mid-way ends with a `stream_interrupted` error event and a broken
//!   connection, never with a clean end. Dropping the response body closes the
//!   upstream connection, so a client that hangs up stops the upstream's work.
//!
//! [`Upstream::upgrade`] passes a protocol upgrade (WebSocket) through on a
//! connection of its own.
//!
//! Connections are pooled and kept alive (HTTP/1.1, and HTTP/2 where a TLS
//! server offers it by ALPN); `TCP_NODELAY` is on. https uses rustls with the
//! `ring` provider and the webpki roots, plus any extra PEM roots given.
//! With [`UpstreamConfig::shards`] set, each shard thread of a thread-per-core
//! server gets its own pool ([`shard`]).
//!
//! # Example
//!
//! ```no_run
//! use llm_proxy_upstream::{Upstream, UpstreamConfig};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = UpstreamConfig::new("gpu-a", "http://127.0.0.1:9001/v1".parse()?)
//!     .api_key("sk-upstream");
//! let upstream = Upstream::new(cfg)?;
//! let req = http::Request::get("/v1/models").body(llm_proxy_core::empty())?;
//! let resp = upstream.oneshot(req).await?;
//! println!("{}", resp.status());
//! # Ok(()) }
//! ```
//!
//! This crate has no feature flags.
#![forbid(unsafe_code)]

mod body;
mod config;
mod dns;
mod headers;
mod pool;
mod service;
pub mod shard;
mod tls;
mod upgrade;

pub use body::UpstreamBody;
pub use config::{AuthStyle, BuildError, UpstreamConfig};
pub use headers::settable_header;
pub use service::{ANTHROPIC_VERSION, ResponseFuture, Upstream, port_of};
pub use tls::check_roots_pem;
pub use upgrade::Upgrade;
