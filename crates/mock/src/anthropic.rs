//! Anthropic's Messages API: messages (whole or streamed), token counting and
//! Anthropic's model list.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::openai::{self, GenerationParams};
use crate::sse::{SseEvents, named_event};
use crate::text;

/// [`CREATED`](crate::openai::CREATED) as Anthropic writes times.
const CREATED_AT: &str = "2023-11-14T22:13:20Z";

/// Events before the first token: `message_start`, `content_block_start` and
/// `ping`.
const PREAMBLE: usize = 3;

/// Checks the headers Anthropic's API requires: `anthropic-version`.
pub(crate) fn check_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    if headers.contains_key("anthropic-version") {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "anthropic-version: header is required",
            None,
        ))
    }
}

/// A message to produce, derived deterministically from its request.
#[derive(Debug)]
pub(crate) struct Message {
    id: String,
    model: String,
    seed: u64,
    /// Output tokens: words, or pieces of the tool call's input.
    tokens: usize,
    stop_reason: &'static str,
    tool: Option<ToolUse>,
    input_tokens: u64,
    /// The request asked for `"stream": true`.
    pub(crate) stream: bool,
}

#[derive(Debug)]
struct ToolUse {
    id: String,
    name: String,
}

impl Message {
    /// Reads a `POST /messages` request.
    pub(crate) fn parse(
        body: &Value,
        body_len: usize,
        params: &GenerationParams<'_>,
    ) -> Result<Self, ApiError> {
        let request = object(body)?;
        let messages = messages(request)?;
        let max_tokens = match request.get("max_tokens") {
            None | Some(Value::Null) => {
                return Err(ApiError::bad_request("max_tokens: Field required", None));
            }
            Some(value) => match value.as_u64() {
                Some(0) => {
                    return Err(ApiError::bad_request(
                        "max_tokens: Input should be greater than or equal to 1",
                        None,
                    ));
                }
                Some(max) => max,
                None => {
                    return Err(ApiError::bad_request(
                        "max_tokens: Input should be a valid integer",
                        None,
                    ));
                }
            },
        };
        let conversation = conversation(request, messages);
        let seed = openai::conversation_hasher(&conversation).finish();
        let tool = tool_use(request, messages).map(|name| ToolUse {
            id: format!("toolu_{:016x}", text::derive(seed, b"toolu")),
            name,
        });
        let (tokens, stop_reason) = match &tool {
            Some(_) => (text::TOOL_ARGUMENT_TOKENS, "tool_use"),
            None if max_tokens < params.tokens as u64 => (max_tokens as usize, "max_tokens"),
            None => (params.tokens, "end_turn"),
        };
        Ok(Self {
            id: format!("msg_{:016x}", text::derive(seed, b"msg")),
            model: openai::request_model(body, params.default_model),
            seed,
            tokens,
            stop_reason,
            tool,
            input_tokens: text::estimate_tokens(body_len),
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
        })
    }

    /// The whole message, for a request that did not ask to stream.
    pub(crate) fn to_json(&self) -> Value {
        let block = match &self.tool {
            Some(tool) => json!({
                "type": "tool_use",
                "id": tool.id,
                "name": tool.name,
                "input": tool_input(),
            }),
            None => json!({ "type": "text", "text": text::completion(self.seed, self.tokens) }),
        };
        self.message(json!([block]), json!(self.stop_reason), self.tokens as u64)
    }

    fn message(&self, content: Value, stop_reason: Value, output_tokens: u64) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": {
                "input_tokens": self.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": output_tokens,
            },
        })
    }

    /// The type and payload of event `index`, without its `type`.
    fn payload(&self, index: usize) -> Option<(&'static str, Value)> {
        let end = PREAMBLE + self.tokens;
        Some(match index {
            0 => (
                "message_start",
                json!({ "message": self.message(json!([]), Value::Null, 1) }),
            ),
            1 => {
                let block = match &self.tool {
                    Some(tool) => json!({
                        "type": "tool_use",
                        "id": tool.id,
                        "name": tool.name,
                        "input": {},
                    }),
                    None => json!({ "type": "text", "text": "" }),
                };
                (
                    "content_block_start",
                    json!({ "index": 0, "content_block": block }),
                )
            }
            2 => ("ping", json!({})),
            i if i < end => {
                let delta = match self.tool {
                    Some(_) => json!({
                        "type": "input_json_delta",
                        "partial_json": text::tool_argument_piece(i - PREAMBLE),
                    }),
                    None => json!({
                        "type": "text_delta",
                        "text": text::token(self.seed, i - PREAMBLE),
                    }),
                };
                ("content_block_delta", json!({ "index": 0, "delta": delta }))
            }
            i if i == end => ("content_block_stop", json!({ "index": 0 })),
            i if i == end + 1 => (
                "message_delta",
                json!({
                    "delta": { "stop_reason": self.stop_reason, "stop_sequence": null },
                    "usage": { "output_tokens": self.tokens },
                }),
            ),
            i if i == end + 2 => ("message_stop", json!({})),
            _ => return None,
        })
    }
}

