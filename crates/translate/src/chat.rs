//! The chat-completions wire format as the translations read it (upstream
//! chunks) and write it (chunks for a chat client).
//!
//! Chunks are read into borrowed, typed structs rather than
//! [`serde_json::Value`]: a streamed answer has one chunk per token, and this
//! is the hot path of two directions.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::content::{Content, first_reasoning};

/// One `chat.completion.chunk` (or the error payload an interrupted stream
/// ends with). Unknown fields are skipped.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Chunk<'a> {
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub model: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "crate::wire::lenient_u64")]
    pub created: Option<u64>,
    #[serde(borrow, default)]
    pub choices: Option<Vec<ChunkChoice<'a>>>,
    /// The upstream's usage, when it is usable ([`Usage::from_value`]): a
    /// malformed one is no usage rather than a failed stream.
    #[serde(default, deserialize_with = "usable_usage")]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub error: Option<Value>,
}

/// A chunk's `usage` as [`Usage::from_value`] reads it. Only chunks that
/// have the field pay for reading it as a [`Value`] first.
fn usable_usage<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Usage>, D::Error> {
    let value = Option::<Value>::deserialize(d)?;
    Ok(Usage::from_value(value.as_ref()))
}

/// Why an answer whose choice ended with this `finish_reason` is no
/// answer: vLLM ends one it gave up on (the request aborted in the engine,
/// an error while generating) with `abort` or `error`. A native chat client
/// reads the reason itself; a translated one would be told its dialect's
/// clean end (`end_turn`, `tool_use`, `completed`) over what may be half a
/// tool call's arguments, so the answer fails instead. `None`: it ended as
/// answers end.
pub(crate) fn failed_finish(finish_reason: &str) -> Option<String> {
    matches!(finish_reason, "abort" | "error")
        .then(|| format!("the upstream gave up on its answer (finish_reason `{finish_reason}`)"))
}

/// Why a stream that ended (`[DONE]`) before its choice had a
/// `finish_reason` is no answer: every chat stream's choice ends with one,
/// and a stream cut short then closed with `[DONE]` (as some gateways
/// close the streams they lose) looks the same. (A whole answer without
/// one is taken as finished: it came whole.)
pub(crate) const UNFINISHED: &str =
    "the upstream's stream ended ([DONE]) before its answer finished (no finish_reason)";

/// A choice of a chunk.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ChunkChoice<'a> {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(borrow, default)]
    pub delta: Option<Delta<'a>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub finish_reason: Option<Cow<'a, str>>,
    /// vLLM: the stop string (or token id) that ended the answer.
    #[serde(default)]
    pub stop_reason: Option<Value>,
}

/// A chunk's delta.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Delta<'a> {
    #[serde(borrow, default, deserialize_with = "crate::content::deserialize")]
    pub content: Option<Content<'a>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub refusal: Option<Cow<'a, str>>,
    /// DeepSeek/vLLM's reasoning text.
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub reasoning_content: Option<Cow<'a, str>>,
    /// Newer vLLM/Ollama name for the same.
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub reasoning: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub tool_calls: Option<Vec<ToolCallDelta<'a>>>,
    /// The legacy (pre-`tools`) form of a call: see
    /// [`Delta::legacy_call`].
    #[serde(borrow, default, deserialize_with = "legacy_function")]
    pub function_call: Option<FunctionDelta<'a>>,
}

impl<'a> Delta<'a> {
    /// The reasoning text of this delta, under any of its names.
    pub fn reasoning_text(&self) -> Option<&str> {
        first_reasoning([
            self.reasoning_content.as_deref(),
            self.reasoning.as_deref(),
            self.content.as_ref().and_then(|c| c.thinking.as_deref()),
        ])
    }

    /// The legacy `function_call` of this delta (OpenAI's format before
    /// `tools`, which some servers still send) as a piece of a tool call:
    /// the one call of such an answer, at index 0, without an id (one is
    /// made up for it, as for any call without). None when the delta has
    /// `tool_calls`, or a `function_call` that says nothing.
    pub fn legacy_call(&self) -> Option<ToolCallDelta<'_>> {
        let function = self.function_call.as_ref()?;
        let (name, arguments) = (function.name.as_deref(), function.arguments.as_deref());
        if self.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) || !is_a_call(name, arguments) {
            return None;
        }
        Some(ToolCallDelta {
            index: Some(0),
            id: None,
            function: Some(FunctionDelta {
                name: name.map(Cow::Borrowed),
                arguments: arguments.map(Cow::Borrowed),
            }),
        })
    }

    /// The text of this delta: its content's, then its refusal's (a
    /// refusal is told as text).
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        let content = self.content.as_ref().and_then(|c| c.text.as_deref());
        [content, self.refusal.as_deref()]
            .into_iter()
            .flatten()
            .filter(|t| !t.is_empty())
    }
}

