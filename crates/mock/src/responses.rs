//! OpenAI's Responses API: creating responses (whole or streamed), the
//! responses the mock remembers, token counting and compaction.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::openai::{self, CREATED, GenerationParams};
use crate::sse::{SseEvents, named_event};
use crate::text::{self, Hasher};

/// How many created responses the mock remembers; the oldest are forgotten
/// first.
pub(crate) const STORE_CAPACITY: usize = 1024;

/// The Responses API's state: the responses created (and stored) so far,
/// and the conversations (OpenAI's Conversations API) they may add to.
#[derive(Debug, Default)]
pub(crate) struct Responses {
    store: Mutex<Store>,
    /// Conversations, as [`Store`] keeps responses (the last 1024).
    conversations: Mutex<Store>,
    /// Responses created so far: makes every id unique.
    created: AtomicU64,
    /// The mock's name, in every id: two mocks (the demo's two upstreams)
    /// do not make the same ids.
    name: String,
}

#[derive(Debug, Default)]
struct Store {
    by_id: HashMap<String, Value>,
    /// Ids, oldest first.
    order: VecDeque<String>,
}

impl Store {
    fn insert(&mut self, response: Value) {
        let Some(id) = response
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return;
        };
        if self.by_id.insert(id.clone(), response).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > STORE_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<Value> {
        let removed = self.by_id.remove(id)?;
        self.order.retain(|kept| kept != id);
        Some(removed)
    }
}

