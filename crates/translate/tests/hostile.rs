//! Property tests with a hostile upstream and a hostile client: well-formed
//! answers and requests mutated at random (a value swapped for any JSON, a
//! field added, an event dropped, repeated, moved or cut short) go through
//! every translation, whole and streamed. Whatever either side sends, the
//! client gets an answer or an error in its own dialect, and the upstream a
//! JSON request — never a panic, a hang, or a stream that is not SSE of
//! JSON events.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Answer, call};
use llm_proxy_core::{Api, sse};
use llm_proxy_translate::{Protocol, TranslateConfig};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, with the keys the dialects use (so that a mutation
/// often lands where a translation looks).
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        prop_oneof![Just(-1i64), Just(0), Just(1), Just(2), Just(i64::MAX)].prop_map(Value::from),
        "[a-z_ \"\\\\{}\u{e9}]{0,8}".prop_map(Value::from),
        key().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..4)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// The names the dialects' fields and types go by.
fn key() -> impl Strategy<Value = String> {
    proptest::sample::select(vec![
        "choices",
        "delta",
        "message",
        "content",
        "role",
        "tool_calls",
        "index",
        "id",
        "type",
        "function",
        "name",
        "arguments",
        "finish_reason",
        "usage",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "reasoning_content",
        "text",
        "thinking",
        "signature",
        "partial_json",
        "input",
        "content_block",
        "stop_reason",
        "error",
        "text_delta",
        "input_json_delta",
        "thinking_delta",
        "tool_use",
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "assistant",
        "stop",
        "tool_calls",
        "end_turn",
        "refusal",
        "logprobs",
    ])
    .prop_map(str::to_owned)
}

/// One change to an answer's events.
#[derive(Clone, Debug)]
enum Mutation {
    /// The value at a path (chosen by these numbers) becomes this one.
    Replace(Vec<usize>, Value),
    /// A field is added at a path.
    Insert(Vec<usize>, String, Value),
    Drop(usize),
    Repeat(usize),
    Move(usize, usize),
    /// The stream ends after this many bytes of its last event.
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let path = proptest::collection::vec(any::<usize>(), 1..5);
    prop_oneof![
        4 => (path.clone(), any_json()).prop_map(|(p, v)| Mutation::Replace(p, v)),
        2 => (path, key(), any_json()).prop_map(|(p, k, v)| Mutation::Insert(p, k, v)),
        1 => any::<usize>().prop_map(Mutation::Drop),
        1 => any::<usize>().prop_map(Mutation::Repeat),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Move(a, b)),
        1 => any::<usize>().prop_map(Mutation::Cut),
    ]
}

/// The value at the path `picks` chooses (each number picks a member of
/// the object or array it meets, modulo its size).
fn pick<'a>(mut value: &'a mut Value, picks: &[usize]) -> &'a mut Value {
    for &at in picks {
        let len = match &*value {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        };
        if len == 0 {
            break;
        }
        value = match value {
            Value::Object(map) => map.values_mut().nth(at % len).unwrap(),
            Value::Array(items) => &mut items[at % len],
            _ => unreachable!("a container"),
        };
    }
    value
}

/// `events` (each an SSE event name, if any, and its data) with the
/// mutations applied, as SSE text.
fn mutated(mut events: Vec<(Option<&'static str>, Value)>, mutations: &[Mutation]) -> String {
    let mut cut = None;
    for mutation in mutations {
        let len = events.len();
        if len == 0 {
            break;
        }
        match mutation.clone() {
            Mutation::Replace(path, value) => {
                let event = &mut events[path[0] % len].1;
                *pick(event, &path[1..]) = value;
            }
            Mutation::Insert(path, key, value) => {
                let event = &mut events[path[0] % len].1;
                if let Value::Object(map) = pick(event, &path[1..]) {
                    map.insert(key, value);
                }
            }
            Mutation::Drop(i) => {
                events.remove(i % len);
            }
            Mutation::Repeat(i) => {
                let event = events[i % len].clone();
                events.insert(i % len, event);
            }
            Mutation::Move(a, b) => {
                let event = events.remove(a % len);
                events.insert(b % len, event);
            }
            Mutation::Cut(at) => cut = Some(at),
        }
    }
    let mut text: String = events
        .iter()
        .map(|(name, data)| {
            let data = match data.as_str() {
                Some("[DONE]") => "[DONE]".to_owned(),
                _ => data.to_string(),
            };
            match name {
                Some(name) => format!("event: {name}\ndata: {data}\n\n"),
                None => format!("data: {data}\n\n"),
            }
        })
        .collect();
    if let Some(at) = cut {
        let last = text[..text.len().saturating_sub(2)]
            .rfind("\n\n")
            .map_or(0, |i| i + 2);
        let mut end = (last + at % (text.len() - last + 1)).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A chat stream: role, text, reasoning, two tool calls, finish, usage.
fn chat_events() -> Vec<(Option<&'static str>, Value)> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let call = |index: u64, id: Value, name: Value, arguments: &str| {
        json!({"tool_calls": [{"index": index, "id": id, "type": "function",
            "function": {"name": name, "arguments": arguments}}]})
    };
    let events = [
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"reasoning_content": "think"}), Value::Null),
        chunk(json!({"content": "hel"}), Value::Null),
        chunk(json!({"content": "lo"}), Value::Null),
        chunk(call(0, json!("call_a"), json!("f"), "{\"a\":"), Value::Null),
        chunk(call(0, Value::Null, Value::Null, "1}"), Value::Null),
        chunk(call(1, json!("call_b"), json!("g"), "{}"), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        json!({"id": "c", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
    ];
    let mut events: Vec<_> = events.into_iter().map(|e| (None, e)).collect();
    events.push((None, Value::String("[DONE]".into())));
    events
}

/// An Anthropic Messages stream: thinking, text, a tool call, the end.
fn messages_events() -> Vec<(Option<&'static str>, Value)> {
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
            "role": "assistant", "model": "claude", "content": [],
            "usage": {"input_tokens": 9, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "hmm"}}),
        json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "signature_delta", "signature": "sig"}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "text_delta", "text": "hi"}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "content_block_start", "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}}),
        json!({"type": "content_block_delta", "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": "{\"a\": 1}"}}),
        json!({"type": "content_block_stop", "index": 2}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 12}}),
        json!({"type": "message_stop"}),
    ];
    events
        .into_iter()
        .map(|e| {
            let name: &'static str = match e["type"].as_str().unwrap() {
                "message_start" => "message_start",
                "content_block_start" => "content_block_start",
                "content_block_delta" => "content_block_delta",
                "content_block_stop" => "content_block_stop",
                "message_delta" => "message_delta",
                _ => "message_stop",
            };
            (Some(name), e)
        })
        .collect()
}

