//! The auth layer: who is calling, which models they may use, and how fast.
//!
//! It sits below the parse layer (it reads [`RequestMeta`]) and above the
//! cache and the balancer. Its [gate](AuthLayer::gate), put in front of the
//! parse layer, refuses a missing or unknown key (and a route the key may
//! not use) from the request's head, before any body is read or parsed:
//!
//! - **Keys**: configured as SHA-256 hashes ([`KeySpec`]); the presented key
//!   (`Authorization: Bearer …`, scheme case-insensitive, else `x-api-key`,
//!   else `api-key`) is hashed and looked up, so timing does not reveal key
//!   content. Missing, empty, malformed or unknown keys all get the same 401
//!   `invalid_api_key`.
//!   The key's *name* becomes the request's [`Identity`] (cache scope,
//!   metrics, logs); the key itself is never logged or forwarded.
//! - **Access**: an optional per-key model allowlist (403
//!   `model_not_allowed`); every other route (other `/v1/*` routes, and an
//!   embedder's own routes behind the layer) only for keys with
//!   `passthrough` (403 `route_not_allowed`), but for a model's description
//!   (`GET /v1/models/{id}`, [`llm_proxy_core::Endpoint::described_model`]),
//!   which the allowlist decides (404 `model_not_found` for a model it
//!   lacks).
//! - **Order**: below the parse layer (a model request it did not read is
//!   refused as `misconfigured`), and above the cache layer (a request that
//!   passed the cache is refused as `misconfigured`: the cache would answer
//!   requests whose key was never checked).
//! - **Limits**: requests and tokens per minute, GCRA with a burst equal to
//!   the limit ([`limit`]). Tokens are reserved up front (prompt bytes / 4
//!   plus the request's completion cap, else 256; charged at most the whole
//!   limit) and reconciled with the real `usage` when the response ends; an
//!   error answer without usage, or a request that fails below HTTP, is
//!   refunded. Only endpoints that run a model are charged tokens: counting
//!   tokens, reading a stored response and listing models count as requests
//!   only. Streams are asked for usage
//!   (`stream_options.include_usage`) and the extra chunk is removed from
//!   what a client that did not ask receives. Over a limit: 429 with
//!   `retry-after`; every response to a limited key carries the
//!   `x-ratelimit-*` headers.
//!
//! [`RequestMeta`]: llm_proxy_core::RequestMeta
//! [`Identity`]: llm_proxy_core::Identity
//!
//! # Example
//!
//! ```
//! use llm_proxy_auth::{AuthLayer, KeySpec};
//! use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut key = KeySpec::from_key("team-a", "sk-team-a");
//! key.requests_per_minute = Some(600);
//! let auth = AuthLayer::new(vec![key]);
//! let svc = ServiceBuilder::new()
//!     .layer(auth.gate())
//!     .layer(ParseLayer::new(ParseLimits::default()))
//!     .layer(auth)
//!     .service(service_fn(|_req: http::Request<Body>| async {
//!         Ok::<_, Error>(http::Response::new(full("ok")))
//!     }));
//! let req = http::Request::post("/v1/chat/completions")
//!     .header("authorization", "Bearer sk-team-a")
//!     .body(full(r#"{"model":"m","messages":[]}"#))
//!     .unwrap();
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "599");
//! # }
//! ```
//!
//! # Features
//!
//! - `redis`: `LimitBackend::redis`, limits shared by every proxy on one
//!   Redis, falling back to local limits when Redis fails.
#![forbid(unsafe_code)]

mod backend;
mod body;
mod gate;
mod keys;
pub mod limit;
#[cfg(feature = "redis")]
mod redis;
mod service;

pub use backend::LimitBackend;
pub use gate::{AuthGate, AuthGateLayer, GateFuture};
pub use keys::{KeyEntry, KeySpec, KeyStats, KeyTable, parse_sha256_hex, presented_key, sha256};
#[cfg(feature = "redis")]
pub use redis::RedisLimits;
pub use service::{
    Auth, AuthLayer, Turn, check_body, estimate_tokens, format_reset, rate_headers,
    strip_upstream_account_headers,
};
