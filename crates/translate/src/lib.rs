//! Dialect translation for llm-proxy: serve a client in its API dialect from
//! an upstream that speaks another.
//!
//! Many upstreams speak only chat completions (older llama.cpp, Ollama, TGI,
//! most hosted open-model APIs), and Anthropic's API speaks only Messages.
//! [`TranslateLayer`] wraps **one** upstream's service (below the balancer,
//! above the upstream client) and, per request:
//!
//! - passes it through untouched when the upstream serves the client's API
//!   natively (native always wins; no cost beyond one lookup);
//! - otherwise translates it in one of three [`Direction`]s:
//!   [`Direction::MessagesOverChat`] (Claude Code on a local Llama),
//!   [`Direction::ChatOverMessages`] (an `openai`-SDK app on Anthropic's API),
//!   [`Direction::ResponsesOverChat`] (a stateless Responses client on a chat
//!   server) — the request's [`RequestMeta`](llm_proxy_core::RequestMeta)
//!   gets the translated body and endpoint, the path is rewritten, and the
//!   answer is translated back: whole answers as JSON, streams event by
//!   event with no buffering ([`TranslateBody`]), error answers into the
//!   client's error shape with their status; a translated stream whose
//!   usage request (`stream_options`, added by the translation) the
//!   upstream refuses is sent once more without it (so the wrapped service
//!   must be `Clone`);
//! - refuses what no translation can serve: `404 api_not_served` when the
//!   upstream lacks the API (a balancer avoids this by filtering candidates
//!   with [`TranslateConfig::can_serve`] /
//!   [`TranslateConfig::can_serve_endpoint`]), and `400
//!   unsupported_parameter` naming the field for a request the target
//!   dialect cannot express (`n > 1` on Anthropic, `previous_response_id` on
//!   a chat server, OpenAI's built-in tools, …).
//!
//! Every mapped, approximated and refused field is listed in
//! `docs/translation.md`. A stream that breaks ends with the client
//! dialect's error event and a failed body, never a clean end.
//!
//! # Example
//!
//! An Anthropic Messages request served by a chat-completions upstream:
//!
//! ```
//! use llm_proxy_core::{Api, Body, Error, ParseLayer, ParseLimits, full};
//! use llm_proxy_translate::{Protocol, TranslateConfig, TranslateLayer};
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! // A chat-only upstream: it sees a chat request on /v1/chat/completions.
//! let upstream = service_fn(|req: http::Request<Body>| async move {
//!     assert_eq!(req.uri().path(), "/v1/chat/completions");
//!     let answer = r#"{"id":"chatcmpl-1","model":"llama","choices":[{"index":0,
//!         "message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],
//!         "usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;
//!     Ok::<_, Error>(http::Response::new(full(answer)))
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(ParseLayer::new(ParseLimits::default()))
//!     .layer(TranslateLayer::new(TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions])))
//!     .service(upstream);
//!
//! let request = http::Request::post("/v1/messages")
//!     .body(full(r#"{"model":"llama","max_tokens":64,
//!         "messages":[{"role":"user","content":"Hi"}]}"#))
//!     .unwrap();
//! let response = svc.oneshot(request).await.unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! let message: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(message["type"], "message");
//! assert_eq!(message["content"][0]["text"], "Hello!");
//! assert_eq!(message["stop_reason"], "end_turn");
//! assert_eq!(message["usage"]["output_tokens"], 2);
//! # }
//! ```
//!
//! This crate has no feature flags.
#![forbid(unsafe_code)]

mod body;
mod chat;
mod chat_over_messages;
mod config;
mod content;
mod messages_over_chat;
mod response;
mod responses_over_chat;
mod service;
mod stream;
mod synthesize;
#[cfg(test)]
mod test_util;
mod wire;

pub use body::TranslateBody;
pub use config::{Direction, Protocol, TranslateConfig};
pub use service::{ResponseFuture, Translate, TranslateLayer};
