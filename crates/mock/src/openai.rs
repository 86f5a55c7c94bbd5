//! The OpenAI wire format: reading requests, writing answers, chunks and
//! errors.

use bytes::Bytes;
use serde_json::{Value, json};

pub(crate) use crate::error::ApiError;
use crate::sse::{SseEvents, data_event};
use crate::text::{self, Hasher};

/// The `created` timestamp of every answer: fixed, so answers are
/// byte-for-byte deterministic.
pub(crate) const CREATED: u64 = 1_700_000_000;

/// Dimensions of an embedding when the request does not ask for `dimensions`.
const DEFAULT_DIMENSIONS: u64 = 8;
/// The largest `dimensions` an embeddings request may ask for.
const MAX_DIMENSIONS: u64 = 4096;

/// Which generation endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    /// `/chat/completions`.
    Chat,
    /// `/completions`.
    Completion,
}

/// A completion to produce, derived deterministically from its request.
#[derive(Debug)]
pub(crate) struct Generation {
    api: Api,
    id: String,
    model: String,
    fingerprint: String,
    seed: u64,
    tokens: usize,
    finish_reason: &'static str,
    /// The chat answer is this tool call instead of text.
    tool_call: Option<ToolCall>,
    prompt_tokens: u64,
    /// The request asked for `"stream": true`.
    pub(crate) stream: bool,
    include_usage: bool,
}

/// A tool call the mock answers with: [`text::TOOL_ARGUMENTS`] for the named
/// function.
#[derive(Debug)]
struct ToolCall {
    id: String,
    name: String,
}

/// What a completion request asked for, beyond its JSON body.
pub(crate) struct GenerationParams<'a> {
    /// Completion tokens to produce before `max_tokens` caps them.
    pub(crate) tokens: usize,
    /// The model to answer with when the request names none.
    pub(crate) default_model: &'a str,
    /// Sent as `system_fingerprint`.
    pub(crate) fingerprint: &'a str,
}

impl Generation {
    /// Reads a `/chat/completions` or `/completions` request.
    pub(crate) fn parse(
        api: Api,
        body: &Value,
        body_len: usize,
        params: &GenerationParams<'_>,
    ) -> Result<Self, ApiError> {
        let request = body
            .as_object()
            .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object", None))?;
        let mut hasher = Hasher::new();
        let mut tool_name = None;
        match api {
            Api::Chat => {
                let messages = request
                    .get("messages")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "missing required parameter: 'messages' (an array)",
                            Some("messages"),
                        )
                    })?;
                hasher = conversation_hasher(messages);
                tool_name = chat_tool_call(request, messages);
            }
            Api::Completion => {
                hasher.write(b"completion");
                match request.get("prompt") {
                    Some(Value::Array(parts)) => {
                        parts.iter().for_each(|p| hash_text(&mut hasher, p))
                    }
                    Some(prompt) => hash_text(&mut hasher, prompt),
                    None => {}
                }
            }
        }
        let seed = hasher.finish();
        let cap = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|key| request.get(*key).and_then(Value::as_u64));
        let (tokens, finish_reason) = match cap {
            _ if tool_name.is_some() => (text::TOOL_ARGUMENT_TOKENS, "tool_calls"),
            Some(cap) if cap < params.tokens as u64 => (cap as usize, "length"),
            _ => (params.tokens, "stop"),
        };
        let tool_call = tool_name.map(|name| ToolCall {
            id: format!("call_{:016x}", text::derive(seed, b"call")),
            name,
        });
        let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
        let include_usage = request
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        };
        Ok(Self {
            api,
            id: format!("{prefix}-mock{seed:016x}"),
            model: request_model(body, params.default_model),
            fingerprint: params.fingerprint.to_owned(),
            seed,
            tokens,
            finish_reason,
            tool_call,
            prompt_tokens: text::estimate_tokens(body_len),
            stream,
            include_usage,
        })
    }

    /// The whole answer, for a request that did not ask to stream.
    pub(crate) fn to_json(&self) -> Value {
        let content = text::completion(self.seed, self.tokens);
        let choice = match self.api {
            Api::Chat if self.tool_call.is_some() => json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "refusal": null,
                    "tool_calls": [self.tool_call_json(text::TOOL_ARGUMENTS, false)],
                },
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }),
            Api::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": content, "refusal": null },
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }),
            Api::Completion => json!({
                "text": content,
                "index": 0,
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }),
        };
        let object = match self.api {
            Api::Chat => "chat.completion",
            Api::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [choice],
            "usage": self.usage(),
        })
    }

    /// The tool call as a `tool_calls` entry: the whole call with
    /// `arguments`, or (`streamed`) its first delta, which has an `index`.
    fn tool_call_json(&self, arguments: &str, streamed: bool) -> Value {
        let Some(call) = &self.tool_call else {
            return Value::Null;
        };
        let mut entry = json!({
            "id": call.id,
            "type": "function",
            "function": { "name": call.name, "arguments": arguments },
        });
        if streamed {
            entry["index"] = json!(0);
        }
        entry
    }

    fn first_token_event(&self) -> usize {
        usize::from(self.api == Api::Chat)
    }
}

