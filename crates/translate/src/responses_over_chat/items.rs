//! The output items of a streamed Responses answer and the events that
//! describe them, numbered by [`Events`].

use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};

use super::TextPart;
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

/// An item as an event or a `response` object writes it: as it was
/// opened (no text, no arguments yet) or as it stands.
pub(crate) struct ItemOut<'a> {
    pub item: &'a Item,
    pub status: &'a str,
    /// With its text or arguments (`false`: as `output_item.added` says
    /// it, before any came).
    pub whole: bool,
}

impl Serialize for ItemOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.item {
            Item::Message(m) => {
                let mut item = serializer.serialize_struct("Message", 5)?;
                item.serialize_field("id", &m.id)?;
                item.serialize_field("type", "message")?;
                item.serialize_field("status", self.status)?;
                item.serialize_field("role", "assistant")?;
                let part = TextPart::new(&m.text);
                let content: &[TextPart<'_>] = if self.whole {
                    std::slice::from_ref(&part)
                } else {
                    &[]
                };
                item.serialize_field("content", content)?;
                item.end()
            }
            Item::Call(c) => {
                let mut item = serializer.serialize_struct("FunctionCall", 7)?;
                item.serialize_field("id", &c.id)?;
                item.serialize_field("type", "function_call")?;
                item.serialize_field("status", self.status)?;
                item.serialize_field("call_id", &c.call_id)?;
                let arguments = if self.whole { c.arguments.as_str() } else { "" };
                item.serialize_field("arguments", arguments)?;
                item.serialize_field("name", c.client_name())?;
                if let Some(namespace) = &c.namespace {
                    item.serialize_field("namespace", namespace)?;
                } else {
                    item.skip_field("namespace")?;
                }
                item.end()
            }
        }
    }
}

/// The status a finished item has in `response.output`: the response's
/// for the last item (the one a limit cut, a call's arguments as much as a
/// message's text), `completed` for the others.
pub(crate) fn finished_status(status: &str) -> &'static str {
    if status == "incomplete" {
        "incomplete"
    } else {
        "completed"
    }
}

/// `response.output` as it stands: each item as its `output_item.done`
/// said it (`done`, by output index); one still open has `status`.
pub(crate) struct Output<'a> {
    pub items: &'a [Item],
    pub done: &'a [&'static str],
    pub status: &'a str,
}

impl Serialize for Output<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.items.len()))?;
        for (i, item) in self.items.iter().enumerate() {
            let status = finished_status(self.done.get(i).copied().unwrap_or(self.status));
            seq.serialize_element(&ItemOut {
                item,
                status,
                whole: true,
            })?;
        }
        seq.end()
    }
}

/// Writes Responses events with their `sequence_number`s.
#[derive(Debug, Default)]
pub(crate) struct Events {
    next: u64,
}

/// An event's own fields, then its `type` and `sequence_number`.
#[derive(Serialize)]
struct Numbered<T> {
    #[serde(flatten)]
    data: T,
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
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

/// `output_item.added` and `output_item.done`.
#[derive(Serialize)]
struct ItemEvent<'a> {
    output_index: usize,
    item: ItemOut<'a>,
}

/// `content_part.added` and `content_part.done`.
#[derive(Serialize)]
struct PartEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    part: TextPart<'a>,
}

/// `output_text.done`.
#[derive(Serialize)]
struct TextDone<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    text: &'a str,
    logprobs: [(); 0],
}

/// `function_call_arguments.done`.
#[derive(Serialize)]
struct ArgumentsDone<'a> {
    item_id: &'a str,
    output_index: usize,
    name: &'a str,
    arguments: &'a str,
}

impl Events {
    fn take(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }

    /// An event of its own fields `data`, numbered. `data` serialises as
    /// a struct or a map (its fields are the event's) without a `type` or
    /// `sequence_number` of its own.
    pub(crate) fn emit(&mut self, out: &mut Vec<u8>, name: &'static str, data: impl Serialize) {
        let event = Numbered {
            data,
            kind: name,
            sequence_number: self.take(),
        };
        write_event(out, name, &event);
    }

    /// `response.output_text.delta` (one per token).
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

    /// `response.function_call_arguments.delta` (one per piece).
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
        let added = ItemEvent {
            output_index: index,
            item: ItemOut {
                item,
                status: "in_progress",
                whole: false,
            },
        };
        self.emit(out, "response.output_item.added", added);
        if let Item::Message(m) = item {
            let part = PartEvent {
                item_id: &m.id,
                output_index: index,
                content_index: 0,
                part: TextPart::new(""),
            };
            self.emit(out, "response.content_part.added", part);
        }
    }

    /// The `….done` events of a finished item, `output_item.done` last.
    pub(crate) fn done(&mut self, out: &mut Vec<u8>, index: usize, item: &Item, status: &str) {
        match item {
            Item::Message(m) => {
                let done = TextDone {
                    item_id: &m.id,
                    output_index: index,
                    content_index: 0,
                    text: &m.text,
                    logprobs: [],
                };
                self.emit(out, "response.output_text.done", done);
                let part = PartEvent {
                    item_id: &m.id,
                    output_index: index,
                    content_index: 0,
                    part: TextPart::new(&m.text),
                };
                self.emit(out, "response.content_part.done", part);
            }
            Item::Call(c) => {
                let done = ArgumentsDone {
                    item_id: &c.id,
                    output_index: index,
                    name: c.client_name(),
                    arguments: &c.arguments,
                };
                self.emit(out, "response.function_call_arguments.done", done);
            }
        }
        let done = ItemEvent {
            output_index: index,
            item: ItemOut {
                item,
                status: finished_status(status),
                whole: true,
            },
        };
        self.emit(out, "response.output_item.done", done);
    }
}
