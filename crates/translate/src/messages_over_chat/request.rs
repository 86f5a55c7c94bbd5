//! A Messages request as a chat-completions request.
//!
//! Parameter names in refusals are Anthropic's dotted paths
//! (`messages.0.content.1`), as its own validation errors name them.

use llm_proxy_core::Error;
use serde_json::{Map, Value, json};

use super::Context;
use super::tools::{output_format, tools};
use crate::wire::{copy_fields, field, object, str_of, unsupported};

/// Top-level fields copied unchanged (`top_k` is a vLLM/llama.cpp extension
/// of chat completions).
const COPIED: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stream",
];
/// Fields mapped below.
const MAPPED: &[&str] = &[
    "messages",
    "system",
    "tools",
    "tool_choice",
    "stop_sequences",
    "metadata",
    "thinking",
    "output_format",
    "output_config",
];
/// Fields that need Anthropic's servers: refused.
const REFUSED: &[&str] = &["mcp_servers", "container"];

/// Translate a Messages request body into a chat request body.
pub(crate) fn request(src: &Map<String, Value>) -> Result<(Map<String, Value>, Context), Error> {
    for key in src.keys() {
        if REFUSED.contains(&key.as_str()) && field(src, key).is_some() {
            return Err(unsupported(
                key.as_str(),
                "needs Anthropic's own servers; this upstream speaks chat completions",
            ));
        }
        if !COPIED.contains(&key.as_str()) && !MAPPED.contains(&key.as_str()) {
            tracing::debug!(field = %key, "not translated to chat completions; dropped");
        }
    }
    // Anthropic's API requires it: a client that left it out would be
    // refused by a native upstream and served by a translating one.
    if field(src, "max_tokens")
        .and_then(Value::as_u64)
        .is_none_or(|n| n == 0)
    {
        return Err(unsupported(
            "max_tokens",
            "is required: a whole number of at least 1, as the Messages API requires",
        ));
    }
    let mut out = Map::new();
    copy_fields(src, &mut out, COPIED);
    out.insert("messages".into(), Value::Array(messages(src)?));
    if out.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let stop_sequences = stop_sequences(src)?;
    if !stop_sequences.is_empty() {
        out.insert("stop".into(), json!(stop_sequences));
    }
    tools(src, &mut out)?;
    if let Some(user) = field(src, "metadata").and_then(|m| str_of(m, "user_id")) {
        out.insert("user".into(), json!(user));
    }
    output_config(src, &mut out)?;
    let thinking = field(src, "thinking")
        .and_then(|t| str_of(t, "type"))
        .is_some_and(|t| t != "disabled");
    let ctx = Context {
        model: src
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        stop_sequences,
        thinking,
    };
    Ok((out, ctx))
}

/// Structured outputs and effort: `output_config.format` (the current
/// spelling; the beta's `output_format` is read too, one or the other) as
/// `response_format`, `output_config.effort` as `reasoning_effort`.
/// Anything else in `output_config` would change the answer in a way chat
/// cannot say: refused, not dropped.
fn output_config(src: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Error> {
    let config = field(src, "output_config");
    if let Some(config) = config {
        let Some(config) = config.as_object() else {
            return Err(unsupported("output_config", "must be an object"));
        };
        for (key, value) in config {
            match key.as_str() {
                _ if value.is_null() => {}
                "format" => {}
                "effort" => {
                    let effort = value
                        .as_str()
                        .ok_or_else(|| unsupported("output_config.effort", "must be a string"))?;
                    out.insert("reasoning_effort".into(), json!(effort));
                }
                other => {
                    return Err(unsupported(
                        format!("output_config.{other}"),
                        "has no chat-completions equivalent",
                    ));
                }
            }
        }
    }
    let format = config.and_then(|c| field(c.as_object()?, "format"));
    let format = match (format, field(src, "output_format")) {
        (Some(_), Some(_)) => {
            return Err(unsupported(
                "output_format",
                "and `output_config.format` cannot both be given",
            ));
        }
        (Some(format), None) | (None, Some(format)) => format,
        (None, None) => return Ok(()),
    };
    out.insert("response_format".into(), output_format(format)?);
    Ok(())
}

fn stop_sequences(src: &Map<String, Value>) -> Result<Vec<String>, Error> {
    let Some(value) = field(src, "stop_sequences") else {
        return Ok(Vec::new());
    };
    let list = value
        .as_array()
        .ok_or_else(|| unsupported("stop_sequences", "must be an array of strings"))?;
    list.iter()
        .map(|s| s.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| unsupported("stop_sequences", "must be an array of strings"))
}

fn messages(src: &Map<String, Value>) -> Result<Vec<Value>, Error> {
    let mut out = Vec::new();
    if let Some(system) = field(src, "system") {
        out.push(object([
            ("role", "system".into()),
            ("content", system_text(system)?.into()),
        ]));
    }
    let turns = field(src, "messages")
        .and_then(Value::as_array)
        .ok_or_else(|| unsupported("messages", "must be an array of messages"))?;
    for (i, turn) in turns.iter().enumerate() {
        let path = format!("messages.{i}");
        match str_of(turn, "role") {
            Some("user") => user_turn(&path, turn, &mut out)?,
            Some("assistant") => out.push(assistant_turn(&path, turn)?),
            _ => {
                return Err(unsupported(
                    format!("{path}.role"),
                    "must be `user` or `assistant`",
                ));
            }
        }
    }
    Ok(out)
}

/// `system` as one string: text blocks joined by blank lines (their
/// `cache_control` has no chat equivalent).
fn system_text(system: &Value) -> Result<String, Error> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let texts = blocks
                .iter()
                .map(|b| match str_of(b, "type") {
                    Some("text") => str_of(b, "text").ok_or(()),
                    _ => Err(()),
                })
                .collect::<Result<Vec<_>, ()>>()
                .map_err(|()| unsupported("system", "may hold only text blocks"))?;
            Ok(texts.join("\n\n"))
        }
        _ => Err(unsupported(
            "system",
            "must be a string or an array of text blocks",
        )),
    }
}

