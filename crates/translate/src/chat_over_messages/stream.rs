//! Anthropic stream events as chat chunks, one upstream event at a time.
//!
//! `message_start` gives the role chunk; text deltas become `content`,
//! thinking deltas `reasoning_content`, a `tool_use` block a tool call (its
//! own chat `index`, counted over tool blocks only) whose `input_json_delta`
//! pieces are `arguments`; `message_delta` gives the finish chunk;
//! `message_stop` the usage chunk (when the client asked for
//! `stream_options.include_usage` and the upstream reported usage) and
//! `data: [DONE]`. The forced tool of a
//! `response_format` answer streams as `content`. Content a block's start
//! gives whole (a tool's `input` other than `{}`, text, thinking) is sent
//! too: a tool's start input when no `input_json_delta` follows it. A
//! block `index` at or past
//! [`MAX_BLOCKS`] is a malformed stream and fails it.

use std::borrow::Cow;

use llm_proxy_core::sse::Event;
use serde::Deserialize;
use serde_json::Value;

use super::response::Counts;
use super::{Context, finish_reason};
use crate::chat::{
    OutChoice, OutChunk, OutDelta, OutFunction, OutToolCall, error_message, usage_json,
};
use crate::stream::{MAX_BLOCKS, MAX_HELD_BYTES, Step};
use crate::wire::{
    bare_id, input_to_arguments, now_secs, restyle_id, str_of, upstream_model, write_data,
};

/// One Anthropic event, read lazily: deltas borrowed, rarer parts as values.
#[derive(Deserialize)]
struct Upstream<'a> {
    #[serde(
        rename = "type",
        borrow,
        default,
        deserialize_with = "crate::wire::borrowed"
    )]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    content_block: Option<Value>,
    #[serde(borrow, default)]
    delta: Option<UpstreamDelta<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct UpstreamDelta<'a> {
    #[serde(
        rename = "type",
        borrow,
        default,
        deserialize_with = "crate::wire::borrowed"
    )]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "crate::wire::borrowed")]
    stop_reason: Option<Cow<'a, str>>,
}

/// What an Anthropic content block is, for its deltas.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Block {
    Text,
    Thinking,
    /// A tool call with this chat `index`, no arguments sent yet.
    Tool(u32),
    /// A tool call whose arguments have begun.
    ToolArgs(u32),
    /// The forced `response_format` tool: its input is the content. No
    /// input sent yet.
    Json,
    /// The forced tool whose input has begun.
    JsonArgs,
    Other,
}

/// The state of one translated stream.
#[derive(Debug)]
pub(crate) struct MessagesToChat {
    ctx: Context,
    id: String,
    model: String,
    created: u64,
    started: bool,
    finished: bool,
    finish_sent: bool,
    blocks: Vec<Block>,
    /// The `input` a tool block's start gave (block index, JSON text), when
    /// it is not the empty object: sent at the block's end if no
    /// `input_json_delta` came instead.
    start_inputs: Vec<(usize, String)>,
    tool_count: u32,
    /// The upstream reported usable usage: only then is there a usage chunk.
    counted: bool,
    input: u64,
    output: u64,
    cached: u64,
}

impl MessagesToChat {
    /// A stream for a request with this context.
    pub(crate) fn new(ctx: Context) -> Self {
        MessagesToChat {
            model: ctx.model.clone(),
            ctx,
            // The upstream's, when its `message_start` gives a usable one.
            id: restyle_id("chatcmpl-", None),
            created: now_secs(),
            started: false,
            finished: false,
            finish_sent: false,
            blocks: Vec::new(),
            start_inputs: Vec::new(),
            tool_count: 0,
            counted: false,
            input: 0,
            output: 0,
            cached: 0,
        }
    }

