//! A Responses request as a chat-completions request (stateless subset).

use std::collections::{HashMap, HashSet};

use llm_proxy_core::Error;
use serde_json::{Map, Value, json};

use super::{Context, ECHOED, NAMESPACE_SEPARATOR};
use crate::wire::{copy_fields, field, object, str_of, unsupported};

/// Fields copied unchanged.
const COPIED: &[&str] = &[
    "model",
    "temperature",
    "top_p",
    "stream",
    "parallel_tool_calls",
    "user",
];
/// Fields mapped below.
const MAPPED: &[&str] = &[
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "max_output_tokens",
    "text",
    "reasoning",
    "store",
];

/// Translate a Responses request body into a chat request body.
pub(crate) fn request(src: &Map<String, Value>) -> Result<(Map<String, Value>, Context), Error> {
    refuse_stateful(src)?;
    for key in src
        .keys()
        .filter(|k| !COPIED.contains(&k.as_str()) && !MAPPED.contains(&k.as_str()))
    {
        tracing::debug!(field = %key, "not translated to chat completions; dropped");
    }
    let mut out = Map::new();
    copy_fields(src, &mut out, COPIED);
    let mut messages = Vec::new();
    if let Some(instructions) = field(src, "instructions") {
        let text = instructions
            .as_str()
            .ok_or_else(|| unsupported("instructions", "must be a string"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    input(src, &mut messages)?;
    out.insert("messages".into(), Value::Array(messages));
    if let Some(max) = field(src, "max_output_tokens") {
        out.insert("max_tokens".into(), max.clone());
    }
    if out.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let namespaced = tools(src, &mut out)?;
    if let Some(format) = field(src, "text").and_then(|t| t.get("format")) {
        response_format(format, &mut out)?;
    }
    if let Some(effort) = field(src, "reasoning").and_then(|r| str_of(r, "effort")) {
        out.insert("reasoning_effort".into(), json!(effort));
    }
    let echo = std::array::from_fn(|i| field(src, ECHOED[i].0).cloned());
    let model = src
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok((
        out,
        Context {
            model,
            echo,
            namespaced,
        },
    ))
}

/// What needs a server that keeps responses, or runs in the background.
fn refuse_stateful(src: &Map<String, Value>) -> Result<(), Error> {
    const STATE: &str = "needs server-side state, which a chat-completions upstream does not keep; \
                         send the whole conversation in `input` with `store: false`";
    for key in ["previous_response_id", "conversation", "prompt"] {
        if field(src, key).is_some() {
            return Err(unsupported(key, STATE));
        }
    }
    if field(src, "store").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("store", STATE));
    }
    if field(src, "background").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            "background",
            "is not supported by this upstream (it speaks chat completions)",
        ));
    }
    Ok(())
}

fn input(src: &Map<String, Value>, messages: &mut Vec<Value>) -> Result<(), Error> {
    let items = match field(src, "input") {
        Some(Value::String(s)) => {
            messages.push(json!({"role": "user", "content": s}));
            return Ok(());
        }
        Some(Value::Array(items)) => items,
        _ => {
            return Err(unsupported(
                "input",
                "must be a string or an array of input items",
            ));
        }
    };
    // Images of function outputs (chat tool messages hold text only), for
    // the user message after the outputs in a row.
    let mut moved_images = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("input[{i}]");
        let kind = str_of(item, "type").or_else(|| item.get("role").map(|_| "message"));
        if kind != Some("function_call_output") {
            images_after_outputs(&mut moved_images, messages);
        }
        match kind {
            Some("message") => messages.push(message(&path, item)?),
            Some("function_call") => function_call(&path, item, messages)?,
            Some("function_call_output") => {
                messages.push(function_output(&path, item, &mut moved_images)?);
            }
            // a stateless client's own reasoning items: chat servers take none back
            Some("reasoning") => {}
            Some("item_reference") => {
                return Err(unsupported(
                    path,
                    "refers to a stored item, which a chat-completions upstream does not keep",
                ));
            }
            _ => {
                return Err(unsupported(
                    format!("{path}.type"),
                    "is an item a chat-completions upstream cannot take (message, function_call and function_call_output are translated)",
                ));
            }
        }
    }
    images_after_outputs(&mut moved_images, messages);
    Ok(())
}

/// The images of the function outputs just translated, as a user message
/// after their `tool` messages (which must follow their calls unbroken).
fn images_after_outputs(images: &mut Vec<Value>, messages: &mut Vec<Value>) {
    if !images.is_empty() {
        messages.push(object([
            ("role", "user".into()),
            ("content", Value::Array(std::mem::take(images))),
        ]));
    }
}

fn message(path: &str, item: &Value) -> Result<Value, Error> {
    let role = match str_of(item, "role") {
        Some("system" | "developer") => "system",
        Some(role @ ("user" | "assistant")) => role,
        _ => {
            return Err(unsupported(
                format!("{path}.role"),
                "must be user, assistant, system or developer",
            ));
        }
    };
    let content = match item.get("content") {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                out.push(content_part(&format!("{path}.content[{j}]"), part)?);
            }
            collapse(out)
        }
        _ => {
            return Err(unsupported(
                format!("{path}.content"),
                "must be a string or an array of parts",
            ));
        }
    };
    Ok(object([("role", role.into()), ("content", content)]))
}