/// A whole chat answer with text and a tool call.
fn chat_answer() -> Value {
    json!({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "hi", "reasoning_content": "think",
            "tool_calls": [{"id": "call_a", "type": "function",
                "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
}

/// A whole Messages answer with thinking, text and a tool call.
fn messages_answer() -> Value {
    json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "hi"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 9, "output_tokens": 12}})
}

/// The translations: an upstream of `protocol` serving `api`, asked on
/// `path` by a client.
const ROUTES: [(Protocol, Api, &str); 3] = [
    (Protocol::OpenAi, Api::ChatCompletions, "/v1/messages"),
    (Protocol::OpenAi, Api::ChatCompletions, "/v1/responses"),
    (Protocol::Anthropic, Api::Messages, "/v1/chat/completions"),
];

/// The client's request on `path`.
fn request(path: &str, stream: bool) -> Value {
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]);
    match path {
        "/v1/messages" => json!({"model": "m", "max_tokens": 100, "stream": stream,
            "tools": [{"name": "f", "input_schema": {"type": "object"}},
                {"name": "g", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "x"}]}),
        "/v1/responses" => json!({"model": "m", "stream": stream, "input": "x",
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}},
                {"type": "function", "name": "g", "parameters": {"type": "object"}}]}),
        _ => json!({"model": "m", "stream": stream, "tools": tools,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "x"}]}),
    }
}

/// A client request on `path` with most of what its dialect may hold: a
/// system prompt, images, tool calls and their results, reasoning, sampling
/// and format settings.
fn rich_request(path: &str, stream: bool) -> Value {
    match path {
        "/v1/messages" => json!({"model": "m", "max_tokens": 100, "stream": stream,
            "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["x"],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "tool_choice": {"type": "tool", "name": "f"},
            "metadata": {"user_id": "u"},
            "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "x"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "t", "signature": "s"},
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "42"}], "is_error": false}]}]}),
        "/v1/responses" => json!({"model": "m", "stream": stream, "instructions": "be brief",
            "max_output_tokens": 100, "temperature": 0.5, "parallel_tool_calls": true,
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": true}},
            "reasoning": {"effort": "low", "summary": "auto"},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}},
                {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "g", "parameters": {}}]}],
            "input": [
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "t"}]},
                {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "42"},
                {"role": "assistant", "content": "ok"}]}),
        _ => json!({"model": "m", "stream": stream, "max_tokens": 100, "temperature": 0.5,
            "stop": ["x"], "n": 1, "stream_options": {"include_usage": true},
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "x"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]}),
    }
}

/// Runs one request through translation against `answer`; checks what the
/// client gets is in its shape (SSE of JSON events, or JSON).
fn check(route: usize, stream: bool, answer: Answer) -> Result<(), TestCaseError> {
    let (_, _, path) = ROUTES[route % ROUTES.len()];
    check_request(route, &request(path, stream), answer)
}

