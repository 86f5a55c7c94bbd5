//! Property tests: any chat chunk sequence a chat server (the mock among
//! them) can produce — text deltas, reasoning deltas, tool calls whose
//! arguments come in random pieces, a finish reason, an optional usage chunk
//! — cut into random frames, yields a well-formed event sequence in the
//! Anthropic and the Responses dialects; and any Anthropic event sequence
//! yields well-formed chat chunks.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Answer, Got, call};
use llm_proxy_core::Api;
use llm_proxy_translate::{Protocol, TranslateConfig};
use proptest::prelude::*;
use serde_json::{Value, json};

/// One segment of a generated answer.
#[derive(Clone, Debug)]
enum Segment {
    Text(Vec<String>),
    Reasoning(Vec<String>),
    Tool { name: String, pieces: Vec<String> },
}

#[derive(Clone, Debug)]
struct Script {
    role_chunk: bool,
    segments: Vec<Segment>,
    finish: &'static str,
    usage: Option<(u64, u64)>,
    frame: usize,
}

fn piece() -> impl Strategy<Value = String> {
    // Quotes, escapes, newlines and non-ASCII: what JSON and SSE must carry.
    "[a-z \"\\\\\n\u{e9}\u{1F600}{}:,]{0,6}"
}

fn segment() -> impl Strategy<Value = Segment> {
    prop_oneof![
        3 => proptest::collection::vec(piece(), 1..6).prop_map(Segment::Text),
        1 => proptest::collection::vec(piece(), 1..4).prop_map(Segment::Reasoning),
        2 => ("[a-z_]{1,10}", proptest::collection::vec(piece(), 0..5))
            .prop_map(|(name, pieces)| Segment::Tool { name, pieces }),
    ]
}

