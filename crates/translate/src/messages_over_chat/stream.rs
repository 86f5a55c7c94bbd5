//! Chat chunks as Anthropic stream events, one upstream event at a time.
//!
//! The rules Anthropic clients rely on, and which this state machine keeps
//! by construction:
//!
//! - `message_start` exactly once, before anything else;
//! - blocks one after another: `content_block_start` before any delta of a
//!   block, the previous block stopped (once) before the next starts, block
//!   indexes 0, 1, 2 …;
//! - reasoning text only ever in `thinking` blocks (and only when the client
//!   enabled thinking), never inside a text block;
//! - tool calls as `tool_use` blocks with `input_json_delta` pieces; a tool
//!   call starts once its name is known and its arguments begin (arguments
//!   that came before the name are sent then; a name may come in pieces), or
//!   when another block comes or the message ends;
//! - at the upstream's `[DONE]`: every block stopped, one `message_delta`
//!   with the stop reason and usage (`input_tokens` too: chat reports them
//!   only at the end), one `message_stop`.
//!
//! Chat servers stream tool calls one after another. One that went back to
//! an earlier tool call after starting the next would need two open blocks,
//! which Anthropic streams cannot express: the stream then ends with an error
//! event rather than a wrong tool call.

use llm_proxy_core::sse::Event;
use serde::Serialize;

use super::{Context, stop_reason, tool_use_id};
use crate::chat::{Delta, ToolCallDelta, Usage, read_chunk};
use crate::stream::{
    ArgumentsEnd, CallSoFar, MAX_BLOCKS, MAX_HELD_BYTES, Step, chat_index, is_another_call,
    join_name,
};
use crate::wire::{bare_id, model_or, restyle_id, write_event};

/// The state of one translated stream.
#[derive(Debug)]
pub(crate) struct ChatToMessages {
    ctx: Context,
    started: bool,
    finished: bool,
    open: Option<Open>,
    next_index: u32,
    tools: Vec<Tool>,
    finish: Option<String>,
    matched: Option<serde_json::Value>,
    usage: Option<Usage>,
    /// Bytes held for tool calls, all together (bounded by
    /// [`MAX_HELD_BYTES`]): arguments waiting for their tool's name, and
    /// the upstream's names and ids (kept for the whole stream).
    pending_bytes: usize,
}

/// The block that is open now.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Open {
    Text(u32),
    Thinking(u32),
    /// Position in `tools`.
    Tool(usize),
}

#[derive(Debug)]
struct Tool {
    chat_index: u64,
    id: String,
    /// `id` is the upstream's (not one made up for a call that had none).
    upstream_id: bool,
    name: String,
    /// The block index, once started.
    block: Option<u32>,
    closed: bool,
    /// Arguments that came before the name.
    pending: String,
    /// Whether the arguments so far are whole, to tell the next call at
    /// the same chat index from more of this one.
    arguments: ArgumentsEnd,
}

impl Tool {
    fn so_far(&self) -> CallSoFar<'_> {
        CallSoFar {
            id: &self.id,
            upstream_id: self.upstream_id,
            name: &self.name,
            arguments: &self.arguments,
        }
    }
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: DeltaOut<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum DeltaOut<'a> {
    #[serde(rename = "text_delta")]
    Text { text: &'a str },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: &'a str },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: &'a str },
}

/// The events written once a message or block, typed as the deltas are:
/// no `serde_json::Value` built (each of its objects' keys hashed into an
/// index map) only to be written out. Fields in Anthropic's order.
#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: StartedMessage<'a>,
}

#[derive(Serialize)]
struct StartedMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [(); 0],
    stop_reason: Option<()>,
    stop_sequence: Option<()>,
    usage: Counts,
}

/// Token counts; `None` is written `null`.
#[derive(Serialize)]
struct Counts {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    content_block: BlockOut<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type")]
enum BlockOut<'a> {
    #[serde(rename = "thinking")]
    Thinking {
        thinking: &'static str,
        signature: &'static str,
    },
    #[serde(rename = "text")]
    Text { text: &'static str },
    #[serde(rename = "tool_use")]
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Empty,
    },
}

/// `{}`.
#[derive(Serialize)]
struct Empty {}

/// `content_block_stop` and `message_stop`: a type, and a block's index.
#[derive(Serialize)]
struct Stop {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
}

#[derive(Serialize)]
struct MessageDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta<'a>,
    usage: Counts,
}

#[derive(Serialize)]
struct StopDelta<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

fn write_delta(out: &mut Vec<u8>, index: u32, delta: DeltaOut<'_>) {
    let event = BlockDelta {
        kind: "content_block_delta",
        index,
        delta,
    };
    write_event(out, "content_block_delta", &event);
}

impl ChatToMessages {
    /// A stream for a request with this context.
    pub(crate) fn new(ctx: Context) -> Self {
        ChatToMessages {
            ctx,
            started: false,
            finished: false,
            open: None,
            next_index: 0,
            tools: Vec::new(),
            finish: None,
            matched: None,
            usage: None,
            pending_bytes: 0,
        }
    }