impl Responses {
    /// The state of the mock named `name`.
    pub(crate) fn named(name: &str) -> Self {
        Responses {
            name: name.to_owned(),
            ..Responses::default()
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // Every update of the store leaves it consistent.
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn conversations(&self) -> std::sync::MutexGuard<'_, Store> {
        self.conversations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `POST /conversations`: a new conversation, with the request's
    /// `metadata` (the body may be empty).
    pub(crate) fn create_conversation(
        &self,
        body: &Value,
        bytes: &[u8],
    ) -> Result<Value, ApiError> {
        let metadata = match body {
            Value::Null => json!({}),
            body => object(body)?
                .get("metadata")
                .filter(|m| !m.is_null())
                .cloned()
                .unwrap_or_else(|| json!({})),
        };
        let unique = self.unique_seed(bytes);
        let conversation = json!({
            "id": format!("conv_{:016x}", text::derive(unique, b"conv")),
            "object": "conversation",
            "created_at": CREATED,
            "metadata": metadata,
        });
        self.conversations().insert(conversation.clone());
        Ok(conversation)
    }

    /// `GET /conversations/{id}`.
    pub(crate) fn get_conversation(&self, id: &str) -> Result<Value, ApiError> {
        self.conversations()
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| conversation_not_found(id, None))
    }

    /// `DELETE /conversations/{id}`.
    pub(crate) fn delete_conversation(&self, id: &str) -> Result<Value, ApiError> {
        self.conversations()
            .remove(id)
            .ok_or_else(|| conversation_not_found(id, None))?;
        Ok(json!({ "id": id, "object": "conversation.deleted", "deleted": true }))
    }

    /// `GET /conversations/{id}/items`: an empty list.
    pub(crate) fn conversation_items(&self, id: &str) -> Result<Value, ApiError> {
        self.get_conversation(id)?;
        Ok(empty_list())
    }

    /// The id of the conversation a create request adds to, which must be
    /// one this mock made (`conversation`: an id, or an object with `id`).
    fn check_conversation(&self, request: &Map<String, Value>) -> Result<(), ApiError> {
        let id = match request.get("conversation") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::String(id)) => id,
            Some(Value::Object(c)) => match c.get("id") {
                Some(Value::String(id)) => id,
                _ => return Err(bad_conversation()),
            },
            Some(_) => return Err(bad_conversation()),
        };
        if self.conversations().by_id.contains_key(id) {
            Ok(())
        } else {
            Err(conversation_not_found(id, Some("conversation")))
        }
    }

    /// A hash unique to this request: its body and how many responses came
    /// before it. Ids derive from it.
    fn unique_seed(&self, body: &[u8]) -> u64 {
        let count = self.created.fetch_add(1, Ordering::SeqCst);
        let mut hasher = Hasher::new();
        hasher.write(b"response");
        hasher.write(self.name.as_bytes());
        hasher.write(body);
        hasher.write(&count.to_le_bytes());
        hasher.finish()
    }

    /// `POST /responses`: the response to `body` (remembered unless the
    /// request says `"store": false`), to answer whole or stream.
    pub(crate) fn create(
        &self,
        body: &Value,
        bytes: &[u8],
        params: &GenerationParams<'_>,
    ) -> Result<ResponseGen, ApiError> {
        let request = object(body)?;
        let conversation = conversation(request)?;
        self.check_conversation(request)?;
        match request.get("previous_response_id") {
            None | Some(Value::Null) => {}
            Some(Value::String(previous)) => {
                if !self.store().by_id.contains_key(previous) {
                    return Err(ApiError::not_found_param(
                        format!("Previous response with id '{previous}' not found."),
                        Some("previous_response_id"),
                        Some("previous_response_not_found"),
                    ));
                }
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "Invalid type for 'previous_response_id': expected a string.",
                    Some("previous_response_id"),
                ));
            }
        }
        let seed = openai::conversation_hasher(&conversation).finish();
        let unique = self.unique_seed(bytes);
        let tool = function_call(request, &conversation);
        let cap = request.get("max_output_tokens").and_then(Value::as_u64);
        let (tokens, incomplete) = match cap {
            _ if tool.is_some() => (text::TOOL_ARGUMENT_TOKENS, false),
            Some(cap) if cap < params.tokens as u64 => (cap as usize, true),
            _ => (params.tokens, false),
        };
        let item_status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        let (item_id, item) = match &tool {
            Some(name) => {
                let id = format!("fc_{:016x}", text::derive(unique, b"fc"));
                let item = json!({
                    "type": "function_call",
                    "id": id,
                    "call_id": format!("call_{:016x}", text::derive(unique, b"call")),
                    "name": name,
                    "arguments": text::TOOL_ARGUMENTS,
                    "status": item_status,
                });
                (id, item)
            }
            None => {
                let id = format!("msg_{:016x}", text::derive(unique, b"msg"));
                let item = json!({
                    "type": "message",
                    "id": id,
                    "status": item_status,
                    "role": "assistant",
                    "content": [output_text(text::completion(seed, tokens))],
                });
                (id, item)
            }
        };
        let input_tokens = text::estimate_tokens(bytes.len());
        let echo = |key: &str, default: Value| {
            request
                .get(key)
                .filter(|value| !value.is_null())
                .cloned()
                .unwrap_or(default)
        };
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        let response = json!({
            "id": format!("resp_{unique:016x}"),
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "background": echo("background", json!(false)),
            "completed_at": if incomplete { Value::Null } else { json!(CREATED) },
            "conversation": match request.get("conversation") {
                Some(Value::String(id)) => json!({ "id": id }),
                Some(Value::Object(c)) => json!({ "id": c.get("id") }),
                _ => Value::Null,
            },
            "error": null,
            "incomplete_details": if incomplete {
                json!({ "reason": "max_output_tokens" })
            } else {
                Value::Null
            },
            "instructions": echo("instructions", Value::Null),
            "max_output_tokens": echo("max_output_tokens", Value::Null),
            "max_tool_calls": echo("max_tool_calls", Value::Null),
            "metadata": echo("metadata", json!({})),
            "model": openai::request_model(body, params.default_model),
            "output": [item],
            "parallel_tool_calls": echo("parallel_tool_calls", json!(true)),
            "previous_response_id": echo("previous_response_id", Value::Null),
            "prompt_cache_key": echo("prompt_cache_key", Value::Null),
            "reasoning": echo("reasoning", json!({ "effort": null, "summary": null })),
            "safety_identifier": echo("safety_identifier", Value::Null),
            "service_tier": "default",
            "store": echo("store", json!(true)),
            "temperature": echo("temperature", json!(1.0)),
            "text": echo("text", json!({ "format": { "type": "text" }, "verbosity": "medium" })),
            "tool_choice": echo("tool_choice", json!("auto")),
            "tools": echo("tools", json!([])),
            "top_logprobs": echo("top_logprobs", json!(0)),
            "top_p": echo("top_p", json!(1.0)),
            "truncation": echo("truncation", json!("disabled")),
            "usage": usage(input_tokens, tokens as u64),
            "user": echo("user", Value::Null),
        });
        if request.get("store").and_then(Value::as_bool) != Some(false) {
            self.store().insert(response.clone());
        }
        Ok(ResponseGen {
            response,
            seed,
            item_id,
            tokens,
            tool_name: tool,
            stream: request.get("stream").and_then(Value::as_bool) == Some(true),
        })
    }

    /// `GET /responses/{id}`.
    pub(crate) fn get(&self, id: &str) -> Result<Value, ApiError> {
        self.store()
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(id))
    }

    /// `DELETE /responses/{id}`.
    pub(crate) fn delete(&self, id: &str) -> Result<Value, ApiError> {
        self.store().remove(id).ok_or_else(|| not_found(id))?;
        Ok(json!({ "id": id, "object": "response", "deleted": true }))
    }

    /// `POST /responses/{id}/cancel`: the response, now `cancelled`.
    pub(crate) fn cancel(&self, id: &str) -> Result<Value, ApiError> {
        let mut store = self.store();
        let response = store.by_id.get_mut(id).ok_or_else(|| not_found(id))?;
        response["status"] = json!("cancelled");
        Ok(response.clone())
    }

    /// `GET /responses/{id}/input_items`: an empty list.
    pub(crate) fn input_items(&self, id: &str) -> Result<Value, ApiError> {
        self.get(id)?;
        Ok(empty_list())
    }

    /// `POST /responses/compact`: one compaction item standing for the
    /// conversation.
    pub(crate) fn compact(
        &self,
        body: &Value,
        bytes: &[u8],
        params: &GenerationParams<'_>,
    ) -> Result<Value, ApiError> {
        let request = object(body)?;
        let seed = openai::conversation_hasher(&conversation(request)?).finish();
        let unique = self.unique_seed(bytes);
        let input_tokens = text::estimate_tokens(bytes.len());
        Ok(json!({
            "id": format!("resp_{unique:016x}"),
            "object": "response.compaction",
            "created_at": CREATED,
            "output": [{
                "type": "compaction",
                "id": format!("cmp_{:016x}", text::derive(unique, b"cmp")),
                "encrypted_content": format!("mock-compaction-{seed:016x}"),
            }],
            "usage": usage(input_tokens, params.tokens as u64),
        }))
    }
}

