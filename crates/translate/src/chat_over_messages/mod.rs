//! A chat-completions client served by a Messages upstream (an `openai`-SDK
//! app on Anthropic's API).
//!
//! - [`request`]: the chat request as a Messages request;
//! - [`response`]: a whole Messages `message` as a `chat.completion`;
//! - [`stream`]: Anthropic stream events as chat chunks ending in `[DONE]`.
//!
//! docs/translation.md has the field table.

pub(crate) mod request;
pub(crate) mod response;
pub(crate) mod stream;

/// The `anthropic-version` sent when the client's request has none.
pub(crate) const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` sent when the client sets none: Anthropic requires it.
pub(crate) const DEFAULT_MAX_TOKENS: u64 = 4096;

/// What the response translation needs to know about the request.
#[derive(Clone, Debug, Default)]
pub(crate) struct Context {
    /// The client's `model`, used when the upstream's answer names none.
    pub model: String,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// The name of the forced tool that carries a `response_format`
    /// json_schema answer: its input is the answer's text.
    pub json_tool: Option<String>,
}

/// Chat's `finish_reason` for an Anthropic `stop_reason`, for an answer
/// that has tool calls (`calls`) or none. The forced JSON tool's
/// `tool_use` is a plain `stop`, and so is a `tool_use` with no call: a
/// chat client reads `tool_calls` as a promise of calls to run.
pub(crate) fn finish_reason(stop_reason: Option<&str>, calls: bool, ctx: &Context) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") if ctx.json_tool.is_none() && calls => "tool_calls",
        Some("refusal") => "content_filter",
        _ => "stop",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons() {
        let ctx = Context::default();
        assert_eq!(finish_reason(Some("end_turn"), true, &ctx), "stop");
        assert_eq!(finish_reason(Some("stop_sequence"), true, &ctx), "stop");
        assert_eq!(finish_reason(Some("max_tokens"), true, &ctx), "length");
        assert_eq!(finish_reason(Some("tool_use"), true, &ctx), "tool_calls");
        assert_eq!(finish_reason(Some("refusal"), true, &ctx), "content_filter");
        assert_eq!(finish_reason(Some("pause_turn"), true, &ctx), "stop");
        let json = Context {
            json_tool: Some("answer".into()),
            ..Context::default()
        };
        assert_eq!(finish_reason(Some("tool_use"), true, &json), "stop");
        assert_eq!(finish_reason(Some("tool_use"), false, &ctx), "stop");
    }
}