/// The blocks of a turn's `content` (a string is one text block).
fn blocks<'a>(path: &str, turn: &'a Value) -> Result<std::borrow::Cow<'a, [Value]>, Error> {
    match turn.get("content") {
        Some(Value::String(s)) => Ok(vec![json!({"type": "text", "text": s})].into()),
        Some(Value::Array(blocks)) => Ok(blocks.as_slice().into()),
        _ => Err(unsupported(
            format!("{path}.content"),
            "must be a string or an array of content blocks",
        )),
    }
}

/// A user turn: its `tool_result` blocks become `tool` messages first, in
/// order; then the rest of the turn is one user message. Images inside tool
/// results (chat tool messages hold text only) move to that user message.
fn user_turn(path: &str, turn: &Value, out: &mut Vec<Value>) -> Result<(), Error> {
    let blocks = blocks(path, turn)?;
    if blocks.is_empty() {
        // Anthropic refuses it ("all messages must have non-empty
        // content"); left out, the turns around it would run together, or
        // the upstream would get no messages at all.
        return Err(unsupported(format!("{path}.content"), "must not be empty"));
    }
    let mut parts = Vec::new();
    let mut moved_images = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let bpath = format!("{path}.content.{j}");
        match str_of(block, "type") {
            Some("tool_result") => out.push(tool_message(&bpath, block, &mut moved_images)?),
            _ => parts.push(user_part(&bpath, block)?),
        }
    }
    parts.extend(moved_images);
    if parts.is_empty() {
        return Ok(());
    }
    out.push(object([
        ("role", "user".into()),
        ("content", collapse(parts)),
    ]));
    Ok(())
}

/// Content parts as chat content: a plain string when they are all text
/// (the form every chat server accepts), else the array.
fn collapse(parts: Vec<Value>) -> Value {
    if parts.iter().all(|p| str_of(p, "type") == Some("text")) {
        let texts: Vec<&str> = parts.iter().filter_map(|p| str_of(p, "text")).collect();
        return Value::String(texts.join("\n"));
    }
    Value::Array(parts)
}

fn user_part(path: &str, block: &Value) -> Result<Value, Error> {
    match str_of(block, "type") {
        Some("text") => Ok(json!({"type": "text", "text": text_of(path, block)?})),
        Some("image") => {
            Ok(json!({"type": "image_url", "image_url": {"url": image_url(path, block)?}}))
        }
        Some("document") => document_text(path, block),
        Some(other) => Err(unsupported(
            path,
            format_args!("is a `{other}` block, which chat completions cannot carry"),
        )),
        None => Err(unsupported(format!("{path}.type"), "is missing")),
    }
}

fn text_of<'a>(path: &str, block: &'a Value) -> Result<&'a str, Error> {
    str_of(block, "text").ok_or_else(|| unsupported(format!("{path}.text"), "must be a string"))
}

