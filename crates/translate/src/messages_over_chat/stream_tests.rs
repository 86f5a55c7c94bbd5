use super::*;
use crate::test_util::{data, events, names};
use serde_json::{Value, json};

fn run(ctx: Context, chunks: &[&str]) -> (Vec<(Option<String>, Value)>, Vec<Step>) {
    let mut m = ChatToMessages::new(ctx);
    let mut out = Vec::new();
    let steps = chunks.iter().map(|c| m.event(&data(c), &mut out)).collect();
    (events(&out), steps)
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-7", "model": "llama", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
}

const USAGE: &str = r#"{"id":"chatcmpl-7","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}"#;

#[test]
fn text_stream() {
    let chunks = [
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Hel"}), None),
        chunk(json!({"content": "lo"}), None),
        chunk(json!({}), Some("stop")),
        USAGE.to_owned(),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(Context::default(), &refs);
    assert!(steps.iter().all(|s| *s == Step::Continue));
    assert_eq!(
        names(&out),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(out[0].1["message"]["id"], "msg_7");
    assert_eq!(out[0].1["message"]["model"], "llama");
    assert_eq!(
        out[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        out[2].1["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(
        out[5].1["delta"],
        json!({"stop_reason": "end_turn", "stop_sequence": null})
    );
    assert_eq!(
        out[5].1["usage"],
        json!({"input_tokens": 11, "output_tokens": 3})
    );
}

#[test]
fn two_tool_calls_with_split_arguments() {
    let call = |index: u64, id: Option<&str>, name: Option<&str>, args: &str| {
        let mut f = json!({"arguments": args});
        if let Some(n) = name {
            f["name"] = json!(n);
        }
        let mut c = json!({"index": index, "function": f});
        if let Some(id) = id {
            c["id"] = json!(id);
            c["type"] = json!("function");
        }
        chunk(json!({"tool_calls": [c]}), None)
    };
    let chunks = [
        chunk(json!({"content": "Let me look."}), None),
        call(0, Some("call_a"), Some("get_weather"), ""),
        call(0, None, None, "{\"city\":"),
        call(0, None, None, "\"Paris\"}"),
        call(1, Some("call_b"), Some("get_time"), "{}"),
        chunk(json!({}), Some("tool_calls")),
        USAGE.to_owned(),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, _) = run(Context::default(), &refs);
    assert_eq!(
        names(&out),
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        out[4].1,
        json!({"type": "content_block_start", "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}})
    );
    assert_eq!(
        out[5].1["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
    );
    assert_eq!(out[8].1["index"], 2);
    assert_eq!(out[9].1["delta"]["partial_json"], "{}");
    assert_eq!(out[11].1["delta"]["stop_reason"], "tool_use");
}

#[test]
fn name_after_arguments_and_interleaving() {
    let chunks = [
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "c1", "function": {"arguments": "{\"a\""}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ":1}"}}]}),
            None,
        ),
        // A call starts with its first arguments (its name may come in
        // pieces until then).
        chunk(
            json!({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "late"}}]}),
            None,
        ),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(Context::default(), &refs);
    assert_eq!(out[1].1["content_block"]["name"], "f");
    assert_eq!(
        out[2].1["delta"]["partial_json"], "{\"a\":1}",
        "arguments held until the name came"
    );
    assert_eq!(names(&out)[3], "content_block_stop");
    assert!(matches!(&steps[3], Step::Fail(why) if why.contains("interleaved")));
}

