//! Dialect translation through the proxy, over real sockets: upstreams that
//! speak one dialect only (mocks restricted with `MockConfig::apis`, so a
//! request in any other dialect would get a 404 from the mock itself) serve
//! clients of the others — the official `anthropic` SDK and the `openai`
//! SDK's chat and responses clients, and raw HTTP for the details.
//!
//! Ignored until the proxy wires `llm-proxy-translate` in front of each
//! upstream (`apis` / `protocol` decide where it applies).

use http::Method;
use llm_proxy_mock::MockApi;
use serde_json::{Value, json};
use tests::*;

/// A mock that speaks only `api`.
async fn only(api: MockApi, name: &str) -> MockServer {
    mock(MockConfig {
        apis: Some(vec![api]),
        name: name.to_owned(),
        ..MockConfig::default()
    })
    .await
}

/// A proxy in front of a chat-only upstream serving `demo`.
async fn over_chat(up: &MockServer) -> TestProxy {
    proxy(&format!(
        "[[upstream]]\nname = \"chat\"\nurl = \"{}\"\napis = [\"chat_completions\"]\nmodels = [\"demo\"]\n\
         [balance]\nmax_retries = 0\n",
        up.base_url()
    ))
    .await
}

/// A proxy in front of an Anthropic-protocol upstream serving `claude`.
async fn over_anthropic(up: &MockServer) -> TestProxy {
    proxy(&format!(
        "[[upstream]]\nname = \"claude\"\nurl = \"{}\"\nprotocol = \"anthropic\"\napi_key = \"sk-ant-upstream\"\n\
         models = [\"claude\"]\n[balance]\nmax_retries = 0\n",
        up.base_url()
    ))
    .await
}

async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(request(Method::POST, url, &all, body.to_string())).await
}

fn events(answer: &Answer) -> Vec<Value> {
    sse_data(&answer.body)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| Value::String(d.clone())))
        .collect()
}

#[tokio::test]
async fn anthropic_sdk_over_a_chat_only_upstream() {
    let up = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&up).await;
    run_python("anthropic_over_chat.py", p.url("")).await;
    assert_eq!(
        up.stats.requests_for("/messages"),
        0,
        "every request translated"
    );
    assert!(up.stats.requests_for("/chat/completions") >= 7);
}

#[tokio::test]
async fn openai_chat_sdk_over_an_anthropic_upstream() {
    let up = only(MockApi::Messages, "claude").await;
    let p = over_anthropic(&up).await;
    run_python("openai_chat_over_anthropic.py", p.url("/v1")).await;
    assert_eq!(
        up.stats.requests_for("/chat/completions"),
        0,
        "every request translated"
    );
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["x-api-key"], "sk-ant-upstream");
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert!(
        seen.get("authorization").is_none(),
        "no client key upstream"
    );
}

#[tokio::test]
async fn openai_responses_sdk_over_a_chat_only_upstream() {
    let up = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&up).await;
    run_python("openai_responses_over_chat.py", p.url("/v1")).await;
    assert_eq!(
        up.stats.requests_for("/responses"),
        0,
        "every request translated"
    );
}

#[tokio::test]
async fn messages_over_chat_streamed_and_not() {
    let up = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&up).await;
    let body = json!({"model": "demo", "max_tokens": 64, "messages": [{"role": "user", "content": "Hello"}]});
    let whole = post(
        &p.url("/v1/messages"),
        &body,
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(whole.status, 200, "{}", whole.text());
    assert_eq!(whole.header("x-llm-proxy-upstream"), Some("chat"));
    assert_eq!(
        whole.header("content-length"),
        Some(whole.body.len().to_string().as_str())
    );
    let message = whole.json();
    assert_eq!(
        (message["type"].as_str(), message["stop_reason"].as_str()),
        (Some("message"), Some("end_turn"))
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let answer = post(&p.url("/v1/messages"), &streamed, &[]).await;
    assert!(
        answer
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = events(&answer);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"message_start"));
    assert_eq!(kinds.last(), Some(&"message_stop"));
    let text: String = events
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, message["content"][0]["text"].as_str().unwrap());
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(
        delta["usage"]["output_tokens"],
        message["usage"]["output_tokens"]
    );
}

