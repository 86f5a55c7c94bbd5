//! Chat chunks as Responses events, one upstream event at a time.
//!
//! `response.created` and `response.in_progress` come first (on the first
//! chunk). Text opens a `message` item (`response.output_item.added`,
//! `response.content_part.added`) and streams `response.output_text.delta`;
//! a tool call opens a `function_call` item once its name is known and its
//! arguments begin (or another item comes, or the end), and streams
//! `response.function_call_arguments.delta`. Items are produced one
//! after another; each is finished (`….done` events, `output_item.done`)
//! before the next opens. At the upstream's `[DONE]`, `response.completed`
//! (or `response.incomplete` for `length` and `content_filter`) carries the
//! whole output and the usage. Every event has a `sequence_number`.
//! Reasoning text is dropped; a refusal streams as text.

use llm_proxy_core::INTERRUPTED_CODE;
use llm_proxy_core::sse::Event;
use serde::Serialize;

use super::items::{Call, Events, Item, Message, Output};
use super::response::item_id;
use super::{Context, ResponseObject, ResponsesUsage, call_id, status};
use crate::chat::{Chunk, Delta, ToolCallDelta, Usage, read_chunk};
use crate::stream::{
    ArgumentsEnd, MAX_BLOCKS, MAX_HELD_BYTES, Step, chat_index, is_another_call, join_name,
};
use crate::wire::{bare_id, now_secs, restyle_id, upstream_model};

/// The state of one translated stream.
#[derive(Debug)]
pub(crate) struct ChatToResponses {
    ctx: Context,
    id: String,
    model: String,
    created_at: u64,
    events: Events,
    started: bool,
    finished: bool,
    items: Vec<Item>,
    /// The status each finished item's `output_item.done` gave it, by
    /// output index: the final response says the same of it.
    done: Vec<&'static str>,
    /// The item being produced (its output index).
    open: Option<usize>,
    finish: Option<String>,
    usage: Option<Usage>,
    /// Bytes of output held in `items`: text, and calls' arguments, names
    /// and upstream ids (bounded by [`MAX_HELD_BYTES`]).
    held: usize,
}

impl ChatToResponses {
    /// A stream for a request with this context.
    pub(crate) fn new(ctx: Context) -> Self {
        ChatToResponses {
            model: ctx.model.clone(),
            ctx,
            // Set by `start`.
            id: String::new(),
            created_at: now_secs(),
            events: Events::default(),
            started: false,
            finished: false,
            items: Vec::new(),
            done: Vec::new(),
            open: None,
            finish: None,
            usage: None,
            held: 0,
        }
    }

    /// Whether the final `response.completed` has been sent.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// `response.created` and `response.in_progress`, unless they went
    /// out already.
    /// The `error` event that ends a stream broken by `reason`, after
    /// `response.created` should nothing have come yet; numbered.
    pub(crate) fn interrupted(&mut self, reason: &str, out: &mut Vec<u8>) {
        if !self.started {
            self.start(&Chunk::default(), out);
        }
        let error = Interrupted {
            code: INTERRUPTED_CODE,
            message: reason,
            param: (),
        };
        self.events.emit(out, "error", error);
    }

