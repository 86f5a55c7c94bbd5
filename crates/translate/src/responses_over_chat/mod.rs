//! A Responses client served by a chat-completions upstream: the stateless
//! subset of the Responses API (Codex, the Agents SDK with `store: false`,
//! on a server without `/v1/responses`).
//!
//! - [`request`]: the Responses request as a chat request (refusing what
//!   needs server state or OpenAI's built-in tools);
//! - [`response`]: a whole chat completion as a `response` object;
//! - [`stream`]: chat chunks as Responses events, one event at a time.
//!
//! The translated response is not stored anywhere: its id cannot be used as
//! a `previous_response_id` later (such a request is refused with 400).
//! docs/translation.md has the field table.

mod items;
pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod stream;

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::chat::Usage;

/// What the response translation needs to know about the request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Context {
    /// The client's `model`, used when the upstream's answer names none.
    pub model: String,
    /// The request's fields that a `response` object repeats
    /// (`instructions`, `tools`, `temperature`, …).
    pub echo: Map<String, Value>,
    /// The functions of the request's `namespace` tools, by the flat name
    /// the upstream knows them by, to their namespace.
    pub namespaced: HashMap<String, String>,
}

/// Between a namespace and a function's name in the flat name a chat
/// upstream knows a namespaced function by.
pub(crate) const NAMESPACE_SEPARATOR: &str = "__";

impl Context {
    /// The name and namespace the client knows the function the upstream
    /// calls `name` by.
    pub(crate) fn client_name<'a>(&'a self, name: &'a str) -> (&'a str, Option<&'a str>) {
        match self.namespaced.get(name) {
            Some(namespace) => {
                let inner = name
                    .strip_prefix(namespace.as_str())
                    .and_then(|rest| rest.strip_prefix(NAMESPACE_SEPARATOR))
                    .unwrap_or(name);
                (inner, Some(namespace))
            }
            None => (name, None),
        }
    }
}

/// A `function_call` item's `name` (and `namespace`, for a namespaced
/// function) as the client knows it, from the upstream's name.
pub(crate) fn name_call(item: &mut Value, ctx: &Context, upstream_name: &str) {
    let (name, namespace) = ctx.client_name(upstream_name);
    item["name"] = json!(name);
    if let Some(namespace) = namespace {
        item["namespace"] = json!(namespace);
    }
}

/// A field's default value.
type Default = fn() -> Value;

/// Request fields a `response` object repeats, with their defaults.
const ECHOED: &[(&str, Default)] = &[
    ("instructions", || Value::Null),
    ("max_output_tokens", || Value::Null),
    ("metadata", || json!({})),
    ("parallel_tool_calls", || json!(true)),
    ("reasoning", || json!({"effort": null, "summary": null})),
    ("temperature", || json!(1.0)),
    ("text", || json!({"format": {"type": "text"}})),
    ("tool_choice", || json!("auto")),
    ("tools", || json!([])),
    ("top_p", || json!(1.0)),
    ("truncation", || json!("disabled")),
    ("user", || Value::Null),
];

/// How a response ended, from the chat `finish_reason`: its `status` and
/// `incomplete_details.reason`.
pub(crate) fn status(finish_reason: Option<&str>) -> (&'static str, Option<&'static str>) {
    match finish_reason {
        Some("length") => ("incomplete", Some("max_output_tokens")),
        Some("content_filter") => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

/// Responses usage from chat usage.
pub(crate) fn usage_json(usage: &Usage) -> Value {
    json!({
        "input_tokens": usage.input(),
        "input_tokens_details": {"cached_tokens": usage.cached()},
        "output_tokens": usage.output(),
        "output_tokens_details": {"reasoning_tokens": usage.reasoning()},
        "total_tokens": usage.input().saturating_add(usage.output()),
    })
}

/// The `call_id` of a `function_call` item: the upstream's tool-call id,
/// or `call_` + a fresh id when it sent none.
pub(crate) fn call_id(id: Option<&str>) -> String {
    crate::wire::tool_call_id(id, "call_")
}

/// The parts of a `response` object that change while it is produced.
pub(crate) struct State<'a> {
    pub id: &'a str,
    pub created_at: u64,
    pub model: &'a str,
    pub status: &'a str,
    pub incomplete: Option<&'a str>,
    pub output: Vec<Value>,
    /// `None` (written as `null`, which the Responses API allows) when the
    /// upstream reported no usage: a zero usage would read as real
    /// downstream, and the auth layer would refund the token reservation.
    pub usage: Option<Value>,
}

/// A whole `response` object.
pub(crate) fn response_object(ctx: &Context, state: State<'_>) -> Value {
    let mut object = json!({
        "id": state.id,
        "object": "response",
        "created_at": state.created_at,
        "status": state.status,
        "background": false,
        "error": null,
        "incomplete_details": state.incomplete.map(|reason| json!({"reason": reason})),
        "model": state.model,
        "output": state.output,
        "previous_response_id": null,
        "store": false,
        "usage": state.usage,
    });
    for (key, default) in ECHOED {
        object[*key] = ctx
            .echo
            .get(*key)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or_else(default);
    }
    object
}

/// The `output_text` part of a message item.
pub(crate) fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_object_echoes_the_request() {
        let mut echo = Map::new();
        echo.insert("instructions".into(), json!("be brief"));
        echo.insert("temperature".into(), Value::Null);
        let ctx = Context {
            model: "m".into(),
            echo,
            ..Context::default()
        };
        let state = State {
            id: "resp_1",
            created_at: 7,
            model: "m",
            status: "completed",
            incomplete: None,
            output: vec![],
            usage: None,
        };
        let object = response_object(&ctx, state);
        assert_eq!(object["instructions"], "be brief");
        assert_eq!(object["temperature"], 1.0);
        assert_eq!(object["store"], false);
        assert_eq!(object["incomplete_details"], Value::Null);
        assert_eq!(
            status(Some("length")),
            ("incomplete", Some("max_output_tokens"))
        );
        assert_eq!(status(Some("tool_calls")), ("completed", None));
    }
}