    /// Whether `data: [DONE]` has been sent.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Translate one upstream event.
    pub(crate) fn event(&mut self, event: &Event, out: &mut Vec<u8>) -> Step {
        let up: Upstream<'_> = match llm_proxy_core::object_from_str(&event.data) {
            Ok(up) => up,
            Err(e) => {
                return Step::Fail(format!(
                    "the upstream sent an event that is not an Anthropic event: {e}"
                ));
            }
        };
        let kind = up.kind.as_deref().or(event.event.as_deref()).unwrap_or("");
        match kind {
            "message_stop" if !self.started => {
                return Step::Fail("the upstream ended its message before starting it".into());
            }
            "message_start" => self.message_start(up.message.as_ref(), out),
            "content_block_start" => {
                return self.block_start(up.index, up.content_block.as_ref(), out);
            }
            "content_block_delta" => self.block_delta(up.index, up.delta.as_ref(), out),
            "content_block_stop" => self.block_stop(up.index, out),
            "message_delta" => {
                self.count(up.usage.as_ref(), true);
                let reason = up.delta.as_ref().and_then(|d| d.stop_reason.as_deref());
                if let Some(reason) = reason {
                    // Calls still waiting for their block's end count.
                    let calls = self.tool_count > 0;
                    self.finish(finish_reason(Some(reason), calls, &self.ctx), out);
                }
            }
            "message_stop" => self.end(out),
            "error" => {
                let error = up.error.as_ref().unwrap_or(&Value::Null);
                return Step::Fail(error_message(error));
            }
            // ping, and events this translation does not know
            _ => {}
        }
        Step::Continue
    }

    fn message_start(&mut self, message: Option<&Value>, out: &mut Vec<u8>) {
        if let Some(message) = message {
            if let Some(id) = bare_id(str_of(message, "id")) {
                self.id = format!("chatcmpl-{id}");
            }
            if let Some(model) = upstream_model(str_of(message, "model")) {
                self.model = model.to_owned();
            }
            self.count(message.get("usage"), false);
        }
        self.role(out);
    }

    /// The first chunk: the assistant role.
    fn role(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let delta = OutDelta {
            role: Some("assistant"),
            content: Some(""),
            ..OutDelta::default()
        };
        self.write(out, delta, None);
    }

    /// Usage from `message_start` or (`last`) `message_delta`. Only the
    /// last counts the output: `message_start`'s output count is a
    /// placeholder (Anthropic's is 1), and a stream whose `message_delta`
    /// reports none has no usage chunk (its reservation is charged, as
    /// core charges a native stream without a final count), rather than one
    /// that says a whole answer took a token.
    fn count(&mut self, usage: Option<&Value>, last: bool) {
        let Some(counts) = Counts::read(usage) else {
            return;
        };
        // message_delta repeats input counts as 0 on some servers: keep the best.
        self.input = self.input.max(counts.prompt());
        self.cached = self.cached.max(counts.cached());
        if let (true, Some(output)) = (last, counts.completion()) {
            self.output = output;
            self.counted = true;
        }
    }

    fn block_start(
        &mut self,
        index: Option<u64>,
        block: Option<&Value>,
        out: &mut Vec<u8>,
    ) -> Step {
        let slot = match index {
            None => self.blocks.len(),
            Some(i) => usize::try_from(i).unwrap_or(usize::MAX),
        };
        if slot >= MAX_BLOCKS {
            return Step::Fail(format!(
                "the upstream started content block {} but a message may have at most \
                 {MAX_BLOCKS} blocks",
                index.map_or_else(|| slot.to_string(), |i| i.to_string())
            ));
        }
        self.role(out);
        let block = block.unwrap_or(&Value::Null);
        let name = str_of(block, "name");
        let kind = match str_of(block, "type") {
            Some("text") => Block::Text,
            Some("thinking") => Block::Thinking,
            Some("tool_use") if name.is_some() && name == self.ctx.json_tool.as_deref() => {
                Block::Json
            }
            Some("tool_use") => {
                let call = self.tool_count;
                self.tool_count = self.tool_count.saturating_add(1);
                Block::Tool(call)
            }
            _ => Block::Other,
        };
        if slot >= self.blocks.len() {
            self.blocks.resize(slot + 1, Block::Other);
        }
        self.blocks[slot] = kind;
        // Anthropic gives an empty start (`{}` input) and the content in
        // deltas; other servers may give it whole here, with no delta.
        self.start_inputs.retain(|(at, _)| *at != slot);
        if let Some(input) = block
            .get("input")
            .filter(|i| !i.is_null() && i.as_object().is_none_or(|o| !o.is_empty()))
        {
            self.start_inputs.push((slot, input_to_arguments(input)));
            // Held until their blocks stop: bounded all together, as a
            // whole answer is.
            let held: usize = self.start_inputs.iter().map(|(_, i)| i.len()).sum();
            if held > MAX_HELD_BYTES {
                return Step::Fail(format!(
                    "the upstream's content block starts hold over {MAX_HELD_BYTES} bytes of input"
                ));
            }
        }
        match kind {
            Block::Text | Block::Thinking => {
                let key = if kind == Block::Text {
                    "text"
                } else {
                    "thinking"
                };
                if let Some(text) = str_of(block, key).filter(|t| !t.is_empty()) {
                    let mut d = OutDelta::default();
                    if kind == Block::Text {
                        d.content = Some(text);
                    } else {
                        d.reasoning_content = Some(text);
                    }
                    self.write(out, d, None);
                }
            }
            Block::Tool(call) => {
                let call = OutToolCall {
                    index: call,
                    id: str_of(block, "id"),
                    kind: Some("function"),
                    function: OutFunction {
                        name,
                        arguments: "",
                    },
                };
                self.write(
                    out,
                    OutDelta {
                        tool_calls: Some([call]),
                        ..OutDelta::default()
                    },
                    None,
                );
            }
            _ => {}
        }
        Step::Continue
    }

    fn block_delta(
        &mut self,
        index: Option<u64>,
        delta: Option<&UpstreamDelta<'_>>,
        out: &mut Vec<u8>,
    ) {
        let Some(delta) = delta else { return };
        self.role(out);
        let block = index
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.blocks.get(i).copied())
            .unwrap_or(Block::Text);
        let mut d = OutDelta::default();
        match (delta.kind.as_deref(), block) {
            (Some("text_delta"), _) => d.content = delta.text.as_deref(),
            (Some("thinking_delta"), _) => d.reasoning_content = delta.thinking.as_deref(),
            (Some("input_json_delta"), Block::Json | Block::JsonArgs) => {
                let content = delta.partial_json.as_deref().unwrap_or("");
                if content.is_empty() {
                    return;
                }
                self.set_block(index, Block::JsonArgs);
                d.content = Some(content);
            }
            (Some("input_json_delta"), Block::Tool(call) | Block::ToolArgs(call)) => {
                let arguments = delta.partial_json.as_deref().unwrap_or("");
                if arguments.is_empty() {
                    return;
                }
                self.set_block(index, Block::ToolArgs(call));
                d.tool_calls = Some([arguments_delta(call, arguments)]);
            }
            // signature and citation deltas have no chat form
            _ => return,
        }
        let empty = d.content.is_none_or(str::is_empty)
            && d.reasoning_content.is_none_or(str::is_empty)
            && d.tool_calls.is_none();
        if !empty {
            self.write(out, d, None);
        }
    }

    /// The end of a block: a tool call that got no input in deltas gets
    /// the input its start gave (a server that sends it whole there), else
    /// `{}` (a tool without input: Anthropic streams `{}` in its start and
    /// an empty delta), as a whole answer's has and as OpenAI sends: a
    /// client parses `arguments` as JSON, and `""` is not. The forced
    /// `response_format` tool's start input is the content likewise.
    fn block_stop(&mut self, index: Option<u64>, out: &mut Vec<u8>) {
        let Some(slot) = index.and_then(|i| usize::try_from(i).ok()) else {
            return;
        };
        let start_input = self
            .start_inputs
            .iter()
            .position(|(at, _)| *at == slot)
            .map(|pos| self.start_inputs.swap_remove(pos).1);
        let input = start_input.as_deref().unwrap_or("{}");
        let mut d = OutDelta::default();
        match self.blocks.get(slot).copied() {
            Some(Block::Tool(call)) => {
                self.set_block(index, Block::ToolArgs(call));
                d.tool_calls = Some([arguments_delta(call, input)]);
            }
            Some(Block::Json) => {
                self.set_block(index, Block::JsonArgs);
                d.content = Some(input);
            }
            _ => return,
        }
        self.write(out, d, None);
    }

    fn set_block(&mut self, index: Option<u64>, block: Block) {
        if let Some(slot) = index
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.blocks.get_mut(i))
        {
            *slot = block;
        }
    }

    fn finish(&mut self, reason: &str, out: &mut Vec<u8>) {
        if self.finish_sent {
            return;
        }
        self.role(out);
        self.finish_sent = true;
        self.write(out, OutDelta::default(), Some(reason));
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        // A tool block the upstream never stopped still gets its input
        // (the one its start gave, else `{}`).
        for slot in 0..self.blocks.len() {
            if matches!(self.blocks[slot], Block::Tool(_) | Block::Json) {
                self.block_stop(Some(slot as u64), out);
            }
        }
        self.finish("stop", out);
        // No usage chunk when the upstream reported no usage: a zero one
        // would read as real usage (the auth layer would refund the token
        // reservation), and chat clients accept a stream without it.
        if self.ctx.include_usage && self.counted {
            let chunk = OutChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: &[],
                usage: Some(usage_json(self.input, self.output, self.cached)),
            };
            write_data(out, &chunk);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.finished = true;
    }

    fn write(&self, out: &mut Vec<u8>, delta: OutDelta<'_>, finish_reason: Option<&str>) {
        let choice = OutChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        };
        let chunk = OutChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: std::slice::from_ref(&choice),
            usage: None,
        };
        write_data(out, &chunk);
    }
}

/// A chat tool-call delta carrying a piece of `call`'s arguments.
fn arguments_delta(call: u32, arguments: &str) -> OutToolCall<'_> {
    OutToolCall {
        index: call,
        id: None,
        kind: None,
        function: OutFunction {
            name: None,
            arguments,
        },
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
