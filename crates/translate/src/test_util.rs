//! Helpers for the state-machine tests: feed events, read the output back.

use llm_proxy_core::sse::{Event, Parser};
use serde_json::Value;

use crate::stream::{MAX_BLOCKS, Step};

/// That a stream's steps went on up to [`MAX_BLOCKS`] items, blocks or
/// calls, and the next (`what`) failed it, saying the bound.
pub(crate) fn fails_past_the_bound(steps: &[Step], what: &str) {
    assert!(steps[..MAX_BLOCKS].iter().all(|s| *s == Step::Continue));
    let Step::Fail(why) = &steps[MAX_BLOCKS] else {
        panic!("{what} {MAX_BLOCKS} was accepted");
    };
    assert!(why.contains(&MAX_BLOCKS.to_string()), "{why}");
}

/// A `data:`-only event.
pub(crate) fn data(data: &str) -> Event {
    Event {
        data: data.to_owned(),
        ..Event::default()
    }
}

/// An event with a name.
pub(crate) fn named(name: &str, data: &str) -> Event {
    Event {
        event: Some(name.to_owned()),
        data: data.to_owned(),
        ..Event::default()
    }
}

/// The events of an SSE byte stream: `(event name, data as JSON)`; a
/// `[DONE]` reads as the JSON string `"[DONE]"`.
pub(crate) fn events(out: &[u8]) -> Vec<(Option<String>, Value)> {
    let mut parser = Parser::new();
    parser.push(out).expect("the translation writes valid SSE");
    assert!(
        !parser.has_partial(),
        "the output ends on an event boundary"
    );
    std::iter::from_fn(|| parser.next_event())
        .map(|e| {
            let json = if e.is_done() {
                Value::String(e.data.clone())
            } else {
                serde_json::from_str(&e.data).expect("every event's data is JSON")
            };
            (e.event, json)
        })
        .collect()
}

/// The event names (or `type`s) of an output, in order.
pub(crate) fn names(out: &[(Option<String>, Value)]) -> Vec<String> {
    out.iter()
        .map(|(name, v)| {
            name.clone()
                .or_else(|| v.get("type").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| v.as_str().unwrap_or("chunk").to_owned())
        })
        .collect()
}

/// What a chat upstream may send instead of a usable `usage` object:
/// nothing, null, no counts, or counts that are not non-negative integers.
pub(crate) fn no_chat_usage() -> [Option<Value>; 7] {
    use serde_json::json;
    [
        None,
        Some(Value::Null),
        Some(json!({})),
        Some(json!({"total_tokens": 5})),
        Some(json!({"prompt_tokens": -1, "completion_tokens": 2})),
        Some(json!({"prompt_tokens": "3", "completion_tokens": 2})),
        Some(json!("lots")),
    ]
}

/// A one-choice chat answer with each of [`no_chat_usage`]'s usages (the
/// usage, for messages, and the answer).
pub(crate) fn chat_answers_without_usage() -> impl Iterator<Item = (Option<Value>, Value)> {
    no_chat_usage().into_iter().map(|usage| {
        let mut chat = serde_json::json!({"choices": [{"finish_reason": "stop", "message": {"content": "a"}}]});
        if let Some(u) = &usage {
            chat["usage"] = u.clone();
        }
        (usage, chat)
    })
}

