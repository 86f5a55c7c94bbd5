//! An Anthropic Messages client served by a chat-completions upstream
//! (Claude Code on vLLM, llama.cpp or Ollama without `/v1/messages`).
//!
//! - [`request`]: the Messages request as a chat request;
//! - [`response`]: a whole chat completion as a Messages `message`;
//! - [`stream`]: chat chunks as Anthropic stream events, one event at a time.
//!
//! docs/translation.md has the field table.

pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod stream;
mod tools;

/// What the response translation needs to know about the request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Context {
    /// The client's `model`, used when the upstream's answer names none.
    pub model: String,
    /// The client's `stop_sequences`, to report which one matched.
    pub stop_sequences: Vec<String>,
    /// The client enabled extended thinking: reasoning text from the
    /// upstream becomes `thinking` blocks (otherwise it is dropped, as
    /// Anthropic sends no thinking to a client that did not ask).
    pub thinking: bool,
}

/// The id of a `tool_use` block: the upstream's tool-call id, or `toolu_`
/// + a fresh id when it sent none or one `taken` by an earlier block.
pub(crate) fn tool_use_id(id: Option<&str>, taken: impl Fn(&str) -> bool) -> String {
    crate::wire::tool_call_id(id, "toolu_", taken)
}

/// Anthropic's `stop_reason` (and `stop_sequence`) for a chat
/// `finish_reason`.
///
/// `stop` is `end_turn`, unless the upstream names the stop string that
/// matched (vLLM's `stop_reason`) and it is one of the request's
/// `stop_sequences`: then `stop_sequence`. Servers that say `stop` after
/// tool calls (older llama.cpp, Ollama) get `tool_use`; `tool_calls`
/// without any tool call gets what `stop` would: a client told `tool_use`
/// looks for a `tool_use` block to run and finds none (Claude Code then
/// answers a tool result for no call).
pub(crate) fn stop_reason(
    finish_reason: Option<&str>,
    matched: Option<&serde_json::Value>,
    had_tool_calls: bool,
    ctx: &Context,
) -> (&'static str, Option<String>) {
    match finish_reason {
        Some("length") => ("max_tokens", None),
        Some("content_filter") => ("refusal", None),
        _ if had_tool_calls => ("tool_use", None),
        _ => {
            let matched = matched
                .and_then(serde_json::Value::as_str)
                .filter(|s| ctx.stop_sequences.iter().any(|q| q == s));
            match matched {
                Some(s) => ("stop_sequence", Some(s.to_owned())),
                None => ("end_turn", None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stop_reasons() {
        let ctx = Context {
            stop_sequences: vec!["END".into()],
            ..Context::default()
        };
        assert_eq!(
            stop_reason(Some("stop"), None, false, &ctx),
            ("end_turn", None)
        );
        assert_eq!(
            stop_reason(Some("stop"), Some(&json!("END")), false, &ctx),
            ("stop_sequence", Some("END".into()))
        );
        assert_eq!(
            stop_reason(Some("stop"), Some(&json!(7)), false, &ctx).0,
            "end_turn"
        );
        assert_eq!(
            stop_reason(Some("length"), None, false, &ctx).0,
            "max_tokens"
        );
        assert_eq!(
            stop_reason(Some("tool_calls"), None, true, &ctx).0,
            "tool_use"
        );
        assert_eq!(stop_reason(Some("stop"), None, true, &ctx).0, "tool_use");
        assert_eq!(
            stop_reason(Some("tool_calls"), None, false, &ctx).0,
            "end_turn",
            "no tool call to use"
        );
        assert_eq!(
            stop_reason(Some("function_call"), None, false, &ctx).0,
            "end_turn"
        );
        assert_eq!(
            stop_reason(Some("content_filter"), None, false, &ctx).0,
            "refusal"
        );
        assert_eq!(stop_reason(None, None, false, &ctx).0, "end_turn");
    }
}
