use super::*;
use crate::test_util::{data, events, names};
use serde_json::{Value, json};

fn run(ctx: Context, chunks: &[String]) -> (Vec<(Option<String>, Value)>, Vec<Step>) {
    let mut m = ChatToResponses::new(ctx);
    let mut out = Vec::new();
    let steps = chunks.iter().map(|c| m.event(&data(c), &mut out)).collect();
    (events(&out), steps)
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    json!({"id": "chatcmpl-5", "created": 9, "model": "llama", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}).to_string()
}

fn usage() -> String {
    r#"{"id":"chatcmpl-5","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#.to_owned()
}

#[test]
fn text_stream() {
    let chunks = [
        chunk(json!({"role": "assistant", "content": ""}), None),
        chunk(json!({"content": "Hel"}), None),
        chunk(json!({"content": "lo"}), None),
        chunk(json!({}), Some("stop")),
        usage(),
        "[DONE]".to_owned(),
    ];
    let (out, steps) = run(Context::default(), &chunks);
    assert!(steps.iter().all(|s| *s == Step::Continue));
    assert_eq!(
        names(&out),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let seqs: Vec<u64> = out
        .iter()
        .map(|(_, v)| v["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..10).collect::<Vec<_>>());
    assert_eq!(out[0].1["response"]["id"], "resp_5");
    assert_eq!(out[0].1["response"]["status"], "in_progress");
    assert_eq!(out[0].1["response"]["created_at"], 9);
    assert_eq!(
        out[4].1,
        json!({"type": "response.output_text.delta", "sequence_number": 4, "item_id": "msg_5",
        "output_index": 0, "content_index": 0, "delta": "Hel", "logprobs": []})
    );
    assert_eq!(out[6].1["text"], "Hello");
    let done = &out[9].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(done["usage"]["input_tokens"], 7);
    assert_eq!(done["usage"]["total_tokens"], 9);
}

#[test]
fn function_calls() {
    let call = |index: u64, id: Option<&str>, name: Option<&str>, args: &str| {
        let mut c = json!({"index": index, "function": {"arguments": args}});
        if let Some(id) = id {
            c["id"] = json!(id);
        }
        if let Some(n) = name {
            c["function"]["name"] = json!(n);
        }
        chunk(json!({"tool_calls": [c]}), None)
    };
    let chunks = [
        chunk(json!({"content": "Checking."}), None),
        call(0, Some("call_a"), Some("get_weather"), ""),
        call(0, None, None, "{\"city\":"),
        call(0, None, None, "\"Paris\"}"),
        call(1, Some("call_b"), Some("get_time"), "{}"),
        chunk(json!({}), Some("tool_calls")),
        usage(),
        "[DONE]".to_owned(),
    ];
    let (out, _) = run(Context::default(), &chunks);
    let added: Vec<&Value> = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_item.added"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(added.len(), 3);
    assert_eq!(
        added[1]["item"],
        json!({"id": "fc_5_1", "type": "function_call", "status": "in_progress",
        "call_id": "call_a", "name": "get_weather", "arguments": ""})
    );
    let deltas: Vec<(&str, &str)> = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.function_call_arguments.delta"))
        .map(|(_, v)| (v["item_id"].as_str().unwrap(), v["delta"].as_str().unwrap()))
        .collect();
    assert_eq!(
        deltas,
        [
            ("fc_5_1", "{\"city\":"),
            ("fc_5_1", "\"Paris\"}"),
            ("fc_5_2", "{}")
        ]
    );
    let args_done = out
        .iter()
        .find(|(n, _)| n.as_deref() == Some("response.function_call_arguments.done"))
        .unwrap();
    assert_eq!(args_done.1["arguments"], "{\"city\":\"Paris\"}");
    let last = &out.last().unwrap().1;
    assert_eq!(last["type"], "response.completed");
    let output = last["response"]["output"].as_array().unwrap();
    assert_eq!(output.len(), 3);
    assert_eq!(output[2]["call_id"], "call_b");
}

#[test]
fn length_is_incomplete_and_errors_fail() {
    let chunks = [
        chunk(json!({"content": "x"}), Some("length")),
        usage(),
        "[DONE]".to_owned(),
    ];
    let (out, _) = run(Context::default(), &chunks);
    let last = &out.last().unwrap();
    assert_eq!(last.0.as_deref(), Some("response.incomplete"));
    assert_eq!(
        last.1["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    assert_eq!(last.1["response"]["output"][0]["status"], "incomplete");

    let (_, steps) = run(
        Context::default(),
        &[r#"{"error":{"message":"cut"}}"#.to_owned()],
    );
    assert_eq!(steps[0], Step::Fail("cut".into()));
}

#[test]
fn output_items_beyond_the_bound_fail_the_stream() {
    let call = |index: usize| {
        chunk(
            json!({"tool_calls": [{"index": index, "id": format!("c{index}"), "function": {"name": "f", "arguments": "{}"}}]}),
            None,
        )
    };
    let chunks: Vec<String> = (0..=MAX_BLOCKS).map(call).collect();
    let (_, steps) = run(Context::default(), &chunks);
    crate::test_util::fails_past_the_bound(&steps, "output item");
}

#[test]
fn no_upstream_usage_is_null_usage() {
    for usage in crate::test_util::no_chat_usage() {
        let mut last = json!({"id": "chatcmpl-5", "choices": []});
        if let Some(u) = &usage {
            last["usage"] = u.clone();
        }
        let chunks = [
            chunk(json!({"content": "Hi"}), None),
            chunk(json!({}), Some("stop")),
            last.to_string(),
            "[DONE]".to_owned(),
        ];
        let (out, steps) = run(Context::default(), &chunks);
        assert!(steps.iter().all(|s| *s == Step::Continue), "{usage:?}");
        let (_, completed) = out.last().unwrap();
        assert_eq!(completed["type"], "response.completed");
        assert_eq!(completed["response"]["usage"], Value::Null, "{usage:?}");
        // What the auth layer reads: no usage, so the reservation stands.
        let mut watch =
            llm_proxy_core::usage::StreamUsage::new(llm_proxy_core::StreamKind::Responses);
        for (_, v) in &out {
            watch.observe(&v.to_string());
        }
        assert_eq!(watch.usage(), None, "{usage:?}");
    }
}

#[test]
fn a_later_unusable_usage_keeps_the_earlier_one() {
    let chunks = [
        chunk(json!({"content": "Hi"}), Some("stop")),
        usage(),
        r#"{"id":"chatcmpl-5","choices":[],"usage":{}}"#.to_owned(),
        "[DONE]".to_owned(),
    ];
    let (out, _) = run(Context::default(), &chunks);
    assert_eq!(
        out.last().unwrap().1["response"]["usage"]["total_tokens"],
        9
    );
}

#[test]
fn reused_index_with_a_new_id_is_a_new_function_call() {
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
    let (out, steps) = run(Context::default(), &chunks);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let (_, done) = out.last().unwrap();
    let output = done["response"]["output"].as_array().unwrap();
    assert_eq!(output.len(), 2, "{output:?}");
    assert_eq!(output[0]["call_id"], "call_a");
    assert_eq!(output[0]["arguments"], r#"{"path":"a"}"#);
    assert_eq!(output[1]["call_id"], "call_b");
    assert_eq!(output[1]["arguments"], r#"{"path":"b"}"#);
}

#[test]
fn the_output_a_stream_holds_is_bounded() {
    let piece = "x".repeat(1 << 20);
    let mut m = ChatToResponses::new(Context::default());
    let mut out = Vec::new();
    let mut failed = false;
    for _ in 0..40 {
        out.clear();
        if let Step::Fail(_) = m.event(&data(&chunk(json!({"content": piece}), None)), &mut out) {
            failed = true;
            break;
        }
    }
    assert!(failed, "40 MiB of text held for response.completed");
}

#[test]
fn each_way_servers_send_one_call_is_one_function_call() {
    for (what, deltas) in crate::test_util::one_call_scenarios() {
        let mut chunks: Vec<String> = deltas.into_iter().map(|d| chunk(d, None)).collect();
        chunks.push(chunk(json!({}), Some("tool_calls")));
        chunks.push("[DONE]".to_owned());
        let (out, steps) = run(Context::default(), &chunks);
        assert!(
            steps.iter().all(|s| *s == Step::Continue),
            "{what}: {steps:?}"
        );
        let added: Vec<&Value> = out
            .iter()
            .filter(|(n, _)| n.as_deref() == Some("response.output_item.added"))
            .map(|(_, v)| &v["item"])
            .collect();
        assert_eq!(added.len(), 1, "{what}");
        assert_eq!(added[0]["name"], "get_weather", "{what}");
        let (_, done) = out.last().unwrap();
        let output = done["response"]["output"].as_array().unwrap();
        assert_eq!(output.len(), 1, "{what}: {output:?}");
        assert_eq!(output[0]["call_id"], "call_A", "{what}");
        assert_eq!(output[0]["name"], "get_weather", "{what}");
        assert_eq!(output[0]["arguments"], r#"{"city":"Paris"}"#, "{what}");
    }
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

/// `(call_id, name, arguments)` of the calls in `response.completed`.
fn completed_calls(out: &[(Option<String>, Value)]) -> Vec<(String, String, String)> {
    let (_, done) = out.last().unwrap();
    let mut calls: Vec<(String, String, String)> = done["response"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "function_call")
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or_default().to_owned();
            (s("call_id"), s("name"), s("arguments"))
        })
        .collect();
    let ids = crate::test_util::made_up_ids(calls.iter().map(|c| c.0.clone()), "call_");
    for (call, id) in calls.iter_mut().zip(ids) {
        call.0 = id;
    }
    calls
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
    let (out, steps) = run(Context::default(), &chunks);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    assert_eq!(
        completed_calls(&out),
        [
            ("call_#0".into(), "read".into(), r#"{"path":"a.md"}"#.into()),
            ("call_#1".into(), "read".into(), r#"{"path":"b.md"}"#.into()),
            ("call_#2".into(), "list".into(), "{}".into()),
        ]
    );
    let deltas: Vec<&str> = out
        .iter()
        .filter_map(|(_, v)| {
            (v["type"] == "response.function_call_arguments.delta").then(|| v["delta"].as_str())?
        })
        .collect();
    assert_eq!(deltas, [r#"{"path":"a.md"}"#, r#"{"path":"b.md"}"#, "{}"]);
}

#[test]
fn a_name_repeated_with_unfinished_arguments_is_the_same_call() {
    // MiniMax repeats the name with every piece, here without ids.
    let chunks = [
        at_zero(Some("get_weather"), ""),
        at_zero(Some("get_weather"), r#"{"city":{"name":"#),
        at_zero(Some("get_weather"), r#""Paris"}"#),
        at_zero(Some("get_weather"), "}"),
        at_zero(Some("get_weather"), ""),
        chunk(json!({}), Some("tool_calls")),
        "[DONE]".to_owned(),
    ];
    let (out, _) = run(Context::default(), &chunks);
    assert_eq!(
        completed_calls(&out),
        [(
            "call_#0".into(),
            "get_weather".into(),
            r#"{"city":{"name":"Paris"}}"#.into()
        )]
    );
}

#[test]
fn empty_or_missing_ids_and_models_are_not_used() {
    let ctx = || Context {
        model: "gpt-x".into(),
        ..Context::default()
    };
    let with = |id: Option<&str>, model: &str, delta: Value, finish: Option<&str>| {
        let mut c = json!({"model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        if let Some(id) = id {
            c["id"] = json!(id);
        }
        c.to_string()
    };
    let call = json!({"tool_calls": [{"index": 0, "type": "function",
        "function": {"name": "f", "arguments": "{}"}}]});
    // Azure opens with a prompt-filter chunk with an empty id and model.
    let azure = vec![
        json!({"id": "", "model": "", "object": "", "created": 0, "choices": [],
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]})
        .to_string(),
        with(
            Some("chatcmpl-az1"),
            "gpt-4o",
            json!({"content": "hi"}),
            None,
        ),
        with(Some("chatcmpl-az1"), "gpt-4o", call.clone(), None),
        with(
            Some("chatcmpl-az1"),
            "gpt-4o",
            json!({}),
            Some("tool_calls"),
        ),
        "[DONE]".to_owned(),
    ];
    let (out, _) = run(ctx(), &azure);
    let created = &out[0].1["response"];
    assert_eq!(created["id"], "resp_az1");
    assert_eq!(created["model"], "gpt-4o");
    let done = &out.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["id"], "msg_az1");
    assert_eq!(done["output"][1]["id"], "fc_az1_1");
    // TGI: an empty id throughout; a server with an empty model, or none.
    for id in [Some(""), None] {
        let chunks = vec![
            with(id, "", json!({"content": "hi"}), None),
            with(id, "", call.clone(), None),
            with(id, "", json!({}), Some("tool_calls")),
            "[DONE]".to_owned(),
        ];
        let (first, _) = run(ctx(), &chunks);
        let (second, _) = run(ctx(), &chunks);
        let response = &first.last().unwrap().1["response"];
        assert_eq!(response["model"], "gpt-x", "{id:?}");
        let made = response["id"].as_str().unwrap();
        let bare = made.strip_prefix("resp_").unwrap();
        assert!(bare.len() > 8, "{made}");
        assert_eq!(response["output"][0]["id"], format!("msg_{bare}"));
        assert_eq!(response["output"][1]["id"], format!("fc_{bare}_1"));
        assert_eq!(first[0].1["response"]["id"], made, "one id throughout");
        assert_ne!(
            second.last().unwrap().1["response"]["id"],
            made,
            "a fresh id for each answer"
        );
    }
}

#[test]
fn names_and_ids_of_function_calls_are_bounded_too() {
    for (what, chunks) in ["a name in pieces", "huge ids"]
        .into_iter()
        .zip(crate::test_util::tool_calls_held_without_bound())
    {
        let mut m = ChatToResponses::new(Context::default());
        let mut out = Vec::new();
        let failed = chunks.iter().any(|c| {
            out.clear();
            matches!(m.event(&data(c), &mut out), Step::Fail(_))
        });
        assert!(failed, "{what}: held without bound");
    }
}

/// A call that comes with no arguments has `{}`, in its deltas, its
/// `….done` events and the completed response, as in a whole answer:
/// clients parse arguments as JSON, and `""` is not.
#[test]
fn a_call_without_arguments_has_an_empty_object() {
    let chunks = [
        at_zero(Some("now"), ""),
        chunk(json!({}), Some("tool_calls")),
        "[DONE]".to_owned(),
    ];
    let (out, _) = run(Context::default(), &chunks);
    let deltas: String = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.function_call_arguments.delta"))
        .map(|(_, v)| v["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deltas, "{}");
    let done = out
        .iter()
        .find(|(n, _)| n.as_deref() == Some("response.function_call_arguments.done"))
        .unwrap();
    assert_eq!(done.1["arguments"], "{}");
    let item = out
        .iter()
        .find(|(n, _)| n.as_deref() == Some("response.output_item.done"))
        .unwrap();
    assert_eq!(item.1["item"]["arguments"], "{}");
    let calls = completed_calls(&out);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].2, "{}");
}

/// Cut by `length` after a message and a call: the message was finished
/// whole before the call began, and reads `completed` in the final
/// response as in its own `output_item.done`. A message cut by the limit
/// is `incomplete` in both.
#[test]
fn only_the_item_cut_by_the_limit_is_incomplete() {
    let statuses = |chunks: &[String]| {
        let (out, _) = run(Context::default(), chunks);
        let done: Vec<Value> = out
            .iter()
            .filter(|(n, _)| n.as_deref() == Some("response.output_item.done"))
            .map(|(_, v)| v["item"]["status"].clone())
            .collect();
        let (name, last) = out.last().unwrap();
        assert_eq!(name.as_deref(), Some("response.incomplete"));
        let fin: Vec<Value> = last["response"]["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["status"].clone())
            .collect();
        (done, fin)
    };
    let (done, fin) = statuses(&[
        chunk(
            json!({"role": "assistant", "content": "Let me check."}),
            None,
        ),
        at_zero(Some("lookup"), "{\"q\":"),
        chunk(json!({}), Some("length")),
        "[DONE]".to_owned(),
    ]);
    // The message was finished whole; the call's arguments were cut.
    assert_eq!(done, [json!("completed"), json!("incomplete")]);
    assert_eq!(fin, done);
    let (done, fin) = statuses(&[
        chunk(
            json!({"role": "assistant", "content": "It was a dark"}),
            None,
        ),
        chunk(json!({}), Some("length")),
        "[DONE]".to_owned(),
    ]);
    assert_eq!(done, [json!("incomplete")]);
    assert_eq!(fin, done);
}

#[test]
fn content_in_parts_is_the_text_as_in_a_whole_answer() {
    let (deltas, message) = crate::test_util::content_in_parts();
    let mut chunks: Vec<String> = deltas.into_iter().map(|d| chunk(d, None)).collect();
    chunks.push(chunk(json!({}), Some("stop")));
    chunks.push("[DONE]".to_owned());
    let (out, steps) = run(Context::default(), &chunks);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let deltas: String = out
        .iter()
        .filter(|(n, _)| n.as_deref() == Some("response.output_text.delta"))
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert_eq!(deltas, "Paris.");
    let (name, done) = out.last().unwrap();
    assert_eq!(name.as_deref(), Some("response.completed"));
    let whole = json!({"id": "chatcmpl-5", "created": 9, "model": "llama",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}]});
    let whole =
        crate::responses_over_chat::response::response(&whole, &Context::default()).unwrap();
    // Reasoning is dropped, streamed or not; the output is the same.
    assert_eq!(done["response"]["output"], whole["output"]);
    assert_eq!(whole["output"][0]["content"][0]["text"], "Paris.");
    assert_eq!(whole["output"].as_array().unwrap().len(), 1);
}

#[test]
fn a_legacy_function_call_is_a_function_call_as_in_a_whole_answer() {
    let (deltas, message) = crate::test_util::legacy_function_call();
    let mut chunks: Vec<String> = deltas.into_iter().map(|d| chunk(d, None)).collect();
    chunks.push(chunk(json!({}), Some("function_call")));
    chunks.push("[DONE]".to_owned());
    let (out, steps) = run(Context::default(), &chunks);
    assert!(steps.iter().all(|s| *s == Step::Continue), "{steps:?}");
    let call = (
        "call_#0".to_owned(),
        "get_weather".to_owned(),
        r#"{"city":"Paris"}"#.to_owned(),
    );
    assert_eq!(completed_calls(&out), std::slice::from_ref(&call));
    assert_eq!(out.last().unwrap().1["response"]["status"], "completed");

    let whole = json!({"id": "chatcmpl-5", "choices": [{"index": 0,
        "finish_reason": "function_call", "message": message}]});
    let whole =
        crate::responses_over_chat::response::response(&whole, &Context::default()).unwrap();
    let output = whole["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "{output:?}");
    let s = |k: &str| output[0][k].as_str().unwrap_or_default().to_owned();
    let made_up = crate::test_util::made_up_ids([s("call_id")], "call_").remove(0);
    assert_eq!((made_up, s("name"), s("arguments")), call);
    assert_eq!(whole["status"], "completed");
}

#[test]
fn message_items_beyond_the_bound_fail_the_stream() {
    // Each finish reason ends the item; the next text opens another.
    let text = || chunk(json!({"content": "x"}), Some("stop"));
    let chunks: Vec<String> = (0..=MAX_BLOCKS).map(|_| text()).collect();
    let (_, steps) = run(Context::default(), &chunks);
    crate::test_util::fails_past_the_bound(&steps, "output item");
}

#[test]
fn an_upstream_id_or_model_too_long_to_repeat_is_not_used() {
    let long = "x".repeat(crate::wire::MAX_ID_BYTES + 1);
    let big = |delta: Value| {
        json!({"id": format!("chatcmpl-{long}"), "model": long, "choices": [{"index": 0, "delta": delta}]})
            .to_string()
    };
    let chunks: Vec<String> = std::iter::once(big(json!({"role": "assistant"})))
        .chain((0..100).map(|_| big(json!({"content": "a"}))))
        .chain([chunk(json!({}), Some("stop")), "[DONE]".to_owned()])
        .collect();
    let ctx = Context {
        model: "client-model".into(),
        ..Context::default()
    };
    let mut m = ChatToResponses::new(ctx);
    let mut out = Vec::new();
    for c in &chunks {
        assert_eq!(m.event(&data(c), &mut out), Step::Continue);
    }
    // Every event names the response: a short id of its own.
    assert!(out.len() < 100 * 1024, "{} bytes", out.len());
    let events = events(&out);
    let done = &events.last().unwrap().1["response"];
    assert!(done["id"].as_str().unwrap().len() < 64, "{}", done["id"]);
    assert_eq!(done["model"], "client-model");
}

#[test]
fn an_item_ends_with_the_status_its_done_event_gave_it() {
    // A length stop, then more text: the first item was cut, as its
    // `output_item.done` said, and the final response says so too.
    let chunks = [
        chunk(json!({"content": "x"}), None),
        chunk(json!({}), Some("length")),
        chunk(json!({"content": "more"}), None),
        chunk(json!({}), Some("stop")),
        "[DONE]".to_owned(),
    ];
    let (out, steps) = run(Context::default(), &chunks);
    assert!(steps.iter().all(|s| *s == Step::Continue));
    let done: Vec<&Value> = out
        .iter()
        .filter(|(_, e)| e["type"] == "response.output_item.done")
        .map(|(_, e)| &e["item"]["status"])
        .collect();
    assert_eq!(done, [&json!("incomplete"), &json!("completed")]);
    let last = &out.last().unwrap().1;
    assert_eq!(last["type"], "response.completed");
    let statuses: Vec<&Value> = last["response"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| &item["status"])
        .collect();
    assert_eq!(statuses, done);
}

/// The context of a request that names some echoed fields (a null one
/// takes its default) and a namespaced tool.
fn echoing_context() -> Context {
    let request = json!({
        "model": "m", "stream": true, "input": "hi",
        "instructions": "be brief",
        "temperature": null,
        "metadata": {"k": "v"},
        "tools": [{"type": "namespace", "name": "ns", "tools": [
            {"type": "function", "name": "g", "parameters": {"type": "object"}}]}],
    });
    let (_, ctx) = super::super::request::request(request.as_object().unwrap()).unwrap();
    ctx
}

/// What a stream of `chunks`, each translated, writes.
fn written(ctx: Context, chunks: &[String]) -> String {
    let mut m = ChatToResponses::new(ctx);
    let mut out = Vec::new();
    for c in chunks {
        assert_eq!(m.event(&data(c), &mut out), Step::Continue);
    }
    String::from_utf8(out).unwrap()
}

/// Every event of a stream, byte for byte: field order, `null`s, the
/// echoed request fields and their defaults, a namespaced call, a call
/// without arguments.
#[test]
fn the_events_as_written() {
    let chunks = [
        chunk(json!({"role": "assistant", "content": "Hi"}), None),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "ns__g", "arguments": "{\"x\":"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            None,
        ),
        chunk(
            json!({"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "f"}}]}),
            Some("tool_calls"),
        ),
        usage(),
        "[DONE]".to_owned(),
    ];
    let text = written(echoing_context(), &chunks);
    let expected = concat!(
        "event: response.created\ndata: {\"response\":{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"in_progress\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"llama\",\"output\":[],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":\"be brief\",\"max_output_tokens\":null,\"metadata\":{\"k\":\"v\"},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[{\"type\":\"namespace\",\"name\":\"ns\",\"tools\":[{\"type\":\"function\",\"name\":\"g\",\"parameters\":{\"type\":\"object\"}}]}],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.created\",\"sequence_number\":0}\n\n",
        "event: response.in_progress\ndata: {\"response\":{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"in_progress\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"llama\",\"output\":[],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":\"be brief\",\"max_output_tokens\":null,\"metadata\":{\"k\":\"v\"},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[{\"type\":\"namespace\",\"name\":\"ns\",\"tools\":[{\"type\":\"function\",\"name\":\"g\",\"parameters\":{\"type\":\"object\"}}]}],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.in_progress\",\"sequence_number\":1}\n\n",
        "event: response.output_item.added\ndata: {\"output_index\":0,\"item\":{\"id\":\"msg_5\",\"type\":\"message\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]},\"type\":\"response.output_item.added\",\"sequence_number\":2}\n\n",
        "event: response.content_part.added\ndata: {\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[],\"logprobs\":[]},\"type\":\"response.content_part.added\",\"sequence_number\":3}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\",\"logprobs\":[]}\n\n",
        "event: response.output_text.done\ndata: {\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"text\":\"Hi\",\"logprobs\":[],\"type\":\"response.output_text.done\",\"sequence_number\":5}\n\n",
        "event: response.content_part.done\ndata: {\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]},\"type\":\"response.content_part.done\",\"sequence_number\":6}\n\n",
        "event: response.output_item.done\ndata: {\"output_index\":0,\"item\":{\"id\":\"msg_5\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]}]},\"type\":\"response.output_item.done\",\"sequence_number\":7}\n\n",
        "event: response.output_item.added\ndata: {\"output_index\":1,\"item\":{\"id\":\"fc_5_1\",\"type\":\"function_call\",\"status\":\"in_progress\",\"call_id\":\"call_1\",\"arguments\":\"\",\"name\":\"g\",\"namespace\":\"ns\"},\"type\":\"response.output_item.added\",\"sequence_number\":8}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"sequence_number\":9,\"item_id\":\"fc_5_1\",\"output_index\":1,\"delta\":\"{\\\"x\\\":\"}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"sequence_number\":10,\"item_id\":\"fc_5_1\",\"output_index\":1,\"delta\":\"1}\"}\n\n",
        "event: response.function_call_arguments.done\ndata: {\"item_id\":\"fc_5_1\",\"output_index\":1,\"name\":\"g\",\"arguments\":\"{\\\"x\\\":1}\",\"type\":\"response.function_call_arguments.done\",\"sequence_number\":11}\n\n",
        "event: response.output_item.done\ndata: {\"output_index\":1,\"item\":{\"id\":\"fc_5_1\",\"type\":\"function_call\",\"status\":\"completed\",\"call_id\":\"call_1\",\"arguments\":\"{\\\"x\\\":1}\",\"name\":\"g\",\"namespace\":\"ns\"},\"type\":\"response.output_item.done\",\"sequence_number\":12}\n\n",
        "event: response.output_item.added\ndata: {\"output_index\":2,\"item\":{\"id\":\"fc_5_2\",\"type\":\"function_call\",\"status\":\"in_progress\",\"call_id\":\"call_2\",\"arguments\":\"\",\"name\":\"f\"},\"type\":\"response.output_item.added\",\"sequence_number\":13}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"sequence_number\":14,\"item_id\":\"fc_5_2\",\"output_index\":2,\"delta\":\"{}\"}\n\n",
        "event: response.function_call_arguments.done\ndata: {\"item_id\":\"fc_5_2\",\"output_index\":2,\"name\":\"f\",\"arguments\":\"{}\",\"type\":\"response.function_call_arguments.done\",\"sequence_number\":15}\n\n",
        "event: response.output_item.done\ndata: {\"output_index\":2,\"item\":{\"id\":\"fc_5_2\",\"type\":\"function_call\",\"status\":\"completed\",\"call_id\":\"call_2\",\"arguments\":\"{}\",\"name\":\"f\"},\"type\":\"response.output_item.done\",\"sequence_number\":16}\n\n",
        "event: response.completed\ndata: {\"response\":{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"completed\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"llama\",\"output\":[{\"id\":\"msg_5\",\"type\":\"message\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]}]},{\"id\":\"fc_5_1\",\"type\":\"function_call\",\"status\":\"completed\",\"call_id\":\"call_1\",\"arguments\":\"{\\\"x\\\":1}\",\"name\":\"g\",\"namespace\":\"ns\"},{\"id\":\"fc_5_2\",\"type\":\"function_call\",\"status\":\"completed\",\"call_id\":\"call_2\",\"arguments\":\"{}\",\"name\":\"f\"}],\"previous_response_id\":null,\"store\":false,\"usage\":{\"input_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":9},\"instructions\":\"be brief\",\"max_output_tokens\":null,\"metadata\":{\"k\":\"v\"},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[{\"type\":\"namespace\",\"name\":\"ns\",\"tools\":[{\"type\":\"function\",\"name\":\"g\",\"parameters\":{\"type\":\"object\"}}]}],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.completed\",\"sequence_number\":17}\n\n",
    );
    assert_eq!(text, expected);
}

/// A stream cut by the token limit, without usage, byte for byte.
#[test]
fn an_incomplete_stream_as_written() {
    let chunks = [
        chunk(json!({"content": "Hi"}), Some("length")),
        "[DONE]".to_owned(),
    ];
    let text = written(Context::default(), &chunks);
    let expected = concat!(
        "event: response.created\ndata: {\"response\":{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"in_progress\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"llama\",\"output\":[],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":null,\"max_output_tokens\":null,\"metadata\":{},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.created\",\"sequence_number\":0}\n\n",
        "event: response.in_progress\ndata: {\"response\":{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"in_progress\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"llama\",\"output\":[],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":null,\"max_output_tokens\":null,\"metadata\":{},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.in_progress\",\"sequence_number\":1}\n\n",
        "event: response.output_item.added\ndata: {\"output_index\":0,\"item\":{\"id\":\"msg_5\",\"type\":\"message\",\"status\":\"in_progress\",\"role\":\"assistant\",\"content\":[]},\"type\":\"response.output_item.added\",\"sequence_number\":2}\n\n",
        "event: response.content_part.added\ndata: {\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[],\"logprobs\":[]},\"type\":\"response.content_part.added\",\"sequence_number\":3}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\",\"logprobs\":[]}\n\n",
        "event: response.output_text.done\ndata: {\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"text\":\"Hi\",\"logprobs\":[],\"type\":\"response.output_text.done\",\"sequence_number\":5}\n\n",
        "event: response.content_part.done\ndata: {\"item_id\":\"msg_5\",\"output_index\":0,\"content_index\":0,\"part\":{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]},\"type\":\"response.content_part.done\",\"sequence_number\":6}\n\n",
        "event: response.output_item.done\ndata: {\"output_index\":0,\"item\":{\"id\":\"msg_5\",\"type\":\"message\",\"status\":\"incomplete\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]}]},\"type\":\"response.output_item.done\",\"sequence_number\":7}\n\n",
        "event: response.incomplete\ndata: {\"response\":{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"incomplete\",\"background\":false,\"error\":null,\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"model\":\"llama\",\"output\":[{\"id\":\"msg_5\",\"type\":\"message\",\"status\":\"incomplete\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]}]}],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":null,\"max_output_tokens\":null,\"metadata\":{},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.incomplete\",\"sequence_number\":8}\n\n",
    );
    assert_eq!(text, expected);
}

/// A stream broken before its first event, byte for byte.
#[test]
fn an_interrupted_stream_as_written() {
    let mut m = ChatToResponses::new(Context::default());
    let mut out = Vec::new();
    m.interrupted("the upstream went away", &mut out);
    let text = String::from_utf8(out).unwrap();
    // The id and time are made up here (no chunk named them).
    let events = events(text.as_bytes());
    let response = &events[0].1["response"];
    let (id, at) = (response["id"].as_str().unwrap(), &response["created_at"]);
    let expected = concat!(
        "event: response.created\ndata: {\"response\":{\"id\":\"{ID}\",\"object\":\"response\",\"created_at\":{AT},\"status\":\"in_progress\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"\",\"output\":[],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":null,\"max_output_tokens\":null,\"metadata\":{},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.created\",\"sequence_number\":0}\n\n",
        "event: response.in_progress\ndata: {\"response\":{\"id\":\"{ID}\",\"object\":\"response\",\"created_at\":{AT},\"status\":\"in_progress\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"\",\"output\":[],\"previous_response_id\":null,\"store\":false,\"usage\":null,\"instructions\":null,\"max_output_tokens\":null,\"metadata\":{},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null},\"type\":\"response.in_progress\",\"sequence_number\":1}\n\n",
        "event: error\ndata: {\"code\":\"stream_interrupted\",\"message\":\"the upstream went away\",\"param\":null,\"type\":\"error\",\"sequence_number\":2}\n\n",
    );
    let expected = expected
        .replace("{ID}", id)
        .replace("{AT}", &at.to_string());
    assert_eq!(text, expected);
}

/// A whole answer, byte for byte.
#[test]
fn a_whole_answer_as_written() {
    let whole = json!({"id": "chatcmpl-5", "created": 9, "model": "llama",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Hi", "refusal": "no",
            "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "ns__g", "arguments": "{\"x\":1}"}}]}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 3}}});
    let whole = crate::responses_over_chat::response::response(&whole, &echoing_context()).unwrap();
    let text = serde_json::to_string(&whole).unwrap();
    assert_eq!(
        text,
        "{\"id\":\"resp_5\",\"object\":\"response\",\"created_at\":9,\"status\":\"completed\",\"background\":false,\"error\":null,\"incomplete_details\":null,\"model\":\"llama\",\"output\":[{\"type\":\"message\",\"id\":\"msg_5\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\",\"annotations\":[],\"logprobs\":[]},{\"type\":\"refusal\",\"refusal\":\"no\"}]},{\"type\":\"function_call\",\"id\":\"fc_5_1\",\"call_id\":\"call_1\",\"arguments\":\"{\\\"x\\\":1}\",\"status\":\"completed\",\"name\":\"g\",\"namespace\":\"ns\"}],\"previous_response_id\":null,\"store\":false,\"usage\":{\"input_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":3},\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":9},\"instructions\":\"be brief\",\"max_output_tokens\":null,\"metadata\":{\"k\":\"v\"},\"parallel_tool_calls\":true,\"reasoning\":{\"effort\":null,\"summary\":null},\"temperature\":1.0,\"text\":{\"format\":{\"type\":\"text\"}},\"tool_choice\":\"auto\",\"tools\":[{\"type\":\"namespace\",\"name\":\"ns\",\"tools\":[{\"type\":\"function\",\"name\":\"g\",\"parameters\":{\"type\":\"object\"}}]}],\"top_p\":1.0,\"truncation\":\"disabled\",\"user\":null}"
    );
}
