use super::*;

/// `body` translated, with a `max_tokens` of 16 when it has none (the
/// Messages API requires one: `max_tokens_is_required`).
fn translate(body: Value) -> Result<(Value, Context), Error> {
    let Value::Object(mut map) = body else {
        panic!("an object")
    };
    map.entry("max_tokens").or_insert(json!(16));
    request(&map).map(|(out, ctx)| (Value::Object(out), ctx))
}

#[test]
fn max_tokens_is_required() {
    let body = |max_tokens: Option<Value>| {
        let mut map = Map::new();
        map.insert("model".into(), json!("m"));
        map.insert(
            "messages".into(),
            json!([{"role": "user", "content": "hi"}]),
        );
        if let Some(n) = max_tokens {
            map.insert("max_tokens".into(), n);
        }
        map
    };
    for bad in [
        None,
        Some(json!(null)),
        Some(json!(0)),
        Some(json!(-5)),
        Some(json!("10")),
        Some(json!(1.5)),
    ] {
        match request(&body(bad.clone())) {
            Err(Error::UnsupportedParameter { param, .. }) => assert_eq!(param, "max_tokens"),
            other => panic!("{bad:?}: expected a refusal, got {other:?}"),
        }
    }
    let (out, _) = request(&body(Some(json!(1)))).unwrap();
    assert_eq!(out["max_tokens"], 1);
}

fn refused(body: Value) -> String {
    match translate(body) {
        Err(Error::UnsupportedParameter { param, .. }) => param,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn whole_conversation() {
    let (out, ctx) = translate(json!({
        "model": "claude", "max_tokens": 100, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
        "stream": true, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "and then?"},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a cat"}]}]},
        ],
    }))
    .unwrap();
    assert_eq!(out["model"], "claude");
    assert_eq!(out["max_tokens"], 100);
    assert_eq!(
        (
            out["temperature"].clone(),
            out["top_p"].clone(),
            out["top_k"].clone()
        ),
        (json!(0.5), json!(0.9), json!(40))
    );
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    assert_eq!(out["stop"], json!(["END"]));
    assert_eq!(out["user"], "u1");
    assert!(out.get("thinking").is_none() && out.get("metadata").is_none());
    let m = out["messages"].as_array().unwrap();
    assert_eq!(
        m[0],
        json!({"role": "system", "content": "Be brief.\n\nBe kind."})
    );
    assert_eq!(
        m[1]["content"][0],
        json!({"type": "text", "text": "What is this?"})
    );
    assert_eq!(
        m[1]["content"][1]["image_url"]["url"],
        "data:image/png;base64,AAAA"
    );
    assert_eq!(m[1]["content"][2]["image_url"]["url"], "https://x/y.png");
    assert_eq!(m[2]["content"], "Checking.");
    assert_eq!(
        m[2]["tool_calls"][0],
        json!({"id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}})
    );
    // The tool result comes first, then the rest of that user turn.
    assert_eq!(
        m[3],
        json!({"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"})
    );
    assert_eq!(m[4], json!({"role": "user", "content": "and then?"}));
    assert_eq!(m.len(), 5);
    assert!(ctx.thinking);
    assert_eq!(ctx.stop_sequences, ["END"]);
    assert_eq!(ctx.model, "claude");
}

#[test]
fn tool_results_in_order_with_errors_and_images() {
    let (out, _) = translate(json!({"model": "m", "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "b", "name": "g", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "a", "content": "one"},
            {"type": "tool_result", "tool_use_id": "b", "is_error": true, "content": [
                {"type": "text", "text": "boom"},
                {"type": "document", "title": "log", "source": {"type": "text", "media_type": "text/plain", "data": "line 1"}},
                {"type": "image", "source": {"type": "url", "url": "https://x/s.png"}}]}]},
    ]}))
    .unwrap();
    let m = out["messages"].as_array().unwrap();
    assert_eq!(
        m[0]["content"],
        Value::Null,
        "no text: content null beside tool_calls"
    );
    assert_eq!(m[1]["tool_call_id"], "a");
    assert_eq!(
        m[2],
        json!({"role": "tool", "tool_call_id": "b", "content": "Error: boom\nlog\n\nline 1"})
    );
    assert_eq!(
        m[3]["content"][0]["image_url"]["url"], "https://x/s.png",
        "images move to the user turn"
    );
    assert!(out.get("stream_options").is_none());
}

