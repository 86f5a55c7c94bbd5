use super::*;

fn translate(body: Value) -> Result<(Value, Context), Error> {
    let Value::Object(map) = body else {
        panic!("an object")
    };
    request(&map).map(|(out, ctx)| (Value::Object(out), ctx))
}

fn with(extra: Value) -> Value {
    let mut body = json!({"model": "llama", "input": "hi"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn refused(body: Value) -> String {
    match translate(body) {
        Err(Error::UnsupportedParameter { param, .. }) => param,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn string_input_and_instructions() {
    let (out, ctx) = translate(with(json!({"instructions": "Be brief.", "max_output_tokens": 64,
        "temperature": 0.2, "top_p": 0.5, "stream": true, "store": false, "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "low", "summary": "auto"}, "metadata": {"k": "v"}}))).unwrap();
    assert_eq!(
        out["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    );
    assert_eq!(out["max_tokens"], 64);
    assert_eq!(
        (out["temperature"].clone(), out["top_p"].clone()),
        (json!(0.2), json!(0.5))
    );
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    assert_eq!(out["reasoning_effort"], "low");
    for dropped in [
        "store",
        "include",
        "metadata",
        "instructions",
        "max_output_tokens",
        "input",
    ] {
        assert!(out.get(dropped).is_none(), "{dropped}");
    }
    assert_eq!(ctx.echoed("instructions"), Some(&json!("Be brief.")));
    assert_eq!(ctx.echoed("metadata"), Some(&json!({"k": "v"})));
    assert_eq!(ctx.model, "llama");
}

#[test]
fn items_and_function_calls() {
    let (out, _) = translate(with(json!({"input": [
        {"role": "developer", "content": "Use metric."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Weather in Paris?"},
            {"type": "input_image", "image_url": "https://x/p.png", "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
    ]}))).unwrap();
    let m = out["messages"].as_array().unwrap();
    assert_eq!(m[0], json!({"role": "system", "content": "Use metric."}));
    assert_eq!(
        m[1]["content"][0],
        json!({"type": "text", "text": "Weather in Paris?"})
    );
    assert_eq!(
        m[1]["content"][1],
        json!({"type": "image_url", "image_url": {"url": "https://x/p.png", "detail": "low"}})
    );
    assert_eq!(m[2]["content"], "Checking.");
    assert_eq!(
        m[2]["tool_calls"].as_array().unwrap().len(),
        2,
        "calls join the assistant message"
    );
    assert_eq!(
        m[2]["tool_calls"][1],
        json!({"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}})
    );
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "18C"})
    );
    assert_eq!(m[4]["content"], "noon");
    assert_eq!(m.len(), 5);

    let (out, _) = translate(with(json!({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]}))).unwrap();
    assert_eq!(out["messages"][0]["content"], Value::Null);
}

#[test]
fn tools_choice_and_format() {
    let (out, _) = translate(with(json!({
        "tools": [{"type": "function", "name": "f", "description": "F", "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": true}},
    }))).unwrap();
    assert_eq!(
        out["tools"],
        json!([{"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object"}, "strict": true}}])
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "f"}})
    );
    assert_eq!(out["parallel_tool_calls"], false);
    assert_eq!(
        out["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": true}})
    );
    let (out, _) = translate(with(
        json!({"tool_choice": "required", "text": {"format": {"type": "text"}}}),
    ))
    .unwrap();
    assert!(
        out.get("tool_choice").is_none(),
        "no tool_choice without tools"
    );
    assert!(out.get("response_format").is_none());
}

#[test]
fn namespaced_functions_go_flat_and_web_search_is_left_out() {
    let f =
        |name: &str| json!({"type": "function", "name": name, "parameters": {"type": "object"}});
    let (out, ctx) = translate(with(json!({
        "tools": [
            {"type": "web_search", "external_web_access": true},
            f("shell"),
            {"type": "namespace", "name": "agents", "description": "Sub-agents",
             "tools": [f("spawn"), f("close")]},
            {"type": "web_search_preview"},
        ],
        "tool_choice": {"type": "function", "name": "spawn", "namespace": "agents"},
        "input": [
            {"role": "user", "content": "go"},
            {"type": "function_call", "call_id": "c1", "name": "spawn", "namespace": "agents", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ],
    })))
    .unwrap();
    let names: Vec<_> = out["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shell", "agents__spawn", "agents__close"]);
    assert_eq!(
        out["tool_choice"],
        json!({"type": "function", "function": {"name": "agents__spawn"}})
    );
    assert_eq!(
        out["messages"][1]["tool_calls"][0]["function"]["name"],
        "agents__spawn"
    );
    assert_eq!(ctx.client_name("agents__close"), ("close", Some("agents")));
    assert_eq!(ctx.client_name("shell"), ("shell", None));
    // A request with web search alone has no tools upstream.
    let (out, _) = translate(with(
        json!({"tools": [{"type": "web_search"}], "tool_choice": "auto"}),
    ))
    .unwrap();
    assert!(out.get("tools").is_none() && out.get("tool_choice").is_none());
    // What a chat upstream cannot tell apart, or run, is refused.
    let clash =
        json!({"tools": [f("a__b"), {"type": "namespace", "name": "a", "tools": [f("b")]}]});
    assert_eq!(refused(with(clash)), "tools[1].tools[0].name");
    let custom = json!({"tools": [{"type": "namespace", "name": "a", "tools": [{"type": "custom", "name": "c"}]}]});
    assert_eq!(refused(with(custom)), "tools[0].tools[0]");
    let bare = json!({"tools": [{"type": "namespace", "name": "a"}]});
    assert_eq!(refused(with(bare)), "tools[0].tools");
}

#[test]
fn tool_choice_without_tools_is_not_sent() {
    // Codex sends `tool_choice: "auto"` on turns without tools; vLLM
    // rejects `tool_choice` (and `parallel_tool_calls`) without `tools`.
    for extra in [
        json!({"tool_choice": "auto", "parallel_tool_calls": true}),
        json!({"tools": [], "tool_choice": "required", "parallel_tool_calls": false}),
        json!({"tools": null, "tool_choice": {"type": "function", "name": "f"}}),
    ] {
        let (out, ctx) = translate(with(extra.clone())).unwrap();
        for key in ["tools", "tool_choice", "parallel_tool_calls"] {
            assert!(out.get(key).is_none(), "{key} sent for {extra}");
        }
        assert_eq!(
            ctx.echoed("tool_choice"),
            extra.get("tool_choice"),
            "the response still echoes the request"
        );
    }
    let (out, _) = translate(with(json!({"tools": [{"type": "function", "name": "f"}],
        "tool_choice": "auto", "parallel_tool_calls": true})))
    .unwrap();
    assert_eq!(out["tool_choice"], "auto");
    assert_eq!(out["parallel_tool_calls"], true);
    assert_eq!(
        refused(with(json!({"tool_choice": "sometimes"}))),
        "tool_choice"
    );
}

/// A tool that returns an image (a screenshot): chat `tool` messages hold
/// text only, so the images go to a user message after the outputs in a
/// row (which must follow their calls unbroken), as a Messages tool
/// result's do.
#[test]
fn images_of_function_outputs_follow_the_outputs() {
    let screenshot = json!({"type": "input_image", "image_url": "data:image/png;base64,AAAA"});
    let (out, _) = translate(with(json!({"input": [
        {"type": "function_call", "call_id": "call_1", "name": "screenshot", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_2", "name": "read", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [
            {"type": "input_text", "text": "the screen"}, screenshot]},
        {"type": "function_call_output", "call_id": "call_2", "output": "text"},
        {"type": "message", "role": "user", "content": "What do you see?"},
        {"type": "function_call", "call_id": "call_3", "name": "screenshot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_3", "output": [screenshot]},
    ]})))
    .unwrap();
    let image = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}});
    assert_eq!(
        out["messages"],
        json!([
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}},
                {"id": "call_2", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "the screen"},
            {"role": "tool", "tool_call_id": "call_2", "content": "text"},
            {"role": "user", "content": [image]},
            {"role": "user", "content": "What do you see?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "screenshot", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_3", "content": ""},
            {"role": "user", "content": [image]},
        ])
    );
    // An image it cannot take is refused where it is; a file, as before.
    let output = |part: Value| {
        with(json!({"input": [{"type": "function_call_output", "call_id": "c", "output": [part]}]}))
    };
    assert_eq!(
        refused(output(json!({"type": "input_image", "file_id": "f"}))),
        "input[0].output[0].image_url"
    );
    assert_eq!(
        refused(output(json!({"type": "input_file", "file_id": "f"}))),
        "input[0].output"
    );
}

