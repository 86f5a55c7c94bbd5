//! Golden tests: recorded-shape upstream answers (chat completions in
//! vLLM/OpenAI's shape, Messages in Anthropic's) for text, one tool call,
//! two tool calls, a stop sequence and max tokens, streamed and not, go
//! through the layer in each direction; the answer is compared field by
//! field with `tests/fixtures/expected/<direction>/<case>.{json,sse}`.
//!
//! `UPDATE_GOLDEN=1 cargo test -p llm-proxy-translate --test golden`
//! rewrites the expected files (review the diff!).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::{Answer, Got, assert_json, call, sse_events};
use llm_proxy_core::Api;
use llm_proxy_translate::{Protocol, TranslateConfig};
use serde_json::{Value, json};

const CASES: [&str; 5] = [
    "text",
    "tool_call",
    "tool_calls",
    "stop_sequence",
    "max_tokens",
];

#[derive(Clone, Copy, Debug)]
enum Dir {
    MessagesOverChat,
    ChatOverMessages,
    ResponsesOverChat,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::MessagesOverChat => "messages_over_chat",
            Dir::ChatOverMessages => "chat_over_messages",
            Dir::ResponsesOverChat => "responses_over_chat",
        }
    }

    fn config(self) -> TranslateConfig {
        match self {
            Dir::ChatOverMessages => TranslateConfig::new(Protocol::Anthropic, [Api::Messages]),
            _ => TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions]),
        }
    }

    fn client_path(self) -> &'static str {
        match self {
            Dir::MessagesOverChat => "/v1/messages",
            Dir::ChatOverMessages => "/v1/chat/completions",
            Dir::ResponsesOverChat => "/v1/responses",
        }
    }

    fn upstream(self) -> &'static str {
        match self {
            Dir::ChatOverMessages => "anthropic",
            _ => "chat",
        }
    }

    /// The client's request for `case`.
    fn request(self, case: &str, stream: bool) -> Value {
        let prompt = match case {
            "tool_call" => "What's the weather in Paris?",
            "tool_calls" => "Weather and time in Paris?",
            "stop_sequence" => "Count to ten.",
            "max_tokens" => "Tell me a story.",
            _ => "What is the capital of France?",
        };
        let tools = case.starts_with("tool");
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
        let mut body = match self {
            Dir::MessagesOverChat => json!({"model": "llama-3.1-8b", "max_tokens": 256,
                "messages": [{"role": "user", "content": prompt}]}),
            Dir::ChatOverMessages => json!({"model": "claude-sonnet-4-5",
                "messages": [{"role": "user", "content": prompt}]}),
            Dir::ResponsesOverChat => {
                json!({"model": "llama-3.1-8b", "input": prompt, "store": false})
            }
        };
        match (self, tools) {
            (Dir::MessagesOverChat, true) => {
                body["tools"] = json!([{"name": "get_weather", "description": "Weather of a city", "input_schema": schema}])
            }
            (Dir::ChatOverMessages, true) => {
                body["tools"] = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": schema}}])
            }
            (Dir::ResponsesOverChat, true) => {
                body["tools"] = json!([{"type": "function", "name": "get_weather", "description": "Weather of a city", "parameters": schema}])
            }
            _ => {}
        }
        match (self, case) {
            (Dir::MessagesOverChat, "stop_sequence") => body["stop_sequences"] = json!(["4"]),
            (Dir::ChatOverMessages, "stop_sequence") => body["stop"] = json!("4"),
            (Dir::MessagesOverChat, "max_tokens") => body["max_tokens"] = json!(8),
            (Dir::ChatOverMessages, "max_tokens") => body["max_tokens"] = json!(8),
            (Dir::ResponsesOverChat, "max_tokens") => body["max_output_tokens"] = json!(8),
            _ => {}
        }
        if stream {
            body["stream"] = json!(true);
            if matches!(self, Dir::ChatOverMessages) {
                body["stream_options"] = json!({"include_usage": true});
            }
        }
        body
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn upstream_answer(dir: Dir, case: &str, stream: bool) -> Answer {
    let ext = if stream { "sse" } else { "json" };
    let path = fixtures().join(format!("upstream/{}/{case}.{ext}", dir.upstream()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if stream {
        Answer::sse(&text)
    } else {
        Answer::json(200, text)
    }
}

/// Timestamps the translation takes from the clock.
fn mask_clock(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "created" {
                    *v = json!("<any>");
                } else {
                    mask_clock(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask_clock),
        _ => {}
    }
}

fn encode(events: &[(Option<String>, Value)]) -> String {
    events
        .iter()
        .map(|(name, data)| {
            let data = data
                .as_str()
                .map_or_else(|| data.to_string(), str::to_owned);
            match name {
                Some(n) => format!("event: {n}\ndata: {data}\n\n"),
                None => format!("data: {data}\n\n"),
            }
        })
        .collect()
}

fn check(dir: Dir, case: &str, stream: bool, got: &Got) {
    let ext = if stream { "sse" } else { "json" };
    let path = fixtures().join(format!("expected/{}/{case}.{ext}", dir.name()));
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    if stream {
        let mut actual = got.events();
        actual.iter_mut().for_each(|(_, v)| mask_clock(v));
        if update {
            std::fs::write(&path, encode(&actual)).unwrap();
        }
        let expected =
            sse_events(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
        assert_eq!(
            expected.len(),
            actual.len(),
            "{dir:?}/{case}: number of events\n{}",
            encode(&actual)
        );
        for (i, ((en, ev), (an, av))) in expected.iter().zip(&actual).enumerate() {
            assert_eq!(en, an, "{dir:?}/{case}: name of event {i}");
            assert_json(ev, av, &format!("{}/{case} event {i}", dir.name()));
        }
    } else {
        let mut actual = got.json();
        mask_clock(&mut actual);
        if update {
            std::fs::write(&path, serde_json::to_string_pretty(&actual).unwrap() + "\n").unwrap();
        }
        let expected: Value = serde_json::from_slice(
            &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .unwrap();
        assert_json(&expected, &actual, &format!("{}/{case}", dir.name()));
    }
}

async fn golden(dir: Dir) {
    for case in CASES {
        for stream in [false, true] {
            let request = dir.request(case, stream);
            let (seen, got) = call(
                dir.config(),
                dir.client_path(),
                &request,
                upstream_answer(dir, case, stream),
            )
            .await;
            let got = got.unwrap_or_else(|e| panic!("{dir:?}/{case}: {e}"));
            assert_eq!(got.status, 200, "{dir:?}/{case}: {:?}", got.body);
            assert!(
                !got.broke,
                "{dir:?}/{case}: the stream broke: {:?}",
                got.body
            );
            let seen = seen.unwrap();
            assert!(seen.headers.get("accept-encoding").is_none());
            match dir {
                Dir::ChatOverMessages => {
                    assert_eq!(seen.path, "/v1/messages");
                    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");
                    assert!(seen.json.get("stream_options").is_none());
                }
                _ => {
                    assert_eq!(seen.path, "/v1/chat/completions");
                    assert_eq!(
                        seen.json.get("stream_options").is_some(),
                        stream,
                        "usage asked for streams only"
                    );
                }
            }
            let content_type = got.headers["content-type"].to_str().unwrap();
            if stream {
                assert!(content_type.starts_with("text/event-stream"));
                assert!(got.headers.get("content-length").is_none());
                // The same answer cut at odd byte positions translates the same.
                let (_, again) = call(
                    dir.config(),
                    dir.client_path(),
                    &request,
                    upstream_answer(dir, case, true).resplit(7),
                )
                .await;
                let mut a = again.unwrap().events();
                let mut b = got.events();
                a.iter_mut()
                    .chain(b.iter_mut())
                    .for_each(|(_, v)| mask_clock(v));
                assert_eq!(a, b, "{dir:?}/{case}: frame boundaries change nothing");
            } else {
                assert_eq!(content_type, "application/json");
                assert_eq!(
                    got.headers["content-length"],
                    got.body.len().to_string().as_str()
                );
            }
            check(dir, case, stream, &got);
        }
    }
}

#[tokio::test]
async fn messages_over_chat() {
    golden(Dir::MessagesOverChat).await;
}

#[tokio::test]
async fn chat_over_messages() {
    golden(Dir::ChatOverMessages).await;
}

#[tokio::test]
async fn responses_over_chat() {
    golden(Dir::ResponsesOverChat).await;
}