fn script() -> impl Strategy<Value = Script> {
    (
        any::<bool>(),
        proptest::collection::vec(segment(), 0..6),
        prop_oneof![
            Just("stop"),
            Just("length"),
            Just("tool_calls"),
            Just("content_filter")
        ],
        proptest::option::of((0u64..5000, 0u64..5000)),
        1usize..64,
    )
        .prop_map(|(role_chunk, segments, finish, usage, frame)| Script {
            role_chunk,
            segments,
            finish,
            usage,
            frame,
        })
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({"id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

impl Script {
    fn sse(&self) -> String {
        let mut out = String::new();
        if self.role_chunk {
            out += &chunk(json!({"role": "assistant", "content": ""}), None);
        }
        let mut tool = 0;
        for segment in &self.segments {
            match segment {
                Segment::Text(pieces) => pieces
                    .iter()
                    .for_each(|p| out += &chunk(json!({"content": p}), None)),
                Segment::Reasoning(pieces) => pieces
                    .iter()
                    .for_each(|p| out += &chunk(json!({"reasoning_content": p}), None)),
                Segment::Tool { name, pieces } => {
                    let mut delta = json!({"tool_calls": [{"index": tool, "id": format!("call_{tool}"),
                        "type": "function", "function": {"name": name, "arguments": ""}}]});
                    if !self.role_chunk && out.is_empty() {
                        // The mock's shape: the role rides on the first tool-call chunk.
                        delta["role"] = json!("assistant");
                        delta["content"] = Value::Null;
                        delta["refusal"] = Value::Null;
                    }
                    out += &chunk(delta, None);
                    for p in pieces {
                        out += &chunk(
                            json!({"tool_calls": [{"index": tool, "function": {"arguments": p}}]}),
                            None,
                        );
                    }
                    tool += 1;
                }
            }
        }
        out += &chunk(json!({}), Some(self.finish));
        if let Some((p, c)) = self.usage {
            let u = json!({"id": "chatcmpl-p", "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
            out += &format!("data: {u}\n\n");
        }
        out + "data: [DONE]\n\n"
    }

    fn text(&self) -> String {
        self.segments
            .iter()
            .filter_map(|s| {
                if let Segment::Text(p) = s {
                    Some(p.concat())
                } else {
                    None
                }
            })
            .collect()
    }

    fn reasoning(&self) -> String {
        self.segments
            .iter()
            .filter_map(|s| {
                if let Segment::Reasoning(p) = s {
                    Some(p.concat())
                } else {
                    None
                }
            })
            .collect()
    }

    fn tools(&self) -> Vec<(String, String)> {
        self.segments
            .iter()
            .filter_map(|s| {
                if let Segment::Tool { name, pieces } = s {
                    Some((name.clone(), pieces.concat()))
                } else {
                    None
                }
            })
            .collect()
    }

    fn run(&self, path: &str, request: Value) -> Got {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let config = TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions]);
        let answer = Answer::sse(&self.sse()).resplit(self.frame);
        let (_, got) = rt.block_on(call(config, path, &request, answer));
        got.unwrap()
    }
}

/// Checks an Anthropic event stream; returns text, thinking and tool calls.
fn check_anthropic(got: &Got) -> (String, String, Vec<(String, String)>, Value) {
    let events = got.events();
    assert!(!got.broke);
    let types: Vec<&str> = events
        .iter()
        .map(|(_, v)| v["type"].as_str().unwrap())
        .collect();
    for (name, v) in &events {
        assert_eq!(
            name.as_deref(),
            v["type"].as_str(),
            "event name = data type"
        );
    }
    assert_eq!(types.first(), Some(&"message_start"));
    assert_eq!(types.iter().filter(|t| **t == "message_start").count(), 1);
    assert_eq!(types.iter().filter(|t| **t == "message_stop").count(), 1);
    assert_eq!(types.last(), Some(&"message_stop"));
    assert_eq!(types.iter().filter(|t| **t == "message_delta").count(), 1);
    assert_eq!(types[types.len() - 2], "message_delta");
    let (mut open, mut stopped): (BTreeMap<u64, String>, BTreeSet<u64>) =
        (BTreeMap::new(), BTreeSet::new());
    let (mut text, mut thinking, mut tools) = (String::new(), String::new(), Vec::new());
    let mut next = 0;
    for (_, v) in &events {
        let index = v["index"].as_u64();
        match v["type"].as_str().unwrap() {
            "content_block_start" => {
                assert_eq!(index, Some(next), "block indexes count up from 0");
                assert!(open.is_empty(), "one block at a time");
                let kind = v["content_block"]["type"].as_str().unwrap().to_owned();
                if kind == "tool_use" {
                    tools.push((
                        v["content_block"]["name"].as_str().unwrap().to_owned(),
                        String::new(),
                    ));
                }
                open.insert(next, kind);
                next += 1;
            }
            "content_block_delta" => {
                let kind = open
                    .get(&index.unwrap())
                    .expect("a delta for an open, started block");
                let d = &v["delta"];
                match (d["type"].as_str().unwrap(), kind.as_str()) {
                    ("text_delta", "text") => text += d["text"].as_str().unwrap(),
                    ("thinking_delta", "thinking") => thinking += d["thinking"].as_str().unwrap(),
                    ("input_json_delta", "tool_use") => {
                        tools.last_mut().unwrap().1 += d["partial_json"].as_str().unwrap()
                    }
                    (delta, block) => panic!("a {delta} inside a {block} block"),
                }
            }
            "content_block_stop" => {
                assert!(
                    open.remove(&index.unwrap()).is_some(),
                    "stopped once, after its start"
                );
                assert!(stopped.insert(index.unwrap()));
            }
            "message_delta" => assert!(open.is_empty(), "every block stopped before message_delta"),
            _ => {}
        }
    }
    assert_eq!(stopped.len() as u64, next);
    let delta = events[events.len() - 2].1.clone();
    // Counts, or nulls when the upstream reported no usage.
    assert!(
        ["output_tokens", "input_tokens"]
            .iter()
            .all(|k| delta["usage"][k].is_u64() || delta["usage"][k].is_null())
            && delta["usage"].as_object().is_some_and(|u| u.len() == 2),
        "usage present"
    );
    (text, thinking, tools, delta)
}

/// Checks a Responses event stream; returns the final response.
fn check_responses(got: &Got) -> Value {
    let events = got.events();
    assert!(!got.broke);
    let types: Vec<&str> = events
        .iter()
        .map(|(_, v)| v["type"].as_str().unwrap())
        .collect();
    assert_eq!(&types[..2], ["response.created", "response.in_progress"]);
    let last = *types.last().unwrap();
    assert!(
        last == "response.completed" || last == "response.incomplete",
        "{last}"
    );
    assert_eq!(
        types
            .iter()
            .filter(|t| t.starts_with("response.completed") || t.starts_with("response.incomplete"))
            .count(),
        1
    );
    let mut added: BTreeMap<String, u64> = BTreeMap::new();
    let mut done = BTreeSet::new();
    for (i, (_, v)) in events.iter().enumerate() {
        assert_eq!(v["sequence_number"], i as u64, "sequence numbers count up");
        match v["type"].as_str().unwrap() {
            "response.output_item.added" => {
                let id = v["item"]["id"].as_str().unwrap().to_owned();
                assert_eq!(v["output_index"], added.len() as u64);
                assert!(
                    added
                        .insert(id, v["output_index"].as_u64().unwrap())
                        .is_none()
                );
            }
            "response.output_item.done" => {
                assert!(done.insert(v["item"]["id"].as_str().unwrap().to_owned()))
            }
            t if t.contains("delta") || t.ends_with(".done") || t.contains("part.added") => {
                let id = v["item_id"].as_str().unwrap();
                assert_eq!(
                    added.get(id),
                    v["output_index"].as_u64().as_ref(),
                    "{t} references an added item"
                );
                assert!(!done.contains(id), "{t} after its item is done");
            }
            _ => {}
        }
    }
    assert_eq!(added.len(), done.len(), "every item done once");
    let response = events.last().unwrap().1["response"].clone();
    assert!(
        response["usage"]["total_tokens"].is_u64() || response["usage"].is_null(),
        "usage present, or null when the upstream reported none"
    );
    assert_eq!(response["output"].as_array().unwrap().len(), added.len());
    response
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn chat_streams_become_well_formed_anthropic_streams(script in script(), thinking in any::<bool>()) {
        let mut request = json!({"model": "m", "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "x"}]});
        if thinking {
            request["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
        }
        let got = script.run("/v1/messages", request);
        let (text, reasoning, tools, delta) = check_anthropic(&got);
        prop_assert_eq!(text, script.text());
        prop_assert_eq!(reasoning, if thinking { script.reasoning() } else { String::new() });
        prop_assert_eq!(tools, script.tools());
        let usage = match script.usage {
            Some((p, c)) => json!({"input_tokens": p, "output_tokens": c}),
            None => json!({"input_tokens": null, "output_tokens": null}),
        };
        prop_assert_eq!(&delta["usage"], &usage);
        let expected = match script.finish {
            "length" => "max_tokens",
            "content_filter" => "refusal",
            // `tool_calls` with no tool call is told as `end_turn`.
            _ if !script.tools().is_empty() => "tool_use",
            _ => "end_turn",
        };
        prop_assert_eq!(&delta["delta"]["stop_reason"], expected);
    }

    #[test]
    fn chat_streams_become_well_formed_responses_streams(script in script()) {
        let request = json!({"model": "m", "stream": true, "input": "x"});
        let response = check_responses(&script.run("/v1/responses", request));
        let text: String = response["output"].as_array().unwrap().iter()
            .filter(|i| i["type"] == "message")
            .map(|i| i["content"][0]["text"].as_str().unwrap().to_owned())
            .collect();
        prop_assert_eq!(text, script.text());
        let calls: Vec<(String, String)> = response["output"].as_array().unwrap().iter()
            .filter(|i| i["type"] == "function_call")
            .map(|i| (i["name"].as_str().unwrap().to_owned(), i["arguments"].as_str().unwrap().to_owned()))
            .collect();
        // A call with no arguments has `{}`.
        let expected: Vec<(String, String)> = script.tools().into_iter()
            .map(|(name, args)| (name, if args.is_empty() { "{}".to_owned() } else { args }))
            .collect();
        prop_assert_eq!(calls, expected);
        let incomplete = matches!(script.finish, "length" | "content_filter");
        prop_assert_eq!(&response["status"], if incomplete { "incomplete" } else { "completed" });
        match script.usage {
            Some((p, c)) => prop_assert_eq!(&response["usage"]["total_tokens"], &json!(p + c)),
            // No usage from the upstream is none in the answer, never a zero one.
            None => prop_assert_eq!(&response["usage"], &Value::Null),
        }
    }
}

/// An Anthropic event sequence: text and tool blocks, then the end.
fn anthropic_stream(blocks: &[Segment], stop: &str, output: u64) -> String {
    let mut events = vec![
        json!({"type": "message_start", "message": {"id": "msg_p", "type": "message", "role": "assistant",
        "model": "claude", "content": [], "usage": {"input_tokens": 9, "output_tokens": 1}}}),
    ];
    for (i, block) in blocks.iter().enumerate() {
        let (start, deltas): (Value, Vec<Value>) = match block {
            Segment::Text(p) | Segment::Reasoning(p) => (
                json!({"type": "text", "text": ""}),
                p.iter()
                    .map(|t| json!({"type": "text_delta", "text": t}))
                    .collect(),
            ),
            Segment::Tool { name, pieces } => (
                json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": {}}),
                pieces
                    .iter()
                    .map(|t| json!({"type": "input_json_delta", "partial_json": t}))
                    .collect(),
            ),
        };
        events.push(json!({"type": "content_block_start", "index": i, "content_block": start}));
        events.extend(
            deltas
                .into_iter()
                .map(|d| json!({"type": "content_block_delta", "index": i, "delta": d})),
        );
        events.push(json!({"type": "content_block_stop", "index": i}));
    }
    events.push(json!({"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": output}}));
    events.push(json!({"type": "message_stop"}));
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    #[test]
    fn anthropic_streams_become_well_formed_chat_streams(
        blocks in proptest::collection::vec(segment(), 0..5),
        stop in prop_oneof![Just("end_turn"), Just("max_tokens"), Just("tool_use"), Just("stop_sequence")],
        output in 0u64..1000,
        include_usage in any::<bool>(),
        frame in 1usize..64,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let config = TranslateConfig::new(Protocol::Anthropic, [Api::Messages]);
        let request = json!({"model": "claude", "stream": true, "stream_options": {"include_usage": include_usage},
            "messages": [{"role": "user", "content": "x"}]});
        let answer = Answer::sse(&anthropic_stream(&blocks, stop, output)).resplit(frame);
        let got = rt.block_on(call(config, "/v1/chat/completions", &request, answer)).1.unwrap();
        prop_assert!(!got.broke);
        let events = got.events();
        prop_assert_eq!(events.last().map(|e| &e.1), Some(&json!("[DONE]")));
        let chunks = &events[..events.len() - 1];
        prop_assert_eq!(&chunks[0].1["choices"][0]["delta"]["role"], "assistant");
        let finishes: Vec<&Value> = chunks.iter().filter_map(|(_, c)| c["choices"].get(0)).map(|c| &c["finish_reason"]).filter(|f| !f.is_null()).collect();
        prop_assert_eq!(finishes.len(), 1, "one finish chunk");
        let usage: Vec<&Value> = chunks.iter().filter(|(_, c)| c.get("usage").is_some()).map(|(_, c)| &c["usage"]).collect();
        if include_usage {
            let expected = json!({"prompt_tokens": 9, "completion_tokens": output, "total_tokens": 9 + output});
            prop_assert_eq!(usage, vec![&expected]);
            prop_assert_eq!(&chunks[chunks.len() - 1].1["choices"], &json!([]), "the usage chunk is last");
        } else {
            prop_assert!(usage.is_empty());
        }
        let mut calls: BTreeMap<u64, (String, String)> = BTreeMap::new();
        let mut text = String::new();
        for (_, c) in chunks {
            let Some(delta) = c["choices"].get(0).map(|c| &c["delta"]) else { continue };
            text += delta["content"].as_str().unwrap_or("");
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().unwrap();
                if let Some(name) = call["function"]["name"].as_str() {
                    prop_assert!(!calls.contains_key(&index), "a call is introduced once");
                    prop_assert!(index == calls.len() as u64, "call indexes count up from 0");
                    calls.insert(index, (name.to_owned(), String::new()));
                }
                let entry = calls.get_mut(&index).expect("arguments of an introduced call");
                entry.1 += call["function"]["arguments"].as_str().unwrap();
            }
        }
        let expected_text: String = blocks.iter().filter_map(|b| match b { Segment::Text(p) | Segment::Reasoning(p) => Some(p.concat()), _ => None }).collect();
        prop_assert_eq!(text, expected_text);
        // A call without input gets `{}`, as a whole answer's does.
        let arguments = |pieces: &[String]| match pieces.concat() {
            joined if joined.is_empty() => "{}".to_owned(),
            joined => joined,
        };
        let expected_calls: Vec<(String, String)> = blocks.iter().filter_map(|b| match b { Segment::Tool { name, pieces } => Some((name.clone(), arguments(pieces))), _ => None }).collect();
        prop_assert_eq!(calls.into_values().collect::<Vec<_>>(), expected_calls);
    }
}