/// Deserialize a delta's legacy `function_call`: anything but an object
/// is none, as it was before the field was read, not a failed stream.
fn legacy_function<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<FunctionDelta<'de>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Legacy<'a> {
        Call(#[serde(borrow)] FunctionDelta<'a>),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Option::<Legacy<'de>>::deserialize(d)? {
        Some(Legacy::Call(function)) => Some(function),
        _ => None,
    })
}

/// Whether a legacy `function_call` with this name and arguments says
/// anything (some servers send `{}` or null fields with every message).
pub(crate) fn is_a_call(name: Option<&str>, arguments: Option<&str>) -> bool {
    !name.unwrap_or_default().is_empty() || !arguments.unwrap_or_default().is_empty()
}

/// A piece of one tool call.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ToolCallDelta<'a> {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub function: Option<FunctionDelta<'a>>,
}

/// The function part of a tool-call delta.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct FunctionDelta<'a> {
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    pub name: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::arguments")]
    pub arguments: Option<Cow<'a, str>>,
}

/// Chat usage, as read by [`Usage::from_value`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

/// `usage.completion_tokens_details`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub(crate) struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Prompt tokens (0 when absent).
    pub fn input(&self) -> u64 {
        self.prompt_tokens.unwrap_or(0)
    }

    /// Completion tokens (0 when absent).
    pub fn output(&self) -> u64 {
        self.completion_tokens.unwrap_or(0)
    }

    /// Cached prompt tokens (0 when absent).
    pub fn cached(&self) -> u64 {
        self.prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
    }

    /// Reasoning tokens (0 when absent).
    pub fn reasoning(&self) -> u64 {
        self.completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0)
    }

    /// Read a usage object (of a whole completion or a chunk). `None` when
    /// the upstream reported no usable usage: the object is missing or
    /// null, is not an object, has a count that is not a non-negative
    /// integer, or has neither `prompt_tokens` nor `completion_tokens` (the
    /// rule the proxy's usage reader, `llm_proxy_core::usage`, applies).
    /// Translations then report no usage rather than a zero one.
    pub fn from_value(value: Option<&Value>) -> Option<Usage> {
        value
            .filter(|v| v.is_object())
            .and_then(|v| Usage::deserialize(v).ok())
            .filter(|u| u.prompt_tokens.is_some() || u.completion_tokens.is_some())
    }
}

/// Read one upstream chat event: `Ok(None)` for `data: [DONE]`, the chunk,
/// or why it fails the stream (not a chunk, or the upstream's own error).
pub(crate) fn read_chunk(event: &llm_proxy_core::sse::Event) -> Result<Option<Chunk<'_>>, String> {
    if event.is_done() {
        return Ok(None);
    }
    // An `error` event (as Anthropic names its own, and some
    // OpenAI-compatible servers theirs) fails the stream whatever its data.
    if event.event.as_deref() == Some("error") {
        let data = serde_json::from_str::<Value>(&event.data)
            .unwrap_or_else(|_| Value::String(event.data.clone()));
        return Err(error_message(data.get("error").unwrap_or(&data)));
    }
    let chunk: Chunk<'_> = llm_proxy_core::object_from_str(&event.data)
        .map_err(|e| format!("the upstream sent an event that is not a chat chunk: {e}"))?;
    match &chunk.error {
        Some(error) => Err(error_message(error)),
        None => Ok(Some(chunk)),
    }
}

/// The message of an upstream's error payload (`{"error":{"message":…}}`,
/// or a bare string, as TGI sends).
pub(crate) fn error_message(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| error.to_string())
}

/// The message of a whole answer that is an error some servers send with
/// `200` (OpenRouter's `{"error": …}`, vLLM's `{"object": "error", …}`),
/// if it is one: the upstream's own words for the client, rather than what
/// such an answer lacks.
pub(crate) fn answer_error(answer: &Value) -> Option<String> {
    if let Some(error) = answer.get("error").filter(|e| !e.is_null()) {
        return Some(format!(
            "the upstream answered with an error: {}",
            error_message(error)
        ));
    }
    (answer.get("object").and_then(Value::as_str) == Some("error")).then(|| {
        format!(
            "the upstream answered with an error: {}",
            error_message(answer)
        )
    })
}

