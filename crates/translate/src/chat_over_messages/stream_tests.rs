use super::*;
use crate::test_util::{events, named};
use serde_json::json;

fn run(ctx: Context, upstream: &[(&str, Value)]) -> (Vec<(Option<String>, Value)>, Vec<Step>) {
    let mut m = MessagesToChat::new(ctx);
    let mut out = Vec::new();
    let steps = upstream
        .iter()
        .map(|(name, data)| m.event(&named(name, &data.to_string()), &mut out))
        .collect();
    (events(&out), steps)
}

fn start() -> (&'static str, Value) {
    (
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant",
        "model": "claude", "content": [], "stop_reason": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    )
}

fn block(index: u64, block: Value) -> (&'static str, Value) {
    (
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block": block}),
    )
}

fn delta(index: u64, delta: Value) -> (&'static str, Value) {
    (
        "content_block_delta",
        json!({"type": "content_block_delta", "index": index, "delta": delta}),
    )
}

fn stop(index: u64) -> (&'static str, Value) {
    (
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    )
}

fn end(reason: &str, output: u64) -> [(&'static str, Value); 2] {
    [
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": null}, "usage": {"output_tokens": output}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]
}

#[test]
fn text_with_usage_chunk() {
    let mut up = vec![
        start(),
        ("ping", json!({"type": "ping"})),
        block(0, json!({"type": "text", "text": ""})),
        delta(0, json!({"type": "text_delta", "text": "Hi"})),
        delta(0, json!({"type": "text_delta", "text": " there"})),
        stop(0),
    ];
    up.extend(end("end_turn", 15));
    let ctx = Context {
        include_usage: true,
        model: "c".into(),
        ..Context::default()
    };
    let (out, steps) = run(ctx, &up);
    assert!(steps.iter().all(|s| *s == Step::Continue));
    let chunks: Vec<&Value> = out.iter().map(|(_, v)| v).collect();
    assert_eq!(chunks.len(), 6);
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[0]["id"], "chatcmpl-01");
    assert_eq!(chunks[0]["model"], "claude");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "Hi"}));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(
        chunks[4]["usage"],
        json!({"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40})
    );
    assert_eq!(chunks[5], &json!("[DONE]"));
}

#[test]
fn tool_calls_get_their_own_indexes() {
    let mut up = vec![
        start(),
        block(0, json!({"type": "thinking", "thinking": ""})),
        delta(0, json!({"type": "thinking_delta", "thinking": "hmm"})),
        delta(0, json!({"type": "signature_delta", "signature": "sig"})),
        stop(0),
        block(1, json!({"type": "text", "text": ""})),
        delta(1, json!({"type": "text_delta", "text": "Checking."})),
        stop(1),
        block(
            2,
            json!({"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}),
        ),
        delta(2, json!({"type": "input_json_delta", "partial_json": ""})),
        delta(
            2,
            json!({"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}),
        ),
        delta(
            2,
            json!({"type": "input_json_delta", "partial_json": "ris\"}"}),
        ),
        stop(2),
        block(
            3,
            json!({"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}),
        ),
        delta(3, json!({"type": "input_json_delta", "partial_json": "{}"})),
        stop(3),
    ];
    up.extend(end("tool_use", 40));
    let (out, _) = run(Context::default(), &up);
    let deltas: Vec<&Value> = out
        .iter()
        .filter_map(|(_, v)| v.get("choices")?.get(0).map(|c| &c["delta"]))
        .collect();
    assert_eq!(deltas[1], &json!({"reasoning_content": "hmm"}));
    assert_eq!(deltas[2], &json!({"content": "Checking."}));
    assert_eq!(
        deltas[3],
        &json!({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
    );
    assert_eq!(
        deltas[4],
        &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": \"Pa"}}]})
    );
    assert_eq!(deltas[6]["tool_calls"][0]["index"], 1);
    assert_eq!(deltas[7]["tool_calls"][0]["function"]["arguments"], "{}");
    let finish = out
        .iter()
        .rev()
        .find_map(|(_, v)| v["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
    assert_eq!(out.last().unwrap().1, json!("[DONE]"));
    assert!(
        out.iter().all(|(_, v)| v.get("usage").is_none()),
        "no usage chunk unless asked"
    );
}

#[test]
fn forced_json_tool_streams_as_content() {
    let mut up = vec![
        start(),
        block(
            0,
            json!({"type": "tool_use", "id": "t", "name": "answer", "input": {}}),
        ),
        delta(
            0,
            json!({"type": "input_json_delta", "partial_json": "{\"a\":"}),
        ),
        delta(0, json!({"type": "input_json_delta", "partial_json": "1}"})),
        stop(0),
    ];
    up.extend(end("tool_use", 5));
    let (out, _) = run(
        Context {
            json_tool: Some("answer".into()),
            ..Context::default()
        },
        &up,
    );
    let text: String = out
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "{\"a\":1}");
    assert!(
        out.iter()
            .all(|(_, v)| v["choices"][0]["delta"].get("tool_calls").is_none())
    );
    assert_eq!(out[out.len() - 2].1["choices"][0]["finish_reason"], "stop");
}

#[test]
fn max_tokens_and_errors() {
    let mut up = vec![
        start(),
        block(0, json!({"type": "text", "text": ""})),
        delta(0, json!({"type": "text_delta", "text": "x"})),
    ];
    up.extend(end("max_tokens", 1));
    let (out, _) = run(Context::default(), &up);
    assert_eq!(
        out[out.len() - 2].1["choices"][0]["finish_reason"],
        "length"
    );

    let error = (
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let (_, steps) = run(Context::default(), &[start(), error]);
    assert_eq!(steps[1], Step::Fail("Overloaded".into()));
    let (_, steps) = run(Context::default(), &[("x", json!("text"))]);
    assert!(matches!(&steps[0], Step::Fail(_)));
}

#[test]
fn block_index_beyond_the_bound_fails_the_stream() {
    for index in [1_099_511_627_776_u64, u64::MAX, MAX_BLOCKS as u64] {
        let up = [start(), block(index, json!({"type": "text", "text": ""}))];
        let (out, steps) = run(Context::default(), &up);
        assert_eq!(steps[0], Step::Continue);
        let Step::Fail(why) = &steps[1] else {
            panic!("index {index} was accepted: {steps:?}");
        };
        assert!(why.contains(&index.to_string()), "{why}");
        assert!(why.contains(&MAX_BLOCKS.to_string()), "{why}");
        // Only the role chunk went out: nothing of the rejected block.
        assert_eq!(out.len(), 1);
        // A delta for a block that never started is read as text.
        let up = [
            start(),
            delta(index, json!({"type": "text_delta", "text": "x"})),
        ];
        let (out, steps) = run(Context::default(), &up);
        assert!(steps.iter().all(|s| *s == Step::Continue));
        assert_eq!(out[1].1["choices"][0]["delta"]["content"], "x");
    }
    // The last index inside the bound is still an ordinary block.
    let last = MAX_BLOCKS as u64 - 1;
    let (out, steps) = run(
        Context::default(),
        &[
            start(),
            block(last, json!({"type": "text", "text": ""})),
            delta(last, json!({"type": "text_delta", "text": "x"})),
        ],
    );
    assert!(steps.iter().all(|s| *s == Step::Continue));
    assert_eq!(out[1].1["choices"][0]["delta"]["content"], "x");
}

#[test]
fn blocks_without_index_are_bounded_too() {
    let unindexed = (
        "content_block_start",
        json!({"type": "content_block_start", "content_block": {"type": "text", "text": ""}}),
    );
    let mut up = vec![start()];
    up.extend(std::iter::repeat_n(unindexed, MAX_BLOCKS + 1));
    let (_, steps) = run(Context::default(), &up);
    assert!(steps[..=MAX_BLOCKS].iter().all(|s| *s == Step::Continue));
    assert!(matches!(&steps[MAX_BLOCKS + 1], Step::Fail(_)));
}

#[tokio::test]
async fn client_gets_the_stream_error_event_for_a_huge_block_index() {
    use crate::body::TranslateBody;
    use crate::stream::StreamMap;
    use http_body_util::{BodyExt, Full};

    let upstream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":1099511627776,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    let map = StreamMap::MessagesToChat(Box::new(MessagesToChat::new(Context::default())));
    let mut body = TranslateBody::new(Full::new(bytes::Bytes::from(upstream)), map);
    let mut out = Vec::new();
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => out.extend_from_slice(frame.data_ref().expect("data frames only")),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body must fail, not end cleanly");
    let events = events(&out);
    let last = &events.last().expect("some events").1;
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert!(!out.windows(6).any(|w| w == b"[DONE]"));
}

#[test]
fn no_upstream_usage_means_no_usage_chunk() {
    for usage in [
        None,
        Some(Value::Null),
        Some(json!({})),
        Some(json!({"output_tokens": -1})),
        Some(json!({"input_tokens": "25"})),
    ] {
        let mut message = json!({"id": "msg_01", "model": "claude", "content": []});
        let mut end = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}});
        if let Some(u) = &usage {
            message["usage"] = u.clone();
            end["usage"] = u.clone();
        }
        let up = vec![
            (
                "message_start",
                json!({"type": "message_start", "message": message}),
            ),
            block(0, json!({"type": "text", "text": ""})),
            delta(0, json!({"type": "text_delta", "text": "Hi"})),
            stop(0),
            ("message_delta", end),
            ("message_stop", json!({"type": "message_stop"})),
        ];
        let ctx = Context {
            include_usage: true,
            ..Context::default()
        };
        let (out, steps) = run(ctx, &up);
        assert!(steps.iter().all(|s| *s == Step::Continue), "{usage:?}");
        assert!(
            out.iter().all(|(_, v)| v.get("usage").is_none()),
            "{usage:?}: no usage chunk, not a zero one"
        );
        assert_eq!(out.last().map(|(_, v)| v), Some(&json!("[DONE]")));
        // What the auth layer reads: no usage, so the reservation stands.
        let mut watch = llm_proxy_core::usage::StreamUsage::new(llm_proxy_core::StreamKind::Chat);
        for (_, v) in &out {
            watch.observe(&v.to_string());
        }
        assert_eq!(watch.usage(), None, "{usage:?}");
    }
}

/// Whose fault a failed translated stream is, as the balancer reads it: the
/// upstream's when it broke the stream (the upstream client's own
/// interrupted event comes, after an event it cut short); the proxy's own
/// when the translation could not go on (here, a block index past the
/// bound).
#[tokio::test]
async fn a_stream_the_upstream_broke_is_its_fault_one_the_translation_cannot_carry_is_not() {
    use crate::body::TranslateBody;
    use crate::stream::StreamMap;
    use http_body_util::{BodyExt, Full};

    let start = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\",\"usage\":{\"input_tokens\":1}}}\n\n",
    );
    let cut = format!(
        // An event cut short, closed by the upstream client, then its own.
        "{start}event: content_block_delta\ndata: {{\"type\":\"content_bl\n\n{}",
        String::from_utf8_lossy(&llm_proxy_core::Error::stream_interrupted_event_for(
            llm_proxy_core::StreamKind::Messages,
            "connection reset",
            &Default::default(),
        ))
    );
    let huge = format!(
        "{start}event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":1099511627776,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n"
    );
    for (upstream, theirs) in [(cut, true), (huge, false)] {
        let map = StreamMap::MessagesToChat(Box::new(MessagesToChat::new(Context::default())));
        let mut body = TranslateBody::new(Full::new(bytes::Bytes::from(upstream)), map);
        let mut error = None;
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                error = Some(e);
                break;
            }
        }
        let error = error.expect("the body fails");
        assert_eq!(llm_proxy_core::is_upstream_fault(&error), theirs, "{error}");
    }
}