/// `POST /responses/input_tokens`: the request's estimated input tokens.
pub(crate) fn input_tokens(body: &Value, body_len: usize) -> Result<Value, ApiError> {
    conversation(object(body)?)?;
    Ok(json!({
        "object": "response.input_tokens",
        "input_tokens": text::estimate_tokens(body_len),
    }))
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object", None))
}

fn empty_list() -> Value {
    json!({
        "object": "list",
        "data": [],
        "first_id": null,
        "last_id": null,
        "has_more": false,
    })
}

fn conversation_not_found(id: &str, param: Option<&'static str>) -> ApiError {
    ApiError::not_found_param(
        format!("Conversation with id '{id}' not found."),
        param,
        None,
    )
}

fn bad_conversation() -> ApiError {
    ApiError::bad_request(
        "Invalid type for 'conversation': expected a conversation id or an object with `id`.",
        Some("conversation"),
    )
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found_param(format!("Response with id '{id}' not found."), None, None)
}

/// The request's conversation as the equivalent chat messages:
/// `instructions` as a system message, then the `input` string as a user
/// message, or each input item (items without a role, such as function call
/// outputs, stand for themselves).
fn conversation(request: &Map<String, Value>) -> Result<Vec<Value>, ApiError> {
    let mut messages = Vec::new();
    if let Some(instructions) = request.get("instructions").filter(|i| !i.is_null()) {
        messages.push(json!({ "role": "system", "content": instructions }));
    }
    match request.get("input") {
        None | Some(Value::Null) => {}
        Some(Value::String(input)) => messages.push(json!({ "role": "user", "content": input })),
        Some(Value::Array(items)) => messages.extend(items.iter().map(|item| {
            if item.get("role").is_some() {
                item.clone()
            } else {
                let kind = item.get("type").cloned().unwrap_or(Value::Null);
                json!({ "role": kind, "content": item })
            }
        })),
        Some(_) => {
            return Err(ApiError::bad_request(
                "Invalid type for 'input': expected a string or an array of input items.",
                Some("input"),
            ));
        }
    }
    Ok(messages)
}