/// An image source as an `image_url`: base64 sources become data URLs.
fn image_url(path: &str, block: &Value) -> Result<String, Error> {
    let source = block.get("source").unwrap_or(&Value::Null);
    match str_of(source, "type") {
        Some("base64") => {
            let media = str_of(source, "media_type").unwrap_or("image/png");
            let data = str_of(source, "data")
                .ok_or_else(|| unsupported(format!("{path}.source.data"), "must be a string"))?;
            Ok(format!("data:{media};base64,{data}"))
        }
        Some("url") => str_of(source, "url")
            .map(str::to_owned)
            .ok_or_else(|| unsupported(format!("{path}.source.url"), "must be a string")),
        _ => Err(unsupported(
            format!("{path}.source"),
            "must be a base64 or url image source (file sources need Anthropic's Files API)",
        )),
    }
}

/// A plain-text document becomes a text part; PDFs and files cannot be
/// sent.
fn document_text(path: &str, block: &Value) -> Result<Value, Error> {
    let text = document_string(path, block)?;
    Ok(object([("type", "text".into()), ("text", text.into())]))
}

/// A plain-text document's text: its title, a blank line, its data.
fn document_string(path: &str, block: &Value) -> Result<String, Error> {
    let source = block.get("source").unwrap_or(&Value::Null);
    match (str_of(source, "type"), str_of(source, "data")) {
        (Some("text"), Some(data)) => Ok(match str_of(block, "title") {
            Some(title) => format!("{title}\n\n{data}"),
            None => data.to_owned(),
        }),
        _ => Err(unsupported(
            format!("{path}.source"),
            "is a document chat completions cannot carry (only plain-text documents are translated)",
        )),
    }
}

/// A `tool_result` block as a `tool` message. `is_error` has no chat field:
/// the content is prefixed with `Error: `.
fn tool_message(path: &str, block: &Value, images: &mut Vec<Value>) -> Result<Value, Error> {
    let id = str_of(block, "tool_use_id")
        .ok_or_else(|| unsupported(format!("{path}.tool_use_id"), "must be a string"))?;
    let mut texts = Vec::new();
    match block.get("content") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(parts)) => {
            for (k, part) in parts.iter().enumerate() {
                let ppath = format!("{path}.content.{k}");
                match str_of(part, "type") {
                    Some("text") => texts.push(text_of(&ppath, part)?.to_owned()),
                    Some("image") => images.push(user_part(&ppath, part)?),
                    // A plain-text document, as in a user turn (a tool that
                    // reads a file may answer with one).
                    Some("document") => texts.push(document_string(&ppath, part)?),
                    _ => {
                        return Err(unsupported(
                            ppath,
                            "may be only a text, image or plain-text document block",
                        ));
                    }
                }
            }
        }
        Some(_) => {
            return Err(unsupported(
                format!("{path}.content"),
                "must be a string or an array of blocks",
            ));
        }
    }
    let mut content = texts.join("\n");
    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        content.insert_str(0, "Error: ");
    }
    Ok(object([
        ("role", "tool".into()),
        ("tool_call_id", id.into()),
        ("content", content.into()),
    ]))
}

/// An assistant turn: text blocks as `content`, `tool_use` blocks as
/// `tool_calls`; thinking blocks are dropped (chat servers take no
/// reasoning back).
fn assistant_turn(path: &str, turn: &Value) -> Result<Value, Error> {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    let blocks = blocks(path, turn)?;
    for (j, block) in blocks.iter().enumerate() {
        let bpath = format!("{path}.content.{j}");
        match str_of(block, "type") {
            Some("text") => texts.push(text_of(&bpath, block)?),
            Some("tool_use") => calls.push(tool_call(&bpath, block)?),
            Some("thinking" | "redacted_thinking") => {}
            _ => {
                return Err(unsupported(
                    bpath,
                    "cannot be translated to chat completions (assistant turns may hold text, tool_use and thinking blocks)",
                ));
            }
        }
    }
    let mut message = json!({"role": "assistant"});
    message["content"] = match (texts.is_empty(), calls.is_empty()) {
        (true, false) => Value::Null,
        _ => Value::String(texts.join("\n")),
    };
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    Ok(message)
}

fn tool_call(path: &str, block: &Value) -> Result<Value, Error> {
    let id =
        str_of(block, "id").ok_or_else(|| unsupported(format!("{path}.id"), "must be a string"))?;
    let name = str_of(block, "name")
        .ok_or_else(|| unsupported(format!("{path}.name"), "must be a string"))?;
    let arguments = match block.get("input") {
        Some(input) => crate::wire::input_to_arguments(input),
        None => "{}".to_owned(),
    };
    Ok(object([
        ("id", id.into()),
        ("type", "function".into()),
        (
            "function",
            object([("name", name.into()), ("arguments", arguments.into())]),
        ),
    ]))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