#[tokio::test]
async fn chat_over_anthropic_streamed_with_usage() {
    let up = only(MockApi::Messages, "claude").await;
    let p = over_anthropic(&up).await;
    let body = json!({"model": "claude", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hello"}]});
    let answer = post(&p.url("/v1/chat/completions"), &body, &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let events = events(&answer);
    assert_eq!(events.last(), Some(&json!("[DONE]")));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = &events[events.len() - 2];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn refusals_and_upstream_errors_come_in_the_clients_dialect() {
    let chat = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&chat).await;
    let body = json!({"model": "demo", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}],
        "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]});
    let refused = post(&p.url("/v1/messages"), &body, &[]).await;
    assert_eq!(refused.status, 400);
    let json = refused.json();
    assert_eq!(
        (json["type"].as_str(), json["error"]["type"].as_str()),
        (Some("error"), Some("invalid_request_error"))
    );
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mcp_servers")
    );

    for (extra, param) in [
        (json!({"store": true}), "store"),
        (json!({"background": true}), "background"),
    ] {
        let mut body = json!({"model": "demo", "input": "Hi"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let refused = post(&p.url("/v1/responses"), &body, &[]).await;
        refused.assert_error(400, "invalid_request_error", "unsupported_parameter");
        assert_eq!(refused.json()["error"]["param"], param);
    }

    // The chat server's 500 reaches a Messages client in Anthropic's shape.
    let body =
        json!({"model": "demo", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]});
    let failed = post(&p.url("/v1/messages"), &body, &[("x-mock-fail", "500")]).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json()["type"], "error");
    assert_eq!(failed.json()["error"]["type"], "api_error");

    let claude = only(MockApi::Messages, "claude").await;
    let p = over_anthropic(&claude).await;
    let body = json!({"model": "claude", "n": 2, "messages": [{"role": "user", "content": "Hi"}]});
    let refused = post(&p.url("/v1/chat/completions"), &body, &[]).await;
    refused.assert_error(400, "invalid_request_error", "unsupported_parameter");
    assert_eq!(refused.json()["error"]["param"], "n");
    // Completions cannot be translated: no upstream serves them.
    let r = post(
        &p.url("/v1/completions"),
        &json!({"model": "claude", "prompt": "x"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
}

#[tokio::test]
async fn a_cut_stream_ends_with_the_clients_error_event_and_a_close() {
    let up = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&up).await;
    let body = json!({"model": "demo", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "Hi"}]});
    let headers = [
        ("content-type", "application/json"),
        ("x-mock-fail", "drop"),
        ("x-mock-drop-after", "3"),
    ];
    let bytes = a_broken_stream(request(
        Method::POST,
        &p.url("/v1/messages"),
        &headers,
        body.to_string(),
    ))
    .await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("event: error"), "{text}");
    assert!(!text.contains("message_stop"), "{text}");
}

#[tokio::test]
async fn a_native_upstream_wins_over_a_translating_one() {
    let chat = only(MockApi::ChatCompletions, "chat").await;
    let native = only(MockApi::Messages, "native").await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"chat\"\nurl = \"{}\"\napis = [\"chat_completions\"]\n\
         [[upstream]]\nname = \"native\"\nurl = \"{}\"\napis = [\"messages\"]\n\
         [balance]\nstrategy = \"round_robin\"\n",
        chat.base_url(),
        native.base_url()
    ))
    .await;
    let body =
        json!({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]});
    for _ in 0..4 {
        let answer = post(
            &p.url("/v1/messages"),
            &body,
            &[("anthropic-version", "2023-06-01")],
        )
        .await;
        assert_eq!(
            answer.header("x-llm-proxy-upstream"),
            Some("native"),
            "{}",
            answer.text()
        );
    }
    assert_eq!(chat.stats.requests(), 0);
}

/// A translated stream that the upstream breaks counts against it as a
/// native one does: the client gets its dialect's error event, and three in
/// a row eject the upstream.
#[tokio::test]
async fn a_translated_stream_the_upstream_breaks_counts_against_it() {
    let up = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&up).await;
    let body = json!({"model": "demo", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        let req = request(
            Method::POST,
            &p.url("/v1/messages"),
            &[
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
                ("x-mock-fail", "drop"),
                ("x-mock-drop-after", "3"),
            ],
            body.to_string(),
        );
        let resp = client().request(req).await.expect("answered");
        assert_eq!(resp.status(), 200);
        let (data, _) = read_stream(resp).await;
        assert!(
            String::from_utf8_lossy(&data).contains("event: error"),
            "{}",
            String::from_utf8_lossy(&data)
        );
    }
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_upstream_healthy{upstream="chat"} 0"#),
        "{metrics}"
    );
}

