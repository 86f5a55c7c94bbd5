//! A whole upstream answer told as the stream its client asked for.
//!
//! A client that asked to stream (Claude Code and Codex always do) reads
//! only events; an upstream that ignored `stream: true` and answered with
//! one JSON object would leave it with a body it cannot read. The answer is
//! written out as the event stream the upstream would have sent, in its own
//! dialect, and that goes through the same stream translation as a real
//! one: one code path for what the client sees.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::wire::{MAX_ID_BYTES, input_to_arguments};

/// An upstream's chat completion as the chunks of a chat stream: the role,
/// reasoning (under one name), content, refusal and each tool call in turn, the finish
/// reason, the usage, `[DONE]` (first choice only: a translated request
/// asks for one).
pub(crate) fn chat_stream(answer: &Value) -> String {
    let choice = &answer["choices"][0];
    let message = &choice["message"];
    // Repeated in every chunk: only as long as the stream translation
    // would use them (else none, which it reads as absent).
    let short = |value: &Value| match value.as_str() {
        Some(s) if s.len() <= MAX_ID_BYTES => value.clone(),
        _ => Value::Null,
    };
    let (id, model) = (short(&answer["id"]), short(&answer["model"]));
    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": answer["created"],
            "model": model,
            "choices": choices,
        })
    };
    let delta = |delta: Value| chunk(json!([{"index": 0, "delta": delta, "finish_reason": null}]));
    let mut chunks = vec![delta(json!({"role": "assistant"}))];
    // Read as a whole answer's translation reads it: the reasoning under
    // one name only (vLLM gives the same text under both, and a stream's
    // delta reads them as one), content in parts as its text and thinking.
    let read = crate::content::Message::read(message);
    let texts = [
        ("reasoning_content", read.reasoning()),
        ("content", read.text()),
        ("refusal", read.refusal()),
    ];
    for (field, text) in texts {
        if let Some(text) = text {
            chunks.push(delta(json!({ field: text })));
        }
    }
    // (Their count was checked by the whole answer's translation.)
    for (index, call) in read.calls().unwrap_or_default().into_iter().enumerate() {
        chunks.push(delta(json!({"tool_calls": [{
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {
                "name": call.function["name"],
                "arguments": call.function["arguments"],
            },
        }]})));
    }
    // With vLLM's `stop_reason` (the stop string matched), which the
    // stream translation reads from the finish chunk as from a whole answer.
    // A whole answer without a finish reason was taken as finished (a
    // stream without one is not: see `chat::UNFINISHED`).
    let finish_reason = match &choice["finish_reason"] {
        Value::String(reason) if !reason.is_empty() => reason.as_str(),
        _ => "stop",
    };
    let mut finish = json!({"index": 0, "delta": {}, "finish_reason": finish_reason});
    if !choice["stop_reason"].is_null() {
        finish["stop_reason"] = choice["stop_reason"].clone();
    }
    chunks.push(chunk(json!([finish])));
    if answer["usage"].is_object() {
        let mut usage = chunk(json!([]));
        usage["usage"] = answer["usage"].clone();
        chunks.push(usage);
    }
    let mut sse = String::new();
    for chunk in chunks {
        let _ = write!(sse, "data: {chunk}\n\n");
    }
    sse.push_str("data: [DONE]\n\n");
    sse
}