#[test]
fn tools_and_tool_choice() {
    let tools = json!([{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
                       {"type": "custom", "name": "x", "input_schema": {"type": "object"}}]);
    for (choice, expected) in [
        (json!({"type": "auto"}), json!("auto")),
        (json!({"type": "any"}), json!("required")),
        (json!({"type": "none"}), json!("none")),
        (
            json!({"type": "tool", "name": "x"}),
            json!({"type": "function", "function": {"name": "x"}}),
        ),
    ] {
        let (out, _) =
            translate(json!({"model": "m", "messages": [], "tools": tools, "tool_choice": choice}))
                .unwrap();
        assert_eq!(out["tool_choice"], expected);
        assert_eq!(
            out["tools"][0]["function"]["parameters"]["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(out["tools"][0]["function"]["description"], "Weather");
        assert_eq!(out["tools"][1]["type"], "function");
    }
    let (out, _) = translate(json!({"model": "m", "messages": [], "tools": tools,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": true}}))
    .unwrap();
    assert_eq!(out["parallel_tool_calls"], false);
}

#[test]
fn tool_choice_without_tools_is_not_sent() {
    // vLLM rejects `tool_choice` without `tools`, and an empty `tools`.
    for extra in [
        json!({"tool_choice": {"type": "auto", "disable_parallel_tool_use": true}}),
        json!({"tools": [], "tool_choice": {"type": "any"}}),
        json!({"tools": [], "tool_choice": {"type": "tool", "name": "x"}}),
    ] {
        let mut body = json!({"model": "m", "messages": []});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (out, _) = translate(body).unwrap();
        for key in ["tools", "tool_choice", "parallel_tool_calls"] {
            assert!(out.get(key).is_none(), "{key} sent for {extra}");
        }
    }
    let (out, _) = translate(json!({"model": "m", "messages": [],
        "tools": [{"name": "x", "input_schema": null}]}))
    .unwrap();
    assert_eq!(
        out["tools"][0]["function"]["parameters"],
        json!({"type": "object"}),
        "a null schema gets the default"
    );
}

#[test]
fn plain_text_document_and_output_format() {
    let (out, _) = translate(json!({"model": "m",
        "output_format": {"type": "json_schema", "schema": {"type": "object"}},
        "messages": [{"role": "user", "content": [
            {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "abc"}}]}]}))
    .unwrap();
    assert_eq!(out["messages"][0]["content"], "Notes\n\nabc");
    assert_eq!(out["response_format"]["type"], "json_schema");
}

#[test]
fn output_config_format_and_effort_are_translated() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let (out, _) = translate(json!({"model": "m", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"}}))
    .unwrap();
    assert_eq!(
        out["response_format"]["json_schema"]["schema"], schema,
        "{out:?}"
    );
    assert_eq!(out["reasoning_effort"], "low");
    let base = |config: Value| {
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "output_config": config})
    };
    assert_eq!(
        refused(base(json!({"task_budget": {"tokens": 5}}))),
        "output_config.task_budget"
    );
    assert_eq!(refused(base(json!("json"))), "output_config");
    let mut both = base(json!({"format": {"type": "json_schema", "schema": {}}}));
    both["output_format"] = json!({"type": "json_schema", "schema": {}});
    assert_eq!(refused(both), "output_format");
}

#[test]
fn refusals_name_the_field() {
    let base = |extra: Value| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    assert_eq!(
        refused(base(json!({"mcp_servers": [{"type": "url"}]}))),
        "mcp_servers"
    );
    assert_eq!(refused(base(json!({"container": "c1"}))), "container");
    assert_eq!(
        refused(base(
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]})
        )),
        "tools.0"
    );
    assert_eq!(
        refused(base(json!({"tool_choice": {"type": "maybe"}}))),
        "tool_choice.type"
    );
    assert_eq!(
        refused(base(json!({"output_format": {"type": "xml"}}))),
        "output_format"
    );
    assert_eq!(
        refused(base(json!({"system": [{"type": "image"}]}))),
        "system"
    );
    // An empty user turn (Anthropic refuses it too), not left out.
    assert_eq!(
        refused(base(json!({"messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": []}]}))),
        "messages.2.content"
    );
    assert_eq!(
        refused(base(json!({"stop_sequences": "END"}))),
        "stop_sequences"
    );
    assert_eq!(refused(base(json!({"messages": "hi"}))), "messages");
    assert_eq!(
        refused(base(
            json!({"messages": [{"role": "system", "content": "x"}]})
        )),
        "messages.0.role"
    );
    let pdf = json!({"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "x"}});
    assert_eq!(
        refused(base(
            json!({"messages": [{"role": "user", "content": [pdf]}]})
        )),
        "messages.0.content.0.source"
    );
    let file = json!({"type": "image", "source": {"type": "file", "file_id": "f"}});
    assert_eq!(
        refused(base(
            json!({"messages": [{"role": "user", "content": [file]}]})
        )),
        "messages.0.content.0.source"
    );
    let search = json!({"type": "search_result", "source": "s"});
    assert_eq!(
        refused(base(
            json!({"messages": [{"role": "user", "content": [search]}]})
        )),
        "messages.0.content.0"
    );
    let server = json!({"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}});
    assert_eq!(
        refused(base(
            json!({"messages": [{"role": "assistant", "content": [server]}]})
        )),
        "messages.0.content.0"
    );
    // Harmless unknown fields are dropped, not refused.
    let (out, _) = translate(base(json!({"service_tier": "auto", "mcp_servers": null}))).unwrap();
    assert!(out.get("service_tier").is_none());
}

/// A request of every kind of block, translated byte for byte: the chat
/// request's field order.
#[test]
fn the_request_as_written() {
    let (out, _) = translate(json!({
        "model": "claude", "max_tokens": 100, "stream": true, "stop_sequences": ["END"],
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "metadata": {"user_id": "u1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "output_config": {"effort": "high", "format": {"type": "json_schema", "schema": {"type": "object"}}},
        "tools": [{"name": "read", "description": "Read a file.", "strict": true,
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}},
            {"name": "bare"}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "document", "title": "Notes", "source": {"type": "text", "data": "n"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a.md"}},
                {"type": "tool_use", "id": "toolu_2", "name": "bare"}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": true, "content": [
                    {"type": "text", "text": "gone"},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "ok"},
                {"type": "text", "text": "Go on."}]},
            {"role": "assistant", "content": "Done."},
        ],
    }))
    .unwrap();
    assert_eq!(
        out.to_string(),
        "{\"model\":\"claude\",\"max_tokens\":100,\"stream\":true,\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\\n\\nBe kind.\"},{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Look:\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:image/png;base64,AAAA\"}},{\"type\":\"text\",\"text\":\"Notes\\n\\nn\"}]},{\"role\":\"assistant\",\"content\":\"Reading.\",\"tool_calls\":[{\"id\":\"toolu_1\",\"type\":\"function\",\"function\":{\"name\":\"read\",\"arguments\":\"{\\\"path\\\":\\\"a.md\\\"}\"}},{\"id\":\"toolu_2\",\"type\":\"function\",\"function\":{\"name\":\"bare\",\"arguments\":\"{}\"}}]},{\"role\":\"tool\",\"tool_call_id\":\"toolu_1\",\"content\":\"Error: gone\"},{\"role\":\"tool\",\"tool_call_id\":\"toolu_2\",\"content\":\"ok\"},{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"Go on.\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"https://x/y.png\"}}]},{\"role\":\"assistant\",\"content\":\"Done.\"}],\"stream_options\":{\"include_usage\":true},\"stop\":[\"END\"],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"read\",\"description\":\"Read a file.\",\"parameters\":{\"type\":\"object\",\"properties\":{\"path\":{\"type\":\"string\"}}},\"strict\":true}},{\"type\":\"function\",\"function\":{\"name\":\"bare\",\"parameters\":{\"type\":\"object\"}}}],\"tool_choice\":\"required\",\"parallel_tool_calls\":false,\"user\":\"u1\",\"reasoning_effort\":\"high\",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"output\",\"schema\":{\"type\":\"object\"},\"strict\":true}}}"
    );
}
