//! A deterministic OpenAI-compatible mock LLM, for llm-proxy's tests,
//! benchmarks and demo configuration.
//!
//! [`Mock`] is a tower `Service<http::Request<B>>` answering with
//! `http::Response<`[`Body`](llm_proxy_core::Body)`>`; it can stand in for an
//! upstream inside the stack, or be served over real sockets with [`serve`]
//! or [`spawn`] (HTTP/1.1 and h2c). The same request always gets the same
//! answer: the words of a completion and the values of an embedding are
//! chosen by a hash of the prompt, ids derive from that hash and `created` is
//! fixed. Different prompts get different answers.
//!
//! # Routes
//!
//! A leading `/v1` is optional: `/v1/chat/completions` and
//! `/chat/completions` are the same route.
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /chat/completions` | `chat.completion`, or an SSE stream of `chat.completion.chunk` with `"stream": true` |
//! | `POST /completions` | `text_completion`, streamed likewise |
//! | `POST /embeddings` | one unit vector (8 floats, or `dimensions`) per input |
//! | `GET /models`, `GET /models/{id}` | the models of [`MockConfig::models`] |
//! | anything else | `404` with an OpenAI-style error |
//!
//! A body that is not JSON gets `400`. Completions have 8 tokens (words)
//! unless `x-mock-tokens` says otherwise; `max_tokens` or
//! `max_completion_tokens` caps them, finishing with `"length"`. A streamed
//! answer is one body frame per SSE event: the role chunk (chat only), one
//! chunk per token, the finish chunk, a usage chunk if
//! `stream_options.include_usage` is true, then `data: [DONE]`. Events are
//! produced as the body is polled, one token per
//! [`MockConfig::tokens_per_second`] tick; dropping the body stops them and
//! counts in [`MockStats::cancelled`].
//!
//! # Per-request headers
//!
//! | header | effect |
//! | --- | --- |
//! | `x-mock-fail: 500` (any status) | that status with an OpenAI-style error body |
//! | `x-mock-fail: 429` | [`Failure::RateLimited`] with `retry-after: 1` |
//! | `x-mock-fail: drop` | [`Failure::DropMidStream`] after `x-mock-drop-after` (default 2) frames |
//! | `x-mock-fail: hang` | [`Failure::Hang`] |
//! | `x-mock-fail: invalid-sse` | [`Failure::InvalidSse`] |
//! | `x-mock-fail: none` | no failure, even if the config injects one |
//! | `x-mock-latency-ms: N` | overrides [`MockConfig::latency`] |
//! | `x-mock-tokens: N` | completion tokens to produce (default 8, at most 1 000 000) |
//! | `x-mock-drop-after: N` | frames sent before a drop (with `x-mock-fail: drop` or a configured drop) |
//!
//! A header with a value the mock does not understand gets `400`. Every
//! response carries `x-mock-name` when [`MockConfig::name`] is set, and the
//! name is each completion's `system_fingerprint`.
//!
//! # Example
//!
//! ```
//! use llm_proxy_mock::{Mock, MockConfig};
//! use tower::ServiceExt;
//! use http_body_util::BodyExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mock = Mock::new(MockConfig { name: "upstream-a".into(), ..MockConfig::default() });
//! let request = http::Request::post("/v1/chat/completions")
//!     .body(llm_proxy_core::full(
//!         r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#,
//!     ))
//!     .unwrap();
//! let response = mock.clone().oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(answer["object"], "chat.completion");
//! assert_eq!(answer["model"], "gpt-test");
//! assert_eq!(answer["system_fingerprint"], "upstream-a");
//! assert_eq!(answer["usage"]["completion_tokens"], 8);
//! assert_eq!(mock.stats().requests_for("/chat/completions"), 1);
//! # }
//! ```
//!
//! This crate has no feature flags.
#![forbid(unsafe_code)]

mod body;
mod config;
mod error;
mod openai;
mod server;
mod service;
mod stats;
mod text;

pub use config::{Failure, MockConfig};
pub use server::{MockServer, serve, spawn};
pub use service::{Mock, ResponseFuture};
pub use stats::MockStats;

/// The model listed by `GET /models` when [`MockConfig::models`] is empty.
pub const DEFAULT_MODEL: &str = "mock-model";

/// The route of `path`: without its query and without a leading `/v1`.
pub(crate) fn route_path(path: &str) -> &str {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    match path.strip_prefix("/v1") {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

#[cfg(test)]
mod tests;
