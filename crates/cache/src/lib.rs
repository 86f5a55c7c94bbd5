//! An exact-match response cache for llm-proxy, as a tower layer.
//!
//! [`CacheLayer`] sits below the parse and auth layers of the stack and above
//! the balancer. It answers repeated chat completions, completions,
//! embeddings, Anthropic Messages and stateless Responses requests (`store:
//! false`, no `previous_response_id`, no `conversation`, not `background`)
//! from a [`Store`], streamed or not:
//!
//! - **Key**: blake3 of a version tag, the endpoint, the scope
//!   ([`CacheScope::PerKey`] by default: the auth layer's key name, else a
//!   hash of the presented credential) and the canonical JSON of the body
//!   minus the end-user ids of [`excluded_fields`] (for Messages,
//!   `metadata.user_id`, and the `anthropic-version` and `anthropic-beta`
//!   headers go in). Key order and whitespace do not split the cache;
//!   `stream` is part of the key (`"stream": false` is no `stream`, where
//!   the API defaults to `false`). A body holding an integer beyond 64
//!   bits, which `serde_json` reads as the nearest `f64`, is not served
//!   (`bypass`): its key could not tell it from its neighbours.
//! - **Streams**: a miss is teed to the client as it arrives ([`CacheBody`])
//!   and stored only if it ended cleanly in its dialect (`data: [DONE]`,
//!   `response.completed`, `message_stop`); a hit replays the stored frames
//!   with their original boundaries. For chat and completions, the cache
//!   asks the upstream for `stream_options.include_usage` so that stored
//!   streams keep their usage chunk, and hands that chunk only to clients
//!   that asked.
//! - **Coalescing**: concurrent identical requests share one upstream call;
//!   followers receive the leader's frames live, retry when the leader fails
//!   before answering, and give up waiting after [`CacheConfig::max_wait`].
//!   The upstream's body is read by whichever request of the flight needs
//!   its next frame first, so a client that reads slowly or not at all holds
//!   back no other (what is read for it waits, up to `max_entry_bytes`).
//! - **Controls**: `cache-control: no-cache`, `no-store`, `max-age=N`,
//!   `only-if-cached` (a stored entry or a 504 `not_cached`, never the
//!   upstream), and `pragma: no-cache` without `cache-control`
//!   ([`CacheControl`]); responses carry `x-llm-proxy-cache: hit|miss|bypass`
//!   ([`CACHE_HEADER`]) and `age` on hits.
//! - **Stores**: [`MemoryStore`] (sharded LRU, bounded by entries and bytes,
//!   TTL) and, with the `redis` feature, `RedisStore`. A store error is a
//!   miss, logged and counted; it never fails a request.
//! - **Metrics**: [`CacheLayer::stats`].
//!
//! The request's JSON is read from the [`RequestMeta`](llm_proxy_core::RequestMeta)
//! that core's parse layer puts into its extensions.
//!
//! # Example
//!
//! ```
//! use llm_proxy_cache::{CacheConfig, CacheLayer, MemoryStore};
//! use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let cache = CacheLayer::new(CacheConfig::default(), MemoryStore::new(10_000, 256 << 20));
//! let stats = cache.stats();
//! let svc = ServiceBuilder::new()
//!     .layer(ParseLayer::new(ParseLimits::default()))
//!     .layer(cache)
//!     .service(service_fn(|_req: http::Request<Body>| async {
//!         Ok::<_, Error>(http::Response::new(full(r#"{"id":"1","choices":[]}"#)))
//!     }));
//! let request = || {
//!     http::Request::post("/v1/chat/completions")
//!         .body(full(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#))
//!         .unwrap()
//! };
//! let first = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(first.headers()["x-llm-proxy-cache"], "miss");
//! // Read the body to its end: only a complete answer is stored.
//! http_body_util::BodyExt::collect(first.into_body()).await.unwrap();
//! # tokio::task::yield_now().await; // let the store task run
//! let second = svc.oneshot(request()).await.unwrap();
//! assert_eq!(second.headers()["x-llm-proxy-cache"], "hit");
//! assert_eq!(stats.snapshot().hits, 1);
//! # }
//! ```
//!
//! # Features
//!
//! - `redis` (off by default): `RedisStore`, a store in Redis shared by
//!   several proxy instances (`redis://` and `rediss://` over rustls).
#![forbid(unsafe_code)]

mod body;
mod clock;
mod config;
mod control;
mod entry;
mod flight;
mod key;
mod layer;
mod replay;
mod service;
mod stats;
mod store;
#[cfg(test)]
mod tests;

pub use body::CacheBody;
pub use config::{CacheConfig, CacheScope};
pub use control::CacheControl;
pub use entry::{DecodeError, Entry, EntryBody, UsageChunk};
pub use key::{CacheKey, EXCLUDED_FIELDS, KeyScope, RESPONSES_EXCLUDED_FIELDS, excluded_fields};
pub use layer::CacheLayer;
pub use replay::{CACHE_HEADER, CacheStatus};
pub use service::Cache;
pub use stats::{CacheStats, StatsSnapshot};
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{MemoryStore, Store, StoreError, StoreFuture, StoreUsage};