/// A chat server that refuses the `stream_options` a translation adds
/// (older Azure API versions: 400; TGI: 422) still serves translated
/// streams: the request is sent once more without, and the client's stream
/// ends as its dialect's does, without usage. A refusal of anything else is
/// not sent twice and reaches the client in its dialect.
/// A proxy over the chat-only upstream at `addr` (serving `demo`), without
/// retries.
async fn chat_only(addr: std::net::SocketAddr) -> TestProxy {
    proxy(&format!(
        "[[upstream]]\nname = \"chat\"\nurl = \"http://{addr}\"\napis = [\"chat_completions\"]\n\
         models = [\"demo\"]\n[balance]\nmax_retries = 0\n"
    ))
    .await
}

/// A streamed Messages request for `demo` through `p`.
async fn streamed_messages(p: &TestProxy) -> Answer {
    let messages = json!({"model": "demo", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    post(
        &p.url("/v1/messages"),
        &messages,
        &[("anthropic-version", "2023-06-01")],
    )
    .await
}

#[tokio::test]
async fn translated_streams_to_a_server_that_refuses_stream_options() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CHUNKS: &str = "data: {\"id\":\"chatcmpl-1\",\"model\":\"demo\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n\
        data: {\"id\":\"chatcmpl-1\",\"model\":\"demo\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: [DONE]\n\n";
    let refusals = [
        (
            400,
            r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error"}}"#,
        ),
        (
            422,
            r#"{"error":"Input validation error: extra field stream_options","error_type":"validation"}"#,
        ),
    ];
    for (status, refusal) in refusals {
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        let addr = sse_upstream(move |body| {
            count.fetch_add(1, Ordering::SeqCst);
            if String::from_utf8_lossy(body).contains("stream_options") {
                (status, refusal.to_owned())
            } else {
                (200, CHUNKS.to_owned())
            }
        })
        .await;
        let p = chat_only(addr).await;

        let answer = streamed_messages(&p).await;
        assert_eq!(answer.status, 200, "{status}: {}", answer.text());
        let got = events(&answer);
        let text: String = got
            .iter()
            .filter_map(|e| e["delta"]["text"].as_str())
            .collect();
        assert_eq!(text, "hi", "{status}");
        let delta = got.iter().find(|e| e["type"] == "message_delta").unwrap();
        assert_eq!(
            delta["usage"],
            json!({"input_tokens": null, "output_tokens": null})
        );
        assert_eq!(got.last().unwrap()["type"], "message_stop", "{status}");
        assert_eq!(asked.load(Ordering::SeqCst), 2, "{status}: sent once more");

        let responses = json!({"model": "demo", "stream": true, "store": false, "input": "hi"});
        let answer = post(&p.url("/v1/responses"), &responses, &[]).await;
        assert_eq!(answer.status, 200, "{status}: {}", answer.text());
        let got = events(&answer);
        let last = got.last().unwrap();
        assert_eq!(last["type"], "response.completed", "{status}");
        assert_eq!(last["response"]["usage"], Value::Null);
        assert_eq!(
            last["response"]["output"][0]["content"][0]["text"], "hi",
            "{status}"
        );
        assert_eq!(asked.load(Ordering::SeqCst), 4, "{status}: sent once more");
    }

    // Any other 400 comes once, in the client's dialect.
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    let addr = sse_upstream(move |_| {
        count.fetch_add(1, Ordering::SeqCst);
        (
            400,
            r#"{"error":{"message":"bad temperature","type":"invalid_request_error"}}"#.to_owned(),
        )
    })
    .await;
    let p = chat_only(addr).await;
    let answer = streamed_messages(&p).await;
    assert_eq!(answer.status, 400);
    assert_eq!(
        answer.json(),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "bad temperature"}})
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1, "not sent twice");
}