    /// Translate one upstream event.
    pub(crate) fn event(&mut self, event: &Event, out: &mut Vec<u8>) -> Step {
        let chunk = match read_chunk(event) {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return self.end(out),
            Err(reason) => return Step::Fail(reason),
        };
        // A chunk without choices or a usable id (Azure opens with a
        // prompt-filter chunk whose id and model are empty) does not name
        // the response: the next one may.
        if !self.started
            && (bare_id(chunk.id.as_deref()).is_some()
                || chunk.choices.as_ref().is_some_and(|c| !c.is_empty()))
        {
            self.start(&chunk, out);
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        for choice in chunk
            .choices
            .iter()
            .flatten()
            .filter(|c| c.index.unwrap_or(0) == 0)
        {
            if let Some(delta) = &choice.delta
                && let Step::Fail(why) = self.delta(delta, out)
            {
                return Step::Fail(why);
            }
            // (An empty one, as some servers send, is none.)
            if let Some(reason) = choice.finish_reason.as_deref().filter(|r| !r.is_empty()) {
                if let Some(why) = crate::chat::failed_finish(reason) {
                    return Step::Fail(why);
                }
                self.finish = Some(reason.to_owned());
                self.close(out);
            }
        }
        if self.held > MAX_HELD_BYTES {
            return Step::Fail(format!(
                "the upstream's answer is larger than {MAX_HELD_BYTES} bytes"
            ));
        }
        Step::Continue
    }

    /// `response.created` and the others that carry the whole `response`
    /// as it stands.
    fn emit_response(
        &mut self,
        out: &mut Vec<u8>,
        name: &'static str,
        status: &str,
        incomplete: Option<&str>,
        usage: Option<ResponsesUsage>,
    ) {
        let response = ResponseObject {
            ctx: &self.ctx,
            id: &self.id,
            created_at: self.created_at,
            model: &self.model,
            status,
            incomplete,
            output: Output {
                items: &self.items,
                done: &self.done,
                status,
            },
            usage,
        };
        self.events.emit(out, name, ResponseEvent { response });
    }

    fn start(&mut self, chunk: &Chunk<'_>, out: &mut Vec<u8>) {
        self.started = true;
        self.id = restyle_id("resp_", chunk.id.as_deref());
        if let Some(model) = upstream_model(chunk.model.as_deref()) {
            self.model = model.to_string();
        }
        if let Some(created) = chunk.created {
            self.created_at = created;
        }
        for name in ["response.created", "response.in_progress"] {
            self.emit_response(out, name, "in_progress", None, None);
        }
    }

    fn item_id(&self, prefix: &str, index: usize) -> String {
        item_id(prefix, self.id.trim_start_matches("resp_"), index)
    }

    fn delta(&mut self, delta: &Delta<'_>, out: &mut Vec<u8>) -> Step {
        for text in delta.texts() {
            if let Err(why) = self.text(text, out) {
                return Step::Fail(why);
            }
        }
        let legacy = delta.legacy_call();
        for call in delta.tool_calls.iter().flatten().chain(&legacy) {
            match self.call_index(call, out) {
                Ok(index) => self.call_delta(index, call, out),
                Err(why) => return Step::Fail(why),
            }
        }
        Step::Continue
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) -> Result<(), String> {
        let index = match self.open {
            Some(i) if matches!(self.items[i], Item::Message(_)) => i,
            _ if self.items.len() >= MAX_BLOCKS => {
                return Err(format!(
                    "the upstream started output item {} but a response may have at most \
                     {MAX_BLOCKS}",
                    self.items.len()
                ));
            }
            _ => {
                self.close(out);
                let index = self.items.len();
                let item = Item::Message(Message {
                    id: self.item_id("msg", index),
                    text: String::new(),
                });
                self.events.added(out, index, &item);
                self.items.push(item);
                self.open = Some(index);
                index
            }
        };
        self.held += text.len();
        if let Item::Message(m) = &mut self.items[index] {
            m.text.push_str(text);
            self.events.text_delta(out, &m.id, index, text);
        }
        Ok(())
    }

    /// The output index of the call this delta belongs to, opening a new
    /// call item when it is the first piece of a call.
    fn call_index(&mut self, call: &ToolCallDelta<'_>, out: &mut Vec<u8>) -> Result<usize, String> {
        let calls = self.items.iter().filter_map(|i| match i {
            Item::Call(c) => Some((c.chat_index, c.call_id.as_str())),
            Item::Message(_) => None,
        });
        let chat_index = chat_index(call, calls, self.items.len() as u64);
        // The newest call at that index, unless the delta starts another
        // there (Ollama and Gemini number every call of a turn 0).
        let found = self
            .items
            .iter()
            .rposition(|i| matches!(i, Item::Call(c) if c.chat_index == chat_index))
            .filter(
                |&i| !matches!(&self.items[i], Item::Call(c) if is_another_call(&c.so_far(), call)),
            );
        match found {
            Some(i) if self.open != Some(i) => Err(format!(
                "the upstream went back to tool call {chat_index} after starting another"
            )),
            Some(i) => Ok(i),
            None if self.items.len() >= MAX_BLOCKS => Err(format!(
                "the upstream started a tool call after {MAX_BLOCKS} output items; \
                 a response may have at most that many"
            )),
            None => {
                self.close(out);
                let call = Call {
                    id: String::new(),
                    call_id: String::new(),
                    upstream_id: false,
                    name: String::new(),
                    arguments: String::new(),
                    arguments_end: ArgumentsEnd::default(),
                    chat_index,
                    added: false,
                    namespace: None,
                };
                self.items.push(Item::Call(call));
                self.open = Some(self.items.len() - 1);
                Ok(self.items.len() - 1)
            }
        }
    }

    /// Apply one piece of a call: its id, name and arguments. A call is
    /// announced (`output_item.added`) once its name is known.
    fn call_delta(&mut self, index: usize, delta: &ToolCallDelta<'_>, out: &mut Vec<u8>) {
        let function = delta.function.as_ref();
        let fragment = function.and_then(|f| f.arguments.as_deref()).unwrap_or("");
        let Item::Call(call) = &mut self.items[index] else {
            return;
        };
        if let (true, Some(id)) = (call.call_id.is_empty(), &delta.id)
            && !id.is_empty()
        {
            call.call_id = id.to_string();
            call.upstream_id = true;
            self.held += id.len();
        }
        call.arguments.push_str(fragment);
        call.arguments_end.push(fragment);
        self.held += fragment.len();
        if call.added {
            if !fragment.is_empty() {
                self.events.arguments_delta(out, &call.id, index, fragment);
            }
            return;
        }
        if let Some(name) = function.and_then(|f| f.name.as_deref()) {
            let before = call.name.len();
            join_name(&mut call.name, name);
            self.held += call.name.len() - before;
        }
        // Announced with its name, which may still be coming in pieces until
        // the arguments begin (or another item, or the end: `close`).
        if !call.name.is_empty() && !call.arguments.is_empty() {
            self.announce(index, out);
        }
    }

    /// `output_item.added` for a call, then the arguments that came before
    /// its name.
    fn announce(&mut self, index: usize, out: &mut Vec<u8>) {
        let id = self.item_id("fc", index);
        let Some(Item::Call(call)) = self.items.get(index) else {
            return;
        };
        // Not yet added, the call cannot take its own id.
        let call_id = call_id(Some(&call.call_id), |id| {
            self.items
                .iter()
                .any(|item| matches!(item, Item::Call(c) if c.added && c.call_id == id))
        });
        let Item::Call(call) = &mut self.items[index] else {
            return;
        };
        call.added = true;
        call.id = id;
        call.call_id = call_id;
        call.namespace = self.ctx.client_name(&call.name).1.map(str::to_owned);
        let pending = call.arguments.clone();
        self.events.added(out, index, &self.items[index]);
        if !pending.is_empty() {
            let id = self.item_id("fc", index);
            self.events.arguments_delta(out, &id, index, &pending);
        }
    }

    /// Finish the open item: its `….done` events.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some(index) = self.open.take() else {
            return;
        };
        if matches!(&self.items[index], Item::Call(c) if !c.added) {
            self.announce(index, out);
        }
        // A call with no arguments has `{}`, as a whole answer's does:
        // clients parse them as JSON, and `""` is not.
        if let Item::Call(c) = &mut self.items[index]
            && c.arguments.is_empty()
        {
            c.arguments.push_str("{}");
            let id = self.item_id("fc", index);
            self.events.arguments_delta(out, &id, index, "{}");
        }
        let (status, _) = status(self.finish.as_deref());
        self.events.done(out, index, &self.items[index], status);
        // Items are finished in order, each before the next opens.
        self.done.resize(index, "completed");
        self.done.push(status);
    }

    /// The upstream's `[DONE]`: the final response event (a failure when
    /// the answer never finished).
    fn end(&mut self, out: &mut Vec<u8>) -> Step {
        if self.finished {
            return Step::Continue;
        }
        if self.finish.is_none() {
            return Step::Fail(crate::chat::UNFINISHED.into());
        }
        if !self.started {
            self.start(&Chunk::default(), out);
        }
        self.close(out);
        let (status, incomplete) = status(self.finish.as_deref());
        let usage = self.usage.as_ref().map(Into::into);
        let name = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.emit_response(out, name, status, incomplete, usage);
        self.finished = true;
        Step::Continue
    }
}

/// The events that carry the `response` object.
#[derive(Serialize)]
struct ResponseEvent<'a> {
    response: ResponseObject<'a, Output<'a>>,
}

/// The `error` event of a broken stream.
#[derive(Serialize)]
struct Interrupted<'a> {
    code: &'a str,
    message: &'a str,
    param: (),
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
