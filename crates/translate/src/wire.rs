//! Small helpers every direction shares: writing SSE events, reading JSON
//! fields, and the refusal error.

use std::borrow::Cow;

use llm_proxy_core::Error;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Append `event: {name}\ndata: {json}\n\n`. serde_json escapes line breaks
/// inside strings, so the JSON is always one `data:` line.
pub(crate) fn write_event(out: &mut Vec<u8>, name: &str, data: &impl Serialize) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    write_json(out, data);
    out.extend_from_slice(b"\n\n");
}

/// Deserialize an optional string borrowed from the input when it has no
/// escapes (serde borrows a `Cow` field only when it is not inside an
/// `Option`). The hot path of stream translation reads deltas this way.
///
/// A value that is not a string reads as absent, as a whole answer's
/// fields are read (`Value::as_str`): a server that sends a number or an
/// object where a string belongs loses that field, not the whole stream.
pub(crate) fn borrowed<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};

    struct Text;
    impl<'de> Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(text)))
        }
        fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(text.to_owned())))
        }
        fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(text)))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    }
    d.deserialize_any(Text)
}

/// Append `data: {json}\n\n`.
pub(crate) fn write_data(out: &mut Vec<u8>, data: &impl Serialize) {
    out.extend_from_slice(b"data: ");
    write_json(out, data);
    out.extend_from_slice(b"\n\n");
}

fn write_json(out: &mut Vec<u8>, data: &impl Serialize) {
    serde_json::to_writer(out, data)
        .expect("the translation's own types and JSON values always serialise");
}

/// The 400 `unsupported_parameter` a request that cannot be translated gets.
pub(crate) fn unsupported(param: impl Into<String>, why: impl std::fmt::Display) -> Error {
    let param = param.into();
    Error::UnsupportedParameter {
        message: format!("`{param}` {why}"),
        param,
    }
}

/// A present, non-null field.
pub(crate) fn field<'a>(json: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    json.get(key).filter(|v| !v.is_null())
}

/// A string field of a JSON value, if it is a string.
pub(crate) fn str_of<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// A JSON object of `fields`, in order, their values moved in: `json!`
/// writes every value it is given out again through `to_value`, a copy
/// of each string and of every node of a `Value`, which a translated
/// request (long conversations, large tool schemas) would pay for its
/// whole size.
pub(crate) fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect(),
    )
}

/// Copy the present, non-null fields `keys` from `src` to `out` unchanged.
pub(crate) fn copy_fields(src: &Map<String, Value>, out: &mut Map<String, Value>, keys: &[&str]) {
    for key in keys {
        if let Some(value) = field(src, key) {
            out.insert((*key).to_owned(), value.clone());
        }
    }
}

/// Tool-call arguments (a JSON text) as the object Anthropic's `input` is.
/// Empty arguments are `{}`; arguments that are not JSON are kept as the
/// string they are rather than lost.
pub(crate) fn arguments_to_input(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(Map::new());
    }
    serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_owned()))
}

/// A chat tool call's `arguments` as its JSON text: the string it should
/// be, or the JSON of an object or array a server sent instead (llama.cpp
/// did for a while) rather than losing them; `None` when absent or null.
pub(crate) fn arguments_text(function: &Value) -> Option<std::borrow::Cow<'_, str>> {
    match function.get("arguments")? {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s)),
        Value::Null => None,
        other => Some(std::borrow::Cow::Owned(other.to_string())),
    }
}

/// Deserialize tool-call `arguments` of a streamed delta: a string, or an
/// object or array sent in its place (as its JSON text).
pub(crate) fn arguments<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Cow<'de, str>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Arguments<'a> {
        Text(#[serde(borrow)] Cow<'a, str>),
        Json(Value),
    }
    Ok(match Option::<Arguments<'de>>::deserialize(d)? {
        None | Some(Arguments::Json(Value::Null)) => None,
        Some(Arguments::Text(text)) => Some(text),
        Some(Arguments::Json(json)) => Some(Cow::Owned(json.to_string())),
    })
}

/// Deserialize a number the translation does not need exactly (`created`):
/// a non-negative integer, a float's whole part, anything else none, never
/// a failed chunk.
pub(crate) fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = Option::<Value>::deserialize(d)?;
    Ok(value.and_then(|v| {
        v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                .map(|f| f as u64)
        })
    }))
}

/// Anthropic's `input` as the JSON text chat's `arguments` are.
pub(crate) fn input_to_arguments(input: &Value) -> String {
    match input {
        Value::String(s) => s.clone(),
        Value::Null => "{}".to_owned(),
        other => other.to_string(),
    }
}

/// A tool call's id: the upstream's, or, when it sent none (or an empty
/// one, or one that `taken` says an earlier call of the same answer was
/// given), `{prefix}` + a fresh id ([`llm_proxy_core::ids::unique_id`]),
/// never the same for two calls: the client sends every turn's calls back,
/// pairs results to calls by id alone, and Anthropic refuses a
/// conversation whose `tool_use` ids repeat. (An index would repeat in
/// every answer.) Streams and whole answers invent ids this one way.
pub(crate) fn tool_call_id(id: Option<&str>, prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    match id.filter(|id| !id.is_empty() && !taken(id)) {
        Some(id) => id.to_owned(),
        None => format!("{prefix}{}", llm_proxy_core::ids::unique_id()),
    }
}