impl SseEvents for Message {
    fn is_token_event(&self, index: usize) -> bool {
        index >= PREAMBLE && index < PREAMBLE + self.tokens
    }

    /// Event `index`, as `event: <type>` and `data:` with the same `type`:
    /// `message_start` (no content yet, `output_tokens` 1),
    /// `content_block_start` (an empty text block, or the `tool_use` block
    /// with input `{}`), `ping`, one `content_block_delta` per token
    /// (`text_delta`, or `input_json_delta` pieces of the tool input),
    /// `content_block_stop`, `message_delta` (the stop reason and output
    /// tokens) and `message_stop`.
    fn event(&self, index: usize) -> Option<Bytes> {
        let (kind, mut data) = self.payload(index)?;
        data["type"] = json!(kind);
        Some(named_event(kind, &data))
    }
}

/// `POST /messages/count_tokens`: the request's estimated input tokens.
pub(crate) fn count_tokens(body: &Value, body_len: usize) -> Result<Value, ApiError> {
    messages(object(body)?)?;
    Ok(json!({ "input_tokens": text::estimate_tokens(body_len) }))
}

/// One entry of Anthropic's `GET /models`.
pub(crate) fn model(id: &str) -> Value {
    json!({ "type": "model", "id": id, "display_name": id, "created_at": CREATED_AT })
}

/// Anthropic's `GET /models`.
pub(crate) fn model_list(ids: &[&str]) -> Value {
    let data: Vec<Value> = ids.iter().map(|id| model(id)).collect();
    json!({
        "data": data,
        "has_more": false,
        "first_id": ids.first(),
        "last_id": ids.last(),
    })
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object", None))
}

fn messages(request: &Map<String, Value>) -> Result<&[Value], ApiError> {
    match request.get("messages") {
        None | Some(Value::Null) => Err(ApiError::bad_request("messages: Field required", None)),
        Some(Value::Array(messages)) => Ok(messages),
        Some(_) => Err(ApiError::bad_request(
            "messages: Input should be a valid list",
            None,
        )),
    }
}

/// The conversation as the equivalent chat messages: `system` first, as a
/// system message.
fn conversation<'a>(request: &'a Map<String, Value>, messages: &'a [Value]) -> Vec<Value> {
    let system = request
        .get("system")
        .filter(|system| !system.is_null())
        .map(|system| json!({ "role": "system", "content": system }));
    system.into_iter().chain(messages.iter().cloned()).collect()
}

/// The tool a message uses: the first tool's, when the last message is the
/// user's, holds no `tool_result` and mentions the weather.
fn tool_use(request: &Map<String, Value>, messages: &[Value]) -> Option<String> {
    let name = request
        .get("tools")?
        .as_array()?
        .first()?
        .get("name")?
        .as_str()?;
    let last = messages.last()?;
    let content = last.get("content");
    let has_result = content.and_then(Value::as_array).is_some_and(|blocks| {
        blocks
            .iter()
            .any(|block| block.get("type").and_then(Value::as_str) == Some("tool_result"))
    });
    let asks = last.get("role").and_then(Value::as_str) == Some("user")
        && !has_result
        && text::mentions_weather(&openai::content_text(content));
    asks.then(|| name.to_owned())
}

fn tool_input() -> Value {
    serde_json::from_str(text::TOOL_ARGUMENTS).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: GenerationParams<'static> = GenerationParams {
        tokens: 5,
        default_model: "mock-model",
        fingerprint: "",
    };

    fn parse(body: Value) -> Result<Message, ApiError> {
        let len = body.to_string().len();
        Message::parse(&body, len, &PARAMS)
    }

    #[test]
    fn max_tokens_is_required_and_caps() {
        let messages = json!([{"role": "user", "content": "hi"}]);
        assert!(parse(json!({"messages": messages})).is_err());
        assert!(parse(json!({"messages": messages, "max_tokens": 0})).is_err());
        assert!(parse(json!({"messages": messages, "max_tokens": "x"})).is_err());
        assert!(parse(json!({"max_tokens": 9})).is_err());
        let capped = parse(json!({"messages": messages, "max_tokens": 2})).expect("valid");
        let answer = capped.to_json();
        assert_eq!(answer["stop_reason"], "max_tokens");
        assert_eq!(answer["usage"]["output_tokens"], 2);
        let whole = parse(json!({"messages": messages, "max_tokens": 100})).expect("valid");
        assert_eq!(whole.to_json()["stop_reason"], "end_turn");
    }

    #[test]
    fn system_and_blocks_hash_like_chat_messages() {
        let message = parse(json!({
            "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }))
        .expect("valid");
        let chat = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ]);
        let seed = openai::conversation_hasher(chat.as_array().expect("array")).finish();
        assert_eq!(message.seed, seed);
    }

    #[test]
    fn model_list_has_anthropic_shape() {
        let list = model_list(&["a", "b"]);
        assert_eq!(list["data"][1]["type"], "model");
        assert_eq!(list["first_id"], "a");
        assert_eq!(list["last_id"], "b");
        assert_eq!(list["has_more"], false);
    }
}
