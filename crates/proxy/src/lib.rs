//! llm-proxy: a config file turned into a complete LLM proxy.
//!
//! This crate is the assembly: it reads the TOML configuration
//! ([`config::Settings`]), builds the stack from the library crates, outermost
//! first —
//!
//! ```text
//! request id + tracing + metrics   (this crate: ProxyService)
//!   -> key from the head           (llm-proxy-auth: AuthGate, when [auth] is set)
//!   -> body limit + parse          (llm-proxy-core: ParseLayer)
//!   -> auth                        (llm-proxy-auth: AuthLayer, when [auth] is set)
//!   -> response id -> upstream     (this crate: ResponseAffinity)
//!   -> local count_tokens          (this crate: Estimate)
//!   -> cache                       (llm-proxy-cache: CacheLayer, when [cache] is set)
//!   -> balance                     (llm-proxy-balance: Balance)
//!   -> per upstream: translate     (llm-proxy-translate: Translate)
//!   -> upstream client             (llm-proxy-upstream: Upstream)
//! ```
//!
//! — and serves it over HTTP/1.1 and h2c with a connection limit, a slow-client
//! cut-off, `/healthz`, `/readyz`, `/metrics`, and a graceful drain on
//! SIGTERM/SIGINT. The `llm-proxy` binary in `examples/` is a thin `main`
//! around [`Proxy`].
//!
//! # Example
//!
//! ```no_run
//! use llm_proxy::{Proxy, config::Settings};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = Settings::from_file("examples/demo.toml".as_ref())?;
//! let listener = llm_proxy::listen(settings.listen)?;
//! let proxy = Proxy::build(settings).await?;
//! proxy.serve(listener, llm_proxy::shutdown_signal()).await?;
//! # Ok(()) }
//! ```
//!
//! This crate has no feature flags.
#![forbid(unsafe_code)]

mod app;
mod batches;
pub mod config;
mod cors;
mod estimate;
mod fair_lru;
mod gated;
mod idle;
mod linger;
pub mod metrics;
mod per_ip;
mod preface;
mod read_timeout;
mod redis_ids;
mod responses;
mod routes;
mod server;
mod stack;
mod timer;
mod websocket;

pub use app::{BuildError, Proxy};
pub use cors::Cors;
pub use routes::{ProxyService, Readiness};
pub use server::{LISTEN_BACKLOG, ShutdownSignals, listen, shutdown_signal};
