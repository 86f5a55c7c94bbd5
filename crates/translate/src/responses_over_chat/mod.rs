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
use std::sync::LazyLock;

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::{Value, json};

use crate::chat::Usage;

/// What the response translation needs to know about the request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Context {
    /// The client's `model`, used when the upstream's answer names none.
    pub model: String,
    /// The request's values of the fields a `response` object repeats
    /// (`instructions`, `tools`, `temperature`, …), in [`ECHOED`]'s order:
    /// `None` where the request has none (or `null`), which the object
    /// gives its default.
    pub echo: [Option<Value>; ECHOED_FIELDS],
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

    /// The request's value of the echoed field `key`.
    #[cfg(test)]
    pub(crate) fn echoed(&self, key: &str) -> Option<&Value> {
        let i = ECHOED.iter().position(|(k, _)| *k == key)?;
        self.echo[i].as_ref()
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

/// How many request fields a `response` object repeats.
pub(crate) const ECHOED_FIELDS: usize = 12;

/// Request fields a `response` object repeats, with their defaults (built
/// once: an object is written three times a stream).
pub(crate) static ECHOED: LazyLock<[(&str, Value); ECHOED_FIELDS]> = LazyLock::new(|| {
    [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("metadata", json!({})),
        ("parallel_tool_calls", json!(true)),
        ("reasoning", json!({"effort": null, "summary": null})),
        ("temperature", json!(1.0)),
        ("text", json!({"format": {"type": "text"}})),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("top_p", json!(1.0)),
        ("truncation", json!("disabled")),
        ("user", Value::Null),
    ]
});

/// How a response ended, from the chat `finish_reason`: its `status` and
/// `incomplete_details.reason`.
pub(crate) fn status(finish_reason: Option<&str>) -> (&'static str, Option<&'static str>) {
    match finish_reason {
        Some("length") => ("incomplete", Some("max_output_tokens")),
        Some("content_filter") => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

/// Responses usage, from chat usage.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ResponsesUsage {
    input_tokens: u64,
    input_tokens_details: CachedTokens,
    output_tokens: u64,
    output_tokens_details: ReasoningTokens,
    total_tokens: u64,
}

#[derive(Debug, serde::Serialize)]
struct CachedTokens {
    cached_tokens: u64,
}

#[derive(Debug, serde::Serialize)]
struct ReasoningTokens {
    reasoning_tokens: u64,
}

impl From<&Usage> for ResponsesUsage {
    fn from(usage: &Usage) -> Self {
        ResponsesUsage {
            input_tokens: usage.input(),
            input_tokens_details: CachedTokens {
                cached_tokens: usage.cached(),
            },
            output_tokens: usage.output(),
            output_tokens_details: ReasoningTokens {
                reasoning_tokens: usage.reasoning(),
            },
            total_tokens: usage.input().saturating_add(usage.output()),
        }
    }
}

/// The `call_id` of a `function_call` item: the upstream's tool-call id,
/// or `call_` + a fresh id when it sent none or one `taken` by an earlier
/// item.
pub(crate) fn call_id(id: Option<&str>, taken: impl Fn(&str) -> bool) -> String {
    crate::wire::tool_call_id(id, "call_", taken)
}

/// A whole `response` object, written as it stands: `output` is the
/// items so far.
pub(crate) struct ResponseObject<'a, O> {
    pub ctx: &'a Context,
    pub id: &'a str,
    pub created_at: u64,
    pub model: &'a str,
    pub status: &'a str,
    pub incomplete: Option<&'a str>,
    pub output: O,
    /// `None` (written as `null`, which the Responses API allows) when the
    /// upstream reported no usage: a zero usage would read as real
    /// downstream, and the auth layer would refund the token reservation.
    pub usage: Option<ResponsesUsage>,
}

/// `incomplete_details`.
#[derive(serde::Serialize)]
struct Incomplete<'a> {
    reason: &'a str,
}

impl<O: Serialize> Serialize for ResponseObject<'_, O> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut object = serializer.serialize_struct("Response", 12 + ECHOED_FIELDS)?;
        object.serialize_field("id", self.id)?;
        object.serialize_field("object", "response")?;
        object.serialize_field("created_at", &self.created_at)?;
        object.serialize_field("status", self.status)?;
        object.serialize_field("background", &false)?;
        object.serialize_field("error", &())?;
        let incomplete = self.incomplete.map(|reason| Incomplete { reason });
        object.serialize_field("incomplete_details", &incomplete)?;
        object.serialize_field("model", self.model)?;
        object.serialize_field("output", &self.output)?;
        object.serialize_field("previous_response_id", &())?;
        object.serialize_field("store", &false)?;
        object.serialize_field("usage", &self.usage)?;
        for ((key, default), given) in ECHOED.iter().zip(&self.ctx.echo) {
            object.serialize_field(key, given.as_ref().unwrap_or(default))?;
        }
        object.end()
    }
}

/// The `output_text` part of a message item.
#[derive(serde::Serialize)]
pub(crate) struct TextPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
    logprobs: [(); 0],
}

impl<'a> TextPart<'a> {
    /// The part holding `text`.
    pub(crate) fn new(text: &'a str) -> Self {
        TextPart {
            kind: "output_text",
            text,
            annotations: [],
            logprobs: [],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_object_echoes_the_request() {
        let mut ctx = Context::default();
        ctx.echo[0] = Some(json!("be brief"));
        assert_eq!(ECHOED[0].0, "instructions");
        let object = ResponseObject {
            ctx: &ctx,
            id: "resp_1",
            created_at: 7,
            model: "m",
            status: "completed",
            incomplete: None,
            output: [(); 0],
            usage: None,
        };
        let object = serde_json::to_value(object).unwrap();
        assert_eq!(object["instructions"], "be brief");
        assert_eq!(object["temperature"], 1.0);
        assert_eq!(object["store"], false);
        assert_eq!(object["incomplete_details"], Value::Null);
        assert_eq!(object["output"], json!([]));
        assert_eq!(
            status(Some("length")),
            ("incomplete", Some("max_output_tokens"))
        );
        assert_eq!(status(Some("tool_calls")), ("completed", None));
    }
}
