//! The mock's behaviour through its `Service`, one request at a time.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, full};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::{Failure, Mock, MockConfig};

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
