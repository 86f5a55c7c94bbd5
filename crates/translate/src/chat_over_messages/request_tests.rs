use super::*;

fn translate(body: Value) -> Result<(Value, Context), Error> {
    let Value::Object(map) = body else {
        panic!("an object")
    };
    request(&map).map(|(out, ctx)| (Value::Object(out), ctx))
}

fn with(extra: Value) -> Value {
    let mut body = json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn refused(body: Value) -> String {
    match translate(body) {
        Err(Error::UnsupportedParameter { param, message }) => {
            assert!(message.contains(&format!("`{param}`")), "{message}");
            param
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn whole_conversation() {
    let (out, ctx) = translate(json!({
        "model": "claude", "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": 50, "temperature": 1.6, "top_p": 0.8, "stop": "END", "user": "u9", "seed": 3,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                {"type": "image_url", "image_url": {"url": "https://x/p.jpg"}}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "user", "content": "Thanks"},
        ],
    }))
    .unwrap();
    assert_eq!(out["system"], "Be brief.\n\nUse metric.");
    assert_eq!(out["max_tokens"], 50);
    assert_eq!(out["temperature"], 1.0, "clamped to Anthropic's range");
    assert_eq!(out["top_p"], 0.8);
    assert_eq!(out["stop_sequences"], json!(["END"]));
    assert_eq!(out["metadata"], json!({"user_id": "u9"}));
    assert!(
        out.get("seed").is_none()
            && out.get("stream_options").is_none()
            && out.get("user").is_none()
    );
    let m = out["messages"].as_array().unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(
        m[0]["content"][1],
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}})
    );
    assert_eq!(
        m[0]["content"][2]["source"],
        json!({"type": "url", "url": "https://x/p.jpg"})
    );
    assert_eq!(
        m[1],
        json!({"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]})
    );
    // The tool message and the next user message share one user turn, result first.
    assert_eq!(
        m[2],
        json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
        {"type": "text", "text": "Thanks"}]})
    );
    assert!(ctx.include_usage);
    assert_eq!(ctx.model, "claude");
    assert_eq!(ctx.json_tool, None);
}

#[test]
fn max_tokens_default_and_preference() {
    let (out, _) = translate(with(json!({}))).unwrap();
    assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(
        out["messages"][0]["content"],
        json!([{"type": "text", "text": "hi"}])
    );
    let (out, _) = translate(with(json!({"max_tokens": 10, "max_completion_tokens": 20}))).unwrap();
    assert_eq!(out["max_tokens"], 20);
    let (out, _) = translate(with(
        json!({"stop": ["a", "b"], "n": 1, "logprobs": false, "modalities": ["text"]}),
    ))
    .unwrap();
    assert_eq!(out["stop_sequences"], json!(["a", "b"]));
}

