//! The output items of a streamed Responses answer and the events that
//! describe them, numbered by [`Events`].

use serde::Serialize;
use serde_json::{Value, json};

use super::text_part;
use crate::stream::{ArgumentsEnd, CallSoFar};
use crate::wire::write_event;

/// A `message` output item.
#[derive(Debug)]
pub(crate) struct Message {
    pub id: String,
    pub text: String,
}

/// A `function_call` output item.
#[derive(Debug)]
pub(crate) struct Call {
    pub id: String,
    pub call_id: String,
    /// `call_id` is the upstream's (not one made up for a call without).
    pub upstream_id: bool,
    pub name: String,
    pub arguments: String,
    /// Whether `arguments` are whole, to tell the next call at the same
    /// chat index from more of this one.
    pub arguments_end: ArgumentsEnd,
    /// The chat `index` of the tool call.
    pub chat_index: u64,
    /// `output_item.added` was sent (the name is known).
    pub added: bool,
    /// The namespace of a namespaced function (`name` is then its flat
    /// name), known once the name is.
    pub namespace: Option<String>,
}

impl Call {
    /// The item's `type`, `call_id`, `name` (and `namespace`) and
    /// `arguments`, as the client knows the function.
    fn item(&self, id: &str, status: &str, arguments: &str) -> Value {
        let mut item = json!({"id": id, "type": "function_call", "status": status,
            "call_id": self.call_id, "arguments": arguments});
        item["name"] = json!(self.client_name());
        if let Some(namespace) = &self.namespace {
            item["namespace"] = json!(namespace);
        }
        item
    }

    /// The function's name as the client knows it: without its namespace.
    pub(crate) fn client_name(&self) -> &str {
        self.namespace
            .as_deref()
            .and_then(|namespace| self.name.strip_prefix(namespace))
            .and_then(|rest| rest.strip_prefix(super::NAMESPACE_SEPARATOR))
            .unwrap_or(&self.name)
    }

    /// The call as [`is_another_call`](crate::stream::is_another_call)
    /// reads it.
    pub(crate) fn so_far(&self) -> CallSoFar<'_> {
        CallSoFar {
            id: &self.call_id,
            upstream_id: self.upstream_id,
            name: &self.name,
            arguments: &self.arguments_end,
        }
    }
}

/// An output item.
#[derive(Debug)]
pub(crate) enum Item {
    Message(Message),
    Call(Call),
}

impl Item {
    /// The item as it stands in `response.output` once finished; `status`
    /// is the response's for the last item (the one a limit cut, a call's
    /// arguments as much as a message's text), `completed` for the others.
    pub(crate) fn json(&self, status: &str) -> Value {
        let status = if status == "incomplete" {
            "incomplete"
        } else {
            "completed"
        };
        match self {
            Item::Message(m) => {
                json!({"id": m.id, "type": "message", "status": status, "role": "assistant",
                    "content": [text_part(&m.text)]})
            }
            Item::Call(c) => c.item(&c.id, status, &c.arguments),
        }
    }
}

/// Writes Responses events with their `sequence_number`s.
#[derive(Debug, Default)]
pub(crate) struct Events {
    next: u64,
}

#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    delta: &'a str,
    logprobs: [(); 0],
}

#[derive(Serialize)]
struct ArgumentsDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    delta: &'a str,
}

impl Events {
    fn take(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// An event built as JSON (the rarer ones).
    pub(crate) fn emit(&mut self, out: &mut Vec<u8>, name: &'static str, mut data: Value) {
        data["type"] = json!(name);
        data["sequence_number"] = json!(self.take());
        write_event(out, name, &data);
    }

    /// `response.output_text.delta` (typed: one per token).
    pub(crate) fn text_delta(
        &mut self,
        out: &mut Vec<u8>,
        item_id: &str,
        output_index: usize,
        delta: &str,
    ) {
        let kind = "response.output_text.delta";
        let event = TextDelta {
            kind,
            sequence_number: self.take(),
            item_id,
            output_index,
            content_index: 0,
            delta,
            logprobs: [],
        };
        write_event(out, kind, &event);
    }

    /// `response.function_call_arguments.delta` (typed: one per piece).
    pub(crate) fn arguments_delta(
        &mut self,
        out: &mut Vec<u8>,
        item_id: &str,
        output_index: usize,
        delta: &str,
    ) {
        let kind = "response.function_call_arguments.delta";
        let event = ArgumentsDelta {
            kind,
            sequence_number: self.take(),
            item_id,
            output_index,
            delta,
        };
        write_event(out, kind, &event);
    }

    /// `output_item.added` and, for a message, `content_part.added`.
    pub(crate) fn added(&mut self, out: &mut Vec<u8>, index: usize, item: &Item) {
        let json = match item {
            Item::Message(m) => {
                json!({"id": m.id, "type": "message", "status": "in_progress", "role": "assistant", "content": []})
            }
            Item::Call(c) => c.item(&c.id, "in_progress", ""),
        };
        self.emit(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": json}),
        );
        if let Item::Message(m) = item {
            let part = json!({"item_id": m.id, "output_index": index, "content_index": 0, "part": text_part("")});
            self.emit(out, "response.content_part.added", part);
        }
    }

    /// The `….done` events of a finished item, `output_item.done` last.
    pub(crate) fn done(&mut self, out: &mut Vec<u8>, index: usize, item: &Item, status: &str) {
        match item {
            Item::Message(m) => {
                let base = json!({"item_id": m.id, "output_index": index, "content_index": 0});
                let mut done = base.clone();
                done["text"] = json!(m.text);
                done["logprobs"] = json!([]);
                self.emit(out, "response.output_text.done", done);
                let mut part = base;
                part["part"] = text_part(&m.text);
                self.emit(out, "response.content_part.done", part);
            }
            Item::Call(c) => {
                let data = json!({"item_id": c.id, "output_index": index, "name": c.client_name(), "arguments": c.arguments});
                self.emit(out, "response.function_call_arguments.done", data);
            }
        }
        let data = json!({"output_index": index, "item": item.json(status)});
        self.emit(out, "response.output_item.done", data);
    }
}