/// Seconds since the Unix epoch, for `created` fields.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An id in another dialect's style: `prefix` + the upstream id without its
/// own prefix (`chatcmpl-abc` -> `msg_abc`). An upstream that gives no id,
/// or an empty one (Azure's first chunk, TGI), gets a fresh one
/// ([`llm_proxy_core::ids::unique_id`]): a constant would hand every such answer the same id,
/// and the proxy routes a Responses client's follow-ups by its response id.
pub(crate) fn restyle_id(prefix: &str, id: Option<&str>) -> String {
    match bare_id(id) {
        Some(bare) => format!("{prefix}{bare}"),
        None => format!("{prefix}{}", llm_proxy_core::ids::unique_id()),
    }
}

/// The longest upstream id or model name a translation repeats: a stream
/// names its answer's id and model in every event, so an upstream's 1 MiB
/// id would make each one-token event a megabyte for the client. Longer
/// ones are not used (a fresh id, the client's model). Real ones are far
/// shorter: OpenAI's and Anthropic's ids are under 64 bytes, LiteLLM's
/// encoded Responses ids a few hundred.
pub(crate) const MAX_ID_BYTES: usize = 512;

/// The upstream's id without its own prefix, when there is anything left
/// and it is no longer than [`MAX_ID_BYTES`].
pub(crate) fn bare_id(id: Option<&str>) -> Option<&str> {
    let id = id?;
    let bare = ["chatcmpl-", "msg_", "resp_", "cmpl-"]
        .iter()
        .find_map(|p| id.strip_prefix(p))
        .unwrap_or(id);
    Some(bare).filter(|b| !b.is_empty() && b.len() <= MAX_ID_BYTES)
}

/// The upstream's `model`, when it gives one that is not empty (Azure's
/// first chunk has an empty one) nor longer than [`MAX_ID_BYTES`].
pub(crate) fn upstream_model(upstream: Option<&str>) -> Option<&str> {
    upstream.filter(|m| !m.is_empty() && m.len() <= MAX_ID_BYTES)
}

/// The upstream's `model` ([`upstream_model`]), else the client's.
pub(crate) fn model_or<'a>(upstream: Option<&'a str>, client: &'a str) -> &'a str {
    upstream_model(upstream).unwrap_or(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        assert_eq!(arguments_to_input(""), serde_json::json!({}));
        assert_eq!(arguments_to_input(r#"{"a":1}"#), serde_json::json!({"a":1}));
        assert_eq!(
            arguments_to_input("{broken"),
            Value::String("{broken".into())
        );
        assert_eq!(
            input_to_arguments(&serde_json::json!({"a":1})),
            r#"{"a":1}"#
        );
        assert_eq!(restyle_id("msg_", Some("chatcmpl-x1")), "msg_x1");
        assert_eq!(restyle_id("resp_", Some("abc")), "resp_abc");
        let free = |_: &str| false;
        assert_eq!(tool_call_id(Some("call_x"), "toolu_", free), "call_x");
        let made = tool_call_id(Some(""), "toolu_", free);
        assert!(made.starts_with("toolu_") && made.len() == 6 + 32, "{made}");
        assert_ne!(
            tool_call_id(None, "call_", free),
            tool_call_id(None, "call_", free)
        );
        // An id an earlier call of the answer has is not given again.
        let again = tool_call_id(Some("call_x"), "call_", |id| id == "call_x");
        assert!(
            again.starts_with("call_") && again.len() == 5 + 32,
            "{again}"
        );
    }

    #[test]
    fn an_unusable_upstream_id_gets_a_fresh_one_each_time() {
        let mut seen = std::collections::HashSet::new();
        for id in [
            None,
            Some(""),
            Some("chatcmpl-"),
            Some("resp_"),
            None,
            Some(""),
        ] {
            let made = restyle_id("resp_", id);
            let bare = made.strip_prefix("resp_").expect("the prefix");
            assert_eq!(bare.len(), 32, "{made}");
            assert!(bare.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
            assert!(seen.insert(made.clone()), "{made} twice");
        }
        assert_eq!(model_or(Some(""), "client"), "client");
        assert_eq!(model_or(None, "client"), "client");
        assert_eq!(model_or(Some("up"), "client"), "up");
        let long = "m".repeat(MAX_ID_BYTES + 1);
        assert_eq!(model_or(Some(&long), "client"), "client");
        let long = format!("chatcmpl-{}", "x".repeat(MAX_ID_BYTES + 1));
        assert_eq!(bare_id(Some(&long)), None);
        assert!(restyle_id("resp_", Some(&long)).len() < 64);
    }

    #[test]
    fn events_are_one_data_line() {
        let mut out = Vec::new();
        write_event(&mut out, "x", &serde_json::json!({"t": "a\nb"}));
        assert_eq!(out, b"event: x\ndata: {\"t\":\"a\\nb\"}\n\n");
    }
}