impl SseEvents for Generation {
    fn is_token_event(&self, index: usize) -> bool {
        let first = self.first_token_event();
        index >= first && index < first + self.tokens
    }

    /// SSE event `index` of the streamed answer (`data: …\n\n`), or `None`
    /// after `data: [DONE]`.
    ///
    /// Chat streams start with a chunk holding the assistant role (and the
    /// tool call's id and name, with empty arguments, when the answer is a
    /// tool call); then come one chunk per token (or piece of the arguments),
    /// a chunk with the finish reason, a usage chunk if the request asked for
    /// `stream_options.include_usage`, and `[DONE]`.
    fn event(&self, index: usize) -> Option<Bytes> {
        let first = self.first_token_event();
        let finish = first + self.tokens;
        let usage = finish + 1;
        let done = usage + usize::from(self.include_usage);
        let chunk = match index {
            0 if self.api == Api::Chat && self.tool_call.is_some() => self.chunk(json!([{
                "index": 0,
                "delta": {
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [self.tool_call_json("", true)],
                    "refusal": null,
                },
                "logprobs": null,
                "finish_reason": null,
            }])),
            0 if self.api == Api::Chat => self.chunk(json!([{
                "index": 0,
                "delta": { "role": "assistant", "content": "" },
                "logprobs": null,
                "finish_reason": null,
            }])),
            i if i < finish => self.token_chunk(i - first),
            i if i == finish => self.finish_chunk(),
            i if i == usage && self.include_usage => {
                let mut chunk = self.chunk(json!([]));
                chunk["usage"] = self.usage();
                chunk
            }
            i if i == done => return Some(Bytes::from_static(b"data: [DONE]\n\n")),
            _ => return None,
        };
        Some(data_event(&chunk))
    }
}

impl Generation {
    fn token_chunk(&self, index: usize) -> Value {
        if self.tool_call.is_some() {
            return self.chunk(json!([{
                "index": 0,
                "delta": { "tool_calls": [{
                    "index": 0,
                    "function": { "arguments": text::tool_argument_piece(index) },
                }] },
                "logprobs": null,
                "finish_reason": null,
            }]));
        }
        let token = text::token(self.seed, index);
        self.chunk(match self.api {
            Api::Chat => json!([{
                "index": 0,
                "delta": { "content": token },
                "logprobs": null,
                "finish_reason": null,
            }]),
            Api::Completion => json!([{
                "text": token,
                "index": 0,
                "logprobs": null,
                "finish_reason": null,
            }]),
        })
    }

    fn finish_chunk(&self) -> Value {
        self.chunk(match self.api {
            Api::Chat => json!([{
                "index": 0,
                "delta": {},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }]),
            Api::Completion => json!([{
                "text": "",
                "index": 0,
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }]),
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": CREATED,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        })
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.tokens,
            "total_tokens": self.prompt_tokens + self.tokens as u64,
        })
    }
}

/// The hasher of a chat conversation, which chooses the words of its answer.
/// The other dialects hash their conversation as the equivalent chat
/// messages, so the same conversation gets the same words in every dialect.
pub(crate) fn conversation_hasher<'a>(messages: impl IntoIterator<Item = &'a Value>) -> Hasher {
    let mut hasher = Hasher::new();
    hasher.write(b"chat");
    for message in messages {
        hash_message(&mut hasher, message);
    }
    hasher
}

/// The text of a message's `content`: the string, or its parts' `text`
/// strings joined by newlines.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The function a chat request's answer calls: its first tool's, when its
/// last message is the user's and mentions the weather.
fn chat_tool_call(request: &serde_json::Map<String, Value>, messages: &[Value]) -> Option<String> {
    let tools = request.get("tools").and_then(Value::as_array)?;
    let name = tools.first()?.get("function")?.get("name")?.as_str()?;
    let last = messages.last()?;
    let asks = last.get("role").and_then(Value::as_str) == Some("user")
        && text::mentions_weather(&content_text(last.get("content")));
    asks.then(|| name.to_owned())
}

/// Hashes a chat message's role and the text of its content.
fn hash_message(hasher: &mut Hasher, message: &Value) {
    let role = message.get("role").and_then(Value::as_str).unwrap_or("");
    hasher.write(role.as_bytes());
    match message.get("content") {
        Some(Value::Array(parts)) => {
            for part in parts {
                match part.get("text") {
                    Some(text) => hash_text(hasher, text),
                    None => hash_text(hasher, part),
                }
            }
        }
        Some(content) => hash_text(hasher, content),
        None => hasher.write(b""),
    }
}

