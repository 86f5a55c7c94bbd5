//! The layer over the real upstream client and the mock LLM on a socket,
//! the mock playing a server that speaks only one dialect: what the layer
//! sends must satisfy that server (Anthropic's required `max_tokens` and
//! `anthropic-version`, the chat paths), and what comes back, streamed
//! through the upstream client's stream watch, must reach the client whole.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Got, read};
use http::Request;
use llm_proxy_core::{Api, Body, Error, ParseLayer, ParseLimits, full};
use llm_proxy_mock::{Mock, MockApi, MockConfig, MockServer};
use llm_proxy_translate::{Protocol, TranslateConfig, TranslateLayer};
use llm_proxy_upstream::{AuthStyle, Upstream, UpstreamConfig};
use serde_json::{Value, json};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<Request<Body>, http::Response<Body>, Error>;

/// A mock speaking only `api`, and parse -> translate -> upstream client.
async fn upstream(api: MockApi) -> (MockServer, Svc) {
    let mock = llm_proxy_mock::spawn(Mock::new(MockConfig {
        apis: Some(vec![api]),
        name: "mock".into(),
        ..MockConfig::default()
    }))
    .await
    .unwrap();
    let mut cfg =
        UpstreamConfig::new("mock", mock.base_url().parse().unwrap()).api_key("sk-upstream");
    let translate = match api {
        MockApi::Messages => {
            cfg.auth_style = AuthStyle::XApiKey;
            TranslateConfig::new(Protocol::Anthropic, [])
        }
        _ => TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions]),
    };
    let svc = ServiceBuilder::new()
        .layer(ParseLayer::new(ParseLimits::default()))
        .layer(TranslateLayer::new(translate))
        .service(Upstream::new(cfg).unwrap());
    (mock, BoxCloneService::new(svc))
}

async fn send(svc: &Svc, path: &str, body: &Value, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = svc
        .clone()
        .oneshot(req.body(full(body.to_string())).unwrap())
        .await
        .unwrap();
    read(resp).await
}

fn weather_tool_anthropic() -> Value {
    json!([{"name": "get_weather", "description": "Weather of a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
}

#[tokio::test]
async fn messages_client_on_a_chat_only_server() {
    let (mock, svc) = upstream(MockApi::ChatCompletions).await;
    let request = json!({"model": "llama", "max_tokens": 100, "messages": [{"role": "user", "content": "Hello"}]});
    let got = send(
        &svc,
        "/v1/messages",
        &request,
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let message = got.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["output_tokens"], 8);
    let text = message["content"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(mock.stats.requests_for("/chat/completions"), 1);
    assert_eq!(
        mock.stats.last_request_headers().unwrap()["authorization"],
        "Bearer sk-upstream"
    );

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let got = send(&svc, "/v1/messages", &streamed, &[]).await;
    assert!(!got.broke);
    let events = got.events();
    let deltas: String = events
        .iter()
        .filter_map(|(_, v)| v["delta"]["text"].as_str())
        .collect();
    assert_eq!(deltas, text, "the stream says what the whole answer says");
    let last_delta = events
        .iter()
        .rev()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    assert_eq!(last_delta.1["usage"]["output_tokens"], 8);
    assert!(
        last_delta.1["usage"]["input_tokens"].as_u64().unwrap() > 0,
        "usage asked of the chat server"
    );

    // Without `max_tokens`, refused as an Anthropic server refuses it
    // (the chat server would have answered), and nothing is sent.
    let mut unbounded = request.clone();
    unbounded.as_object_mut().unwrap().remove("max_tokens");
    let sent = mock.stats.requests_for("/chat/completions");
    assert_eq!(
        refused_param(&svc, "/v1/messages", &unbounded).await,
        "max_tokens"
    );
    assert_eq!(mock.stats.requests_for("/chat/completions"), sent);
}

/// The parameter the layer refused `body` for, sent to `path` (the
/// refusal is the layer's own error, before any upstream is asked).
async fn refused_param(svc: &Svc, path: &str, body: &Value) -> String {
    let refused = svc
        .clone()
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap(),
        )
        .await;
    match refused {
        Err(Error::UnsupportedParameter { param, .. }) => param,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tool_call_round_trip_over_a_chat_only_server() {
    let (_mock, svc) = upstream(MockApi::ChatCompletions).await;
    let ask = json!({"role": "user", "content": "What's the weather in Paris?"});
    let request = json!({"model": "llama", "max_tokens": 100, "stream": true, "tools": weather_tool_anthropic(), "messages": [ask]});
    let got = send(&svc, "/v1/messages", &request, &[]).await;
    let events = got.events();
    let start = events
        .iter()
        .find(|(n, _)| n.as_deref() == Some("content_block_start"))
        .unwrap();
    assert_eq!(start.1["content_block"]["type"], "tool_use");
    let id = start.1["content_block"]["id"].as_str().unwrap().to_owned();
    let args: String = events
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"city": "Paris"})
    );
    assert!(
        events
            .iter()
            .any(|(_, v)| v["delta"]["stop_reason"] == "tool_use")
    );

    let call = json!({"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "get_weather", "input": {"city": "Paris"}}]});
    let result = json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "18C and sunny"}]});
    let request = json!({"model": "llama", "max_tokens": 100, "tools": weather_tool_anthropic(), "messages": [ask, call, result]});
    let got = send(&svc, "/v1/messages", &request, &[]).await;
    let message = got.json();
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["content"][0]["type"], "text");
}

