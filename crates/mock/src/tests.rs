//! The mock's behaviour through its `Service`, one request at a time.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, full};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::{Failure, Mock, MockApi, MockConfig};

fn post(path: &str, body: &Value, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(full(body.to_string())).expect("valid request")
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-test", "messages": [{"role": "user", "content": content}]})
}

fn streamed_chat(content: &str) -> Value {
    let mut body = chat(content);
    body["stream"] = json!(true);
    body
}

async fn send(mock: &Mock, request: Request<Body>) -> Response<Body> {
    let Ok(response) = mock.clone().oneshot(request).await;
    response
}

async fn json_of(response: Response<Body>) -> Value {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&bytes).expect("JSON body")
}

/// Every data frame of a body that must end cleanly.
async fn frames(response: Response<Body>) -> Vec<Bytes> {
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body frame").into_data() {
            frames.push(data);
        }
    }
    frames
}

/// The JSON of each SSE event, checking that each frame holds exactly one
/// event and that the last is `[DONE]`.
fn sse_json(frames: &[Bytes]) -> Vec<Value> {
    let (last, events) = frames.split_last().expect("at least one frame");
    assert_eq!(&last[..], b"data: [DONE]\n\n");
    events
        .iter()
        .map(|frame| {
            let text = std::str::from_utf8(frame).expect("UTF-8 event");
            let data = text
                .strip_prefix("data: ")
                .and_then(|rest| rest.strip_suffix("\n\n"))
                .expect("one `data:` event per frame");
            serde_json::from_str(data).expect("JSON event")
        })
        .collect()
}

#[tokio::test]
async fn same_request_gets_the_same_answer_and_prompts_differ() {
    let mock = Mock::default();
    let a = json_of(send(&mock, post("/v1/chat/completions", &chat("hello"), &[])).await).await;
    let b = json_of(send(&mock, post("/v1/chat/completions", &chat("hello"), &[])).await).await;
    let c = json_of(send(&mock, post("/v1/chat/completions", &chat("goodbye"), &[])).await).await;
    assert_eq!(a, b);
    assert_ne!(
        a["choices"][0]["message"]["content"],
        c["choices"][0]["message"]["content"]
    );
    assert_ne!(a["id"], c["id"]);
    // Another mock answers the same: nothing depends on state or time.
    let other = json_of(
        send(
            &Mock::default(),
            post("/chat/completions", &chat("hello"), &[]),
        )
        .await,
    )
    .await;
    assert_eq!(a, other);
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape() {
    let mock = Mock::new(MockConfig {
        name: "up-a".into(),
        ..MockConfig::default()
    });
    let response = send(&mock, post("/chat/completions", &chat("hi"), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.headers()["x-mock-name"], "up-a");
    let answer = json_of(response).await;
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["created"], 1_700_000_000);
    assert_eq!(answer["model"], "gpt-test");
    assert_eq!(answer["system_fingerprint"], "up-a");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert_eq!(content.split(' ').count(), 8);
    let usage = &answer["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    assert!(usage["prompt_tokens"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap_or(0) + 8)
    );
}

#[tokio::test]
async fn token_count_header_and_max_tokens() {
    let mock = Mock::default();
    let answer = json_of(
        send(
            &mock,
            post("/chat/completions", &chat("hi"), &[("x-mock-tokens", "3")]),
        )
        .await,
    )
    .await;
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    let mut capped = chat("hi");
    capped["max_tokens"] = json!(2);
    let answer = json_of(send(&mock, post("/chat/completions", &capped, &[])).await).await;
    assert_eq!(answer["usage"]["completion_tokens"], 2);
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn streamed_chunks_parse_as_json_and_end_with_done() {
    let mock = Mock::default();
    let response = send(
        &mock,
        post("/v1/chat/completions", &streamed_chat("hi"), &[]),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = sse_json(&frames(response).await);
    // Role, 8 tokens, finish.
    assert_eq!(events.len(), 10);
    assert!(
        events
            .iter()
            .all(|e| e["object"] == "chat.completion.chunk")
    );
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events[1..9]
        .iter()
        .map(|e| e["choices"][0]["delta"]["content"].as_str().expect("token"))
        .collect();
    assert_eq!(events[9]["choices"][0]["finish_reason"], "stop");
    assert!(events.iter().all(|e| e.get("usage").is_none()));
    // The stream spells the same answer as the non-streamed request.
    let whole = json_of(send(&mock, post("/v1/chat/completions", &chat("hi"), &[])).await).await;
    assert_eq!(whole["choices"][0]["message"]["content"], streamed.as_str());
    assert_eq!(mock.stats().in_flight(), 0);
    assert_eq!(mock.stats().cancelled(), 0);
}

#[tokio::test]
async fn include_usage_adds_the_usage_chunk() {
    let mut body = streamed_chat("hi");
    body["stream_options"] = json!({"include_usage": true});
    let response = send(
        &Mock::default(),
        post("/chat/completions", &body, &[("x-mock-tokens", "2")]),
    )
    .await;
    let events = sse_json(&frames(response).await);
    assert_eq!(events.len(), 5);
    let usage = events.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert!(usage["usage"]["prompt_tokens"].as_u64().is_some());
}

#[tokio::test]
async fn completions_answer_text_streamed_or_not() {
    let mock = Mock::default();
    let body = json!({"model": "m", "prompt": "once upon"});
    let answer = json_of(send(&mock, post("/v1/completions", &body, &[])).await).await;
    assert_eq!(answer["object"], "text_completion");
    assert_eq!(answer["usage"]["completion_tokens"], 8);
    let text = answer["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_owned();
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let events =
        sse_json(&frames(send(&mock, post("/v1/completions", &streamed_body, &[])).await).await);
    assert_eq!(events.len(), 9);
    let streamed: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().expect("text"))
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(events[8]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn embeddings_give_one_vector_per_input() {
    let mock = Mock::default();
    let body = json!({"model": "emb", "input": ["a", "b"]});
    let answer = json_of(send(&mock, post("/v1/embeddings", &body, &[])).await).await;
    assert_eq!(answer["object"], "list");
    assert_eq!(answer["model"], "emb");
    let data = answer["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["embedding"].as_array().map(Vec::len), Some(8));
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    assert!(answer["usage"]["prompt_tokens"].as_u64().is_some());
    let again = json_of(send(&mock, post("/v1/embeddings", &body, &[])).await).await;
    assert_eq!(answer, again);
}

#[tokio::test]
async fn models_are_listed() {
    let get = |path: &str| {
        Request::get(path)
            .body(llm_proxy_core::empty())
            .expect("valid request")
    };
    let list = json_of(send(&Mock::default(), get("/v1/models")).await).await;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "mock-model");
    assert_eq!(list["data"][0]["object"], "model");
    assert_eq!(list["data"][0]["owned_by"], "mock");
    let mock = Mock::new(MockConfig {
        models: vec!["a".into(), "b".into()],
        ..MockConfig::default()
    });
    let list = json_of(send(&mock, get("/models")).await).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        send(&mock, get("/v1/models/b")).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&mock, get("/v1/models/c")).await.status(),
        StatusCode::NOT_FOUND
    );
    // A request that names no model is answered with the first configured.
    let answer = json_of(
        send(
            &mock,
            post("/chat/completions", &json!({"messages": []}), &[]),
        )
        .await,
    )
    .await;
    assert_eq!(answer["model"], "a");
}

#[tokio::test]
async fn unknown_routes_get_404_and_bad_json_400() {
    let mock = Mock::default();
    let response = send(&mock, post("/v1/nope", &json!({}), &[])).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error = json_of(response).await;
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/nope"))
    );
    let get_chat = Request::get("/v1/chat/completions")
        .body(llm_proxy_core::empty())
        .expect("valid request");
    assert_eq!(send(&mock, get_chat).await.status(), StatusCode::NOT_FOUND);
    let bad = Request::post("/v1/chat/completions")
        .body(full("{not json"))
        .expect("valid request");
    let response = send(&mock, bad).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_of(response).await["error"]["type"],
        "invalid_request_error"
    );
    let no_messages = send(
        &mock,
        post("/v1/chat/completions", &json!({"model": "m"}), &[]),
    )
    .await;
    assert_eq!(no_messages.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(no_messages).await["error"]["param"], "messages");
}

#[tokio::test]
async fn bad_mock_headers_get_400() {
    let mock = Mock::default();
    for (name, value) in [
        ("x-mock-fail", "sometimes"),
        ("x-mock-tokens", "many"),
        ("x-mock-latency-ms", "-1"),
    ] {
        let response = send(
            &mock,
            post("/chat/completions", &chat("hi"), &[(name, value)]),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{name}: {value}"
        );
        let error = json_of(response).await;
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(name))
        );
    }
}