fn content_part(path: &str, part: &Value) -> Result<Value, Error> {
    match str_of(part, "type") {
        Some("input_text" | "output_text" | "text") => {
            Ok(json!({"type": "text", "text": str_of(part, "text").unwrap_or_default()}))
        }
        Some("refusal") => {
            Ok(json!({"type": "text", "text": str_of(part, "refusal").unwrap_or_default()}))
        }
        Some("input_image") => match part.get("image_url").and_then(Value::as_str) {
            Some(url) => {
                let mut image = json!({"url": url});
                if let Some(detail) = str_of(part, "detail") {
                    image["detail"] = json!(detail);
                }
                Ok(object([("type", "image_url".into()), ("image_url", image)]))
            }
            None => Err(unsupported(
                format!("{path}.image_url"),
                "must be a URL (file ids need OpenAI's Files API)",
            )),
        },
        _ => Err(unsupported(
            path,
            "is a content part a chat-completions upstream cannot take (text and image URLs are translated)",
        )),
    }
}

/// All-text content as one string, the form every chat server accepts.
fn collapse(parts: Vec<Value>) -> Value {
    if parts.iter().all(|p| str_of(p, "type") == Some("text")) {
        let texts: Vec<&str> = parts.iter().filter_map(|p| str_of(p, "text")).collect();
        return Value::String(texts.join("\n"));
    }
    Value::Array(parts)
}

/// A `function_call` item joins the assistant message just before it, or
/// starts one.
fn function_call(path: &str, item: &Value, messages: &mut Vec<Value>) -> Result<(), Error> {
    let call_id = str_of(item, "call_id")
        .ok_or_else(|| unsupported(format!("{path}.call_id"), "must be a string"))?;
    let name = str_of(item, "name")
        .ok_or_else(|| unsupported(format!("{path}.name"), "must be a string"))?;
    let name = match str_of(item, "namespace") {
        Some(namespace) => flat_name(namespace, name),
        None => name.to_owned(),
    };
    let arguments = str_of(item, "arguments").unwrap_or("{}");
    let call = object([
        ("id", call_id.into()),
        ("type", "function".into()),
        (
            "function",
            object([("name", name.into()), ("arguments", arguments.into())]),
        ),
    ]);
    match messages.last_mut() {
        Some(last) if str_of(last, "role") == Some("assistant") => {
            match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                Some(calls) => calls.push(call),
                None => last["tool_calls"] = Value::Array(vec![call]),
            }
        }
        _ => messages.push(object([
            ("role", "assistant".into()),
            ("content", Value::Null),
            ("tool_calls", Value::Array(vec![call])),
        ])),
    }
    Ok(())
}

/// A `function_call_output` item as a `tool` message: its text parts
/// joined; its images (a screenshot a tool took) go to `images`, for a user
/// message after it, as a Messages tool result's do.
fn function_output(path: &str, item: &Value, images: &mut Vec<Value>) -> Result<Value, Error> {
    let call_id = str_of(item, "call_id")
        .ok_or_else(|| unsupported(format!("{path}.call_id"), "must be a string"))?;
    let output = match item.get("output") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                match (str_of(part, "type"), str_of(part, "text")) {
                    (Some("input_image"), _) => {
                        images.push(content_part(&format!("{path}.output[{j}]"), part)?);
                    }
                    (_, Some(text)) => texts.push(text),
                    (_, None) => {
                        return Err(unsupported(
                            format!("{path}.output"),
                            "may hold only text and image parts on this upstream",
                        ));
                    }
                }
            }
            texts.join("\n")
        }
        _ => {
            return Err(unsupported(
                format!("{path}.output"),
                "must be a string or text parts",
            ));
        }
    };
    Ok(object([
        ("role", "tool".into()),
        ("tool_call_id", call_id.into()),
        ("content", output.into()),
    ]))
}

/// A namespaced function's name on a chat upstream, which has no
/// namespaces: `{namespace}__{name}`.
pub(crate) fn flat_name(namespace: &str, name: &str) -> String {
    format!("{namespace}{NAMESPACE_SEPARATOR}{name}")
}

/// Built-in tools a chat server cannot run and a model can answer without:
/// left out rather than refused (Codex sends `web_search` on every turn).
const DROPPED_TOOLS: &[&str] = &[
    "web_search",
    "web_search_preview",
    "web_search_2025_08_26",
    "web_search_preview_2025_03_11",
];