#[test]
fn tools_and_choices() {
    let tools = json!([{"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object", "properties": {}}}},
                       {"type": "function", "function": {"name": "g"}}]);
    for (choice, expected) in [
        (Value::Null, json!({"type": "auto"})),
        (json!("auto"), json!({"type": "auto"})),
        (json!("none"), json!({"type": "none"})),
        (json!("required"), json!({"type": "any"})),
        (
            json!({"type": "function", "function": {"name": "g"}}),
            json!({"type": "tool", "name": "g"}),
        ),
    ] {
        let (out, _) = translate(with(json!({"tools": tools, "tool_choice": choice}))).unwrap();
        assert_eq!(out["tool_choice"], expected);
        assert_eq!(
            out["tools"][0],
            json!({"name": "f", "description": "F", "input_schema": {"type": "object", "properties": {}}})
        );
        assert_eq!(
            out["tools"][1]["input_schema"],
            json!({"type": "object", "properties": {}})
        );
    }
    let (out, _) = translate(with(json!({"tools": tools, "parallel_tool_calls": false}))).unwrap();
    assert_eq!(
        out["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
}

#[test]
fn null_parameters_get_the_default_schema() {
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": null}}]);
    let (out, _) = translate(with(json!({"tools": tools}))).unwrap();
    assert_eq!(
        out["tools"][0]["input_schema"],
        json!({"type": "object", "properties": {}})
    );
}

#[test]
fn response_format_becomes_a_forced_tool() {
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}}});
    let (out, ctx) = translate(with(json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": true}}})))
    .unwrap();
    assert_eq!(out["tools"][0]["name"], "answer");
    assert_eq!(out["tools"][0]["input_schema"], schema);
    assert_eq!(
        out["tool_choice"],
        json!({"type": "tool", "name": "answer"})
    );
    assert_eq!(ctx.json_tool.as_deref(), Some("answer"));
    let (out, ctx) = translate(with(json!({"response_format": {"type": "json_object"}}))).unwrap();
    assert_eq!(out["tools"][0]["input_schema"], json!({"type": "object"}));
    assert_eq!(ctx.json_tool.as_deref(), Some("json_object"));
    let (out, ctx) = translate(with(json!({"response_format": {"type": "text"}}))).unwrap();
    assert!(out.get("tools").is_none() && ctx.json_tool.is_none());
}

#[test]
fn refusals_name_the_field() {
    assert_eq!(refused(with(json!({"n": 2}))), "n");
    assert_eq!(refused(with(json!({"logprobs": true}))), "logprobs");
    assert_eq!(refused(with(json!({"top_logprobs": 3}))), "top_logprobs");
    assert_eq!(
        refused(with(json!({"logit_bias": {"50256": -100}}))),
        "logit_bias"
    );
    assert_eq!(refused(with(json!({"audio": {"voice": "alloy"}}))), "audio");
    assert_eq!(
        refused(with(json!({"modalities": ["text", "audio"]}))),
        "modalities"
    );
    assert_eq!(
        refused(with(json!({"functions": [{"name": "f"}]}))),
        "functions"
    );
    assert_eq!(
        refused(with(json!({"web_search_options": {}}))),
        "web_search_options"
    );
    assert!(
        translate(with(
            json!({"logit_bias": {}, "top_logprobs": 0, "seed": 1})
        ))
        .is_ok()
    );
}

#[test]
fn more_refusals() {
    let tools = json!([{"type": "function", "function": {"name": "f"}}]);
    let json_format =
        json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}});
    assert_eq!(
        refused(with(
            json!({"tools": tools, "response_format": json_format})
        )),
        "response_format"
    );
    let array =
        json!({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "array"}}});
    assert_eq!(
        refused(with(json!({"response_format": array}))),
        "response_format.json_schema.schema"
    );
    assert_eq!(
        refused(with(
            json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]})
        )),
        "tools[0]"
    );
    assert_eq!(
        refused(with(
            json!({"tool_choice": {"type": "allowed_tools"}, "tools": tools})
        )),
        "tool_choice"
    );
    let bad_args = json!([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]);
    assert_eq!(
        refused(with(json!({"messages": bad_args}))),
        "messages[0].tool_calls[0].function.arguments"
    );
    let audio = json!([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]);
    assert_eq!(
        refused(with(json!({"messages": audio}))),
        "messages[0].content[0]"
    );
    assert_eq!(
        refused(with(
            json!({"messages": [{"role": "function", "content": "x"}]})
        )),
        "messages[0].role"
    );
    let text_data = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain,hi"}}]}]);
    assert_eq!(
        refused(with(json!({"messages": text_data}))),
        "messages[0].content[0].image_url.url"
    );
}