/// An upstream's Anthropic message as the events of a Messages stream:
/// `message_start`, each content block (started empty, its content in one
/// delta), `message_delta` with the stop reason and usage, `message_stop`.
pub(crate) fn messages_stream(answer: &Value) -> String {
    let mut start = answer.clone();
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    start["stop_sequence"] = Value::Null;
    let mut events = vec![json!({"type": "message_start", "message": start})];
    for (index, block) in answer["content"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let (empty, delta) = match block["type"].as_str() {
            Some("text") => (
                json!({"type": "text", "text": ""}),
                Some(json!({"type": "text_delta", "text": block["text"]})),
            ),
            Some("thinking") => (
                json!({"type": "thinking", "thinking": ""}),
                Some(json!({"type": "thinking_delta", "thinking": block["thinking"]})),
            ),
            // The arguments a whole answer's translation gives them: `{}`
            // for none, a string as it is.
            Some("tool_use") => (
                json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}),
                Some(json!({"type": "input_json_delta",
                    "partial_json": input_to_arguments(block.get("input").unwrap_or(&Value::Null))})),
            ),
            // Whole in its start (`redacted_thinking`, server tools' blocks).
            _ => (block.clone(), None),
        };
        events.push(json!({"type": "content_block_start", "index": index, "content_block": empty}));
        if let Some(delta) = delta {
            events.push(json!({"type": "content_block_delta", "index": index, "delta": delta}));
        }
        if let Some(signature) = block["signature"].as_str() {
            events.push(json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": signature}}));
        }
        events.push(json!({"type": "content_block_stop", "index": index}));
    }
    events.push(json!({
        "type": "message_delta",
        "delta": {"stop_reason": answer["stop_reason"], "stop_sequence": answer["stop_sequence"]},
        "usage": answer["usage"],
    }));
    events.push(json!({"type": "message_stop"}));
    let mut sse = String::new();
    for event in events {
        let _ = write!(
            sse,
            "event: {}\ndata: {event}\n\n",
            event["type"].as_str().unwrap_or("")
        );
    }
    sse
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(sse: &str) -> Vec<Value> {
        sse.split("\n\n")
            .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn a_chat_answer_becomes_its_chunks() {
        let answer = json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant",
                "content": "Hi", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{\"a\":1}"}}]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}});
        let sse = chat_stream(&answer);
        assert!(sse.ends_with("data: [DONE]\n\n"));
        let chunks = data(&sse);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["delta"])
            .collect();
        assert_eq!(deltas[0]["role"], "assistant");
        assert_eq!(deltas[1]["content"], "Hi");
        assert_eq!(deltas[2]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(deltas[3]["tool_calls"][0]["index"], 1);
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chunks[5]["usage"]["total_tokens"], 7);
        assert!(
            chunks
                .iter()
                .all(|c| c["id"] == "c1" && c["object"] == "chat.completion.chunk")
        );
    }

    #[test]
    fn the_matched_stop_string_goes_into_the_finish_chunk() {
        let answer = |stop_reason: Value| {
            json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "stop_reason": stop_reason,
                    "message": {"role": "assistant", "content": "abc"}}]})
        };
        let finish = |sse: String| data(&sse).last().unwrap()["choices"][0].clone();
        let matched = finish(chat_stream(&answer(json!("END"))));
        assert_eq!(
            (&matched["finish_reason"], &matched["stop_reason"]),
            (&json!("stop"), &json!("END"))
        );
        let plain = finish(chat_stream(&answer(Value::Null)));
        assert!(plain.get("stop_reason").is_none(), "{plain}");
        // A whole answer without a finish reason was taken as finished, so
        // its stream is too (one without one is not).
        for missing in [Value::Null, json!("")] {
            let mut whole = answer(Value::Null);
            whole["choices"][0]["finish_reason"] = missing;
            assert_eq!(finish(chat_stream(&whole))["finish_reason"], "stop");
        }
    }

    #[test]
    fn a_message_becomes_its_events() {
        let answer = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "text", "text": "Hi"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 3, "output_tokens": 9}});
        let events = data(&messages_stream(&answer));
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(events[0]["message"]["content"], json!([]));
        assert_eq!(events[0]["message"]["usage"]["input_tokens"], 3);
        assert_eq!(events[3]["delta"]["signature"], "sig");
        assert_eq!(events[9]["delta"]["partial_json"], "{\"a\":1}");
        assert_eq!(events[11]["delta"]["stop_reason"], "tool_use");
        assert_eq!(events[11]["usage"]["output_tokens"], 9);
    }

    /// The Messages answer a client that streams gets from a whole chat
    /// answer: the synthesised chunks through the stream translation.
    fn as_messages_stream(answer: &Value) -> Vec<Value> {
        let mut parser = llm_proxy_core::sse::Parser::new();
        parser.push(chat_stream(answer).as_bytes()).unwrap();
        let ctx = crate::messages_over_chat::Context {
            thinking: true,
            ..Default::default()
        };
        let mut map = crate::messages_over_chat::stream::ChatToMessages::new(ctx);
        let mut out = Vec::new();
        while let Some(event) = parser.next_event() {
            assert_eq!(map.event(&event, &mut out), crate::stream::Step::Continue);
        }
        data(std::str::from_utf8(&out).unwrap())
    }

    #[test]
    fn reasoning_under_both_names_and_content_in_parts_come_once() {
        // vLLM fills `reasoning` and, for older clients, `reasoning_content`
        // with the same text; some servers give content as text parts.
        let answer = json!({"id": "c1", "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "reasoning": "think", "reasoning_content": "think",
                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}}]});
        let events = as_messages_stream(&answer);
        let thinking: String = events
            .iter()
            .filter_map(|e| e["delta"]["thinking"].as_str())
            .collect();
        let text: String = events
            .iter()
            .filter_map(|e| e["delta"]["text"].as_str())
            .collect();
        assert_eq!(thinking, "think");
        assert_eq!(text, "Hello");
        // As the whole answer says it.
        let whole = crate::messages_over_chat::response::response(
            &answer,
            &crate::messages_over_chat::Context {
                thinking: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(whole["content"][0]["thinking"], "think");
        assert_eq!(whole["content"][1]["text"], "Hello");
    }

    #[test]
    fn content_in_parts_streams_as_its_whole_answer_reads() {
        // Mistral's reasoning models: thinking and text parts.
        let (_, message) = crate::test_util::content_in_parts();
        let answer = json!({"id": "c1", "choices": [{"index": 0, "finish_reason": "stop",
            "message": message}]});
        let events = as_messages_stream(&answer);
        let read = |key: &str| -> String {
            events
                .iter()
                .filter_map(|e| e["delta"][key].as_str())
                .collect()
        };
        assert_eq!(read("thinking"), "Let me think. Yes.");
        assert_eq!(read("text"), "Paris.");
    }

    #[test]
    fn a_legacy_function_call_streams_as_a_tool_call() {
        let (_, message) = crate::test_util::legacy_function_call();
        let answer = json!({"id": "c1", "choices": [{"index": 0, "finish_reason": "function_call",
            "message": message}]});
        let events = as_messages_stream(&answer);
        let tool = events
            .iter()
            .find(|e| e["content_block"]["type"] == "tool_use")
            .expect("a tool_use block");
        assert_eq!(tool["content_block"]["name"], "get_weather");
        let arguments: String = events
            .iter()
            .filter_map(|e| e["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(arguments, r#"{"city":"Paris"}"#);
        let end = events
            .iter()
            .find(|e| e["type"] == "message_delta")
            .unwrap();
        assert_eq!(end["delta"]["stop_reason"], "tool_use");
    }

    #[test]
    fn tool_input_streams_as_a_whole_answer_gives_it() {
        let answer = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [
                {"type": "tool_use", "id": "t1", "name": "f"},
                {"type": "tool_use", "id": "t2", "name": "g", "input": "{\"k\":1}"},
                {"type": "tool_use", "id": "t3", "name": "h", "input": {"a": 1}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 3, "output_tokens": 9}});
        let arguments: Vec<String> = data(&messages_stream(&answer))
            .iter()
            .filter_map(|e| e["delta"]["partial_json"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(arguments, ["{}", r#"{"k":1}"#, r#"{"a":1}"#]);
    }

    #[test]
    fn an_id_or_model_too_long_to_repeat_is_left_out_of_the_chunks() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        let answer = json!({"id": long, "model": long, "choices": [{"index": 0,
            "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}]});
        let sse = chat_stream(&answer);
        assert!(!sse.contains(&long));
        assert!(
            data(&sse)
                .iter()
                .all(|c| c["id"].is_null() && c["model"].is_null())
        );
    }
}