/// `tools` and `tool_choice`: function tools, and those of `namespace`
/// tools under their [`flat_name`]s (returned, flat name to namespace, for
/// the answer to name them as the client does); web search left out;
/// other built-in tools refused. Without tools (Codex sends `tool_choice:
/// "auto"` on turns that have none) neither `tool_choice` nor
/// `parallel_tool_calls` is sent: chat servers such as vLLM and OpenAI
/// reject them without `tools`.
fn tools(
    src: &Map<String, Value>,
    out: &mut Map<String, Value>,
) -> Result<HashMap<String, String>, Error> {
    let mut namespaced = HashMap::new();
    if let Some(list) = field(src, "tools") {
        let list = list
            .as_array()
            .ok_or_else(|| unsupported("tools", "must be an array"))?;
        let mut functions = Vec::with_capacity(list.len());
        let mut names = HashSet::new();
        for (i, tool) in list.iter().enumerate() {
            let path = format!("tools[{i}]");
            match str_of(tool, "type") {
                Some("function") => {
                    let name = tool_name(&path, tool, &mut names, None)?;
                    functions.push(function_tool(name, tool));
                }
                Some("namespace") => {
                    let namespace = str_of(tool, "name")
                        .ok_or_else(|| unsupported(format!("{path}.name"), "must be a string"))?;
                    let inner = tool
                        .get("tools")
                        .and_then(Value::as_array)
                        .ok_or_else(|| unsupported(format!("{path}.tools"), "must be an array"))?;
                    for (j, tool) in inner.iter().enumerate() {
                        let path = format!("{path}.tools[{j}]");
                        if str_of(tool, "type") != Some("function") {
                            return Err(not_translated(&path, tool));
                        }
                        let name = tool_name(&path, tool, &mut names, Some(namespace))?;
                        namespaced.insert(name.clone(), namespace.to_owned());
                        functions.push(function_tool(name, tool));
                    }
                }
                Some(kind) if DROPPED_TOOLS.contains(&kind) => {
                    tracing::debug!(
                        tool = kind,
                        "a chat upstream cannot search the web; left out"
                    );
                }
                _ => return Err(not_translated(&path, tool)),
            }
        }
        if !functions.is_empty() {
            out.insert("tools".into(), Value::Array(functions));
        }
    }
    if !out.contains_key("tools") {
        out.shift_remove("parallel_tool_calls");
    }
    let Some(choice) = field(src, "tool_choice") else {
        return Ok(namespaced);
    };
    let mapped = match (
        choice.as_str(),
        str_of(choice, "type"),
        str_of(choice, "name"),
    ) {
        (Some(s @ ("auto" | "none" | "required")), _, _) => json!(s),
        (None, Some("function"), Some(name)) => {
            let name = match str_of(choice, "namespace") {
                Some(namespace) => flat_name(namespace, name),
                None => name.to_owned(),
            };
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(unsupported(
                "tool_choice",
                "must be auto, none, required or a function on this upstream",
            ));
        }
    };
    if out.contains_key("tools") {
        out.insert("tool_choice".into(), mapped);
    }
    Ok(namespaced)
}

/// A function tool's name on the chat upstream (flat, in a namespace),
/// unique among the request's tools.
fn tool_name(
    path: &str,
    tool: &Value,
    names: &mut HashSet<String>,
    namespace: Option<&str>,
) -> Result<String, Error> {
    let name = str_of(tool, "name")
        .ok_or_else(|| unsupported(format!("{path}.name"), "must be a string"))?;
    let name = match namespace {
        Some(namespace) => flat_name(namespace, name),
        None => name.to_owned(),
    };
    if !names.insert(name.clone()) {
        return Err(unsupported(
            format!("{path}.name"),
            format_args!(
                "`{name}` names two tools on this upstream (a namespaced function is sent as \
                 `<namespace>{NAMESPACE_SEPARATOR}<name>`)"
            ),
        ));
    }
    Ok(name)
}

/// A chat function tool named `name`, from a Responses function tool.
fn function_tool(name: String, tool: &Value) -> Value {
    let mut function = json!({ "name": name });
    for key in ["description", "parameters", "strict"] {
        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
            function[key] = v.clone();
        }
    }
    object([("type", "function".into()), ("function", function)])
}

/// The refusal of a tool a chat upstream cannot run.
fn not_translated(path: &str, tool: &Value) -> Error {
    let kind = str_of(tool, "type").unwrap_or("untyped");
    unsupported(
        path,
        format_args!(
            "is a `{kind}` tool; OpenAI's built-in tools need a native Responses upstream \
             (function tools, also in a namespace, are translated; web search is left out)"
        ),
    )
}

/// `text.format` as chat's `response_format`.
fn response_format(format: &Value, out: &mut Map<String, Value>) -> Result<(), Error> {
    let mapped = match str_of(format, "type") {
        Some("text") => return Ok(()),
        Some("json_object") => json!({"type": "json_object"}),
        Some("json_schema") => {
            let mut spec = json!({"name": str_of(format, "name").unwrap_or("response")});
            for key in ["schema", "strict", "description"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    spec[key] = v.clone();
                }
            }
            object([("type", "json_schema".into()), ("json_schema", spec)])
        }
        _ => {
            return Err(unsupported(
                "text.format.type",
                "must be text, json_object or json_schema",
            ));
        }
    };
    out.insert("response_format".into(), mapped);
    Ok(())
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