/// An upstream that ignores `stream: true` and answers with one JSON
/// object: the client that asked for a stream (Claude Code, Codex always
/// do) gets the stream its dialect expects, told from the whole answer.
#[tokio::test]
async fn a_whole_answer_to_a_streamed_request_reaches_the_client_as_a_stream() {
    let chat_answer = json!({"id": "chatcmpl-9", "object": "chat.completion", "created": 1,
        "model": "demo", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "read", "arguments": "{\"path\":\"a.md\"}"}}]}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}})
    .to_string();
    let up = sse_upstream(move |_| (200, chat_answer.clone())).await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"chat\"\nurl = \"http://{up}/v1\"\napis = [\"chat_completions\"]\n"
    ))
    .await;
    // Messages (Claude Code).
    let body = json!({"model": "demo", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    let answer = post(
        &p.url("/v1/messages"),
        &body,
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let kinds: Vec<String> = events(&answer)
        .iter()
        .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
    assert_eq!(kinds.last().map(String::as_str), Some("message_stop"));
    let text = answer.text();
    assert!(
        text.contains("Let me look.") && text.contains("tool_use"),
        "{text}"
    );
    assert!(text.contains(r#""stop_reason":"tool_use""#), "{text}");
    // Responses (Codex).
    let body = json!({"model": "demo", "stream": true, "store": false, "input": "Hi"});
    let answer = post(&p.url("/v1/responses"), &body, &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let completed = events(&answer)
        .into_iter()
        .find(|e| e["type"] == "response.completed")
        .expect("response.completed");
    let output = completed["response"]["output"].as_array().unwrap();
    assert!(
        output
            .iter()
            .any(|i| i["type"] == "function_call" && i["arguments"] == "{\"path\":\"a.md\"}"),
        "{completed}"
    );
    assert_eq!(completed["response"]["usage"]["total_tokens"], 12);
}

/// The same from an Anthropic upstream to a chat client that streams.
#[tokio::test]
async fn a_whole_message_to_a_streamed_chat_request_reaches_the_client_as_chunks() {
    let message = json!({"id": "msg_9", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Hello there"}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 4, "output_tokens": 2}})
    .to_string();
    let up = sse_upstream(move |_| (200, message.clone())).await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"claude\"\nurl = \"http://{up}/v1\"\nprotocol = \"anthropic\"\n"
    ))
    .await;
    let body = json!({"model": "claude", "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Hi"}]});
    let answer = post(&p.url("/v1/chat/completions"), &body, &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let chunks = events(&answer);
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "Hello there");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"] == "stop")
    );
    assert!(chunks.iter().any(|c| c["usage"]["total_tokens"] == 6));
    assert_eq!(chunks.last(), Some(&Value::String("[DONE]".into())));
}

/// The events of a streamed Messages answer and of a streamed Responses
/// answer for `demo` through `p`, each of which must have come with 200.
async fn both_streams(p: &TestProxy) -> (Vec<Value>, Vec<Value>) {
    let messages = streamed_messages(p).await;
    assert_eq!(messages.status, 200, "{}", messages.text());
    let body = json!({"model": "demo", "stream": true, "store": false, "input": "hi"});
    let responses = post(&p.url("/v1/responses"), &body, &[]).await;
    assert_eq!(responses.status, 200, "{}", responses.text());
    (events(&messages), events(&responses))
}

/// An upstream that keeps its connection busy between chunks — with SSE
/// comments (`: ping`) or with events whose data is empty (`data: `) — is
/// translated as if it had not: such events carry nothing.
#[tokio::test]
async fn keep_alives_in_a_chat_stream_reach_no_client_and_break_nothing() {
    const CHUNKS: &str = ": ping\n\n\
        data: \n\n\
        data: {\"id\":\"chatcmpl-1\",\"model\":\"demo\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n\
        data:\n\n\
        : ping\n\n\
        data: {\"id\":\"chatcmpl-1\",\"model\":\"demo\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
        data: \n\n\
        data: [DONE]\n\n";
    let addr = sse_upstream(|_| (200, CHUNKS.to_owned())).await;
    let p = chat_only(addr).await;
    let (messages, responses) = both_streams(&p).await;
    let text: String = messages
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "hi", "{messages:?}");
    assert_eq!(messages.last().unwrap()["type"], "message_stop");
    assert!(
        messages.iter().all(|e| e["type"] != "error"),
        "{messages:?}"
    );
    let last = responses.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{responses:?}");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "hi");
}

/// A Responses client whose tool returned a screenshot (an `input_image`
/// in a `function_call_output`, as a computer-use agent sends) is served by
/// a chat-only upstream: the image reaches it in a user message after the
/// tool message.
#[tokio::test]
async fn a_function_output_image_reaches_a_chat_upstream() {
    let up = only(MockApi::ChatCompletions, "chat").await;
    let p = over_chat(&up).await;
    let body = json!({"model": "demo", "store": false, "input": [
        {"role": "user", "content": "Look at the screen."},
        {"type": "function_call", "call_id": "call_1", "name": "screenshot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [
            {"type": "input_text", "text": "1280x800"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]},
    ]});
    let answer = post(&p.url("/v1/responses"), &body, &[]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["status"], "completed");
    let sent: Value = serde_json::from_slice(&up.stats.last_request_body().unwrap()).unwrap();
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(
        messages[2],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "1280x800"})
    );
    assert_eq!(
        messages[3],
        json!({"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]})
    );
}

/// An answer the upstream gave up on (vLLM's `finish_reason` `abort` or
/// `error`), or whose stream ended (`[DONE]`) before it finished, here
/// over half a tool call's arguments, reaches a translated client as its
/// dialect's error event, never as a clean `tool_use` or `completed` whose
/// client would run the call with what came of its arguments. Whole, it is
/// a 502.
#[tokio::test]
async fn an_answer_the_upstream_gave_up_on_is_never_a_clean_end() {
    const CALL: &str = "data: {\"id\":\"chatcmpl-1\",\"model\":\"demo\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"write\",\"arguments\":\"{\\\"path\\\": \\\"a\\\", \\\"con\"}}]}}]}\n\n";
    for finish in [
        r#","finish_reason":"abort""#,
        r#","finish_reason":"error""#,
        "",
    ] {
        let stream = format!(
            "{CALL}data: {{\"id\":\"chatcmpl-1\",\"model\":\"demo\",\"choices\":[{{\"index\":0,\"delta\":{{}}{finish}}}]}}\n\n\
             data: [DONE]\n\n"
        );
        let addr = sse_upstream(move |_| (200, stream.clone())).await;
        let p = chat_only(addr).await;
        // Each stream ends with its error event and a close.
        let broken = |path: &'static str, body: Value| {
            let url = p.url(path);
            async move {
                let headers = [
                    ("content-type", "application/json"),
                    ("anthropic-version", "2023-06-01"),
                ];
                let req = request(Method::POST, &url, &headers, body.to_string());
                sse_data(&a_broken_stream(req).await)
                    .iter()
                    .map(|d| serde_json::from_str::<Value>(d).unwrap())
                    .collect::<Vec<_>>()
            }
        };
        let messages = broken(
            "/v1/messages",
            json!({"model": "demo", "max_tokens": 50, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        let responses = broken(
            "/v1/responses",
            json!({"model": "demo", "stream": true, "store": false, "input": "hi"}),
        )
        .await;
        let last = messages.last().unwrap();
        assert_eq!(last["type"], "error", "{finish}: {messages:?}");
        assert_eq!(last["error"]["type"], "api_error", "{last}");
        assert!(
            messages.iter().all(|e| e["type"] != "message_delta"),
            "{finish}: {messages:?}"
        );
        let last = responses.last().unwrap();
        assert_eq!(last["type"], "error", "{finish}: {responses:?}");
        assert!(
            responses.iter().all(|e| e["type"] != "response.completed"
                && e["type"] != "response.function_call_arguments.done"),
            "{finish}: {responses:?}"
        );
    }
    // Whole: a 502 in the client's dialect.
    let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "demo",
        "choices": [{"index": 0, "finish_reason": "abort", "message": {"role": "assistant", "content": "The answer is"}}]})
    .to_string();
    let addr = sse_upstream(move |_| (200, answer.clone())).await;
    let p = chat_only(addr).await;
    let messages = json!({"model": "demo", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]});
    let whole = post(
        &p.url("/v1/messages"),
        &messages,
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(whole.status, 502, "{}", whole.text());
    assert_eq!(whole.json()["type"], "error", "{}", whole.text());
    assert!(
        whole.text().contains("finish_reason `abort`"),
        "{}",
        whole.text()
    );
    let body = json!({"model": "demo", "store": false, "input": "hi"});
    let whole = post(&p.url("/v1/responses"), &body, &[]).await;
    assert_eq!(whole.status, 502, "{}", whole.text());
    assert!(
        whole.text().contains("finish_reason `abort`"),
        "{}",
        whole.text()
    );
    // An error sent with `200`: a 502 in the upstream's own words.
    let error = r#"{"error":{"message":"the model is overloaded","code":502}}"#;
    let addr = sse_upstream(move |_| (200, error.to_owned())).await;
    let p = chat_only(addr).await;
    let whole = post(&p.url("/v1/responses"), &body, &[]).await;
    assert_eq!(whole.status, 502, "{}", whole.text());
    assert!(
        whole.text().contains("the model is overloaded"),
        "{}",
        whole.text()
    );
}

/// Mistral's reasoning models give `content` as an array of parts, thinking
/// and text, streamed and whole: the text is the client's text, the
/// thinking its reasoning (a Messages client that enabled thinking gets it
/// as a thinking block), the same either way.
#[tokio::test]
async fn content_in_parts_is_read_streamed_and_whole() {
    let thinking = json!({"type": "thinking", "thinking": [{"type": "text", "text": "Hmm."}]});
    let text = json!({"type": "text", "text": "Paris."});
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({"id": "chatcmpl-1", "model": "demo",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let stream = [
        chunk(
            json!({"role": "assistant", "content": [thinking.clone()]}),
            Value::Null,
        ),
        chunk(json!({"content": [text.clone()]}), Value::Null),
        chunk(json!({}), json!("stop")),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let whole = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "demo",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": [thinking, text]}}]})
    .to_string();
    let addr = sse_upstream(move |body| {
        let request: Value = serde_json::from_slice(body).unwrap_or_default();
        match request["stream"].as_bool() {
            Some(true) => (200, stream.clone()),
            _ => (200, whole.clone()),
        }
    })
    .await;
    let p = chat_only(addr).await;
    let expected = json!([{"type": "thinking", "thinking": "Hmm.", "signature": ""},
        {"type": "text", "text": "Paris."}]);
    for stream in [true, false] {
        let body = json!({"model": "demo", "max_tokens": 2048, "stream": stream,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "Capital of France?"}]});
        let answer = post(
            &p.url("/v1/messages"),
            &body,
            &[("anthropic-version", "2023-06-01")],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let content = if stream {
            let got = events(&answer);
            assert_eq!(got.last().unwrap()["type"], "message_stop", "{got:?}");
            let read = |key: &str| -> String {
                got.iter()
                    .filter_map(|e| e["delta"][key].as_str())
                    .collect()
            };
            json!([{"type": "thinking", "thinking": read("thinking"), "signature": ""},
                {"type": "text", "text": read("text")}])
        } else {
            answer.json()["content"].clone()
        };
        assert_eq!(content, expected, "stream: {stream}");

        let body = json!({"model": "demo", "stream": stream, "store": false, "input": "hi"});
        let answer = post(&p.url("/v1/responses"), &body, &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let response = if stream {
            let last = events(&answer).pop().unwrap();
            assert_eq!(last["type"], "response.completed", "{last}");
            last["response"].clone()
        } else {
            answer.json()
        };
        let output = response["output"].as_array().unwrap();
        assert_eq!(output.len(), 1, "stream: {stream}: {output:?}");
        assert_eq!(
            output[0]["content"][0]["text"], "Paris.",
            "stream: {stream}"
        );
    }
}

/// A server that answers in OpenAI's legacy function-calling format
/// (`function_call` instead of `tool_calls`), streamed and whole: the
/// client sees the call as its dialect's tool call, with an id made up for
/// it, and a finish reason that says a tool is to run.
#[tokio::test]
async fn a_legacy_function_call_reaches_the_client_as_a_tool_call() {
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({"id": "chatcmpl-1", "model": "demo",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let stream = [
        chunk(
            json!({"role": "assistant", "content": null,
                "function_call": {"name": "get_weather", "arguments": ""}}),
            Value::Null,
        ),
        chunk(
            json!({"function_call": {"arguments": "{\"city\":"}}),
            Value::Null,
        ),
        chunk(
            json!({"function_call": {"arguments": "\"Paris\"}"}}),
            Value::Null,
        ),
        chunk(json!({}), json!("function_call")),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let whole = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "demo",
        "choices": [{"index": 0, "finish_reason": "function_call",
            "message": {"role": "assistant", "content": null,
                "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}}]})
    .to_string();
    let addr = sse_upstream(move |body| {
        let request: Value = serde_json::from_slice(body).unwrap_or_default();
        match request["stream"].as_bool() {
            Some(true) => (200, stream.clone()),
            _ => (200, whole.clone()),
        }
    })
    .await;
    let p = chat_only(addr).await;
    for stream in [true, false] {
        let body = json!({"model": "demo", "max_tokens": 64, "stream": stream,
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "Weather in Paris?"}]});
        let answer = post(
            &p.url("/v1/messages"),
            &body,
            &[("anthropic-version", "2023-06-01")],
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let (tool, input, stop) = if stream {
            let got = events(&answer);
            let start = got
                .iter()
                .find(|e| e["content_block"]["type"] == "tool_use")
                .unwrap_or_else(|| panic!("a tool_use block: {got:?}"));
            let input: String = got
                .iter()
                .filter_map(|e| e["delta"]["partial_json"].as_str())
                .collect();
            let end = got.iter().find(|e| e["type"] == "message_delta").unwrap();
            let input: Value = serde_json::from_str(&input).unwrap();
            (
                start["content_block"].clone(),
                input,
                end["delta"]["stop_reason"].clone(),
            )
        } else {
            let message = answer.json();
            let tool = message["content"][0].clone();
            (
                tool.clone(),
                tool["input"].clone(),
                message["stop_reason"].clone(),
            )
        };
        assert_eq!(tool["name"], "get_weather", "stream: {stream}");
        assert!(tool["id"].as_str().unwrap().starts_with("toolu_"), "{tool}");
        assert_eq!(input, json!({"city": "Paris"}), "stream: {stream}");
        assert_eq!(stop, "tool_use", "stream: {stream}");

        let body = json!({"model": "demo", "stream": stream, "store": false, "input": "hi",
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]});
        let answer = post(&p.url("/v1/responses"), &body, &[]).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let response = if stream {
            let last = events(&answer).pop().unwrap();
            assert_eq!(last["type"], "response.completed", "{last}");
            last["response"].clone()
        } else {
            answer.json()
        };
        let call = &response["output"][0];
        assert_eq!(
            call["type"], "function_call",
            "stream: {stream}: {response}"
        );
        assert_eq!(call["name"], "get_weather");
        assert_eq!(call["arguments"], "{\"city\":\"Paris\"}");
        assert!(
            call["call_id"].as_str().unwrap().starts_with("call_"),
            "{call}"
        );
    }
}

/// What an upstream sends is bounded by what it is translated into: an
/// id repeated in every event, a stream of one-character items, or a
/// megabyte of empty tool calls do not come out as hundreds of megabytes.
#[tokio::test]
async fn a_hostile_upstream_cannot_make_a_translation_balloon() {
    let long_id = format!("chatcmpl-{}", "X".repeat(256 * 1024));
    let id_stream = {
        let chunk = |delta: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": long_id, "model": "demo", "choices": [{"index": 0, "delta": delta}]})
            )
        };
        let mut sse = chunk(json!({"role": "assistant"}));
        for _ in 0..200 {
            sse.push_str(&chunk(json!({"content": "a"})));
        }
        sse + "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
               data: [DONE]\n\n"
    };
    let items_stream = {
        let item = "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n";
        item.repeat(5000) + "data: [DONE]\n\n"
    };
    let empty_calls =
        json!({"id": "chatcmpl-m", "choices": [{"index": 0, "finish_reason": "tool_calls",
        "message": {"role": "assistant", "tool_calls": vec![json!({}); 100_000]}}]})
        .to_string();
    let answers = std::sync::Arc::new((id_stream, items_stream, empty_calls));
    // The whole answer in one write (`sse_upstream` paces its events).
    let up = raw_upstream(move |mut conn| {
        let answers = answers.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let Some((_, body)) = read_request(&mut conn).await else {
                return;
            };
            let body = String::from_utf8_lossy(&body);
            let (text, kind) = if body.contains("long id") {
                (&answers.0, "text/event-stream")
            } else if body.contains("many items") {
                (&answers.1, "text/event-stream")
            } else {
                (&answers.2, "application/json")
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                text.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(text.as_bytes()).await;
        }
    })
    .await;
    let p = chat_only(up).await;
    let url = p.url("/v1/responses");
    let responses = async |input: &str, stream: bool| {
        let body = json!({"model": "demo", "input": input, "stream": stream});
        post(&url, &body, &[]).await
    };
    // The id is not repeated: the answer is some kilobytes.
    let answer = responses("long id", true).await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.body.len() < 200 * 1024,
        "{} bytes",
        answer.body.len()
    );
    let last = events(&answer).pop().unwrap();
    assert_eq!(last["type"], "response.completed", "{last}");
    // Past 1024 output items, the stream fails.
    let body = json!({"model": "demo", "input": "many items", "stream": true});
    let resp = client()
        .request(request(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            body.to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (bytes, broke) = read_stream(resp).await;
    assert!(broke, "the stream fails");
    let last = sse_data(&bytes).pop().unwrap();
    assert!(last.contains(r#""type":"error""#), "{last}");
    assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
    // 100,000 empty tool calls are no answer to translate.
    let answer = responses("calls", false).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert!(answer.text().contains("tool calls"), "{}", answer.text());
}

/// An upstream that streams under another media type — none (Starlette's
/// `StreamingResponse` unless told), `text/plain`, even `application/json`
/// — as clients reading events whatever the type never notice, is
/// translated as the stream it is, as it comes: the client reads its
/// first event while the upstream still holds the rest.
#[tokio::test]
async fn a_stream_under_another_media_type_is_translated_as_it_comes() {
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    let chunk = |delta: Value, finish: Value| {
        let chunk = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1,
            "model": "demo", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let first = chunk(json!({"role": "assistant", "content": "Hel"}), Value::Null);
    let rest = chunk(json!({"content": "lo"}), Value::Null)
        + &chunk(json!({}), json!("stop"))
        + "data: [DONE]\n\n";
    for kind in [
        "",
        "content-type: text/plain\r\n",
        "content-type: application/json\r\n",
    ] {
        let go_on = Arc::new(tokio::sync::Notify::new());
        let (first, rest, upstream_go_on) = (first.clone(), rest.clone(), go_on.clone());
        let up = raw_upstream(move |mut conn| {
            let (first, rest, go_on) = (first.clone(), rest.clone(), upstream_go_on.clone());
            async move {
                let Some(_) = read_request(&mut conn).await else {
                    return;
                };
                let head = format!("HTTP/1.1 200 OK\r\n{kind}connection: close\r\n\r\n");
                let _ = conn.write_all(format!("{head}{first}").as_bytes()).await;
                let _ = tokio::time::timeout(2 * HANG, go_on.notified()).await;
                let _ = conn.write_all(rest.as_bytes()).await;
            }
        })
        .await;
        let p = chat_only(up).await;
        let body = json!({"model": "demo", "max_tokens": 50, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        let req = request(
            Method::POST,
            &p.url("/v1/messages"),
            &[
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
            ],
            body.to_string(),
        );
        let resp = tokio::time::timeout(HANG, client().request(req))
            .await
            .expect("the head before the upstream's end")
            .unwrap();
        assert_eq!(resp.status(), 200, "{kind:?}");
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "text/event-stream",
            "{kind:?}"
        );
        let mut body = resp.into_body();
        let mut seen = Vec::new();
        tokio::time::timeout(HANG, async {
            while !String::from_utf8_lossy(&seen).contains("\"Hel\"") {
                let frame = body.frame().await.expect("more").expect("a frame");
                seen.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..]));
            }
        })
        .await
        .expect("the first event before the upstream's end");
        go_on.notify_one();
        let rest = body.collect().await.expect("a clean end").to_bytes();
        seen.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&seen);
        assert!(text.contains("\"lo\""), "{kind:?}: {text}");
        assert!(
            text.contains(r#""stop_reason":"end_turn""#),
            "{kind:?}: {text}"
        );
        assert!(
            text.ends_with("data: {\"type\":\"message_stop\"}\n\n"),
            "{kind:?}: {text}"
        );
    }
}