#[test]
fn stateful_and_built_in_requests_are_refused() {
    assert_eq!(
        refused(with(json!({"previous_response_id": "resp_1"}))),
        "previous_response_id"
    );
    assert_eq!(refused(with(json!({"store": true}))), "store");
    assert_eq!(refused(with(json!({"background": true}))), "background");
    assert_eq!(
        refused(with(json!({"conversation": "conv_1"}))),
        "conversation"
    );
    assert_eq!(refused(with(json!({"prompt": {"id": "pmpt_1"}}))), "prompt");
    assert_eq!(
        refused(with(json!({"tools": [{"type": "code_interpreter"}]}))),
        "tools[0]"
    );
    assert_eq!(
        refused(with(json!({"tool_choice": {"type": "web_search_preview"}}))),
        "tool_choice"
    );
    assert_eq!(
        refused(with(
            json!({"input": [{"type": "item_reference", "id": "msg_1"}]})
        )),
        "input[0]"
    );
    assert_eq!(
        refused(with(
            json!({"input": [{"type": "web_search_call", "id": "ws"}]})
        )),
        "input[0].type"
    );
    let file = json!([{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]);
    assert_eq!(refused(with(json!({"input": file}))), "input[0].content[0]");
    let image = json!([{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]);
    assert_eq!(
        refused(with(json!({"input": image}))),
        "input[0].content[0].image_url"
    );
    assert_eq!(refused(with(json!({"input": 5}))), "input");
    // Explicitly stateless requests and null fields are fine.
    assert!(
        translate(with(
            json!({"store": false, "previous_response_id": null, "background": false})
        ))
        .is_ok()
    );
}

/// A request of every kind of item, translated byte for byte: the chat
/// request's field order.
#[test]
fn the_request_as_written() {
    let (out, _) = translate(with(json!({
        "stream": true, "instructions": "Be brief.", "max_output_tokens": 100,
        "temperature": 0.5, "user": "u1", "reasoning": {"effort": "low"},
        "text": {"format": {"type": "json_schema", "name": "answer", "strict": true,
            "schema": {"type": "object"}}},
        "tools": [{"type": "function", "name": "read", "description": "Read a file.",
            "parameters": {"type": "object"}, "strict": true},
            {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "g"}]}],
        "tool_choice": {"type": "function", "name": "read"},
        "input": [
            {"role": "developer", "content": "Be kind."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Look:"},
                {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]},
            {"type": "reasoning", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Reading."}]},
            {"type": "function_call", "call_id": "call_1", "name": "read", "arguments": "{\"path\":\"a.md\"}"},
            {"type": "function_call", "call_id": "call_2", "namespace": "ns", "name": "g"},
            {"type": "function_call_output", "call_id": "call_1", "output": "gone"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
            {"type": "function_call", "call_id": "call_3", "name": "read", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_3", "output": "again"},
        ],
    })))
    .unwrap();
    assert_eq!(
        out.to_string(),
        "{\"model\":\"llama\",\"temperature\":0.5,\"stream\":true,\"user\":\"u1\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":\"system\",\"content\":\"Be kind.\"},{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Look:\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"https://x/y.png\",\"detail\":\"low\"}}]},{\"role\":\"assistant\",\"content\":\"Reading.\",\"tool_calls\":[{\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"read\",\"arguments\":\"{\\\"path\\\":\\\"a.md\\\"}\"}},{\"id\":\"call_2\",\"type\":\"function\",\"function\":{\"name\":\"ns__g\",\"arguments\":\"{}\"}}]},{\"role\":\"tool\",\"tool_call_id\":\"call_1\",\"content\":\"gone\"},{\"role\":\"tool\",\"tool_call_id\":\"call_2\",\"content\":\"ok\"},{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"call_3\",\"type\":\"function\",\"function\":{\"name\":\"read\",\"arguments\":\"{}\"}}]},{\"role\":\"tool\",\"tool_call_id\":\"call_3\",\"content\":\"again\"}],\"max_tokens\":100,\"stream_options\":{\"include_usage\":true},\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"read\",\"description\":\"Read a file.\",\"parameters\":{\"type\":\"object\"},\"strict\":true}},{\"type\":\"function\",\"function\":{\"name\":\"ns__g\"}}],\"tool_choice\":{\"type\":\"function\",\"function\":{\"name\":\"read\"}},\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"answer\",\"schema\":{\"type\":\"object\"},\"strict\":true}},\"reasoning_effort\":\"low\"}"
    );
}