#[test]
fn whitespace_only_text_is_left_out() {
    // Anthropic rejects text blocks of only whitespace ("text content blocks
    // must contain non-whitespace text") as it does empty ones; a model's
    // "\n\n" before its tool call comes back in the next request.
    let (out, _) = translate(with(json!({"messages": [
        {"role": "user", "content": [{"type": "text", "text": " "}, {"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": "\n\n", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "user", "content": "\n"},
    ]})))
    .unwrap();
    assert_eq!(
        out["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "18C"}]},
        ])
    );
}

#[test]
fn parameters_without_a_type_are_an_object_schema() {
    // Chat servers take `parameters: {}` (or properties without `type`);
    // Anthropic answers 400 "tools.0.custom.input_schema.type: Field required".
    let tools = json!([
        {"type": "function", "function": {"name": "f", "parameters": {}}},
        {"type": "function", "function": {"name": "g", "parameters": {"properties": {"a": {"type": "string"}}}}},
    ]);
    let (out, _) = translate(with(json!({"tools": tools}))).unwrap();
    assert_eq!(out["tools"][0]["input_schema"], json!({"type": "object"}));
    assert_eq!(
        out["tools"][1]["input_schema"],
        json!({"type": "object", "properties": {"a": {"type": "string"}}})
    );
}

#[test]
fn whitespace_stop_sequences_are_refused() {
    // Anthropic answers 400 "stop_sequences: each stop sequence must contain
    // non-whitespace" (and "must be non-empty"); chat clients often send
    // `stop: ["\n"]`. Refused before anything is sent, naming `stop`.
    assert_eq!(refused(with(json!({"stop": "\n"}))), "stop");
    assert_eq!(refused(with(json!({"stop": ["END", " "]}))), "stop");
    assert_eq!(refused(with(json!({"stop": [""]}))), "stop");
    let (out, _) = translate(with(json!({"stop": ["\nEND", "x "]}))).unwrap();
    assert_eq!(out["stop_sequences"], json!(["\nEND", "x "]));
}

/// A request of every kind of message, translated byte for byte: the
/// Messages request's field order.
#[test]
fn the_request_as_written() {
    let (out, _) = translate(json!({
        "model": "claude", "max_tokens": 100, "stream": true, "temperature": 1.5,
        "stop": "END", "user": "u1",
        "tools": [{"type": "function", "function": {"name": "read", "description": "Read a file.",
            "parameters": {"properties": {"path": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "bare"}}],
        "tool_choice": "required", "parallel_tool_calls": false,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "content": "Reading.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a.md\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "bare", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "gone"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": "Go on."},
        ],
    }))
    .unwrap();
    assert_eq!(
        out.to_string(),
        "{\"model\":\"claude\",\"stream\":true,\"max_tokens\":100,\"temperature\":1.0,\"system\":\"Be brief.\\n\\nBe kind.\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Look:\"},{\"type\":\"image\",\"source\":{\"type\":\"base64\",\"media_type\":\"image/png\",\"data\":\"AAAA\"}},{\"type\":\"image\",\"source\":{\"type\":\"url\",\"url\":\"https://x/y.png\"}}]},{\"role\":\"assistant\",\"content\":[{\"type\":\"text\",\"text\":\"Reading.\"},{\"type\":\"tool_use\",\"id\":\"call_1\",\"name\":\"read\",\"input\":{\"path\":\"a.md\"}},{\"type\":\"tool_use\",\"id\":\"call_2\",\"name\":\"bare\",\"input\":{}}]},{\"role\":\"user\",\"content\":[{\"type\":\"tool_result\",\"tool_use_id\":\"call_1\",\"content\":\"gone\"},{\"type\":\"tool_result\",\"tool_use_id\":\"call_2\",\"content\":\"ok\"},{\"type\":\"text\",\"text\":\"Go on.\"}]}],\"stop_sequences\":[\"END\"],\"metadata\":{\"user_id\":\"u1\"},\"tools\":[{\"name\":\"read\",\"input_schema\":{\"properties\":{\"path\":{\"type\":\"string\"}},\"type\":\"object\"},\"description\":\"Read a file.\"},{\"name\":\"bare\",\"input_schema\":{\"type\":\"object\",\"properties\":{}}}],\"tool_choice\":{\"type\":\"any\",\"disable_parallel_tool_use\":true}}"
    );
}

/// A structured-output request, translated byte for byte: the forced tool.
#[test]
fn a_structured_output_request_as_written() {
    let (out, _) = translate(with(json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}}}})))
    .unwrap();
    assert_eq!(
        out.to_string(),
        "{\"model\":\"claude\",\"max_tokens\":4096,\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}],\"tools\":[{\"name\":\"answer\",\"description\":\"Give your final answer as this tool's input: JSON that matches the schema.\",\"input_schema\":{\"type\":\"object\"}}],\"tool_choice\":{\"type\":\"tool\",\"name\":\"answer\"}}"
    );
}

#[test]
fn a_cap_that_is_no_whole_number_is_refused() {
    // As a chat server refuses them: a default cap in their place would
    // let the answer run to 4096 tokens.
    for (cap, bad) in [
        ("max_tokens", json!(-5)),
        ("max_tokens", json!(1.5)),
        ("max_tokens", json!("100")),
        ("max_completion_tokens", json!(-5)),
        ("max_completion_tokens", json!("abc")),
    ] {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body[cap] = bad.clone();
        assert_eq!(refused(body), cap, "{cap}: {bad}");
    }
    // A null cap is none; a missing one is the default.
    let (out, _) = translate(json!({"model": "m", "max_tokens": null,
        "messages": [{"role": "user", "content": "hi"}]}))
    .unwrap();
    assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
}