/// Hashes a string's text, or any other JSON value's serialisation.
fn hash_text(hasher: &mut Hasher, value: &Value) {
    match value {
        Value::String(text) => hasher.write(text.as_bytes()),
        other => hasher.write(other.to_string().as_bytes()),
    }
}

/// The request's `model`, or `default` when it names none.
pub(crate) fn request_model(body: &Value, default: &str) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_owned()
}

/// The answer to a `/embeddings` request: one vector per input.
pub(crate) fn embeddings(
    body: &Value,
    default_model: &str,
    fingerprint: &str,
) -> Result<Value, ApiError> {
    let missing = || {
        ApiError::bad_request(
            "missing required parameter: 'input' (a string or an array)",
            Some("input"),
        )
    };
    let input = body.get("input").ok_or_else(missing)?;
    let inputs: Vec<Vec<u8>> = match input {
        Value::String(text) => vec![text.as_bytes().to_vec()],
        // An array of token ids is one input.
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![input.to_string().into_bytes()]
        }
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.as_bytes().to_vec(),
                other => other.to_string().into_bytes(),
            })
            .collect(),
        _ => return Err(missing()),
    };
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(value) => value
            .as_u64()
            .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!("'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}"),
                    Some("dimensions"),
                )
            })?,
    };
    let prompt_tokens: u64 = inputs.iter().map(|i| text::estimate_tokens(i.len())).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            json!({
                "object": "embedding",
                "index": index,
                "embedding": text::embedding(input, dimensions as usize),
            })
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": request_model(body, default_model),
        "system_fingerprint": fingerprint,
        "usage": { "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens },
    }))
}

/// One entry of `GET /models`.
pub(crate) fn model(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": CREATED, "owned_by": "mock" })
}

/// The answer to `GET /models`.
pub(crate) fn model_list(ids: &[&str]) -> Value {
    let data: Vec<Value> = ids.iter().map(|id| model(id)).collect();
    json!({ "object": "list", "data": data })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: GenerationParams<'static> = GenerationParams {
        tokens: 4,
        default_model: "mock-model",
        fingerprint: "fp",
    };

    fn chat(body: Value) -> Generation {
        let len = body.to_string().len();
        Generation::parse(Api::Chat, &body, len, &PARAMS).expect("valid request")
    }

    #[test]
    fn max_tokens_caps_and_finishes_with_length() {
        let g = chat(json!({"model": "m", "messages": [], "max_tokens": 2}));
        let answer = g.to_json();
        assert_eq!(answer["choices"][0]["finish_reason"], "length");
        assert_eq!(answer["usage"]["completion_tokens"], 2);
        let g = chat(json!({"messages": [], "max_completion_tokens": 10}));
        let answer = g.to_json();
        assert_eq!(answer["choices"][0]["finish_reason"], "stop");
        assert_eq!(answer["model"], "mock-model");
    }

    #[test]
    fn content_parts_hash_like_their_text() {
        let plain = chat(json!({"messages": [{"role": "user", "content": "hi"}]}));
        let parts = chat(
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        );
        assert_eq!(plain.seed, parts.seed);
        let other = chat(json!({"messages": [{"role": "user", "content": "ho"}]}));
        assert_ne!(plain.seed, other.seed);
    }

    #[test]
    fn completion_stream_has_no_role_chunk() {
        let body = json!({"prompt": "x", "stream": true});
        let g = Generation::parse(Api::Completion, &body, 10, &PARAMS).expect("valid request");
        let events: Vec<Bytes> = (0..).map_while(|i| g.event(i)).collect();
        // 4 tokens, finish, [DONE].
        assert_eq!(events.len(), 6);
        assert!(g.is_token_event(0) && !g.is_token_event(4));
    }

    #[test]
    fn embeddings_accept_strings_arrays_and_tokens() {
        let one = embeddings(&json!({"input": "a"}), "m", "").expect("valid");
        assert_eq!(one["data"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            one["data"][0]["embedding"].as_array().map(Vec::len),
            Some(8)
        );
        let two =
            embeddings(&json!({"input": ["a", "b"], "dimensions": 3}), "m", "").expect("valid");
        assert_eq!(two["data"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            two["data"][1]["embedding"].as_array().map(Vec::len),
            Some(3)
        );
        assert_eq!(
            one["data"][0]["embedding"][0],
            embeddings(&json!({"input": "a"}), "m", "").expect("valid")["data"][0]["embedding"][0]
        );
        let tokens = embeddings(&json!({"input": [1, 2, 3]}), "m", "").expect("valid");
        assert_eq!(tokens["data"].as_array().map(Vec::len), Some(1));
        assert!(embeddings(&json!({"input": []}), "m", "").is_err());
        assert!(embeddings(&json!({"model": "m"}), "m", "").is_err());
        assert!(embeddings(&json!({"input": "a", "dimensions": 0}), "m", "").is_err());
    }
}
