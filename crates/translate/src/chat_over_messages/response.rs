//! A whole Messages `message` as a `chat.completion`.

use serde_json::{Value, json};

use super::{Context, finish_reason};
use crate::chat::usage_json;
use crate::wire::{input_to_arguments, now_secs, restyle_id, str_of};

/// Anthropic usage as chat counts `(prompt, completion, cached)`. Anthropic's
/// `input_tokens` leaves out cache reads and writes; chat's `prompt_tokens`
/// includes them.
pub(crate) fn usage_counts(usage: Option<&Value>) -> (u64, u64, u64) {
    let count = |key: &str| {
        usage
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let cached = count("cache_read_input_tokens");
    let input = count("input_tokens")
        .saturating_add(count("cache_creation_input_tokens"))
        .saturating_add(cached);
    (input, count("output_tokens"), cached)
}

/// Translate an Anthropic `message` into a `chat.completion`. `Err` says
/// what is missing when the upstream's answer is not a message.
pub(crate) fn response(message: &Value, ctx: &Context) -> Result<Value, String> {
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .ok_or("the upstream's answer is not an Anthropic message (no content array)")?;
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for block in blocks {
        let name = str_of(block, "name");
        match str_of(block, "type") {
            Some("text") => text.push_str(str_of(block, "text").unwrap_or_default()),
            Some("thinking") => reasoning.push_str(str_of(block, "thinking").unwrap_or_default()),
            Some("tool_use") if name.is_some() && name == ctx.json_tool.as_deref() => {
                text.push_str(&input_to_arguments(
                    block.get("input").unwrap_or(&Value::Null),
                ));
            }
            Some("tool_use") => calls.push(json!({
                "id": str_of(block, "id").unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": name.unwrap_or_default(),
                    "arguments": input_to_arguments(block.get("input").unwrap_or(&Value::Null)),
                },
            })),
            // redacted thinking and server-tool blocks have no chat form
            _ => {}
        }
    }
    let mut out_message = json!({"role": "assistant", "content": text, "refusal": null});
    if text.is_empty() && !calls.is_empty() {
        out_message["content"] = Value::Null;
    }
    if !reasoning.is_empty() {
        out_message["reasoning_content"] = json!(reasoning);
    }
    if !calls.is_empty() {
        out_message["tool_calls"] = Value::Array(calls);
    }
    let (input, output, cached) = usage_counts(message.get("usage"));
    Ok(json!({
        "id": restyle_id("chatcmpl-", str_of(message, "id").unwrap_or("translated")),
        "object": "chat.completion",
        "created": now_secs(),
        "model": str_of(message, "model").unwrap_or(&ctx.model),
        "choices": [{
            "index": 0,
            "message": out_message,
            "logprobs": null,
            "finish_reason": finish_reason(str_of(message, "stop_reason"), ctx),
        }],
        "usage": usage_json(input, output, cached),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_use_and_usage() {
        let message = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 5, "cache_read_input_tokens": 3, "output_tokens": 7},
        });
        let out = response(&message, &Context::default()).unwrap();
        assert_eq!(out["id"], "chatcmpl-01");
        let m = &out["choices"][0]["message"];
        assert_eq!(m["content"], "Checking.");
        assert_eq!(m["reasoning_content"], "hmm");
        assert_eq!(
            m["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["usage"]["prompt_tokens"], 8);
        assert_eq!(out["usage"]["total_tokens"], 15);
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
    }

    #[test]
    fn forced_json_tool_is_content() {
        let message = json!({"content": [{"type": "tool_use", "id": "t", "name": "answer", "input": {"a": 1}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 2}});
        let ctx = Context {
            json_tool: Some("answer".into()),
            model: "m".into(),
            ..Context::default()
        };
        let out = response(&message, &ctx).unwrap();
        assert_eq!(out["choices"][0]["message"]["content"], r#"{"a":1}"#);
        assert!(out["choices"][0]["message"].get("tool_calls").is_none());
        assert_eq!(out["choices"][0]["finish_reason"], "stop");
        assert_eq!(out["model"], "m");
        assert!(response(&json!({"type": "error"}), &ctx).is_err());
    }
}