#[tokio::test]
async fn chat_client_on_an_anthropic_only_server() {
    let (mock, svc) = upstream(MockApi::Messages).await;
    let request = json!({"model": "claude", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]});
    let got = send(&svc, "/v1/chat/completions", &request, &[]).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let chat = got.json();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["finish_reason"], "stop");
    let text = chat["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let seen = mock.stats.last_request_headers().unwrap();
    assert_eq!(seen["x-api-key"], "sk-upstream");
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(mock.stats.requests_for("/messages"), 1);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let got = send(&svc, "/v1/chat/completions", &streamed, &[]).await;
    assert!(!got.broke);
    let events = got.events();
    assert_eq!(events.last().unwrap().1, json!("[DONE]"));
    let deltas: String = events
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(deltas, text);
    let usage = &events[events.len() - 2].1["usage"];
    assert_eq!(
        usage["completion_tokens"],
        chat["usage"]["completion_tokens"]
    );

    // A cap that is no whole number is refused, as a chat server refuses
    // it, and nothing is sent (a default in its place would be sent).
    let mut negative = request.clone();
    negative["max_tokens"] = json!(-5);
    let sent = mock.stats.requests_for("/messages");
    assert_eq!(
        refused_param(&svc, "/v1/chat/completions", &negative).await,
        "max_tokens"
    );
    assert_eq!(mock.stats.requests_for("/messages"), sent);
}

#[tokio::test]
async fn chat_tool_call_on_an_anthropic_only_server() {
    let (_mock, svc) = upstream(MockApi::Messages).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let request = json!({"model": "claude", "tools": tools, "messages": [{"role": "user", "content": "Weather in Paris?"}]});
    let chat = send(&svc, "/v1/chat/completions", &request, &[])
        .await
        .json();
    assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
    let call = &chat["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"city": "Paris"})
    );
}

#[tokio::test]
async fn responses_client_on_a_chat_only_server() {
    let (mock, svc) = upstream(MockApi::ChatCompletions).await;
    let request =
        json!({"model": "llama", "instructions": "Be brief.", "input": "Hello", "store": false});
    let got = send(&svc, "/v1/responses", &request, &[]).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let response = got.json();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    let text = response["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(mock.stats.requests_for("/responses"), 0);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let got = send(&svc, "/v1/responses", &streamed, &[]).await;
    let events = got.events();
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_text.delta"))
        .map(|(_, v)| v["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, text);
    let (name, last) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("response.completed"));
    assert_eq!(last["response"]["usage"]["output_tokens"], 8);
}

#[tokio::test]
async fn a_stream_cut_by_the_server_ends_with_the_clients_error_event() {
    let (_mock, svc) = upstream(MockApi::ChatCompletions).await;
    let request = json!({"model": "llama", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "Hello"}]});
    let got = send(
        &svc,
        "/v1/messages",
        &request,
        &[("x-mock-fail", "drop"), ("x-mock-drop-after", "3")],
    )
    .await;
    assert!(got.broke, "the client's connection is closed");
    let events = got.events();
    let (name, last) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    assert_eq!(last["type"], "error");
    assert!(
        events
            .iter()
            .all(|(n, _)| n.as_deref() != Some("message_stop"))
    );
}
