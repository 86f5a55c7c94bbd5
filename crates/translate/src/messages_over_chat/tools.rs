//! Messages `tools`, `tool_choice` and `output_format` as their chat
//! counterparts.

use llm_proxy_core::Error;
use serde_json::{Map, Value, json};

use crate::wire::{field, object, str_of, unsupported};

/// `tools` and `tool_choice`. Anthropic-defined tool types (`bash_…`,
/// `web_search_…`, `text_editor_…`, `computer_…`) run on Anthropic's side or
/// need its schemas: refused. Without tools, neither an empty `tools` nor
/// `tool_choice` (nor `parallel_tool_calls`) is sent: chat servers such as
/// vLLM reject them.
pub(crate) fn tools(src: &Map<String, Value>, out: &mut Map<String, Value>) -> Result<(), Error> {
    let mut functions = Vec::new();
    if let Some(tools) = field(src, "tools") {
        let list = tools
            .as_array()
            .ok_or_else(|| unsupported("tools", "must be an array"))?;
        for (i, tool) in list.iter().enumerate() {
            functions.push(function_tool(i, tool)?);
        }
    }
    // A malformed tool_choice is refused even when there are no tools.
    let choice = field(src, "tool_choice").map(tool_choice).transpose()?;
    if functions.is_empty() {
        return Ok(());
    }
    out.insert("tools".into(), Value::Array(functions));
    if let Some((mapped, serial)) = choice {
        out.insert("tool_choice".into(), mapped);
        if serial {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    Ok(())
}

/// Chat's `tool_choice` for Anthropic's, and whether it disables parallel
/// tool use.
fn tool_choice(choice: &Value) -> Result<(Value, bool), Error> {
    let mapped = match str_of(choice, "type") {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = str_of(choice, "name")
                .ok_or_else(|| unsupported("tool_choice.name", "must be a string"))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(unsupported(
                "tool_choice.type",
                "must be auto, any, tool or none",
            ));
        }
    };
    let serial = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        == Some(true);
    Ok((mapped, serial))
}

fn function_tool(i: usize, tool: &Value) -> Result<Value, Error> {
    if let Some(kind) = str_of(tool, "type").filter(|t| *t != "custom") {
        return Err(unsupported(
            format!("tools.{i}"),
            format_args!(
                "is Anthropic's `{kind}` tool, which a chat-completions upstream cannot run"
            ),
        ));
    }
    let name = str_of(tool, "name")
        .ok_or_else(|| unsupported(format!("tools.{i}.name"), "must be a string"))?;
    let mut function = json!({"name": name});
    if let Some(d) = str_of(tool, "description") {
        function["description"] = json!(d);
    }
    function["parameters"] = tool
        .get("input_schema")
        .filter(|s| !s.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    if let Some(strict) = tool.get("strict").and_then(Value::as_bool) {
        function["strict"] = json!(strict);
    }
    Ok(object([
        ("type", "function".into()),
        ("function", function),
    ]))
}

/// Anthropic's structured outputs (`output_format: {type: json_schema,
/// schema}`) as chat's `response_format`.
pub(crate) fn output_format(format: &Value) -> Result<Value, Error> {
    match (str_of(format, "type"), format.get("schema")) {
        (Some("json_schema"), Some(schema)) => Ok(object([
            ("type", "json_schema".into()),
            (
                "json_schema",
                object([
                    ("name", "output".into()),
                    ("schema", schema.clone()),
                    ("strict", true.into()),
                ]),
            ),
        ])),
        _ => Err(unsupported(
            "output_format",
            "must be {\"type\": \"json_schema\", \"schema\": …}",
        )),
    }
}
