//! A deterministic mock LLM speaking OpenAI's APIs (chat completions,
//! completions, embeddings, Responses) and Anthropic's Messages API, for
//! llm-proxy's tests, benchmarks and demo configuration.
//!
//! [`Mock`] is a tower `Service<http::Request<B>>` answering with
//! `http::Response<`[`Body`](llm_proxy_core::Body)`>`; it can stand in for an
//! upstream inside the stack, or be served over real sockets with [`serve`]
//! or [`spawn`] (HTTP/1.1 and h2c). The same request always gets the same
//! answer: the words of a completion and the values of an embedding are
//! chosen by a hash of the prompt, ids derive from that hash and `created` is
//! fixed. Different prompts get different answers. The exception is the
//! Responses API, whose ids are unique per response (see below).
//!
//! The words depend on the conversation only, not on its dialect: a
//! Responses request (`instructions` as a system message, then the `input`)
//! or a Messages request (`system`, then the `messages`) gets the same words
//! as the chat request with the same messages. Input (prompt) tokens are
//! estimated the same way everywhere: a token per 4 bytes of request body.
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
//! | `POST /responses` | a Responses API `response`, or its SSE events with `"stream": true` |
//! | `GET /responses` with `upgrade: websocket` | a WebSocket (served connections only): each `{"type":"response.create",…}` message answered by the streamed events, one message each, `tokens_per_second` apart when that is set |
//! | `GET /responses/{id}` | a response created before (and not `"store": false`) |
//! | `DELETE /responses/{id}` | `{"id","object":"response","deleted":true}`; forgets it |
//! | `POST /responses/{id}/cancel` | the response, now `"status": "cancelled"` |
//! | `GET /responses/{id}/input_items` | an empty list |
//! | `POST /responses/input_tokens` | `{"object":"response.input_tokens","input_tokens":N}` |
//! | `POST /responses/compact` | a `response.compaction` with one `compaction` item |
//! | `POST /messages` | an Anthropic `message`, or its SSE events with `"stream": true` |
//! | `POST /messages/count_tokens` | `{"input_tokens":N}` |
//! | `GET /models`, `GET /models/{id}` | the models of [`MockConfig::models`] (in Anthropic's format when the mock serves only [`MockApi::Messages`]) |
//! | anything else | `404` with an OpenAI-style error |
//!
//! [`MockConfig::apis`] restricts the APIs served, to play a server that
//! speaks only some: the routes of the others answer `404` at once (before
//! latency and injected failures), in their API's error format. Requests are
//! counted per route whether served or not ([`MockStats::requests_for`]).
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
//! # Tool calls
//!
//! A request offering tools whose last message is the user's and mentions
//! "weather" (any case) is answered with a call of the first tool (the first
//! `function` tool for the Responses API) with arguments `{"city":"Paris"}`,
//! streamed in 4 pieces (4 completion tokens, whatever `x-mock-tokens` or a
//! cap say). A conversation ending with the tool's result is answered with
//! text.
//!
//! | API | the call |
//! | --- | --- |
//! | chat | `tool_calls: [{"id":"call_…","type":"function","function":{"name","arguments"}}]`, `finish_reason: "tool_calls"`; streamed: the role chunk carries the call's `index`, `id`, `name` and empty `arguments`, then argument deltas, then the finish chunk |
//! | Responses | a `function_call` output item (`id` `fc_…`, `call_id` `call_…`); streamed with `response.function_call_arguments.delta`/`.done` |
//! | Messages | a `tool_use` block (`toolu_…`), `stop_reason: "tool_use"`; streamed as `input_json_delta` pieces after a `content_block_start` with `input: {}` |
//!
//! # The Responses API
//!
//! A response (`resp_<hex>`) has one output message (`msg_<hex>`) holding one
//! `output_text` part, and `usage` with `input_tokens`, `output_tokens`,
//! `total_tokens` and their details. Request fields such as `instructions`,
//! `previous_response_id`, `store` (default `true`), `tools`, `metadata` and
//! `max_output_tokens` are echoed. `max_output_tokens` below the token count
//! caps it: `"status": "incomplete"` with `incomplete_details.reason`
//! `max_output_tokens`.
//!
//! Ids hash the mock's name, the request body and the number of responses
//! the mock created before it, so they are unique (also between two mocks
//! of different names), yet the same on every run of a test. The
//! mock remembers the last 1024 stored responses: `previous_response_id`
//! naming another id gets `404` with code `previous_response_not_found`.
//!
//! Conversations (OpenAI's Conversations API) are made by `POST
//! /v1/conversations` (`conv_<hex>`, with the request's `metadata`), read by
//! `GET /v1/conversations/{id}` and `…/items` (an empty list), and deleted by
//! `DELETE`; the mock remembers the last 1024. A response whose
//! `conversation` (an id, or an object with `id`) the mock did not make is
//! `404` with `param` `conversation`; otherwise the response echoes it.
//!
//! Streamed, each event is `event: <type>` and `data:` JSON with `type` and
//! `sequence_number`: `response.created` and `response.in_progress` (status
//! `in_progress`, no output, `usage: null`), `response.output_item.added`,
//! `response.content_part.added`, one `response.output_text.delta` per token,
//! `response.output_text.done`, `response.content_part.done`,
//! `response.output_item.done` and `response.completed` with the whole
//! response (`response.incomplete` when capped, as OpenAI does). No `[DONE]`.
//!
//! # The Messages API
//!
//! As Anthropic's API: requests need the `anthropic-version` header and
//! `max_tokens` (else `400`); `max_tokens` below the token count caps it with
//! `stop_reason: "max_tokens"`, else `"end_turn"`. A message (`msg_<hex>`)
//! has one `text` block and `usage` with `input_tokens` and `output_tokens`.
//! Errors (injected ones included) have Anthropic's format,
//! `{"type":"error","error":{"type","message"}}`, whose type follows the
//! status: `invalid_request_error`, `authentication_error`,
//! `permission_error`, `not_found_error`, `rate_limit_error`, `api_error`,
//! `overloaded_error` (529)… Streamed events are `message_start` (no content,
//! `output_tokens: 1`), `content_block_start`, `ping`, one
//! `content_block_delta` (`text_delta`) per token, `content_block_stop`,
//! `message_delta` (stop reason and `output_tokens`) and `message_stop`.
//! Request headers (`anthropic-version`, `anthropic-beta`, `x-api-key`) are
//! recorded like any other ([`MockStats::last_request_headers`]).
//!
//! # Per-request headers
//!
//! | header | effect |
//! | --- | --- |
//! | `x-mock-fail: 500` (any final status, 200–999; a 1xx is answered 500) | that status with an error body (OpenAI's format, or Anthropic's on `/messages`) |
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

mod anthropic;
mod body;
mod config;
mod error;
mod openai;
mod responses;
mod server;
mod service;
mod sse;
mod stats;
mod text;
mod websocket;

pub use config::{Failure, MockApi, MockConfig};
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
