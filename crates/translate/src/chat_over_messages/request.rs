//! A chat-completions request as a Messages request.
//!
//! Parameter names in refusals are OpenAI's (`messages[2].content[0]`), as
//! its own validation errors name them.

use llm_proxy_core::Error;
use serde_json::{Map, Value, json};

use super::{Context, DEFAULT_MAX_TOKENS};
use crate::wire::{field, object, str_of, unsupported};

/// Fields mapped below.
const MAPPED: &[&str] = &[
    "model",
    "messages",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "user",
    "n",
];

/// Translate a chat request body into a Messages request body.
pub(crate) fn request(src: &Map<String, Value>) -> Result<(Map<String, Value>, Context), Error> {
    refuse_unservable(src)?;
    for key in src.keys().filter(|k| !MAPPED.contains(&k.as_str())) {
        tracing::debug!(field = %key, "not translated to Messages; dropped");
    }
    let mut out = Map::new();
    for key in ["model", "stream", "top_p"] {
        if let Some(v) = field(src, key) {
            out.insert(key.into(), v.clone());
        }
    }
    // A cap that is there must be one: as a chat server refuses `-5`,
    // `1.5` or `"100"` (a default in its place would let the answer run
    // to 4096 tokens).
    for key in ["max_completion_tokens", "max_tokens"] {
        if field(src, key).is_some_and(|v| !v.is_u64()) {
            return Err(unsupported(key, "must be a whole number of tokens"));
        }
    }
    let max_tokens = field(src, "max_completion_tokens")
        .or_else(|| field(src, "max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(t) = field(src, "temperature").and_then(Value::as_f64) {
        // Chat's range is 0..=2, Anthropic's 0..=1.
        out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
    }
    let (system, turns) = messages(src)?;
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    out.insert("messages".into(), Value::Array(turns));
    let stop = match field(src, "stop") {
        Some(Value::String(s)) => Some(json!([s])),
        Some(list @ Value::Array(_)) => Some(list.clone()),
        _ => None,
    };
    if let Some(stop) = stop {
        // Anthropic rejects a stop sequence that is empty or only whitespace.
        let blank = |s: &Value| s.as_str().is_some_and(|s| s.trim().is_empty());
        if stop.as_array().is_some_and(|list| list.iter().any(blank)) {
            return Err(unsupported(
                "stop",
                "may not hold an empty or whitespace-only sequence on this upstream (Anthropic Messages rejects them)",
            ));
        }
        out.insert("stop_sequences".into(), stop);
    }
    if let Some(user) = field(src, "user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    tools(src, &mut out)?;
    let json_tool = response_format(src, &mut out)?;
    let include_usage = field(src, "stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let ctx = Context {
        model: src
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        include_usage,
        json_tool,
    };
    Ok((out, ctx))
}

/// Parameters whose answer Anthropic cannot give.
fn refuse_unservable(src: &Map<String, Value>) -> Result<(), Error> {
    if field(src, "n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 1)
    {
        return Err(unsupported(
            "n",
            "greater than 1 is not supported by this upstream (Anthropic Messages returns one choice)",
        ));
    }
    let active = |key: &str| match field(src, key) {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        // `web_search_options: {}` turns search on; an empty `logit_bias` does nothing.
        Some(Value::Object(m)) => key != "logit_bias" || !m.is_empty(),
        Some(Value::Array(a)) => key != "modalities" || a.iter().any(|m| m != "text"),
        Some(_) => true,
    };
    for key in [
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
        "functions",
        "function_call",
    ] {
        if active(key) {
            return Err(unsupported(
                key,
                "is not supported by this upstream (Anthropic Messages has no equivalent)",
            ));
        }
    }
    Ok(())
}

/// System and developer messages (joined, wherever they stand), and the
/// turns: consecutive messages of one role merge into one turn, `tool`
/// messages become `tool_result` blocks of a user turn.
fn messages(src: &Map<String, Value>) -> Result<(Vec<String>, Vec<Value>), Error> {
    let list = field(src, "messages")
        .and_then(Value::as_array)
        .ok_or_else(|| unsupported("messages", "must be an array of messages"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, message) in list.iter().enumerate() {
        let path = format!("messages[{i}]");
        let (role, blocks) = match str_of(message, "role") {
            Some("system" | "developer") => {
                system.push(plain_text(&path, message.get("content"))?);
                continue;
            }
            Some("user") => ("user", user_blocks(&path, message)?),
            Some("assistant") => ("assistant", assistant_blocks(&path, message)?),
            Some("tool") => ("user", vec![tool_result(&path, message)?]),
            _ => {
                return Err(unsupported(
                    format!("{path}.role"),
                    "must be system, developer, user, assistant or tool",
                ));
            }
        };
        match turns.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let turns = turns
        .into_iter()
        .filter(|(_, blocks)| !blocks.is_empty())
        .map(|(role, blocks)| object([("role", role.into()), ("content", Value::Array(blocks))]))
        .collect();
    Ok((system, turns))
}

/// Text content: a string or text parts, joined.
fn plain_text(path: &str, content: Option<&Value>) -> Result<String, Error> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| str_of(p, "text"))
            .collect::<Option<Vec<_>>>()
            .map(|t| t.join("\n"))
            .ok_or_else(|| unsupported(format!("{path}.content"), "may hold only text parts here")),
        Some(_) => Err(unsupported(
            format!("{path}.content"),
            "must be a string or an array of parts",
        )),
    }
}

fn text_block(text: &str) -> Option<Value> {
    // Anthropic rejects empty text blocks, and those of only whitespace
    // ("text content blocks must contain non-whitespace text").
    (!text.trim().is_empty()).then(|| json!({"type": "text", "text": text}))
}

fn user_blocks(path: &str, message: &Value) -> Result<Vec<Value>, Error> {
    let parts = match message.get("content") {
        Some(Value::Array(parts)) => parts,
        other => return Ok(text_block(&plain_text(path, other)?).into_iter().collect()),
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let ppath = format!("{path}.content[{j}]");
        match str_of(part, "type") {
            Some("text") => blocks.extend(text_block(str_of(part, "text").unwrap_or_default())),
            Some("image_url") => blocks.push(image_block(&ppath, part)?),
            _ => {
                return Err(unsupported(
                    ppath,
                    "is a content part this upstream cannot take (text and image_url are translated)",
                ));
            }
        }
    }
    Ok(blocks)
}

/// An `image_url` part as an image block: data URLs become base64 sources.
fn image_block(path: &str, part: &Value) -> Result<Value, Error> {
    let url = part
        .get("image_url")
        .and_then(|i| i.as_str().or_else(|| str_of(i, "url")))
        .ok_or_else(|| unsupported(format!("{path}.image_url.url"), "must be a string"))?;
    let source = match url
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,"))
    {
        Some((media_type, data)) => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        None if url.starts_with("data:") => {
            return Err(unsupported(
                format!("{path}.image_url.url"),
                "is a data URL that is not base64",
            ));
        }
        None => json!({"type": "url", "url": url}),
    };
    Ok(object([("type", "image".into()), ("source", source)]))
}

fn assistant_blocks(path: &str, message: &Value) -> Result<Vec<Value>, Error> {
    let mut blocks = Vec::new();
    match message.get("content") {
        Some(Value::Array(parts)) => {
            for part in parts {
                let text = str_of(part, "text").or_else(|| str_of(part, "refusal"));
                blocks.extend(text.and_then(text_block));
            }
        }
        other => blocks.extend(text_block(&plain_text(path, other)?)),
    }
    let calls = message.get("tool_calls").and_then(Value::as_array);
    for (j, call) in calls.into_iter().flatten().enumerate() {
        blocks.push(tool_use(&format!("{path}.tool_calls[{j}]"), call)?);
    }
    Ok(blocks)
}

fn tool_use(path: &str, call: &Value) -> Result<Value, Error> {
    let function = call.get("function").unwrap_or(&Value::Null);
    let name = str_of(function, "name")
        .ok_or_else(|| unsupported(format!("{path}.function.name"), "must be a string"))?;
    let arguments = str_of(function, "arguments").unwrap_or("{}");
    let input: Value = match arguments.trim() {
        "" => json!({}),
        text => serde_json::from_str(text).map_err(|_| {
            unsupported(
                format!("{path}.function.arguments"),
                "must be a JSON object",
            )
        })?,
    };
    if !input.is_object() {
        return Err(unsupported(
            format!("{path}.function.arguments"),
            "must be a JSON object",
        ));
    }
    Ok(object([
        ("type", "tool_use".into()),
        ("id", str_of(call, "id").unwrap_or_default().into()),
        ("name", name.into()),
        ("input", input),
    ]))
}

fn tool_result(path: &str, message: &Value) -> Result<Value, Error> {
    let id = str_of(message, "tool_call_id")
        .ok_or_else(|| unsupported(format!("{path}.tool_call_id"), "must be a string"))?;
    let content = plain_text(path, message.get("content"))?;
    Ok(object([
        ("type", "tool_result".into()),
        ("tool_use_id", id.into()),
        ("content", content.into()),
    ]))
}

/// `tools`, `tool_choice` and `parallel_tool_calls`.
fn tools(src: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Error> {
    let Some(list) = field(src, "tools") else {
        return Ok(());
    };
    let list = list
        .as_array()
        .ok_or_else(|| unsupported("tools", "must be an array"))?;
    let mut tools = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        let function = match (str_of(tool, "type"), tool.get("function")) {
            (Some("function") | None, Some(f)) => f,
            _ => {
                return Err(unsupported(
                    format!("tools[{i}]"),
                    "is not a function tool; only function tools are translated",
                ));
            }
        };
        let name = str_of(function, "name")
            .ok_or_else(|| unsupported(format!("tools[{i}].function.name"), "must be a string"))?;
        let mut schema = function
            .get("parameters")
            .filter(|p| !p.is_null())
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        // Chat servers take a schema without `type` (`parameters: {}`):
        // arguments are an object anyway. Anthropic requires the `type`.
        if let Some(schema) = schema.as_object_mut() {
            schema
                .entry("type")
                .or_insert_with(|| Value::String("object".into()));
        }
        let mut t = object([("name", name.into()), ("input_schema", schema)]);
        if let Some(d) = str_of(function, "description") {
            t["description"] = json!(d);
        }
        tools.push(t);
    }
    if tools.is_empty() {
        return Ok(());
    }
    let mut choice = match field(src, "tool_choice") {
        None => json!({"type": "auto"}),
        Some(Value::String(s)) if s == "auto" => json!({"type": "auto"}),
        Some(Value::String(s)) if s == "none" => json!({"type": "none"}),
        Some(Value::String(s)) if s == "required" => json!({"type": "any"}),
        Some(c) => match c.get("function").and_then(|f| str_of(f, "name")) {
            Some(name) => json!({"type": "tool", "name": name}),
            None => {
                return Err(unsupported(
                    "tool_choice",
                    "must be auto, none, required or a named function",
                ));
            }
        },
    };
    if field(src, "parallel_tool_calls").and_then(Value::as_bool) == Some(false)
        && choice["type"] != "none"
    {
        choice["disable_parallel_tool_use"] = json!(true);
    }
    out.insert("tools".into(), Value::Array(tools));
    out.insert("tool_choice".into(), choice);
    Ok(())
}

/// `response_format` json_schema / json_object as a forced tool whose input
/// is the answer. Returns the tool's name.
fn response_format(
    src: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<Option<String>, Error> {
    let Some(format) = field(src, "response_format") else {
        return Ok(None);
    };
    let (name, schema) = match str_of(format, "type") {
        Some("text") => return Ok(None),
        Some("json_object") => ("json_object".to_owned(), json!({"type": "object"})),
        Some("json_schema") => {
            let spec = format.get("json_schema").unwrap_or(&Value::Null);
            let name = str_of(spec, "name").unwrap_or("json_response").to_owned();
            let schema = spec
                .get("schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            (name, schema)
        }
        _ => {
            return Err(unsupported(
                "response_format.type",
                "must be text, json_object or json_schema",
            ));
        }
    };
    if out.contains_key("tools") {
        return Err(unsupported(
            "response_format",
            "cannot be combined with tools on this upstream (it is served through a forced tool)",
        ));
    }
    if schema.get("type").is_some_and(|t| t != "object") {
        return Err(unsupported(
            "response_format.json_schema.schema",
            "must describe an object on this upstream (tool inputs are objects)",
        ));
    }
    let tool = object([
        ("name", name.as_str().into()),
        (
            "description",
            "Give your final answer as this tool's input: JSON that matches the schema.".into(),
        ),
        ("input_schema", schema),
    ]);
    out.insert("tools".into(), Value::Array(vec![tool]));
    out.insert("tool_choice".into(), json!({"type": "tool", "name": name}));
    Ok(Some(name))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