/// The arguments each tool call of a translated stream got, in call order.
fn call_arguments(out: &[(Option<String>, Value)]) -> Vec<String> {
    let mut calls: Vec<String> = Vec::new();
    for call in out
        .iter()
        .filter_map(|(_, v)| v["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
    {
        let index = call["index"].as_u64().unwrap() as usize;
        if calls.len() <= index {
            calls.resize(index + 1, String::new());
        }
        calls[index].push_str(call["function"]["arguments"].as_str().unwrap());
    }
    calls
}

#[test]
fn an_input_given_whole_in_the_block_start_is_the_arguments() {
    // A Messages-compatible server that gives the input in the start block
    // and sends no input_json_delta; then a real Anthropic one (`{}` in the
    // start, the input in deltas); then a tool without input.
    let mut up = vec![
        start(),
        block(
            0,
            json!({"type": "tool_use", "id": "toolu_a", "name": "read", "input": {"path": "a.md"}}),
        ),
        stop(0),
        block(
            1,
            json!({"type": "tool_use", "id": "toolu_b", "name": "read", "input": {}}),
        ),
        delta(
            1,
            json!({"type": "input_json_delta", "partial_json": "{\"path\":\"b.md\"}"}),
        ),
        stop(1),
        block(
            2,
            json!({"type": "tool_use", "id": "toolu_c", "name": "list", "input": {}}),
        ),
        stop(2),
    ];
    up.extend(end("tool_use", 9));
    let (out, steps) = run(Context::default(), &up);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    assert_eq!(
        call_arguments(&out),
        [r#"{"path":"a.md"}"#, r#"{"path":"b.md"}"#, "{}"]
    );
}

#[test]
fn text_thinking_and_forced_json_given_whole_in_the_block_start_are_kept() {
    let mut up = vec![
        start(),
        block(
            0,
            json!({"type": "thinking", "thinking": "hmm", "signature": ""}),
        ),
        stop(0),
        block(1, json!({"type": "text", "text": "Here:"})),
        stop(1),
        block(
            2,
            json!({"type": "tool_use", "id": "t", "name": "answer", "input": {"a": 1}}),
        ),
        stop(2),
    ];
    up.extend(end("tool_use", 5));
    let ctx = Context {
        json_tool: Some("answer".into()),
        ..Context::default()
    };
    let (out, _) = run(ctx, &up);
    let field = |key: &str| -> String {
        out.iter()
            .filter_map(|(_, v)| v["choices"][0]["delta"][key].as_str())
            .collect()
    };
    assert_eq!(field("reasoning_content"), "hmm");
    assert_eq!(field("content"), r#"Here:{"a":1}"#);
}

#[test]
fn inputs_held_from_block_starts_are_bounded_in_total() {
    // Each tool block's start gives a large input whole and is never
    // stopped: each under the bound, all of them over it.
    let input = json!({"data": "x".repeat(12 << 20)});
    let mut m = MessagesToChat::new(Context::default());
    let mut out = Vec::new();
    let failed = (0..3).any(|n| {
        let (name, data) = block(
            n,
            json!({"type": "tool_use", "id": format!("toolu_{n}"), "name": "f", "input": input}),
        );
        out.clear();
        matches!(
            m.event(&named(name, &data.to_string()), &mut out),
            Step::Fail(_)
        )
    });
    assert!(failed, "36 MiB of block-start inputs held");
}

#[test]
fn the_output_count_is_message_deltas_not_message_starts() {
    let ctx = Context {
        include_usage: true,
        ..Context::default()
    };
    let usage = |up: &[(&str, Value)]| {
        let (out, _) = run(ctx.clone(), up);
        out.iter().find_map(|(_, c)| c.get("usage").cloned())
    };
    let text = [
        start(),
        block(0, json!({"type": "text", "text": ""})),
        delta(0, json!({"type": "text_delta", "text": "Hi"})),
        stop(0),
    ];
    // message_start's placeholder output count (1) is no final count.
    for last in [
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 50, "cache_read_input_tokens": -1}}),
    ] {
        let mut up = text.to_vec();
        up.push(("message_delta", last));
        up.push(("message_stop", json!({"type": "message_stop"})));
        assert_eq!(usage(&up), None);
    }
    let mut up = text.to_vec();
    up.extend(end("end_turn", 50));
    let counted = usage(&up).expect("a usage chunk");
    assert_eq!(counted["completion_tokens"], 50);
    assert_eq!(counted["prompt_tokens"], 25);
}

#[test]
fn a_message_stopped_before_it_started_fails() {
    for first in [
        vec![("message_stop", json!({"type": "message_stop"}))],
        vec![
            ("ping", json!({"type": "ping"})),
            ("message_stop", json!({"type": "message_stop"})),
        ],
    ] {
        let (out, steps) = run(Context::default(), &first);
        assert!(matches!(steps.last(), Some(Step::Fail(_))), "{steps:?}");
        assert!(out.is_empty(), "{out:?}");
    }
}

#[test]
fn a_tool_block_never_stopped_still_gets_its_input() {
    let up = [
        start(),
        block(
            0,
            json!({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"city": "Paris"}}),
        ),
        block(
            1,
            json!({"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}),
        ),
        end("tool_use", 9)[0].clone(),
        end("tool_use", 9)[1].clone(),
    ];
    let (out, steps) = run(Context::default(), &up);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let arguments = |call: u64| -> String {
        out.iter()
            .flat_map(|(_, c)| c["choices"][0]["delta"]["tool_calls"].as_array().cloned())
            .flatten()
            .filter(|t| t["index"] == call)
            .filter_map(|t| t["function"]["arguments"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(arguments(0), r#"{"city":"Paris"}"#);
    assert_eq!(arguments(1), "{}");
}

#[test]
fn tool_use_without_a_tool_block_is_a_plain_stop() {
    let mut up = vec![
        start(),
        block(0, json!({"type": "text", "text": ""})),
        delta(0, json!({"type": "text_delta", "text": "Hi"})),
        stop(0),
    ];
    up.extend(end("tool_use", 3));
    let (out, _) = run(Context::default(), &up);
    let finish: Vec<&Value> = out
        .iter()
        .map(|(_, c)| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("stop")]);
}

#[test]
fn an_upstream_id_or_model_too_long_to_repeat_is_not_used() {
    let long = "x".repeat(crate::wire::MAX_ID_BYTES + 1);
    let mut up = vec![(
        "message_start",
        json!({"type": "message_start", "message": {"id": format!("msg_{long}"), "model": long,
            "content": [], "usage": {"input_tokens": 1, "output_tokens": 1}}}),
    )];
    up.push(block(0, json!({"type": "text", "text": ""})));
    for _ in 0..100 {
        up.push(delta(0, json!({"type": "text_delta", "text": "a"})));
    }
    up.push(stop(0));
    up.extend(end("end_turn", 100));
    let ctx = Context {
        model: "client-model".into(),
        ..Context::default()
    };
    let (out, steps) = run(ctx, &up);
    assert!(steps.iter().all(|s| *s == Step::Continue));
    for (_, chunk) in out.iter().filter(|(_, c)| c.is_object()) {
        assert!(chunk["id"].as_str().unwrap().len() < 64, "{}", chunk["id"]);
        assert_eq!(chunk["model"], "client-model");
    }
}

#[test]
fn an_event_that_is_an_array_fails_the_stream() {
    let (_, steps) = run(
        Context::default(),
        &[start(), ("message_delta", json!([1, 2]))],
    );
    assert!(
        matches!(&steps[1], Step::Fail(why) if why.contains("not a JSON object")),
        "{steps:?}"
    );
}