    /// Whether `message_stop` has been sent.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
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
        // the message: the next one may.
        if bare_id(chunk.id.as_deref()).is_some()
            || chunk.choices.as_ref().is_some_and(|c| !c.is_empty())
        {
            self.start(chunk.id.as_deref(), chunk.model.as_deref(), out);
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
                self.matched = choice.stop_reason.clone();
                self.close_all(out);
            }
        }
        Step::Continue
    }

    fn start(&mut self, id: Option<&str>, model: Option<&str>, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = restyle_id("msg_", id);
        let start = MessageStart {
            kind: "message_start",
            message: StartedMessage {
                id: &id,
                kind: "message",
                role: "assistant",
                model: model_or(model, &self.ctx.model),
                content: [],
                stop_reason: None,
                stop_sequence: None,
                usage: Counts {
                    input_tokens: Some(0),
                    output_tokens: Some(0),
                },
            },
        };
        write_event(out, "message_start", &start);
    }

    fn delta(&mut self, delta: &Delta<'_>, out: &mut Vec<u8>) -> Step {
        if let Some(thinking) = delta.reasoning_text().filter(|_| self.ctx.thinking) {
            match self.open_block(Open::Thinking(0), out) {
                Ok(index) => write_delta(out, index, DeltaOut::Thinking { thinking }),
                Err(why) => return Step::Fail(why),
            }
        }
        for text in delta.texts() {
            match self.open_block(Open::Text(0), out) {
                Ok(index) => write_delta(out, index, DeltaOut::Text { text }),
                Err(why) => return Step::Fail(why),
            }
        }
        let legacy = delta.legacy_call();
        for call in delta.tool_calls.iter().flatten().chain(&legacy) {
            if let Step::Fail(why) = self.tool_delta(call, out) {
                return Step::Fail(why);
            }
        }
        Step::Continue
    }

    /// The index of an open text or thinking block of `kind`'s sort,
    /// stopping the open block of another sort and starting one if needed;
    /// none past [`MAX_BLOCKS`] blocks (text and thinking taking turns
    /// would open one per upstream chunk).
    fn open_block(&mut self, kind: Open, out: &mut Vec<u8>) -> Result<u32, String> {
        match (self.open, kind) {
            (Some(Open::Text(i)), Open::Text(_)) | (Some(Open::Thinking(i)), Open::Thinking(_)) => {
                return Ok(i);
            }
            _ => {}
        }
        if self.next_index as usize >= MAX_BLOCKS {
            return Err(format!(
                "the upstream's answer would take more than {MAX_BLOCKS} content blocks"
            ));
        }
        self.start_named(out);
        self.close(out);
        let index = self.take_index();
        let block = match kind {
            Open::Thinking(_) => {
                self.open = Some(Open::Thinking(index));
                BlockOut::Thinking {
                    thinking: "",
                    signature: "",
                }
            }
            _ => {
                self.open = Some(Open::Text(index));
                BlockOut::Text { text: "" }
            }
        };
        write_block_start(out, index, block);
        Ok(index)
    }

    fn tool_delta(&mut self, call: &ToolCallDelta<'_>, out: &mut Vec<u8>) -> Step {
        let chat_index = chat_index(
            call,
            self.tools.iter().map(|t| (t.chat_index, t.id.as_str())),
            self.tools.len() as u64,
        );
        // The newest call at that index, unless the delta starts another
        // there (Ollama and Gemini number every call of a turn 0).
        let found = self
            .tools
            .iter()
            .rposition(|t| t.chat_index == chat_index)
            .filter(|&pos| !is_another_call(&self.tools[pos].so_far(), call));
        let pos = match found {
            Some(pos) if self.tools[pos].closed => {
                return Step::Fail(format!(
                    "the upstream went back to tool call {chat_index} after starting another; \
                     an Anthropic stream cannot express interleaved tool calls"
                ));
            }
            Some(pos) => pos,
            None if self.tools.len() >= MAX_BLOCKS => {
                return Step::Fail(format!(
                    "the upstream started more than {MAX_BLOCKS} tool calls in one message"
                ));
            }
            None => {
                self.start_named(out);
                self.tools.push(Tool {
                    chat_index,
                    id: String::new(),
                    upstream_id: false,
                    name: String::new(),
                    block: None,
                    closed: false,
                    pending: String::new(),
                    arguments: ArgumentsEnd::default(),
                });
                self.tools.len() - 1
            }
        };
        let function = call.function.as_ref();
        let tool = &mut self.tools[pos];
        if let (Some(id), true) = (&call.id, tool.id.is_empty())
            && !id.is_empty()
        {
            tool.id = id.to_string();
            tool.upstream_id = true;
            self.pending_bytes += id.len();
        }
        let arguments = function.and_then(|f| f.arguments.as_deref()).unwrap_or("");
        tool.arguments.push(arguments);
        match tool.block {
            Some(index) => {
                if !arguments.is_empty() {
                    write_delta(
                        out,
                        index,
                        DeltaOut::InputJson {
                            partial_json: arguments,
                        },
                    );
                }
            }
            None => {
                if let Some(name) = function.and_then(|f| f.name.as_deref()) {
                    let before = tool.name.len();
                    join_name(&mut tool.name, name);
                    self.pending_bytes += tool.name.len() - before;
                }
                tool.pending.push_str(arguments);
                self.pending_bytes += arguments.len();
                if self.pending_bytes > MAX_HELD_BYTES {
                    return Step::Fail(format!(
                        "the upstream sent over {MAX_HELD_BYTES} bytes of tool names, ids and \
                         arguments before their tool's name"
                    ));
                }
                // The block starts with its name, which may still be coming
                // in pieces until the arguments begin (or another block, or
                // the end: `start_named`).
                if !tool.name.is_empty() && !tool.pending.is_empty() {
                    self.start_tool(pos, out);
                }
            }
        }
        Step::Continue
    }

    /// Start the tool calls that have their name but no block yet (their
    /// arguments have not begun): another block comes.
    fn start_named(&mut self, out: &mut Vec<u8>) {
        for pos in 0..self.tools.len() {
            if self.tools[pos].block.is_none() && !self.tools[pos].name.is_empty() {
                self.start_tool(pos, out);
            }
        }
    }

    fn start_tool(&mut self, pos: usize, out: &mut Vec<u8>) {
        self.close(out);
        let index = self.take_index();
        // Not yet started, the tool cannot take its own id.
        let id = tool_use_id(Some(&self.tools[pos].id), |id| {
            self.tools.iter().any(|t| t.block.is_some() && t.id == id)
        });
        let tool = &mut self.tools[pos];
        tool.id = id;
        tool.block = Some(index);
        let block = BlockOut::ToolUse {
            id: &tool.id,
            name: &tool.name,
            input: Empty {},
        };
        write_block_start(out, index, block);
        let pending = std::mem::take(&mut tool.pending);
        self.pending_bytes = self.pending_bytes.saturating_sub(pending.len());
        if !pending.is_empty() {
            write_delta(
                out,
                index,
                DeltaOut::InputJson {
                    partial_json: &pending,
                },
            );
        }
        self.open = Some(Open::Tool(pos));
    }

    fn take_index(&mut self) -> u32 {
        let index = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        index
    }

    /// Stop the open block, if any.
    fn close(&mut self, out: &mut Vec<u8>) {
        let index = match self.open.take() {
            None => return,
            Some(Open::Text(i) | Open::Thinking(i)) => i,
            Some(Open::Tool(pos)) => {
                self.tools[pos].closed = true;
                self.tools[pos].block.unwrap_or_default()
            }
        };
        let stop = Stop {
            kind: "content_block_stop",
            index: Some(index),
        };
        write_event(out, "content_block_stop", &stop);
    }

    /// Stop the open block and send any tool call still waiting for its name.
    fn close_all(&mut self, out: &mut Vec<u8>) {
        self.close(out);
        for pos in 0..self.tools.len() {
            if self.tools[pos].block.is_none() {
                self.start_tool(pos, out);
                self.close(out);
            }
        }
    }

    /// The upstream's `[DONE]`: the stop reason, usage and `message_stop`
    /// (a failure when the answer never finished).
    fn end(&mut self, out: &mut Vec<u8>) -> Step {
        if self.finished {
            return Step::Continue;
        }
        if self.finish.is_none() {
            return Step::Fail(crate::chat::UNFINISHED.into());
        }
        self.start(None, None, out);
        self.close_all(out);
        let (reason, sequence) = stop_reason(
            self.finish.as_deref(),
            self.matched.as_ref(),
            !self.tools.is_empty(),
            &self.ctx,
        );
        // An upstream that reported no usage gets null counts: Anthropic's
        // SDKs want the object, and a zero would read as real usage (core's
        // `StreamUsage` takes null counts, like `message_start`'s zeros, as
        // no count at all).
        let delta = MessageDelta {
            kind: "message_delta",
            delta: StopDelta {
                stop_reason: reason,
                stop_sequence: sequence.as_deref(),
            },
            usage: Counts {
                input_tokens: self.usage.map(|u| u.input()),
                output_tokens: self.usage.map(|u| u.output()),
            },
        };
        write_event(out, "message_delta", &delta);
        let stop = Stop {
            kind: "message_stop",
            index: None,
        };
        write_event(out, "message_stop", &stop);
        self.finished = true;
        Step::Continue
    }
}

fn write_block_start(out: &mut Vec<u8>, index: u32, block: BlockOut<'_>) {
    let event = BlockStart {
        kind: "content_block_start",
        index,
        content_block: block,
    };
    write_event(out, "content_block_start", &event);
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