/// The function a response calls: the first function tool's, when the last
/// input is the user's and mentions the weather.
fn function_call(request: &Map<String, Value>, conversation: &[Value]) -> Option<String> {
    let name = request
        .get("tools")?
        .as_array()?
        .iter()
        .find(|tool| tool.get("type").and_then(Value::as_str) == Some("function"))?
        .get("name")?
        .as_str()?;
    let last = conversation.last()?;
    let asks = last.get("role").and_then(Value::as_str) == Some("user")
        && text::mentions_weather(&openai::content_text(last.get("content")));
    asks.then(|| name.to_owned())
}

fn output_text(text: String) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

fn usage(input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "input_tokens_details": { "cached_tokens": 0, "cache_write_tokens": 0 },
        "output_tokens": output_tokens,
        "output_tokens_details": { "reasoning_tokens": 0 },
        "total_tokens": input_tokens + output_tokens,
    })
}

/// A created response, answered whole or streamed as Responses API events.
#[derive(Debug)]
pub(crate) struct ResponseGen {
    /// The finished response (`completed` or `incomplete`).
    response: Value,
    seed: u64,
    /// The id of the output item.
    item_id: String,
    /// Output tokens: words, or pieces of the function call's arguments.
    tokens: usize,
    /// The function the response calls instead of answering text.
    tool_name: Option<String>,
    /// The request asked for `"stream": true`.
    pub(crate) stream: bool,
}

/// Events before the first token: `response.created`, `response.in_progress`,
/// `response.output_item.added` and, for text, `response.content_part.added`.
const TEXT_PREAMBLE: usize = 4;
const TOOL_PREAMBLE: usize = 3;

impl ResponseGen {
    /// The finished response, as answered when not streaming.
    pub(crate) fn into_json(self) -> Value {
        self.response
    }

    fn preamble(&self) -> usize {
        if self.tool_name.is_some() {
            TOOL_PREAMBLE
        } else {
            TEXT_PREAMBLE
        }
    }

    /// The response as first streamed: in progress, without output or usage.
    fn in_progress(&self) -> Value {
        let mut response = self.response.clone();
        response["status"] = json!("in_progress");
        response["completed_at"] = Value::Null;
        response["incomplete_details"] = Value::Null;
        response["output"] = json!([]);
        response["usage"] = Value::Null;
        response
    }

    fn item(&self) -> &Value {
        &self.response["output"][0]
    }

    /// The output item as first streamed: in progress, empty.
    fn item_in_progress(&self) -> Value {
        let mut item = self.item().clone();
        item["status"] = json!("in_progress");
        if self.tool_name.is_some() {
            item["arguments"] = json!("");
        } else {
            item["content"] = json!([]);
        }
        item
    }