/// Streamed tool-call scenarios that must each come out as one call,
/// `get_weather` with arguments `{"city":"Paris"}`: every chat `delta` of
/// each, before its finish chunk.
pub(crate) fn one_call_scenarios() -> Vec<(&'static str, Vec<Value>)> {
    let piece = |index: Option<u64>, id: &str, name: Option<&str>, args: &str| {
        let mut call =
            serde_json::json!({"id": id, "type": "function", "function": {"arguments": args}});
        if let Some(index) = index {
            call["index"] = index.into();
        }
        if let Some(name) = name {
            call["function"]["name"] = name.into();
        }
        serde_json::json!({"tool_calls": [call]})
    };
    let fresh_ids = |index| {
        vec![
            piece(index, "call_A", Some("get_weather"), ""),
            piece(index, "call_B", None, r#"{"city":"#),
            piece(index, "call_C", None, r#""Paris"}"#),
            // Without an index, an id seen before is its call again.
            piece(index, "call_A", None, ""),
        ]
    };
    vec![
        // LM Studio, mlx: every argument piece under a fresh id, no name.
        ("fresh ids at index 0", fresh_ids(Some(0))),
        ("fresh ids without index", fresh_ids(None)),
        // Gemini splits the name.
        (
            "name in pieces",
            vec![
                piece(Some(0), "call_A", Some("get_"), ""),
                piece(Some(0), "call_A", Some("weather"), ""),
                piece(Some(0), "call_A", Some(""), r#"{"city":"Paris"}"#),
            ],
        ),
        // MiniMax repeats it whole with every piece.
        (
            "name repeated",
            vec![
                piece(Some(0), "call_A", Some("get_weather"), ""),
                piece(Some(0), "call_A", Some("get_weather"), r#"{"city":"#),
                piece(Some(0), "call_A", Some("get_weather"), r#""Paris"}"#),
            ],
        ),
        // llama.cpp, for a while: arguments as an object.
        (
            "arguments as an object",
            vec![
                serde_json::json!({"tool_calls": [{"index": 0, "id": "call_A", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
            ],
        ),
    ]
}

/// Tool-call ids as a test can compare them: each id the translation made
/// up (`prefix` + 32 hex digits, fresh every time) becomes `prefix#n`, `n`
/// counting distinct made-up ids in order; the upstream's stay as they are.
pub(crate) fn made_up_ids(ids: impl IntoIterator<Item = String>, prefix: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    ids.into_iter()
        .map(|id| match id.strip_prefix(prefix) {
            Some(rest) if rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                let n = seen.iter().position(|s| *s == id).unwrap_or_else(|| {
                    seen.push(id.clone());
                    seen.len() - 1
                });
                format!("{prefix}#{n}")
            }
            _ => id,
        })
        .collect()
}

/// Chat chunks that make a stream translator hold ever more of its tool
/// calls, in two scenarios each of which must fail the stream before its
/// end: a name that keeps coming in 1 MiB pieces, each unlike the name so
/// far (no arguments, so nothing is sent on yet: 40 MiB), and three calls
/// whose ids, kept for the whole stream, are 12 MiB each.
pub(crate) fn tool_calls_held_without_bound() -> [Vec<String>; 2] {
    let chunk = |call: Value| {
        serde_json::json!({"id": "chatcmpl-1", "choices": [{"index": 0,
            "delta": {"tool_calls": [call]}, "finish_reason": null}]})
        .to_string()
    };
    let (x, y) = ("x".repeat(1 << 20), "y".repeat(1 << 20));
    let names = (0..40)
        .map(|n| {
            let piece = if n % 2 == 0 { &x } else { &y };
            chunk(serde_json::json!({"index": 0, "function": {"name": piece, "arguments": ""}}))
        })
        .collect();
    let id = "i".repeat(12 << 20);
    let ids = (0..3)
        .map(|n| {
            chunk(serde_json::json!({"index": n, "id": format!("{id}{n}"),
                "function": {"name": "f", "arguments": "{}"}}))
        })
        .collect();
    [names, ids]
}

/// An answer of Mistral's reasoning models, content in parts: the deltas
/// of its stream, and the `message` of the same answer whole. Both read as
/// reasoning `Let me think. Yes.` and text `Paris.` (a part of another
/// type says nothing a translation can tell).
pub(crate) fn content_in_parts() -> (Vec<Value>, Value) {
    use serde_json::json;
    let thinking = |t: &str| json!({"type": "thinking", "thinking": [{"type": "text", "text": t}]});
    let text = |t: &str| json!({"type": "text", "text": t});
    let reference = json!({"type": "reference", "reference_ids": [1]});
    let deltas = vec![
        json!({"role": "assistant", "content": [thinking("Let me think.")]}),
        json!({"content": [{"type": "thinking", "thinking": " Yes."}]}),
        json!({"content": [text("Par"), reference.clone()]}),
        json!({"content": "is."}),
    ];
    let message = json!({"role": "assistant", "content": [
        thinking("Let me think."),
        {"type": "thinking", "thinking": " Yes."},
        text("Par"),
        reference,
        text("is."),
    ]});
    (deltas, message)
}

/// An answer with a legacy `function_call` (OpenAI's format before
/// `tools`, which some servers still send): the deltas of its stream, with
/// the `function_call` finish reason, and the `message` of the same answer
/// whole. Both are one call of `get_weather` with arguments
/// `{"city":"Paris"}`, and no id. (A `function_call` that says nothing, as
/// some servers send with every message, is no call.)
pub(crate) fn legacy_function_call() -> (Vec<Value>, Value) {
    use serde_json::json;
    let deltas = vec![
        json!({"role": "assistant", "content": null, "function_call": {"name": null, "arguments": ""}}),
        json!({"function_call": {"name": "get_weather", "arguments": ""}}),
        json!({"function_call": {"arguments": "{\"city\":"}}),
        json!({"function_call": {"arguments": "\"Paris\"}"}, "tool_calls": null}),
    ];
    let message = json!({"role": "assistant", "content": null,
        "function_call": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}});
    (deltas, message)
}

/// Why an answer the upstream gave up on with `reason` fails.
fn gave_up(reason: &str) -> String {
    format!("the upstream gave up on its answer (finish_reason `{reason}`)")
}

/// Whole chat answers the upstream gave up on (vLLM's `abort`, `error`),
/// here over half a call's arguments, and why each is no answer.
pub(crate) fn answers_given_up() -> [(Value, String); 2] {
    ["abort", "error"].map(|reason| {
        let answer = serde_json::json!({"choices": [{"finish_reason": reason, "message": {"tool_calls": [
            {"id": "c1", "function": {"name": "write", "arguments": "{\"path\": \"a\", \"con"}}]}}]});
        (answer, gave_up(reason))
    })
}

/// Chat streams (their events' data, in order) that end before their
/// answer finished (nothing at all, or half a call's arguments and no
/// finish reason) or that the upstream gave up on (vLLM's `abort`,
/// `error`), and why each fails.
pub(crate) fn unfinished_streams() -> [(Vec<String>, String); 4] {
    let chunk = |delta: Value, finish: Option<&str>| {
        serde_json::json!({"id": "chatcmpl-9", "model": "llama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        .to_string()
    };
    let cut_call = chunk(
        serde_json::json!({"tool_calls": [{"index": 0, "id": "call_1",
            "function": {"name": "write", "arguments": "{\"path\": \"a\", \"con"}}]}),
        None,
    );
    let usage =
        r#"{"id":"chatcmpl-9","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#;
    let done = || "[DONE]".to_owned();
    let unfinished = crate::chat::UNFINISHED.to_owned();
    [
        (vec![done()], unfinished.clone()),
        (vec![cut_call.clone(), usage.to_owned(), done()], unfinished),
        (
            vec![
                cut_call,
                chunk(serde_json::json!({}), Some("abort")),
                done(),
            ],
            gave_up("abort"),
        ),
        (
            vec![
                chunk(
                    serde_json::json!({"content": "The answer is"}),
                    Some("error"),
                ),
                done(),
            ],
            gave_up("error"),
        ),
    ]
}