#[tokio::test]
async fn status_failure_answers_error_json() {
    let mock = Mock::new(MockConfig {
        failure: Some(Failure::Status(503)),
        ..MockConfig::default()
    });
    let response = send(&mock, post("/chat/completions", &chat("hi"), &[])).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let error = json_of(response).await;
    assert_eq!(error["error"]["type"], "server_error");
    // The header overrides the configured failure, and `none` lifts it.
    let response = send(
        &mock,
        post("/chat/completions", &chat("hi"), &[("x-mock-fail", "500")]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let response = send(
        &mock,
        post("/chat/completions", &chat("hi"), &[("x-mock-fail", "none")]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_injected_informational_status_is_an_openai_error() {
    // A 1xx is no final answer: hyper would send an empty 500 for it
    // (101: a switch to a protocol nobody asked for).
    for status in ["100", "101", "103", "199"] {
        let response = send(
            &Mock::default(),
            post("/chat/completions", &chat("hi"), &[("x-mock-fail", status)]),
        )
        .await;
        assert_eq!(
            response.status(),
            StatusCode::INTERNAL_SERVER_ERROR,
            "{status}"
        );
        let error = json_of(response).await;
        assert_eq!(error["error"]["code"], "mock_injected_failure", "{status}");
    }
}

#[tokio::test]
async fn rate_limited_sets_retry_after() {
    let mock = Mock::new(MockConfig {
        failure: Some(Failure::RateLimited {
            retry_after_secs: 7,
        }),
        ..MockConfig::default()
    });
    let response = send(&mock, post("/chat/completions", &chat("hi"), &[])).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(
        json_of(response).await["error"]["code"],
        "rate_limit_exceeded"
    );
    let response = send(
        &Mock::default(),
        post("/chat/completions", &chat("hi"), &[("x-mock-fail", "429")]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn drop_mid_stream_fails_the_body_after_n_chunks() {
    let mock = Mock::default();
    let headers = [("x-mock-fail", "drop"), ("x-mock-drop-after", "3")];
    let response = send(
        &mock,
        post("/chat/completions", &streamed_chat("hi"), &headers),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    for _ in 0..3 {
        let frame = body
            .frame()
            .await
            .expect("a frame")
            .expect("not failed yet");
        assert!(frame.is_data());
    }
    let error = body.frame().await.expect("a frame").expect_err("dropped");
    assert!(error.to_string().contains("dropped mid-stream"));
    assert!(body.frame().await.is_none());
    // Not streamed: the head, then a failing body.
    let mock = Mock::new(MockConfig {
        failure: Some(Failure::DropMidStream { after_chunks: 5 }),
        ..MockConfig::default()
    });
    let response = send(&mock, post("/chat/completions", &chat("hi"), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.into_body().collect().await.is_err());
    // A drop after more events than the stream has still fails, at the end.
    let response = send(
        &mock,
        post(
            "/chat/completions",
            &streamed_chat("hi"),
            &[("x-mock-tokens", "1")],
        ),
    )
    .await;
    assert!(response.into_body().collect().await.is_err());
    assert_eq!(mock.stats().cancelled(), 0);
    assert_eq!(mock.stats().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn hang_never_answers_until_dropped() {
    let mock = Mock::default();
    let stats = mock.stats();
    let mut service = mock.clone();
    let pending = service.call(post(
        "/chat/completions",
        &chat("hi"),
        &[("x-mock-fail", "hang")],
    ));
    assert_eq!(stats.in_flight(), 1);
    let waited = tokio::time::timeout(Duration::from_secs(3600), pending).await;
    assert!(waited.is_err(), "a hanging mock answered");
    // The timeout dropped the future.
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(stats.requests(), 1);
}

#[tokio::test]
async fn invalid_sse_is_not_sse_json() {
    let mock = Mock::new(MockConfig {
        failure: Some(Failure::InvalidSse),
        ..MockConfig::default()
    });
    let response = send(&mock, post("/chat/completions", &streamed_chat("hi"), &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let body = frames(response).await.concat();
    let text = String::from_utf8(body).expect("UTF-8");
    assert!(!text.contains("[DONE]"));
    let data = text
        .trim()
        .strip_prefix("data: ")
        .expect("looks like an event");
    assert!(serde_json::from_str::<Value>(data).is_err());
}

#[tokio::test(start_paused = true)]
async fn latency_delays_the_head() {
    let mock = Mock::new(MockConfig {
        latency: Duration::from_millis(250),
        ..MockConfig::default()
    });
    let start = Instant::now();
    send(&mock, post("/chat/completions", &chat("hi"), &[])).await;
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    let start = Instant::now();
    send(
        &mock,
        post(
            "/chat/completions",
            &chat("hi"),
            &[("x-mock-latency-ms", "40")],
        ),
    )
    .await;
    assert_eq!(start.elapsed(), Duration::from_millis(40));
}

#[tokio::test(start_paused = true)]
async fn tokens_per_second_paces_the_stream() {
    let mock = Mock::new(MockConfig {
        tokens_per_second: Some(10.0),
        ..MockConfig::default()
    });
    let start = Instant::now();
    let response = send(
        &mock,
        post(
            "/chat/completions",
            &streamed_chat("hi"),
            &[("x-mock-tokens", "4")],
        ),
    )
    .await;
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    while let Some(frame) = body.frame().await {
        frame.expect("frame");
        arrivals.push(start.elapsed().as_millis());
    }
    // The role chunk at once; a token every 100 ms; finish and [DONE] at once.
    assert_eq!(arrivals, [0, 100, 200, 300, 400, 400, 400]);
}

#[tokio::test(start_paused = true)]
async fn a_pace_too_slow_for_the_clock_waits_instead_of_panicking() {
    // 1e-19 tokens per second: a token every 1e19 s, a valid `Duration`
    // that no `Instant` can be pushed by.
    let mock = Mock::new(MockConfig {
        tokens_per_second: Some(1e-19),
        ..MockConfig::default()
    });
    let response = send(&mock, post("/chat/completions", &streamed_chat("hi"), &[])).await;
    let mut body = response.into_body();
    // The role chunk at once; the first token never comes.
    assert!(body.frame().await.is_some());
    let token = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
    assert!(token.is_err(), "the first token waits");
}

#[tokio::test(start_paused = true)]
async fn dropping_a_streamed_body_counts_as_cancelled() {
    let mock = Mock::new(MockConfig {
        tokens_per_second: Some(1.0),
        ..MockConfig::default()
    });
    let stats = mock.stats();
    let response = send(&mock, post("/chat/completions", &streamed_chat("hi"), &[])).await;
    let mut body = response.into_body();
    assert!(body.frame().await.is_some());
    assert_eq!(stats.in_flight(), 1);
    drop(body);
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(stats.cancelled(), 1);
    // A non-streamed body dropped unread is not a cancelled stream.
    drop(send(&mock, post("/chat/completions", &chat("hi"), &[])).await);
    assert_eq!(stats.cancelled(), 1);
    assert_eq!(stats.in_flight(), 0);
}

#[tokio::test]
async fn stats_record_the_last_request() {
    let mock = Mock::default();
    let stats = mock.stats();
    assert_eq!(stats.last_path(), None);
    send(
        &mock,
        post(
            "/v1/chat/completions?x=1",
            &chat("hi"),
            &[("x-test", "yes")],
        ),
    )
    .await;
    send(&mock, post("/v1/embeddings", &json!({"input": "a"}), &[])).await;
    send(&mock, post("/embeddings", &json!({"input": "b"}), &[])).await;
    assert_eq!(stats.requests(), 3);
    assert_eq!(stats.requests_for("/v1/chat/completions"), 1);
    assert_eq!(stats.requests_for("/chat/completions"), 1);
    assert_eq!(stats.requests_for("/embeddings"), 2);
    assert_eq!(stats.requests_for("/models"), 0);
    assert_eq!(stats.last_path().as_deref(), Some("/embeddings"));
    assert_eq!(
        stats.last_request_body(),
        Some(Bytes::from(json!({"input": "b"}).to_string()))
    );
    send(
        &mock,
        post(
            "/v1/chat/completions?x=1",
            &chat("hi"),
            &[("x-test", "yes")],
        ),
    )
    .await;
    assert_eq!(
        stats.last_path().as_deref(),
        Some("/v1/chat/completions?x=1")
    );
    let headers = stats.last_request_headers().expect("headers");
    assert_eq!(headers["x-test"], "yes");
}

#[test]
fn route_path_strips_v1_and_query() {
    assert_eq!(
        crate::route_path("/v1/chat/completions"),
        "/chat/completions"
    );
    assert_eq!(
        crate::route_path("/chat/completions?a=b"),
        "/chat/completions"
    );
    assert_eq!(crate::route_path("/v1"), "/");
    assert_eq!(crate::route_path("/v1beta/models"), "/v1beta/models");
}

// ---- The Responses API, the Messages API, tool calls and `apis`. ----

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(llm_proxy_core::empty())
        .expect("valid request")
}

/// `(event name, data)` of each SSE event of a Responses or Messages stream,
/// checking that each frame holds exactly one named event whose data is JSON
/// with the same `type`, and that there is no `[DONE]`.
fn named_sse(frames: &[Bytes]) -> Vec<(String, Value)> {
    frames
        .iter()
        .map(|frame| {
            let text = std::str::from_utf8(frame).expect("UTF-8 event");
            assert!(!text.contains("[DONE]"), "{text}");
            let (name, data) = text
                .strip_prefix("event: ")
                .and_then(|rest| rest.strip_suffix("\n\n"))
                .and_then(|rest| rest.split_once("\ndata: "))
                .expect("one `event:` and `data:` event per frame");
            let data: Value = serde_json::from_str(data).expect("JSON event");
            assert_eq!(data["type"], name, "{text}");
            (name.to_owned(), data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}

fn respond(input: Value) -> Value {
    json!({"model": "gpt-test", "input": input})
}

const ANTHROPIC: [(&str, &str); 2] = [
    ("anthropic-version", "2023-06-01"),
    ("x-api-key", "sk-ant-test"),
];

fn message(content: Value) -> Value {
    json!({
        "model": "claude-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": content}],
    })
}

fn weather_tools_chat() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
}

#[tokio::test]
async fn responses_answer_a_whole_response() {
    let mock = Mock::default();
    let body = respond(json!("hello"));
    let response = send(&mock, post("/v1/responses", &body, &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let answer = json_of(response).await;
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["created_at"], 1_700_000_000);
    assert_eq!(answer["status"], "completed");
    assert_eq!(answer["model"], "gpt-test");
    assert_eq!(answer["previous_response_id"], Value::Null);
    assert_eq!(answer["store"], true);
    assert_eq!(answer["incomplete_details"], Value::Null);
    assert!(
        answer["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("resp_"))
    );
    let item = &answer["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["status"], "completed");
    assert!(item["id"].as_str().is_some_and(|id| id.starts_with("msg_")));
    assert_eq!(item["content"][0]["type"], "output_text");
    assert_eq!(item["content"][0]["annotations"], json!([]));
    let text = item["content"][0]["text"].as_str().expect("text");
    assert_eq!(text.split(' ').count(), 8);
    let usage = &answer["usage"];
    let input_tokens = body.to_string().len().div_ceil(4) as u64;
    assert_eq!(usage["input_tokens"], input_tokens);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(usage["output_tokens"], 8);
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 0);
    assert_eq!(usage["total_tokens"], input_tokens + 8);
    // The same request again: the same words, a new id.
    let again = json_of(send(&mock, post("/responses", &body, &[])).await).await;
    assert_eq!(again["output"][0]["content"][0]["text"], text);
    assert_ne!(again["id"], answer["id"]);
    assert_ne!(again["output"][0]["id"], item["id"]);
    // A fresh mock gives the first request the same id: ids are deterministic.
    let fresh = json_of(send(&Mock::default(), post("/responses", &body, &[])).await).await;
    assert_eq!(fresh, answer);
    // The same conversation gets the same words as chat, and message items
    // the same as a string input.
    let chat = json_of(send(&mock, post("/chat/completions", &chat("hello"), &[])).await).await;
    assert_eq!(chat["choices"][0]["message"]["content"], text);
    let items = respond(json!([
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    ]));
    let answer = json_of(send(&mock, post("/responses", &items, &[])).await).await;
    assert_eq!(answer["output"][0]["content"][0]["text"], text);
    // The fresh mock counted the other.
    assert_eq!(mock.stats().requests_for("/responses"), 3);
}

#[tokio::test]
async fn responses_stream_events_in_order() {
    let mock = Mock::default();
    let mut body = respond(json!("hello"));
    body["stream"] = json!(true);
    let response = send(
        &mock,
        post("/v1/responses", &body, &[("x-mock-tokens", "3")]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = named_sse(&frames(response).await);
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (index, (_, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], index);
    }
    let created = &events[0].1["response"];
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["usage"], Value::Null);
    assert_eq!(created["output"], json!([]));
    let added = &events[2].1;
    assert_eq!(added["output_index"], 0);
    assert_eq!(added["item"]["status"], "in_progress");
    assert_eq!(added["item"]["content"], json!([]));
    let item_id = added["item"]["id"].clone();
    assert_eq!(events[3].1["part"]["text"], "");
    let deltas: String = events[4..7]
        .iter()
        .map(|(_, data)| {
            assert_eq!(data["item_id"], item_id);
            assert_eq!(data["output_index"], 0);
            assert_eq!(data["content_index"], 0);
            data["delta"].as_str().expect("delta")
        })
        .collect();
    assert_eq!(events[7].1["text"], deltas.as_str());
    assert_eq!(events[8].1["part"]["text"], deltas.as_str());
    assert_eq!(events[9].1["item"]["status"], "completed");
    let completed = &events[10].1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["usage"]["output_tokens"], 3);
    assert_eq!(completed["output"][0]["id"], item_id);
    // The streamed response is remembered whole.
    let id = completed["id"].as_str().expect("id");
    let stored =
        json_of(send(&mock, request("GET", &format!("/v1/responses/{id}"), &[])).await).await;
    assert_eq!(&stored, completed);
    let mut whole_body = respond(json!("hello"));
    whole_body["max_output_tokens"] = json!(100);
    let whole = json_of(
        send(
            &mock,
            post("/responses", &whole_body, &[("x-mock-tokens", "3")]),
        )
        .await,
    )
    .await;
    assert_eq!(whole["output"][0]["content"][0]["text"], deltas.as_str());
    assert_eq!(mock.stats().in_flight(), 0);
    assert_eq!(mock.stats().cancelled(), 0);
}

#[tokio::test]
async fn responses_max_output_tokens_makes_them_incomplete() {
    let mock = Mock::default();
    let mut body = respond(json!("hello"));
    body["max_output_tokens"] = json!(2);
    let answer = json_of(send(&mock, post("/responses", &body, &[])).await).await;
    assert_eq!(answer["status"], "incomplete");
    assert_eq!(
        answer["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(answer["output"][0]["status"], "incomplete");
    assert_eq!(answer["usage"]["output_tokens"], 2);
    assert_eq!(answer["max_output_tokens"], 2);
    body["stream"] = json!(true);
    let events = named_sse(&frames(send(&mock, post("/responses", &body, &[])).await).await);
    let (last, data) = events.last().expect("events");
    assert_eq!(last, "response.incomplete");
    assert_eq!(data["response"]["status"], "incomplete");
    assert_eq!(
        events
            .iter()
            .filter(|(name, _)| name == "response.output_text.delta")
            .count(),
        2
    );
}

#[tokio::test]
async fn responses_are_remembered_by_id() {
    let mock = Mock::default();
    let first = json_of(send(&mock, post("/responses", &respond(json!("one")), &[])).await).await;
    let id = first["id"].as_str().expect("id").to_owned();
    let get = |path: String| request("GET", &path, &[]);
    let stored = json_of(send(&mock, get(format!("/v1/responses/{id}"))).await).await;
    assert_eq!(stored, first);
    let items = json_of(send(&mock, get(format!("/v1/responses/{id}/input_items"))).await).await;
    assert_eq!(
        items,
        json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false})
    );
    // A follow-up names it.
    let mut follow = respond(json!("two"));
    follow["previous_response_id"] = json!(id);
    let second = json_of(send(&mock, post("/responses", &follow, &[])).await).await;
    assert_eq!(second["previous_response_id"], id.as_str());
    // An unknown previous response.
    follow["previous_response_id"] = json!("resp_unknown");
    let response = send(&mock, post("/responses", &follow, &[])).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        json_of(response).await,
        json!({"error": {
            "message": "Previous response with id 'resp_unknown' not found.",
            "type": "invalid_request_error",
            "param": "previous_response_id",
            "code": "previous_response_not_found",
        }})
    );
    // Cancel, then delete.
    let cancel = Request::post(format!("/v1/responses/{id}/cancel"))
        .body(llm_proxy_core::empty())
        .expect("valid request");
    let cancelled = json_of(send(&mock, cancel).await).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["id"], id.as_str());
    let deleted = json_of(
        send(
            &mock,
            request("DELETE", &format!("/v1/responses/{id}"), &[]),
        )
        .await,
    )
    .await;
    assert_eq!(
        deleted,
        json!({"id": id, "object": "response", "deleted": true})
    );
    for path in [
        format!("/v1/responses/{id}"),
        format!("/v1/responses/{id}/input_items"),
    ] {
        let response = send(&mock, get(path)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            json_of(response).await["error"]["type"],
            "invalid_request_error"
        );
    }
    let response = send(
        &mock,
        request("DELETE", &format!("/v1/responses/{id}"), &[]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // `"store": false` is not remembered.
    let mut unstored = respond(json!("three"));
    unstored["store"] = json!(false);
    let answer = json_of(send(&mock, post("/responses", &unstored, &[])).await).await;
    assert_eq!(answer["store"], false);
    let id = answer["id"].as_str().expect("id");
    let response = send(&mock, get(format!("/v1/responses/{id}"))).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn conversations_are_made_read_deleted_and_named_by_responses() {
    let mock = Mock::default();
    let body = json!({"metadata": {"topic": "demo"}});
    let made = json_of(send(&mock, post("/v1/conversations", &body, &[])).await).await;
    let id = made["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("conv_"), "{made}");
    assert_eq!(made["object"], "conversation");
    assert_eq!(made["metadata"], json!({"topic": "demo"}));
    // An empty body makes one too.
    let empty = send(&mock, request("POST", "/v1/conversations", &[])).await;
    assert_eq!(empty.status(), StatusCode::OK);
    let get = |path: String| request("GET", &path, &[]);
    assert_eq!(
        json_of(send(&mock, get(format!("/v1/conversations/{id}"))).await).await,
        made
    );
    let items = json_of(send(&mock, get(format!("/v1/conversations/{id}/items"))).await).await;
    assert_eq!(items["object"], "list");
    // A response adds to it, named by id or by object.
    for named in [json!(id), json!({"id": id})] {
        let mut turn = respond(json!("hi"));
        turn["conversation"] = named;
        let answer = json_of(send(&mock, post("/responses", &turn, &[])).await).await;
        assert_eq!(answer["conversation"], json!({"id": id}));
    }
    let mut turn = respond(json!("hi"));
    turn["conversation"] = json!("conv_unknown");
    let response = send(&mock, post("/responses", &turn, &[])).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        json_of(response).await["error"],
        json!({
            "message": "Conversation with id 'conv_unknown' not found.",
            "type": "invalid_request_error",
            "param": "conversation",
            "code": null,
        })
    );
    turn["conversation"] = json!(5);
    let response = send(&mock, post("/responses", &turn, &[])).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    // Deleted, it is gone.
    let path = format!("/v1/conversations/{id}");
    let deleted = json_of(send(&mock, request("DELETE", &path, &[])).await).await;
    assert_eq!(
        deleted,
        json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    for path in [path.clone(), format!("{path}/items")] {
        let response = send(&mock, get(path)).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn responses_count_input_tokens_and_compact() {
    let mock = Mock::default();
    let body = respond(json!("hello"));
    let count = json_of(send(&mock, post("/v1/responses/input_tokens", &body, &[])).await).await;
    assert_eq!(
        count,
        json!({
            "object": "response.input_tokens",
            "input_tokens": body.to_string().len().div_ceil(4),
        })
    );
    let compacted = json_of(send(&mock, post("/v1/responses/compact", &body, &[])).await).await;
    assert_eq!(compacted["object"], "response.compaction");
    assert!(
        compacted["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("resp_"))
    );
    assert_eq!(compacted["output"][0]["type"], "compaction");
    assert!(compacted["output"][0]["encrypted_content"].is_string());
    assert!(compacted["usage"]["total_tokens"].as_u64().is_some());
    let bad = send(&mock, post("/v1/responses", &json!({"input": 7}), &[])).await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(json_of(bad).await["error"]["param"], "input");
}

#[tokio::test]
async fn responses_call_functions_whole_and_streamed() {
    let mock = Mock::default();
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": {}}]);
    let mut body = respond(json!("What's the weather in Paris?"));
    body["tools"] = tools.clone();
    let answer = json_of(send(&mock, post("/responses", &body, &[])).await).await;
    let call = &answer["output"][0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(call["status"], "completed");
    assert!(
        call["call_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );
    assert!(call["id"].as_str().is_some_and(|id| id.starts_with("fc_")));
    assert_eq!(answer["tools"], tools);
    body["stream"] = json!(true);
    let events = named_sse(&frames(send(&mock, post("/responses", &body, &[])).await).await);
    let names = names(&events);
    assert_eq!(
        names[..3],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added"
        ]
    );
    assert_eq!(events[2].1["item"]["arguments"], "");
    let arguments: String = events
        .iter()
        .filter(|(name, _)| name == "response.function_call_arguments.delta")
        .map(|(_, data)| data["delta"].as_str().expect("delta"))
        .collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    assert_eq!(
        names[names.len() - 3..],
        [
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    // The function's output gets text.
    let mut output = respond(json!([
        {"role": "user", "content": "What's the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]));
    output["tools"] = tools;
    let answer = json_of(send(&mock, post("/responses", &output, &[])).await).await;
    assert_eq!(answer["output"][0]["type"], "message");
}

#[tokio::test]
async fn responses_failures_and_errors_are_openai_shaped() {
    let mock = Mock::default();
    let mut body = respond(json!("hello"));
    let response = send(&mock, post("/responses", &body, &[("x-mock-fail", "500")])).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(json_of(response).await["error"]["type"], "server_error");
    let response = send(&mock, post("/responses", &body, &[("x-mock-fail", "429")])).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    body["stream"] = json!(true);
    let headers = [("x-mock-fail", "drop"), ("x-mock-drop-after", "3")];
    let response = send(&mock, post("/responses", &body, &headers)).await;
    let mut stream = response.into_body();
    for _ in 0..3 {
        let frame = stream.frame().await.expect("a frame").expect("not yet");
        assert!(frame.is_data());
    }
    assert!(stream.frame().await.expect("a frame").is_err());
    let response = send(
        &mock,
        post("/responses", &body, &[("x-mock-fail", "invalid-sse")]),
    )
    .await;
    let text = String::from_utf8(frames(response).await.concat()).expect("UTF-8");
    assert!(serde_json::from_str::<Value>(text.trim().trim_start_matches("data: ")).is_err());
    let response = send(&mock, request("GET", "/v1/responses/a/b/c", &[])).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(json_of(response).await["error"]["message"].is_string());
}

#[tokio::test]
async fn messages_answer_like_anthropic() {
    let mock = Mock::default();
    let body = message(json!("hello"));
    let response = send(&mock, post("/v1/messages", &body, &ANTHROPIC)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = json_of(response).await;
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["role"], "assistant");
    assert_eq!(answer["model"], "claude-test");
    assert!(
        answer["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["stop_sequence"], Value::Null);
    assert_eq!(answer["content"][0]["type"], "text");
    let text = answer["content"][0]["text"].as_str().expect("text");
    let input_tokens = body.to_string().len().div_ceil(4) as u64;
    assert_eq!(answer["usage"]["input_tokens"], input_tokens);
    assert_eq!(answer["usage"]["output_tokens"], 8);
    // The same conversation gets the same words as chat.
    let chat = json_of(send(&mock, post("/chat/completions", &chat("hello"), &[])).await).await;
    assert_eq!(chat["choices"][0]["message"]["content"], text);
    // The headers arrive as sent.
    let seen = mock.stats().last_request_headers().expect("headers");
    assert!(!seen.contains_key("anthropic-version"));
    send(
        &mock,
        post(
            "/v1/messages",
            &body,
            &[
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "tools-2024-04-04"),
                ("x-api-key", "sk-ant"),
            ],
        ),
    )
    .await;
    let seen = mock.stats().last_request_headers().expect("headers");
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(seen["anthropic-beta"], "tools-2024-04-04");
    assert_eq!(seen["x-api-key"], "sk-ant");
    // max_tokens caps.
    let mut capped = body.clone();
    capped["max_tokens"] = json!(3);
    let answer = json_of(send(&mock, post("/messages", &capped, &ANTHROPIC)).await).await;
    assert_eq!(answer["stop_reason"], "max_tokens");
    assert_eq!(answer["usage"]["output_tokens"], 3);
    assert_eq!(mock.stats().requests_for("/v1/messages"), 3);
}

#[tokio::test]
async fn messages_reject_what_anthropic_rejects() {
    let mock = Mock::default();
    let body = message(json!("hello"));
    let check = |response: Response<Body>, status: StatusCode, kind: &'static str| async move {
        assert_eq!(response.status(), status);
        let error = json_of(response).await;
        assert_eq!(error["type"], "error", "{error}");
        assert_eq!(error["error"]["type"], kind, "{error}");
        error["error"]["message"]
            .as_str()
            .expect("message")
            .to_owned()
    };
    let no_version = send(&mock, post("/messages", &body, &[])).await;
    let message = check(no_version, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    assert!(message.contains("anthropic-version"), "{message}");
    let mut no_max = body.clone();
    no_max.as_object_mut().expect("object").remove("max_tokens");
    let response = send(&mock, post("/messages", &no_max, &ANTHROPIC)).await;
    let message = check(response, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    assert!(message.contains("max_tokens"), "{message}");
    let bad_json = Request::post("/v1/messages")
        .header("anthropic-version", "2023-06-01")
        .body(full("{not json"))
        .expect("valid request");
    check(
        send(&mock, bad_json).await,
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
    )
    .await;
    let bad_header = send(
        &mock,
        post("/messages", &body, &[("x-mock-tokens", "many")]),
    )
    .await;
    check(bad_header, StatusCode::BAD_REQUEST, "invalid_request_error").await;
    let get = send(&mock, request("GET", "/v1/messages", &ANTHROPIC)).await;
    check(get, StatusCode::NOT_FOUND, "not_found_error").await;
}

#[tokio::test]
async fn messages_stream_events_in_order() {
    let mock = Mock::default();
    let mut body = message(json!("hello"));
    body["stream"] = json!(true);
    let mut headers = ANTHROPIC.to_vec();
    headers.push(("x-mock-tokens", "3"));
    let response = send(&mock, post("/v1/messages", &body, &headers)).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = named_sse(&frames(response).await);
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start = &events[0].1["message"];
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["output_tokens"], 1);
    let input_tokens = body.to_string().len().div_ceil(4) as u64;
    assert_eq!(start["usage"]["input_tokens"], input_tokens);
    assert_eq!(
        events[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    let text: String = events[3..6]
        .iter()
        .map(|(_, data)| {
            assert_eq!(data["index"], 0);
            assert_eq!(data["delta"]["type"], "text_delta");
            data["delta"]["text"].as_str().expect("text")
        })
        .collect();
    assert_eq!(
        events[6].1,
        json!({"type": "content_block_stop", "index": 0})
    );
    assert_eq!(
        events[7].1,
        json!({
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": 3},
        })
    );
    assert_eq!(events[8].1, json!({"type": "message_stop"}));
    body["stream"] = json!(false);
    let whole = json_of(send(&mock, post("/v1/messages", &body, &headers)).await).await;
    assert_eq!(whole["content"][0]["text"], text.as_str());
    assert_eq!(whole["id"], start["id"]);
}

#[tokio::test]
async fn messages_use_tools_and_read_their_results() {
    let mock = Mock::default();
    let tools = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let mut body = message(json!("What's the weather in Paris?"));
    body["tools"] = tools.clone();
    let answer = json_of(send(&mock, post("/messages", &body, &ANTHROPIC)).await).await;
    assert_eq!(answer["stop_reason"], "tool_use");
    let block = &answer["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "get_weather");
    assert_eq!(block["input"], json!({"city": "Paris"}));
    let id = block["id"].as_str().expect("id");
    assert!(id.starts_with("toolu_"));
    // Streamed: the block starts with input {}, then JSON pieces.
    body["stream"] = json!(true);
    let events = named_sse(&frames(send(&mock, post("/messages", &body, &ANTHROPIC)).await).await);
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "tool_use", "id": id, "name": "get_weather", "input": {}})
    );
    let partial: String = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, data)| {
            assert_eq!(data["delta"]["type"], "input_json_delta");
            data["delta"]["partial_json"].as_str().expect("piece")
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).expect("JSON input"),
        json!({"city": "Paris"})
    );
    let delta = events
        .iter()
        .find(|(name, _)| name == "message_delta")
        .expect("message_delta");
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
    // The tool's result gets text.
    let round_trip = json!({
        "model": "claude-test",
        "max_tokens": 100,
        "tools": tools,
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": [block]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": id, "content": "sunny"},
                {"type": "text", "text": "and the weather tomorrow?"},
            ]},
        ],
    });
    let answer = json_of(send(&mock, post("/messages", &round_trip, &ANTHROPIC)).await).await;
    assert_eq!(answer["stop_reason"], "end_turn");
    assert_eq!(answer["content"][0]["type"], "text");
    // Without tools, the weather is just words.
    let answer = json_of(
        send(
            &mock,
            post("/messages", &message(json!("weather?")), &ANTHROPIC),
        )
        .await,
    )
    .await;
    assert_eq!(answer["content"][0]["type"], "text");
}

#[tokio::test]
async fn messages_count_tokens() {
    let mock = Mock::default();
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]});
    let count =
        json_of(send(&mock, post("/v1/messages/count_tokens", &body, &ANTHROPIC)).await).await;
    assert_eq!(
        count,
        json!({"input_tokens": body.to_string().len().div_ceil(4)})
    );
    let response = send(&mock, post("/v1/messages/count_tokens", &body, &[])).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(mock.stats().requests_for("/messages/count_tokens"), 2);
}

#[tokio::test]
async fn messages_failures_are_anthropic_shaped() {
    let mock = Mock::default();
    let mut body = message(json!("hello"));
    for (fail, status, kind) in [
        ("500", 500, "api_error"),
        ("529", 529, "overloaded_error"),
        ("429", 429, "rate_limit_error"),
        ("404", 404, "not_found_error"),
        ("401", 401, "authentication_error"),
    ] {
        let response = send(&mock, post("/messages", &body, &[("x-mock-fail", fail)])).await;
        assert_eq!(response.status().as_u16(), status);
        if status == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        let error = json_of(response).await;
        assert_eq!(error["type"], "error");
        assert_eq!(error["error"]["type"], kind);
        assert!(error["error"]["message"].is_string());
    }
    body["stream"] = json!(true);
    let mut headers = ANTHROPIC.to_vec();
    headers.push(("x-mock-fail", "drop"));
    let response = send(&mock, post("/messages", &body, &headers)).await;
    let mut stream = response.into_body();
    for _ in 0..2 {
        stream.frame().await.expect("a frame").expect("not yet");
    }
    assert!(stream.frame().await.expect("a frame").is_err());
    drop(stream);
    let response = send(
        &mock,
        post("/messages", &body, &[("x-mock-fail", "invalid-sse")]),
    )
    .await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    drop(response);
    assert_eq!(mock.stats().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn tokens_per_second_paces_responses_and_messages() {
    let mock = Mock::new(MockConfig {
        tokens_per_second: Some(10.0),
        ..MockConfig::default()
    });
    let mut responses = respond(json!("hi"));
    responses["stream"] = json!(true);
    let mut messages = message(json!("hi"));
    messages["stream"] = json!(true);
    for (path, body, expected) in [
        // created, in_progress, item added, part added; 2 deltas; 4 to finish.
        (
            "/responses",
            responses,
            vec![0, 0, 0, 0, 100, 200, 200, 200, 200, 200],
        ),
        // message_start, block start, ping; 2 deltas; 3 to finish.
        (
            "/messages",
            messages,
            vec![0, 0, 0, 100, 200, 200, 200, 200],
        ),
    ] {
        let mut headers = ANTHROPIC.to_vec();
        headers.push(("x-mock-tokens", "2"));
        let start = Instant::now();
        let response = send(&mock, post(path, &body, &headers)).await;
        let mut body = response.into_body();
        let mut arrivals = Vec::new();
        while let Some(frame) = body.frame().await {
            frame.expect("frame");
            arrivals.push(start.elapsed().as_millis() as u64);
        }
        assert_eq!(arrivals, expected, "{path}");
    }
}

#[tokio::test]
async fn chat_calls_tools_whole_and_streamed() {
    let mock = Mock::default();
    let mut body = chat("What's the weather in Paris?");
    body["tools"] = weather_tools_chat();
    let answer = json_of(send(&mock, post("/chat/completions", &body, &[])).await).await;
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(answer["usage"]["completion_tokens"], 4);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = sse_json(&frames(send(&mock, post("/chat/completions", &body, &[])).await).await);
    let first = &events[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(first["tool_calls"][0]["index"], 0);
    assert_eq!(first["tool_calls"][0]["id"], call["id"]);
    assert_eq!(first["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(first["tool_calls"][0]["function"]["arguments"], "");
    let arguments: String = events[1..5]
        .iter()
        .map(|e| {
            let delta = &e["choices"][0]["delta"]["tool_calls"][0];
            assert_eq!(delta["index"], 0);
            delta["function"]["arguments"].as_str().expect("arguments")
        })
        .collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    assert_eq!(events[5]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(events[6]["usage"]["completion_tokens"], 4);
    assert_eq!(events.len(), 7);
    // The tool's answer gets text.
    let round_trip = json!({
        "model": "gpt-test",
        "tools": weather_tools_chat(),
        "messages": [
            {"role": "user", "content": "What's the weather in Paris?"},
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
    });
    let answer = json_of(send(&mock, post("/chat/completions", &round_trip, &[])).await).await;
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");
    assert!(answer["choices"][0]["message"]["content"].is_string());
}

#[tokio::test]
async fn apis_restrict_the_routes_served() {
    let chat_only = Mock::new(MockConfig {
        apis: Some(vec![MockApi::ChatCompletions]),
        ..MockConfig::default()
    });
    let ok = send(&chat_only, post("/v1/chat/completions", &chat("hi"), &[])).await;
    assert_eq!(ok.status(), StatusCode::OK);
    // Not served: 404 in the API's error format, whatever the failure asked.
    let response = send(
        &chat_only,
        post(
            "/v1/responses",
            &respond(json!("hi")),
            &[("x-mock-fail", "500")],
        ),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error = json_of(response).await;
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/responses"))
    );
    let response = send(
        &chat_only,
        post("/v1/messages", &message(json!("hi")), &ANTHROPIC),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error = json_of(response).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "not_found_error");
    for path in [
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses/input_tokens",
    ] {
        let response = send(
            &chat_only,
            post(path, &json!({"input": "a", "prompt": "a"}), &[]),
        )
        .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let models = send(&chat_only, request("GET", "/v1/models", &[])).await;
    assert_eq!(json_of(models).await["object"], "list");
    let stats = chat_only.stats();
    assert_eq!(stats.requests_for("/chat/completions"), 1);
    assert_eq!(stats.requests_for("/responses"), 1);
    assert_eq!(stats.requests_for("/messages"), 1);

    let anthropic_only = Mock::new(MockConfig {
        apis: Some(vec![MockApi::Messages]),
        models: vec!["claude-test".into()],
        ..MockConfig::default()
    });
    let ok = send(
        &anthropic_only,
        post("/v1/messages", &message(json!("hi")), &ANTHROPIC),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let response = send(
        &anthropic_only,
        post("/v1/chat/completions", &chat("hi"), &[]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(response).await["error"]["code"], "not_found");
    let models =
        json_of(send(&anthropic_only, request("GET", "/v1/models", &ANTHROPIC)).await).await;
    assert_eq!(models["data"][0]["type"], "model");
    assert_eq!(models["data"][0]["id"], "claude-test");
    assert_eq!(models["has_more"], false);
    let model = json_of(
        send(
            &anthropic_only,
            request("GET", "/v1/models/claude-test", &ANTHROPIC),
        )
        .await,
    )
    .await;
    assert_eq!(model["display_name"], "claude-test");
    let response = send(&anthropic_only, request("GET", "/v1/nowhere", &[])).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(response).await["error"]["type"], "not_found_error");

    let responses_only = Mock::new(MockConfig {
        apis: Some(vec![MockApi::Responses]),
        ..MockConfig::default()
    });
    let ok = send(
        &responses_only,
        post("/v1/responses", &respond(json!("hi")), &[]),
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    let response = send(
        &responses_only,
        post("/v1/chat/completions", &chat("hi"), &[]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[test]
fn mock_api_names_round_trip() {
    for api in MockApi::ALL {
        assert_eq!(api.name().parse::<MockApi>(), Ok(api));
        assert_eq!(api.to_string(), api.name());
    }
    assert_eq!("chat".parse::<MockApi>(), Ok(MockApi::ChatCompletions));
    assert_eq!(
        "chat_completions".parse::<MockApi>(),
        Ok(MockApi::ChatCompletions)
    );
    assert_eq!("Anthropic".parse::<MockApi>(), Ok(MockApi::Messages));
    assert!("gemini".parse::<MockApi>().is_err());
}
