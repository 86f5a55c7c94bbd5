//! A whole Messages `message` as a `chat.completion`.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Context, finish_reason};
use crate::chat::usage_json;
use crate::stream::MAX_BLOCKS;
use crate::wire::{input_to_arguments, model_or, now_secs, restyle_id, str_of};

/// Anthropic usage, as far as chat reports it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct Counts {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl Counts {
    /// Read an Anthropic `usage` object. `None` when the upstream reported
    /// no usable usage: missing, null, not an object, a count that is not a
    /// non-negative integer, or neither `input_tokens` nor `output_tokens`
    /// (the rule the proxy's usage reader, `llm_proxy_core::usage`,
    /// applies).
    pub(crate) fn read(usage: Option<&Value>) -> Option<Counts> {
        usage
            .filter(|v| v.is_object())
            .and_then(|v| Counts::deserialize(v).ok())
            .filter(|c| c.input_tokens.is_some() || c.output_tokens.is_some())
    }

    /// Chat's `prompt_tokens`. Anthropic's `input_tokens` leaves out cache
    /// reads and writes; chat's `prompt_tokens` includes them.
    pub(crate) fn prompt(&self) -> u64 {
        self.input_tokens
            .unwrap_or(0)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
            .saturating_add(self.cached())
    }

    /// Chat's `completion_tokens`, when reported.
    pub(crate) fn completion(&self) -> Option<u64> {
        self.output_tokens
    }

    /// Chat's `prompt_tokens_details.cached_tokens`: the cache reads.
    pub(crate) fn cached(&self) -> u64 {
        self.cache_read_input_tokens.unwrap_or(0)
    }
}

/// Translate an Anthropic `message` into a `chat.completion`. `Err` says
/// what is missing when the upstream's answer is not a message.
pub(crate) fn response(message: &Value, ctx: &Context) -> Result<Value, String> {
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .ok_or("the upstream's answer is not an Anthropic message (no content array)")?;
    // As a stream's: each block may become a tool call of its own.
    if blocks.len() > MAX_BLOCKS {
        return Err(format!(
            "the upstream's message has {} content blocks; at most {MAX_BLOCKS} are translated",
            blocks.len()
        ));
    }
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
    let has_calls = !calls.is_empty();
    if has_calls {
        out_message["tool_calls"] = Value::Array(calls);
    }
    let mut answer = json!({
        "id": restyle_id("chatcmpl-", str_of(message, "id")),
        "object": "chat.completion",
        "created": now_secs(),
        "model": model_or(str_of(message, "model"), &ctx.model),
        "choices": [{
            "index": 0,
            "message": out_message,
            "logprobs": null,
            "finish_reason": finish_reason(str_of(message, "stop_reason"), has_calls, ctx),
        }],
    });
    // Chat's `usage` is optional: when the upstream reported none it is left
    // out rather than written as zeros, which would read as real usage (the
    // auth layer would refund the token reservation).
    if let Some(c) = Counts::read(message.get("usage")) {
        answer["usage"] = usage_json(c.prompt(), c.completion().unwrap_or(0), c.cached());
    }
    Ok(answer)
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
    fn no_usage_is_left_out() {
        for usage in [
            None,
            Some(Value::Null),
            Some(json!({})),
            Some(json!({"cache_read_input_tokens": 3})),
            Some(json!({"input_tokens": -1, "output_tokens": 2})),
            Some(json!({"input_tokens": "3", "output_tokens": 2})),
            Some(json!([1, 2])),
        ] {
            let mut message =
                json!({"content": [{"type": "text", "text": "a"}], "stop_reason": "end_turn"});
            if let Some(u) = &usage {
                message["usage"] = u.clone();
            }
            let out = response(&message, &Context::default()).unwrap();
            assert!(out.get("usage").is_none(), "{usage:?}: {out}");
            // What the auth layer reads: no usage, so the reservation stands.
            assert_eq!(llm_proxy_core::usage::from_value(&out), None, "{usage:?}");
        }
        let message = json!({"content": [], "usage": {"output_tokens": 4}});
        let out = response(&message, &Context::default()).unwrap();
        assert_eq!(out["usage"]["prompt_tokens"], 0);
        assert_eq!(out["usage"]["completion_tokens"], 4);
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

    #[test]
    fn too_many_content_blocks_are_refused() {
        let blocks = vec![json!({"type": "tool_use"}); MAX_BLOCKS + 1];
        let message = json!({"id": "msg_1", "content": blocks, "stop_reason": "tool_use"});
        let refused = response(&message, &Context::default()).unwrap_err();
        assert!(refused.contains("content blocks"), "{refused}");
    }
}
