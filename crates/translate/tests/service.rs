//! The layer as a service: native passthrough, refusals, upstream errors in
//! the client's shape, and streams that break.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Answer, call};
use llm_proxy_core::{Api, Error};
use llm_proxy_translate::{Protocol, TranslateConfig};
use serde_json::{Value, json};

fn chat_only() -> TranslateConfig {
    TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions])
}

fn anthropic() -> TranslateConfig {
    TranslateConfig::new(Protocol::Anthropic, [])
}

fn messages_request(stream: bool) -> Value {
    json!({"model": "m", "max_tokens": 10, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

fn chat_request(stream: bool) -> Value {
    json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

const CHUNK: &str =
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";

#[tokio::test]
async fn native_requests_pass_untouched() {
    let request = json!({"model": "m", "messages": [], "weird": {"kept": true}});
    let answer = Answer::json(200, r#"{"any":"thing"}"#);
    let (seen, got) = call(chat_only(), "/v1/chat/completions?x=1", &request, answer).await;
    let seen = seen.unwrap();
    assert_eq!(seen.path, "/v1/chat/completions?x=1");
    assert_eq!(seen.json, request);
    assert_eq!(
        seen.headers["accept-encoding"], "gzip",
        "native requests keep every header"
    );
    assert_eq!(got.unwrap().body, r#"{"any":"thing"}"#);
}

#[tokio::test]
async fn what_cannot_be_served_is_refused_before_the_upstream() {
    let (seen, got) = call(
        anthropic(),
        "/v1/embeddings",
        &json!({"model": "m", "input": "x"}),
        Answer::json(200, "{}"),
    )
    .await;
    assert!(seen.is_none());
    let Err(Error::ApiNotServed(why)) = got else {
        panic!("expected api_not_served")
    };
    assert!(
        why.contains("embeddings") && why.contains("messages"),
        "{why}"
    );

    let (seen, got) = call(
        chat_only(),
        "/v1/messages/count_tokens",
        &messages_request(false),
        Answer::json(200, "{}"),
    )
    .await;
    assert!(seen.is_none());
    assert!(matches!(got, Err(Error::ApiNotServed(_))));

    let request = json!({"model": "m", "n": 3, "messages": [{"role": "user", "content": "hi"}]});
    let (seen, got) = call(
        anthropic(),
        "/v1/chat/completions",
        &request,
        Answer::json(200, "{}"),
    )
    .await;
    assert!(seen.is_none());
    let Err(error @ Error::UnsupportedParameter { .. }) = got else {
        panic!("expected a refusal")
    };
    assert_eq!(error.status(), 400);
    assert_eq!(error.param(), Some("n"));
    assert_eq!(error.code(), "unsupported_parameter");
}

#[tokio::test]
async fn the_client_anthropic_version_is_kept() {
    let (seen, _) = call(
        anthropic(),
        "/v1/chat/completions",
        &chat_request(false),
        Answer::json(200, "{}"),
    )
    .await;
    assert_eq!(seen.unwrap().headers["anthropic-version"], "2023-06-01");
}

#[tokio::test]
async fn upstream_errors_take_the_clients_shape_and_keep_their_status() {
    let body = r#"{"error":{"message":"Rate limit reached","type":"rate_limit_error","param":null,"code":"rate_limit_exceeded"}}"#;
    let (_, got) = call(
        chat_only(),
        "/v1/messages",
        &messages_request(true),
        Answer::json(429, body),
    )
    .await;
    let got = got.unwrap();
    assert_eq!(got.status, 429);
    assert_eq!(
        got.json(),
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
    );
    assert_eq!(
        got.headers["content-length"],
        got.body.len().to_string().as_str()
    );

    let body = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let (_, got) = call(
        anthropic(),
        "/v1/chat/completions",
        &chat_request(false),
        Answer::json(529, body),
    )
    .await;
    let got = got.unwrap();
    assert_eq!(got.status.as_u16(), 529);
    assert_eq!(got.json()["error"]["message"], "Overloaded");
    assert_eq!(got.json()["error"]["type"], "overloaded_error");

    // Responses over chat: both OpenAI-shaped, passed as they are.
    let body = r#"{"error":{"message":"bad input","type":"invalid_request_error","param":"input","code":null}}"#;
    let (_, got) = call(
        chat_only(),
        "/v1/responses",
        &json!({"model": "m", "input": "x"}),
        Answer::json(400, body),
    )
    .await;
    let got = got.unwrap();
    assert_eq!((got.status.as_u16(), &got.body[..]), (400, body.as_bytes()));
    // ... unless the body is not JSON: an OpenAI error carrying its text.
    let (_, got) = call(
        chat_only(),
        "/v1/responses",
        &json!({"model": "m", "input": "x"}),
        Answer::json(500, "oops"),
    )
    .await;
    let got = got.unwrap();
    assert_eq!(got.status.as_u16(), 500);
    assert_eq!(
        got.json(),
        json!({"error": {"message": "oops", "type": "upstream_error", "param": null, "code": null}})
    );
}

#[tokio::test]
async fn an_error_body_too_long_or_broken_off_keeps_its_start() {
    let long = format!(
        r#"{{"error":{{"message":"context too long: {}"}}}}"#,
        "x".repeat(100 << 10)
    );
    let broken = Answer {
        status: 400,
        content_type: "application/json",
        frames: vec![
            Ok(r#"{"error":{"message":"bad"#.into()),
            Err("connection reset".into()),
        ],
    };
    let cases = [
        (
            "/v1/messages",
            messages_request(false),
            Answer::json(413, long.clone()),
        ),
        ("/v1/messages", messages_request(false), broken.clone()),
        (
            "/v1/responses",
            json!({"model": "m", "input": "x"}),
            Answer::json(413, long),
        ),
        ("/v1/responses", json!({"model": "m", "input": "x"}), broken),
    ];
    for (path, request, answer) in cases {
        let status = answer.status;
        let (_, got) = call(chat_only(), path, &request, answer).await;
        let got = got.unwrap();
        assert_eq!(got.status.as_u16(), status, "{path}");
        assert_eq!(got.headers["content-type"], "application/json");
        let json = got.json();
        let message = json["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(r#"{"error":{"message":""#),
            "{path}: {message}"
        );
        assert!(message.len() < 1024, "{path}: the message is bounded");
        if path == "/v1/messages" {
            assert_eq!(json["type"], "error", "Anthropic's shape");
        } else {
            assert_eq!(json["error"]["type"], "upstream_error", "OpenAI's shape");
            assert!(json["error"].get("code").is_some());
        }
    }
}

#[tokio::test]
async fn an_answer_that_is_not_json_is_a_bad_gateway() {
    let (_, got) = call(
        chat_only(),
        "/v1/messages",
        &messages_request(false),
        Answer::json(200, "<html>"),
    )
    .await;
    let Err(Error::BadGateway { reason, .. }) = got else {
        panic!("expected bad_gateway")
    };
    assert!(reason.contains("not JSON"), "{reason}");
}

#[tokio::test]
async fn a_broken_chat_stream_ends_with_the_anthropic_error_event() {
    let answer = Answer {
        status: 200,
        content_type: "text/event-stream",
        frames: vec![Ok(CHUNK.into()), Err("connection reset".into())],
    };
    let (_, got) = call(chat_only(), "/v1/messages", &messages_request(true), answer).await;
    let got = got.unwrap();
    assert!(got.broke, "the body fails so the connection closes");
    let events = got.events();
    let (name, last) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    assert_eq!(last["error"]["type"], "api_error");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("connection reset")
    );
    assert!(
        events.iter().all(|(_, v)| v["type"] != "message_stop"),
        "never a fake clean end"
    );
    assert_eq!(
        events[2].1["delta"]["text"], "Hi",
        "what came before is delivered"
    );
}

#[tokio::test]
async fn the_upstream_clients_interrupt_event_is_translated() {
    // What llm-proxy-upstream appends to a chat stream cut mid-way.
    let interrupt = "data: {\"error\":{\"message\":\"upstream `a`: ended without [DONE]\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"stream_interrupted\"}}\n\n";
    let answer = Answer {
        status: 200,
        content_type: "text/event-stream",
        frames: vec![Ok(CHUNK.into()), Ok(interrupt.into()), Err("cut".into())],
    };
    let (_, got) = call(
        chat_only(),
        "/v1/responses",
        &json!({"model": "m", "input": "x", "stream": true}),
        answer,
    )
    .await;
    let got = got.unwrap();
    assert!(got.broke);
    let mut events = got.events();
    let (name, last) = events.pop().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    assert_eq!(last["code"], "stream_interrupted");
    assert_eq!(last["message"], "upstream `a`: ended without [DONE]");
    // Numbered as every other event: the one after the last before it.
    let before = &events.last().unwrap().1["sequence_number"];
    assert_eq!(
        last["sequence_number"],
        before.as_u64().unwrap() + 1,
        "{last}"
    );
}

#[tokio::test]
async fn streams_that_end_early_or_report_errors_fail() {
    // A chat stream without [DONE], for a Messages client.
    let (_, got) = call(
        chat_only(),
        "/v1/messages",
        &messages_request(true),
        Answer::sse(CHUNK),
    )
    .await;
    let got = got.unwrap();
    assert!(got.broke);
    assert_eq!(got.events().last().unwrap().0.as_deref(), Some("error"));

    // An Anthropic stream with an error event, for a chat client.
    let sse = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}\n\n\
               event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
    let (_, got) = call(
        anthropic(),
        "/v1/chat/completions",
        &chat_request(true),
        Answer::sse(sse),
    )
    .await;
    let got = got.unwrap();
    assert!(got.broke);
    let events = got.events();
    assert_eq!(
        events.last().unwrap().1["error"]["code"],
        "stream_interrupted"
    );
    assert_eq!(events.last().unwrap().1["error"]["message"], "Overloaded");
    assert!(
        events.iter().all(|(_, v)| v != "[DONE]"),
        "never [DONE] after an error"
    );

    // Data that is not the upstream's dialect.
    let (_, got) = call(
        chat_only(),
        "/v1/messages",
        &messages_request(true),
        Answer::sse("data: [1,2]\n\n"),
    )
    .await;
    assert!(got.unwrap().broke);
}

#[tokio::test]
async fn a_responses_stream_that_fails_at_once_still_opens_with_response_created() {
    // The upstream's first event is already an error: the client's stream
    // opens as every Responses stream does, then ends with the error, so
    // that SDK stream helpers read an API error, not a malformed stream.
    let error =
        "data: {\"error\":{\"message\":\"model overloaded\",\"type\":\"server_error\"}}\n\n";
    let (_, got) = call(
        chat_only(),
        "/v1/responses",
        &json!({"model": "m", "input": "x", "stream": true}),
        Answer::sse(error),
    )
    .await;
    let got = got.unwrap();
    assert!(got.broke);
    let names: Vec<Option<String>> = got.events().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            Some("response.created".to_owned()),
            Some("response.in_progress".to_owned()),
            Some("error".to_owned())
        ]
    );
}