#[test]
fn thinking_only_when_asked_and_never_in_text() {
    let chunks = [
        chunk(json!({"reasoning_content": "think"}), None),
        chunk(json!({"content": "answer"}), None),
        chunk(json!({"reasoning": "more"}), None),
        chunk(json!({}), Some("stop")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, _) = run(
        Context {
            thinking: true,
            ..Context::default()
        },
        &refs,
    );
    let blocks: Vec<&str> = out
        .iter()
        .filter_map(|(_, v)| v.get("content_block").and_then(|b| b["type"].as_str()))
        .collect();
    assert_eq!(blocks, ["thinking", "text", "thinking"]);
    assert_eq!(
        out[2].1["delta"],
        json!({"type": "thinking_delta", "thinking": "think"})
    );
    let (out, _) = run(Context::default(), &refs);
    assert!(
        out.iter()
            .all(|(_, v)| v["delta"]["type"] != "thinking_delta")
    );
    assert_eq!(
        names(&out)
            .iter()
            .filter(|n| *n == "content_block_start")
            .count(),
        1
    );
}

#[test]
fn stop_sequence_length_errors_and_empty_streams() {
    let ctx = Context {
        stop_sequences: vec!["###".into()],
        ..Context::default()
    };
    let stop = json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "###"}]}).to_string();
    let (out, _) = run(
        ctx,
        &[&chunk(json!({"content": "x"}), None), &stop, "[DONE]"],
    );
    let delta = &out[out.len() - 2].1["delta"];
    assert_eq!(
        delta,
        &json!({"stop_reason": "stop_sequence", "stop_sequence": "###"})
    );

    let (out, _) = run(
        Context::default(),
        &[&chunk(json!({"content": "x"}), Some("length")), "[DONE]"],
    );
    assert_eq!(out[out.len() - 2].1["delta"]["stop_reason"], "max_tokens");

    let (_, steps) = run(
        Context::default(),
        &[r#"{"error":{"message":"cut","code":"stream_interrupted"}}"#],
    );
    assert_eq!(steps[0], Step::Fail("cut".into()));
    let (_, steps) = run(Context::default(), &["{not json"]);
    assert!(matches!(&steps[0], Step::Fail(_)));
}

#[test]
fn tool_calls_beyond_the_bound_fail_the_stream() {
    let call = |index: usize| {
        chunk(
            json!({"tool_calls": [{"index": index, "id": format!("c{index}"), "function": {"name": "f", "arguments": "{}"}}]}),
            None,
        )
    };
    let chunks: Vec<String> = (0..=MAX_BLOCKS).map(call).collect();
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (_, steps) = run(Context::default(), &refs);
    crate::test_util::fails_past_the_bound(&steps, "tool call");
}

#[test]
fn unusable_usage_does_not_fail_the_stream() {
    for usage in crate::test_util::no_chat_usage() {
        let mut last = json!({"id": "chatcmpl-7", "choices": []});
        if let Some(u) = &usage {
            last["usage"] = u.clone();
        }
        let chunks = [
            chunk(json!({"content": "Hi"}), Some("stop")),
            last.to_string(),
            "[DONE]".to_owned(),
        ];
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (out, steps) = run(Context::default(), &refs);
        assert!(steps.iter().all(|s| *s == Step::Continue), "{usage:?}");
        // Anthropic's SDKs want a usage object here; its counts are null,
        // which the auth layer's reader takes as no usage (not as zero).
        let delta = &out[out.len() - 2].1;
        assert_eq!(delta["type"], "message_delta");
        assert_eq!(
            delta["usage"],
            json!({"input_tokens": null, "output_tokens": null})
        );
        let mut seen =
            llm_proxy_core::usage::StreamUsage::new(llm_proxy_core::StreamKind::Messages);
        for (_, event) in &out {
            seen.observe(&event.to_string());
        }
        assert_eq!(seen.usage(), None, "{usage:?}");
    }
}