    /// The type and payload of event `index`.
    fn payload(&self, index: usize) -> Option<(&'static str, Value)> {
        let first = self.preamble();
        let end = first + self.tokens;
        let in_item = |mut value: Value| {
            value["item_id"] = json!(self.item_id);
            value["output_index"] = json!(0);
            value
        };
        let in_part = |mut value: Value| {
            value["content_index"] = json!(0);
            in_item(value)
        };
        let text = &self.item()["content"][0];
        Some(match index {
            0 => (
                "response.created",
                json!({ "response": self.in_progress() }),
            ),
            1 => (
                "response.in_progress",
                json!({ "response": self.in_progress() }),
            ),
            2 => (
                "response.output_item.added",
                json!({ "output_index": 0, "item": self.item_in_progress() }),
            ),
            3 if self.tool_name.is_none() => (
                "response.content_part.added",
                in_part(json!({ "part": output_text(String::new()) })),
            ),
            i if i < end => match self.tool_name {
                Some(_) => (
                    "response.function_call_arguments.delta",
                    in_item(json!({ "delta": text::tool_argument_piece(i - first) })),
                ),
                None => (
                    "response.output_text.delta",
                    in_part(json!({
                        "delta": text::token(self.seed, i - first),
                        "logprobs": [],
                    })),
                ),
            },
            i if i == end => match &self.tool_name {
                Some(name) => (
                    "response.function_call_arguments.done",
                    in_item(json!({ "name": name, "arguments": text::TOOL_ARGUMENTS })),
                ),
                None => (
                    "response.output_text.done",
                    in_part(json!({ "text": text["text"], "logprobs": [] })),
                ),
            },
            i if i == end + 1 && self.tool_name.is_none() => (
                "response.content_part.done",
                in_part(json!({ "part": text })),
            ),
            i if i == self.last_event() - 1 => (
                "response.output_item.done",
                json!({ "output_index": 0, "item": self.item() }),
            ),
            i if i == self.last_event() => {
                let kind = if self.response["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                (kind, json!({ "response": self.response }))
            }
            _ => return None,
        })
    }

    /// Event `index` as its JSON object, with its `type` and
    /// `sequence_number`: an SSE event's data, or a WebSocket message.
    pub(crate) fn data(&self, index: usize) -> Option<Value> {
        let (kind, mut data) = self.payload(index)?;
        data["type"] = json!(kind);
        data["sequence_number"] = json!(index);
        Some(data)
    }

    /// The index of the last event: `response.completed` (or
    /// `response.incomplete`).
    fn last_event(&self) -> usize {
        let done_events = if self.tool_name.is_some() { 2 } else { 3 };
        self.preamble() + self.tokens + done_events
    }
}

impl SseEvents for ResponseGen {
    fn is_token_event(&self, index: usize) -> bool {
        let first = self.preamble();
        index >= first && index < first + self.tokens
    }

    /// Event `index`, as `event: <type>` and `data:` with the `type` and
    /// `sequence_number`. Text answers stream `response.created`,
    /// `response.in_progress`, `response.output_item.added`,
    /// `response.content_part.added`, one `response.output_text.delta` per
    /// token, `response.output_text.done`, `response.content_part.done`,
    /// `response.output_item.done` and `response.completed` (or
    /// `response.incomplete` when `max_output_tokens` cut it short). Function
    /// calls stream `response.function_call_arguments.delta` pieces and
    /// `response.function_call_arguments.done` instead of the content part
    /// and text events. There is no `[DONE]`.
    fn event(&self, index: usize) -> Option<Bytes> {
        let data = self.data(index)?;
        let kind = data["type"].as_str().unwrap_or_default();
        Some(named_event(kind, &data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: GenerationParams<'static> = GenerationParams {
        tokens: 3,
        default_model: "mock-model",
        fingerprint: "",
    };

    fn create(responses: &Responses, body: Value) -> ResponseGen {
        let bytes = body.to_string();
        responses
            .create(&body, bytes.as_bytes(), &PARAMS)
            .expect("valid request")
    }

    #[test]
    fn the_store_forgets_the_oldest() {
        let responses = Responses::default();
        let first = create(&responses, json!({"input": "a"})).into_json();
        for _ in 0..STORE_CAPACITY {
            create(&responses, json!({"input": "a"}));
        }
        let id = first["id"].as_str().expect("id");
        assert!(responses.get(id).is_err());
        assert_eq!(responses.store().by_id.len(), STORE_CAPACITY);
        assert_eq!(responses.store().order.len(), STORE_CAPACITY);
    }

    #[test]
    fn instructions_and_input_hash_like_chat_messages() {
        let responses = Responses::default();
        let answer = create(
            &responses,
            json!({"instructions": "be brief", "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}
            ]}),
        )
        .into_json();
        let chat = json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ]);
        let seed = openai::conversation_hasher(chat.as_array().expect("array")).finish();
        assert_eq!(
            answer["output"][0]["content"][0]["text"],
            text::completion(seed, 3)
        );
    }

    #[test]
    fn streamed_events_number_themselves() {
        let responses = Responses::default();
        let generation = create(&responses, json!({"input": "a", "stream": true}));
        let events: Vec<Bytes> = (0..).map_while(|i| generation.event(i)).collect();
        assert_eq!(events.len(), 8 + 3);
        let function = create(
            &responses,
            json!({"input": "weather?", "tools": [{"type": "function", "name": "w"}]}),
        );
        let events: Vec<Bytes> = (0..).map_while(|i| function.event(i)).collect();
        assert_eq!(events.len(), 6 + text::TOOL_ARGUMENT_TOKENS);
    }
}