/// [`check`], with this client request.
fn check_request(route: usize, request: &Value, answer: Answer) -> Result<(), TestCaseError> {
    let (protocol, api, path) = ROUTES[route % ROUTES.len()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let config = TranslateConfig::new(protocol, [api]);
    let got = rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            call(config, path, request, answer),
        )
        .await
    });
    let (_, got) = got.map_err(|_| TestCaseError::fail("the translation hung"))?;
    let Ok(got) = got else {
        // An error of the proxy's own, rendered by the server: fine.
        return Ok(());
    };
    let content_type = got
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("text/event-stream") {
        let mut parser = sse::Parser::new();
        prop_assert!(parser.push(&got.body).is_ok(), "SSE: {:?}", got.body);
        let mut last = None;
        while let Some(event) = parser.next_event() {
            let data = match event.is_done() {
                true => Value::from("[DONE]"),
                false => serde_json::from_str::<Value>(&event.data).map_err(|_| {
                    TestCaseError::fail(format!("an event that is not JSON: {:?}", event.data))
                })?,
            };
            last = Some(data);
        }
        // A stream that ends cleanly ends as its dialect ends one: whole,
        // or with an error event.
        if !got.broke {
            let last = last.unwrap_or_default();
            let kind = last["type"].as_str().unwrap_or("");
            let ended = match path {
                "/v1/messages" => ["message_stop", "error"].contains(&kind),
                "/v1/responses" => [
                    "response.completed",
                    "response.incomplete",
                    "response.failed",
                    "error",
                ]
                .contains(&kind),
                _ => last == "[DONE]" || last.get("error").is_some(),
            };
            prop_assert!(ended, "a stream that stops short: {:?}", got.body);
        }
    } else if !got.body.is_empty() {
        prop_assert!(
            serde_json::from_slice::<Value>(&got.body).is_ok(),
            "{} {:?}",
            got.status,
            got.body
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn mutated_streams_never_break_a_translation(
        route in 0usize..3,
        mutations in proptest::collection::vec(mutation(), 1..4),
        frame in 1usize..48,
    ) {
        let (_, api, _) = ROUTES[route];
        let events = match api {
            Api::Messages => messages_events(),
            _ => chat_events(),
        };
        let answer = Answer::sse(&mutated(events, &mutations)).resplit(frame);
        check(route, true, answer)?;
    }

    #[test]
    fn mutated_whole_answers_never_break_a_translation(
        route in 0usize..3,
        mutations in proptest::collection::vec(mutation(), 1..4),
        status in prop_oneof![Just(200u16), Just(400), Just(500)],
    ) {
        let (_, api, _) = ROUTES[route];
        let answer = match api {
            Api::Messages => messages_answer(),
            _ => chat_answer(),
        };
        let mutations: Vec<_> = mutations.into_iter().filter(|m| matches!(m, Mutation::Replace(..) | Mutation::Insert(..))).collect();
        let text = mutated(vec![(None, answer)], &mutations);
        let body = text.trim_start_matches("data: ").trim_end().to_owned();
        check(route, false, Answer::json(status, body))?;
    }

    #[test]
    fn mutated_requests_never_break_a_translation(
        route in 0usize..3,
        stream in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let (_, api, path) = ROUTES[route];
        let mutations: Vec<_> = mutations.into_iter().filter(|m| matches!(m, Mutation::Replace(..) | Mutation::Insert(..))).collect();
        let text = mutated(vec![(None, rich_request(path, stream))], &mutations);
        let request: Value = serde_json::from_str(text.trim_start_matches("data: ").trim_end()).unwrap();
        let answer = match (api, stream) {
            (Api::Messages, true) => Answer::sse(&mutated(messages_events(), &[])),
            (Api::Messages, false) => Answer::json(200, messages_answer().to_string()),
            (_, true) => Answer::sse(&mutated(chat_events(), &[])),
            (_, false) => Answer::json(200, chat_answer().to_string()),
        };
        check_request(route, &request, answer)?;
    }
}

/// The requests and answers the mutations start from go through every
/// translation whole (else the properties above would test only refusals).
#[test]
fn the_unmutated_requests_and_answers_are_translated() {
    for (protocol, api, path) in ROUTES {
        for stream in [false, true] {
            let answer = match (api, stream) {
                (Api::Messages, true) => Answer::sse(&mutated(messages_events(), &[])),
                (Api::Messages, false) => Answer::json(200, messages_answer().to_string()),
                (_, true) => Answer::sse(&mutated(chat_events(), &[])),
                (_, false) => Answer::json(200, chat_answer().to_string()),
            };
            for request in [request(path, stream), rich_request(path, stream)] {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let config = TranslateConfig::new(protocol, [api]);
                let (seen, got) = rt.block_on(call(config, path, &request, answer.clone()));
                let got = got.unwrap();
                assert!(seen.is_some(), "{path} {stream}: sent upstream");
                assert_eq!(got.status, 200, "{path} {stream}: {:?}", got.body);
                assert!(!got.broke, "{path} {stream}: {:?}", got.body);
                assert!(
                    !String::from_utf8_lossy(&got.body).contains("\"error\":{"),
                    "{path} {stream}: {:?}",
                    got.body
                );
            }
        }
    }
}