/// A chunk written for a chat client.
#[derive(Debug, Serialize)]
pub(crate) struct OutChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [OutChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Value>,
}

/// The one choice of an [`OutChunk`].
#[derive(Debug, Default, Serialize)]
pub(crate) struct OutChoice<'a> {
    pub index: u32,
    pub delta: OutDelta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
}

/// The delta of an [`OutChoice`].
#[derive(Debug, Default, Serialize)]
pub(crate) struct OutDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[OutToolCall<'a>; 1]>,
}

/// One tool call's piece in an [`OutDelta`].
#[derive(Debug, Serialize)]
pub(crate) struct OutToolCall<'a> {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: OutFunction<'a>,
}

/// The function of an [`OutToolCall`].
#[derive(Debug, Serialize)]
pub(crate) struct OutFunction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub arguments: &'a str,
}

/// Chat usage as a chat client reads it.
pub(crate) fn usage_json(input: u64, output: u64, cached: u64) -> Value {
    let mut usage = serde_json::json!({
        "prompt_tokens": input,
        "completion_tokens": output,
        "total_tokens": input.saturating_add(output),
    });
    if cached > 0 {
        usage["prompt_tokens_details"] = serde_json::json!({"cached_tokens": cached});
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_tool_call_chunk_borrowing() {
        let data = r#"{"id":"c","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"t","type":"function","function":{"name":"f","arguments":"{\"a\""}}]},"finish_reason":null}]}"#;
        let chunk: Chunk<'_> = serde_json::from_str(data).unwrap();
        let choices = chunk.choices.unwrap();
        let call = &choices[0]
            .delta
            .as_ref()
            .unwrap()
            .tool_calls
            .as_ref()
            .unwrap()[0];
        assert_eq!(call.index, Some(1));
        assert!(matches!(
            call.function.as_ref().unwrap().name,
            Some(Cow::Borrowed("f"))
        ));
        assert_eq!(
            call.function.as_ref().unwrap().arguments.as_deref(),
            Some("{\"a\"")
        );
    }

    #[test]
    fn a_legacy_function_call_is_call_0_without_an_id_unless_it_says_nothing() {
        let legacy = |delta: &str| {
            let delta: Delta<'_> = serde_json::from_str(delta).unwrap();
            delta.legacy_call().map(|c| {
                let f = c.function.unwrap();
                let name = f.name.map(String::from);
                (c.index, c.id.is_none(), name, f.arguments.map(String::from))
            })
        };
        assert_eq!(
            legacy(r#"{"function_call":{"name":"f","arguments":""}}"#),
            Some((Some(0), true, Some("f".into()), Some("".into())))
        );
        assert_eq!(
            legacy(r#"{"function_call":{"arguments":{"a":1}}}"#),
            Some((Some(0), true, None, Some(r#"{"a":1}"#.into())))
        );
        for nothing in [
            r#"{"function_call":null}"#,
            r#"{"function_call":{}}"#,
            r#"{"function_call":{"name":"","arguments":null}}"#,
            r#"{"function_call":{"name":"f"},"tool_calls":[{"index":0}]}"#,
            r#"{"function_call":"auto"}"#,
            r#"{"function_call":[]}"#,
        ] {
            assert_eq!(legacy(nothing), None, "{nothing}");
        }
    }

    #[test]
    fn reads_usage_and_errors() {
        let chunk: Chunk<'_> = serde_json::from_str(
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}"#,
        )
        .unwrap();
        let usage = chunk.usage.unwrap();
        assert_eq!((usage.input(), usage.output(), usage.cached()), (3, 2, 1));
        let chunk: Chunk<'_> =
            serde_json::from_str(r#"{"error":{"message":"cut","code":"stream_interrupted"}}"#)
                .unwrap();
        assert_eq!(error_message(chunk.error.as_ref().unwrap()), "cut");
    }

    #[test]
    fn unusable_usage_is_none() {
        for usage in crate::test_util::no_chat_usage() {
            assert_eq!(Usage::from_value(usage.as_ref()), None, "{usage:?}");
            let mut data = serde_json::json!({"choices": []});
            if let Some(u) = usage {
                data["usage"] = u;
            }
            let text = data.to_string();
            let chunk: Chunk<'_> = serde_json::from_str(&text).unwrap();
            assert_eq!(chunk.usage, None, "{data}");
        }
        let only_completion = serde_json::json!({"completion_tokens": 2});
        assert_eq!(
            Usage::from_value(Some(&only_completion)).map(|u| (u.input(), u.output())),
            Some((0, 2))
        );
    }
}