#[test]
fn tool_calls_without_ids_get_fresh_ids() {
    let call = |index: u64, name: &str| {
        chunk(
            json!({"tool_calls": [{"index": index, "function": {"name": name, "arguments": "{}"}}]}),
            None,
        )
    };
    let chunks = [
        chunk(json!({"content": "x"}), None),
        call(0, "f"),
        call(1, "g"),
        chunk(json!({}), Some("tool_calls")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, _) = run(Context::default(), &refs);
    let ids = out
        .iter()
        .filter(|(_, v)| v["content_block"]["type"] == "tool_use")
        .map(|(_, v)| v["content_block"]["id"].as_str().unwrap().to_owned());
    assert_eq!(
        crate::test_util::made_up_ids(ids, "toolu_"),
        ["toolu_#0", "toolu_#1"]
    );
}

#[test]
fn reused_index_with_a_new_id_is_a_new_tool_call() {
    // Ollama gives every call of a turn index 0, each with its own id.
    let call = |id: &str, args: &str| {
        chunk(
            json!({"tool_calls": [{"index": 0, "id": id, "type": "function",
                "function": {"name": "write", "arguments": args}}]}),
            None,
        )
    };
    let chunks = [
        call("call_a", r#"{"path":"a"}"#),
        call("call_b", r#"{"path":"b"}"#),
        chunk(json!({}), Some("tool_calls")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(Context::default(), &refs);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let starts: Vec<&Value> = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("content_block_start"))
        .map(|(_, v)| &v["content_block"])
        .collect();
    assert_eq!(starts.len(), 2, "two tool_use blocks: {out:?}");
    assert_eq!(
        (starts[0]["id"].as_str(), starts[1]["id"].as_str()),
        (Some("call_a"), Some("call_b"))
    );
    let inputs: Vec<&str> = out
        .iter()
        .filter_map(|(_, v)| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(inputs, [r#"{"path":"a"}"#, r#"{"path":"b"}"#]);
    // The same id again, or none, is more of the same call.
    let more = chunk(
        json!({"tool_calls": [{"index": 0, "id": "call_a", "function": {"arguments": "}"}}]}),
        None,
    );
    let chunks = [call("call_a", r#"{"path":"a""#), more];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, _) = run(Context::default(), &refs);
    let starts = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("content_block_start"))
        .count();
    assert_eq!(starts, 1);
}

#[test]
fn arguments_that_never_get_a_name_are_bounded() {
    let piece = "x".repeat(1 << 20);
    let mut m = ChatToMessages::new(Context::default());
    let mut out = Vec::new();
    let mut failed = false;
    for _ in 0..40 {
        let c = chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            None,
        );
        out.clear();
        if let Step::Fail(_) = m.event(&data(&c), &mut out) {
            failed = true;
            break;
        }
    }
    assert!(failed, "40 MiB of nameless arguments held");
}

#[test]
fn an_empty_finish_reason_is_none() {
    let chunks = [
        chunk(json!({"content": "a"}), Some("")),
        chunk(json!({"content": "b"}), Some("")),
        chunk(json!({}), Some("stop")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, _) = run(Context::default(), &refs);
    let starts = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("content_block_start"))
        .count();
    assert_eq!(starts, 1, "one text block: {out:?}");
    assert_eq!(out.last().unwrap().0.as_deref(), Some("message_stop"));
}

#[test]
fn nameless_arguments_are_bounded_in_total() {
    // Each call (a new id at index 0) under the bound, all of them over it.
    let piece = "x".repeat(12 << 20);
    let mut m = ChatToMessages::new(Context::default());
    let mut out = Vec::new();
    let failed = (0..3).any(|n| {
        let c = chunk(
            json!({"tool_calls": [{"index": 0, "id": format!("call_{n}"), "function": {"arguments": piece}}]}),
            None,
        );
        out.clear();
        matches!(m.event(&data(&c), &mut out), Step::Fail(_))
    });
    assert!(failed, "36 MiB of nameless arguments held over three calls");
}

/// The tool_use blocks of a translated stream: (id, name, input JSON text).
fn tool_blocks(out: &[(Option<String>, Value)]) -> Vec<(String, String, String)> {
    let mut blocks: Vec<(String, String, String)> = Vec::new();
    for (name, v) in out {
        match name.as_deref() {
            Some("content_block_start") if v["content_block"]["type"] == "tool_use" => {
                let b = &v["content_block"];
                blocks.push((
                    b["id"].as_str().unwrap_or_default().to_owned(),
                    b["name"].as_str().unwrap_or_default().to_owned(),
                    String::new(),
                ));
            }
            Some("content_block_delta") => {
                if let (Some(part), Some(last)) =
                    (v["delta"]["partial_json"].as_str(), blocks.last_mut())
                {
                    last.2.push_str(part);
                }
            }
            _ => {}
        }
    }
    let ids = crate::test_util::made_up_ids(blocks.iter().map(|b| b.0.clone()), "toolu_");
    for (block, id) in blocks.iter_mut().zip(ids) {
        block.0 = id;
    }
    blocks
}

#[test]
fn each_way_servers_send_one_call_is_one_tool_use_block() {
    for (what, deltas) in crate::test_util::one_call_scenarios() {
        let mut chunks: Vec<String> = deltas.into_iter().map(|d| chunk(d, None)).collect();
        chunks.push(chunk(json!({}), Some("tool_calls")));
        chunks.push("[DONE]".to_owned());
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (out, steps) = run(Context::default(), &refs);
        assert!(
            steps.iter().all(|s| *s == Step::Continue),
            "{what}: {steps:?}"
        );
        assert_eq!(
            tool_blocks(&out),
            [(
                "call_A".to_owned(),
                "get_weather".to_owned(),
                r#"{"city":"Paris"}"#.to_owned()
            )],
            "{what}"
        );
    }
}

#[test]
fn an_odd_created_does_not_fail_the_stream() {
    let chunks = [
        json!({"id": "c", "created": 1712345678.25, "choices": [{"index": 0, "delta": {"content": "hi"}}]})
        .to_string(),
        chunk(json!({}), Some("stop")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (_, steps) = run(Context::default(), &refs);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
}

#[test]
fn fields_that_are_not_strings_read_as_absent_as_in_a_whole_answer() {
    // A whole answer's message is read with `as_str`: a number or an
    // object where a string belongs is no text. A stream's delta reads the
    // same, rather than failing the whole translated stream on it.
    let chunks = [
        chunk(
            json!({"reasoning": 5, "reasoning_content": {"text": "x"}, "refusal": [1]}),
            None,
        ),
        chunk(json!({"content": "hi", "reasoning": "hmm"}), None),
        // A legacy call with a name that is not a string: an empty-named
        // call, as the whole answer reads it.
        chunk(
            json!({"function_call": {"name": 3, "arguments": "{}"}}),
            None,
        ),
        json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": 7}]}).to_string(),
        chunk(json!({}), Some("stop")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(
        Context {
            thinking: true,
            ..Context::default()
        },
        &refs,
    );
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let deltas: Vec<&Value> = out
        .iter()
        .filter(|(name, _)| name.as_deref() == Some("content_block_delta"))
        .map(|(_, v)| &v["delta"])
        .collect();
    assert_eq!(
        deltas,
        [
            &json!({"type": "thinking_delta", "thinking": "hmm"}),
            &json!({"type": "text_delta", "text": "hi"}),
            &json!({"type": "input_json_delta", "partial_json": "{}"}),
        ]
    );
    assert_eq!(tool_blocks(&out)[0].1, "");
    assert_eq!(names(&out).last().map(String::as_str), Some("message_stop"));
}

/// A chunk with one tool-call delta at chat index 0 and no id.
fn at_zero(name: Option<&str>, args: &str) -> String {
    let mut function = json!({"arguments": args});
    if let Some(name) = name {
        function["name"] = json!(name);
    }
    chunk(
        json!({"tool_calls": [{"index": 0, "type": "function", "function": function}]}),
        None,
    )
}

#[test]
fn parallel_calls_whole_at_index_zero_without_ids_are_separate() {
    // Gemini's OpenAI-compatible API: each parallel call whole in its own
    // chunk, every one at index 0, none with an id.
    let chunks = [
        at_zero(Some("read"), r#"{"path":"a.md"}"#),
        at_zero(Some("read"), r#"{"path":"b.md"}"#),
        at_zero(Some("list"), "{}"),
        chunk(json!({}), Some("tool_calls")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(Context::default(), &refs);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    assert_eq!(
        tool_blocks(&out),
        [
            (
                "toolu_#0".into(),
                "read".into(),
                r#"{"path":"a.md"}"#.into()
            ),
            (
                "toolu_#1".into(),
                "read".into(),
                r#"{"path":"b.md"}"#.into()
            ),
            ("toolu_#2".into(), "list".into(), "{}".into()),
        ]
    );
}

#[test]
fn a_name_repeated_with_unfinished_arguments_is_the_same_call() {
    // MiniMax repeats the name with every piece, here without ids: pieces
    // whose arguments are not yet one JSON value join; a repeat of the
    // name with no arguments after they are complete adds nothing.
    let chunks = [
        at_zero(Some("get_weather"), ""),
        at_zero(Some("get_weather"), r#"{"city":{"name":"#),
        at_zero(Some("get_weather"), r#""Paris"}"#),
        at_zero(Some("get_weather"), "}"),
        at_zero(Some("get_weather"), ""),
        chunk(json!({}), Some("tool_calls")),
        "[DONE]".to_owned(),
    ];
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, _) = run(Context::default(), &refs);
    assert_eq!(
        tool_blocks(&out),
        [(
            "toolu_#0".into(),
            "get_weather".into(),
            r#"{"city":{"name":"Paris"}}"#.into()
        )]
    );
}

/// The `message` of a translated stream's `message_start`.
fn message_start(ctx: Context, chunks: &[String]) -> Value {
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(ctx, &refs);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    assert_eq!(out.last().unwrap().0.as_deref(), Some("message_stop"));
    out[0].1["message"].clone()
}

#[test]
fn empty_or_missing_ids_and_models_are_not_used() {
    let ctx = || Context {
        model: "claude-x".into(),
        ..Context::default()
    };
    let with = |id: Option<&str>, model: &str, delta: Value, finish: Option<&str>| {
        let mut c = json!({"model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if let Some(id) = id {
            c["id"] = json!(id);
        }
        c.to_string()
    };
    // Azure opens with a prompt-filter chunk with an empty id and model.
    let azure = [
        json!({"id": "", "model": "", "object": "", "created": 0, "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})
        .to_string(),
        with(
            Some("chatcmpl-az1"),
            "gpt-4o",
            json!({"content": "hi"}),
            None,
        ),
        with(Some("chatcmpl-az1"), "gpt-4o", json!({}), Some("stop")),
        "[DONE]".to_owned(),
    ];
    let message = message_start(ctx(), &azure);
    assert_eq!(message["id"], "msg_az1");
    assert_eq!(message["model"], "gpt-4o");
    // TGI: an empty id throughout; a server with an empty model, or none.
    for id in [Some(""), None] {
        let chunks = [
            with(id, "", json!({"content": "hi"}), None),
            with(id, "", json!({}), Some("stop")),
            "[DONE]".to_owned(),
        ];
        let first = message_start(ctx(), &chunks);
        let second = message_start(ctx(), &chunks);
        assert_eq!(first["model"], "claude-x", "{id:?}");
        let made = first["id"].as_str().unwrap();
        assert!(
            made.len() > "msg_".len() + 8 && made.starts_with("msg_"),
            "{made}"
        );
        assert_ne!(first["id"], second["id"], "a fresh id for each answer");
    }
}

#[test]
fn names_and_ids_of_tool_calls_are_bounded_too() {
    for (what, chunks) in ["a name in pieces", "huge ids"]
        .into_iter()
        .zip(crate::test_util::tool_calls_held_without_bound())
    {
        let mut m = ChatToMessages::new(Context::default());
        let mut out = Vec::new();
        let failed = chunks.iter().any(|c| {
            out.clear();
            matches!(m.event(&data(c), &mut out), Step::Fail(_))
        });
        assert!(failed, "{what}: held without bound");
    }
}

#[test]
fn content_in_parts_is_text_and_thinking_as_in_a_whole_answer() {
    let (deltas, message) = crate::test_util::content_in_parts();
    let mut chunks: Vec<String> = deltas.into_iter().map(|d| chunk(d, None)).collect();
    chunks.push(chunk(json!({}), Some("stop")));
    chunks.push("[DONE]".to_owned());
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let whole = json!({"id": "chatcmpl-7", "model": "llama",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}]});
    for thinking in [true, false] {
        let ctx = Context {
            thinking,
            ..Context::default()
        };
        let (out, steps) = run(ctx.clone(), &refs);
        assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
        // The blocks the stream made, each with its text.
        let mut blocks: Vec<Value> = Vec::new();
        for (name, v) in &out {
            match name.as_deref() {
                Some("content_block_start") => blocks.push(v["content_block"].clone()),
                Some("content_block_delta") => {
                    let block = blocks.last_mut().unwrap();
                    for key in ["text", "thinking"] {
                        if let Some(piece) = v["delta"][key].as_str() {
                            let so_far = block[key].as_str().unwrap_or_default();
                            block[key] = json!(format!("{so_far}{piece}"));
                        }
                    }
                }
                _ => {}
            }
        }
        let expected = if thinking {
            json!([{"type": "thinking", "thinking": "Let me think. Yes.", "signature": ""},
                {"type": "text", "text": "Paris."}])
        } else {
            json!([{"type": "text", "text": "Paris."}])
        };
        assert_eq!(Value::Array(blocks), expected, "thinking: {thinking}");
        let whole = crate::messages_over_chat::response::response(&whole, &ctx).unwrap();
        assert_eq!(whole["content"], expected, "whole, thinking: {thinking}");
    }
}

#[test]
fn a_legacy_function_call_is_a_tool_use_as_in_a_whole_answer() {
    let (deltas, message) = crate::test_util::legacy_function_call();
    let mut chunks: Vec<String> = deltas.into_iter().map(|d| chunk(d, None)).collect();
    chunks.push(chunk(json!({}), Some("function_call")));
    chunks.push("[DONE]".to_owned());
    let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let (out, steps) = run(Context::default(), &refs);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let call = (
        "toolu_#0".to_owned(),
        "get_weather".to_owned(),
        r#"{"city":"Paris"}"#.to_owned(),
    );
    assert_eq!(tool_blocks(&out), [call]);
    let (_, delta) = out
        .iter()
        .find(|(n, _)| n.as_deref() == Some("message_delta"))
        .unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");

    let whole = json!({"id": "chatcmpl-7", "choices": [{"index": 0,
        "finish_reason": "function_call", "message": message}]});
    let whole = crate::messages_over_chat::response::response(&whole, &Context::default()).unwrap();
    let content = whole["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "{content:?}");
    assert_eq!(content[0]["name"], "get_weather");
    assert_eq!(content[0]["input"], json!({"city": "Paris"}));
    let id = content[0]["id"].as_str().unwrap();
    assert_eq!(
        crate::test_util::made_up_ids([id.to_owned()], "toolu_"),
        ["toolu_#0"]
    );
    assert_eq!(whole["stop_reason"], "tool_use");
}

#[test]
fn text_and_thinking_taking_turns_are_bounded_in_blocks() {
    let ctx = Context {
        thinking: true,
        ..Context::default()
    };
    let turns: Vec<String> = (0..=MAX_BLOCKS)
        .map(|i| {
            let field = if i % 2 == 0 {
                "reasoning_content"
            } else {
                "content"
            };
            chunk(json!({ field: "x" }), None)
        })
        .collect();
    let turns: Vec<&str> = turns.iter().map(String::as_str).collect();
    let (_, steps) = run(ctx, &turns);
    crate::test_util::fails_past_the_bound(&steps, "block");
}

#[test]
fn an_error_event_fails_the_stream_whatever_its_data() {
    for (data, message) in [
        (r#"{"message":"model crashed","code":500}"#, "model crashed"),
        (r#"{"error":{"message":"overloaded"}}"#, "overloaded"),
        (r#""a string""#, "a string"),
        ("not json", "not json"),
    ] {
        let mut m = ChatToMessages::new(Context::default());
        let mut out = Vec::new();
        let first = chunk(json!({"content": "partial"}), None);
        assert_eq!(m.event(&data_event(&first), &mut out), Step::Continue);
        let step = m.event(&crate::test_util::named("error", data), &mut out);
        assert_eq!(step, Step::Fail(message.into()), "{data}");
    }
}

fn data_event(text: &str) -> llm_proxy_core::sse::Event {
    data(text)
}

#[test]
fn a_chunk_that_is_an_array_fails_the_stream() {
    let (_, steps) = run(Context::default(), &["[]"]);
    assert!(
        matches!(&steps[0], Step::Fail(why) if why.contains("not a JSON object")),
        "{steps:?}"
    );
}

/// The events written once a message or block, byte for byte: Anthropic's
/// field order, `null`s, the empty `content` and `input`.
#[test]
fn the_frame_events_as_written() {
    let ctx = Context {
        thinking: true,
        ..Context::default()
    };
    let mut m = ChatToMessages::new(ctx);
    let mut out = Vec::new();
    let chunks = [
        chunk(
            json!({"role": "assistant", "reasoning_content": "hm"}),
            None,
        ),
        chunk(json!({"content": "Hi"}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}]}),
            Some("tool_calls"),
        ),
        "[DONE]".to_owned(),
    ];
    for c in &chunks {
        assert_eq!(m.event(&data(c), &mut out), Step::Continue);
    }
    let text = String::from_utf8(out).unwrap();
    let expected = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_7\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"llama\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\",\"signature\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hm\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"call_1\",\"name\":\"f\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":null,\"output_tokens\":null}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    assert_eq!(text, expected);
}
