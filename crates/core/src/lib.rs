//! Core types of llm-proxy, shared by every layer of the stack.
//!
//! The proxy is a stack of tower layers over `http::Request<Body>`. This crate
//! owns what they all agree on:
//!
//! - [`Body`]: the one boxed body type requests and responses travel in;
//! - [`RequestMeta`]: set once by the [`ParseLayer`] (the request JSON is
//!   parsed exactly once) and read by every later layer from the request's
//!   extensions: endpoint kind, model, stream flag, the buffered body;
//! - [`Error`]: the error enum every layer returns, rendered once into an
//!   OpenAI-style error response;
//! - [`sse`]: an incremental Server-Sent-Events parser and encoder;
//! - [`usage`]: token usage extraction from JSON bodies and SSE streams;
//! - [`canonical`]: canonical JSON (sorted keys, no whitespace) for cache keys;
//! - [`Waited`]: the time a request waited on its peers (its client's body,
//!   its upstreams), which layers add to and the server leaves out of the
//!   proxy's overhead figure.
//!
//! # Example
//!
//! ```
//! use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, RequestMeta};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(ParseLayer::new(ParseLimits::default()))
//!     .service(service_fn(|req: http::Request<Body>| async move {
//!         let meta = req.extensions().get::<RequestMeta>().expect("set by ParseLayer");
//!         Ok::<_, Error>(http::Response::new(llm_proxy_core::full(meta.model().unwrap_or_default().to_owned())))
//!     }));
//! let req = http::Request::post("/v1/chat/completions")
//!     .body(llm_proxy_core::full(r#"{"model":"m","messages":[]}"#))
//!     .unwrap();
//! let resp = svc.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! # }
//! ```
//!
//! Feature `redis` adds `redis::RedisLink`, the self-healing Redis
//! connection the cache, auth and Responses id stores share.
#![forbid(unsafe_code)]

mod body;
pub mod breaker;
mod budget;
pub mod canonical;
pub mod credential;
mod endpoint;
mod error;
pub mod fallback;
pub mod ids;
pub mod media;
mod meta;
mod parse;
pub mod redact;
#[cfg(feature = "redis")]
pub mod redis;
pub mod refusal;
mod render;
pub mod sse;
mod svc;
pub mod throttle;
pub mod usage;
mod usage_filter;
mod waited;

pub use body::{
    Body, BoxError, FlushBeforeError, Guarded, NotUpstreamFault, empty, full, is_upstream_fault,
    read_answer,
};
pub use budget::BodyBudget;
pub use endpoint::{
    Api, ConversationPath, Dialect, Endpoint, StreamKind, conversation_path, response_id,
};
pub use error::{
    CLIENT_CLOSED_REQUEST, Error, ErrorBody, ErrorObject, INTERRUPTED_CODE, MAX_MESSAGE_BYTES,
};
pub use meta::{
    CallerSlot, GenerationCaps, Identity, ModelAllowlist, RequestMeta, references_stored_items,
};
pub use parse::{
    BudgetHold, Parse, ParseLayer, ParseLimits, buffers_body, json_from_slice, object_from_slice,
    object_from_str, parse, parse_object, parse_object_within, parse_within, value_from_slice,
};
pub use render::{RenderErrors, RenderErrorsLayer, RenderFuture};
pub use svc::{BoxFuture, call_boxed};
pub use usage_filter::UsageFilter;
pub use waited::Waited;

/// The response header that names the upstream which served a request.
pub const UPSTREAM_HEADER: http::HeaderName = http::HeaderName::from_static("x-llm-proxy-upstream");

/// Put in a request's extensions to send it to one named upstream and no
/// other (a stateful Responses request follows the upstream that created its
/// response). The balancer honours it; no failover to another upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedUpstream(pub std::sync::Arc<str>);

/// Set on a response by the upstream service that produced it: which upstream
/// served the request. Read by metrics and by the proxy's response headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamName(pub std::sync::Arc<str>);

/// Set on a response by a layer that made it from an answer in another
/// dialect (the translate crate's): the upstream kept nothing under the id
/// the client sees, so no layer records that id as one to fetch or
/// continue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translated;

/// Where the upstream client writes the name of each upstream it sends a
/// request to (the last one tried stays), for a layer in front of it that
/// names the upstream even when no answer comes back: the proxy's access
/// line for a request its client abandoned while an upstream worked on it.
/// Put into the request's extensions by that layer, shared by its clones.
#[derive(Clone, Debug, Default)]
pub struct UpstreamSlot(std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<str>>>>);

impl UpstreamSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `name` as the upstream the request went to last.
    pub fn set(&self, name: &std::sync::Arc<str>) {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(name.clone());
    }

    /// The upstream the request went to last, if any.
    pub fn get(&self) -> Option<std::sync::Arc<str>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Whether `token` is one of the comma-separated values of the `name`
/// headers, compared case-insensitively (`connection: keep-alive, Upgrade`
/// lists `upgrade`).
pub fn header_lists(headers: &http::HeaderMap, name: &http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `bytes` as text when they are valid UTF-8, checked with SIMD where the
/// CPU has it (`simdutf8`): several times faster than `str::from_utf8` on
/// the kilobytes of JSON that bodies and stream events are, and the same
/// answer. Callers that need to know where invalid input breaks fall back
/// to the standard library's error.
pub fn utf8(bytes: &[u8]) -> Option<&str> {
    simdutf8::basic::from_utf8(bytes).ok()
}

/// `bytes` as text, invalid UTF-8 replaced with U+FFFD: borrowed when they
/// are valid ([`utf8`], many times faster than `String::from_utf8_lossy`'s
/// chunk iterator), as they almost always are.
pub fn utf8_lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match utf8(bytes) {
        Some(text) => std::borrow::Cow::Borrowed(text),
        None => String::from_utf8_lossy(bytes),
    }
}
