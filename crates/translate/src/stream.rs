//! The per-direction stream state machines behind one type, so that the body
//! wrapper ([`TranslateBody`](crate::TranslateBody)) has one thing to drive.

use llm_proxy_core::StreamKind;
use llm_proxy_core::sse::Event;

use crate::chat_over_messages::stream::MessagesToChat;
use crate::messages_over_chat::stream::ChatToMessages;
use crate::responses_over_chat::stream::ChatToResponses;

/// The most content blocks (Anthropic) or output items (Responses) one
/// translated message may have. Real answers have a handful; the bound keeps
/// an upstream-controlled block `index` from sizing the translator's state
/// (an index of 2^40 would otherwise allocate terabytes), and a stream that
/// goes past it fails like any other malformed upstream stream.
pub(crate) const MAX_BLOCKS: usize = 1024;

/// The most bytes of output (text and tool arguments) a translated stream
/// holds: a Responses stream keeps its whole output for
/// `response.completed`, and a tool's arguments wait for its name. The
/// bound of a whole translated answer; past it the stream fails like any
/// other malformed upstream stream.
pub(crate) const MAX_HELD_BYTES: usize = crate::response::MAX_ANSWER_BYTES;

/// Whether a tool-call delta at the index of a call that has `id` (the
/// upstream's own when `upstream_id`) is another call: one that names a
/// function under another non-empty id. Some servers (Ollama) give every
/// call of a turn index 0, each with its own id and name; read by index
/// alone they would merge into one call with the arguments of both. Others
/// (LM Studio, mlx) send a new id with every piece of one call's arguments,
/// without a name: those pieces are the same call.
pub(crate) fn is_another_call(
    id: &str,
    upstream_id: bool,
    delta: &crate::chat::ToolCallDelta<'_>,
) -> bool {
    upstream_id
        && delta
            .id
            .as_deref()
            .is_some_and(|new| !new.is_empty() && new != id)
        && names_a_function(delta)
}

fn names_a_function(delta: &crate::chat::ToolCallDelta<'_>) -> bool {
    delta
        .function
        .as_ref()
        .and_then(|f| f.name.as_deref())
        .is_some_and(|name| !name.is_empty())
}

/// Add a piece of a tool's name to what came of it: some servers (Gemini's
/// OpenAI-compatible API) split a name across deltas, others (MiniMax)
/// repeat the whole name in every delta; a piece equal to the name so far
/// is such a repeat.
pub(crate) fn join_name(name: &mut String, piece: &str) {
    if *name != piece {
        name.push_str(piece);
    }
}

/// The chat `index` of the call a tool-call delta belongs to, among the
/// calls so far (`(index, id)`, oldest first; `id` empty when the upstream
/// gave none). Its own `index` when it has one; without (some servers send
/// none): the call whose id it repeats, else a new call when it names a
/// function, else the last call (the next piece of its arguments), else a
/// new one (`next`).
pub(crate) fn chat_index<'a>(
    delta: &crate::chat::ToolCallDelta<'_>,
    mut calls: impl DoubleEndedIterator<Item = (u64, &'a str)> + Clone,
    next: u64,
) -> u64 {
    if let Some(index) = delta.index {
        return index;
    }
    let id = delta.id.as_deref().filter(|id| !id.is_empty());
    if let Some((index, _)) = id.and_then(|id| calls.clone().rev().find(|(_, known)| *known == id))
    {
        return index;
    }
    if names_a_function(delta) {
        return next;
    }
    calls.next_back().map_or(next, |(index, _)| index)
}

/// What happened to one upstream event.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Translated (possibly into nothing); go on.
    Continue,
    /// The upstream stream is broken or reported an error: end the client's
    /// stream with its dialect's error event carrying this message.
    Fail(String),
}

/// The state machine of one translated stream.
#[derive(Debug)]
pub(crate) enum StreamMap {
    /// Chat chunks -> Anthropic events.
    ChatToMessages(Box<ChatToMessages>),
    /// Anthropic events -> chat chunks.
    MessagesToChat(Box<MessagesToChat>),
    /// Chat chunks -> Responses events.
    ChatToResponses(Box<ChatToResponses>),
}

impl StreamMap {
    /// Translate one upstream event, appending the client's events to `out`.
    pub(crate) fn event(&mut self, event: &Event, out: &mut Vec<u8>) -> Step {
        match self {
            StreamMap::ChatToMessages(m) => m.event(event, out),
            StreamMap::MessagesToChat(m) => m.event(event, out),
            StreamMap::ChatToResponses(m) => m.event(event, out),
        }
    }

    /// Whether the client's stream has had its last event.
    pub(crate) fn is_finished(&self) -> bool {
        match self {
            StreamMap::ChatToMessages(m) => m.is_finished(),
            StreamMap::MessagesToChat(m) => m.is_finished(),
            StreamMap::ChatToResponses(m) => m.is_finished(),
        }
    }

    /// Before the error event that ends a failed stream: a Responses
    /// stream that failed on its first event opens with `response.created`
    /// (and `in_progress`) first, as every Responses stream does, so that
    /// SDK stream helpers read the error as the API's, not as a malformed
    /// stream.
    pub(crate) fn before_failure(&mut self, out: &mut Vec<u8>) {
        if let StreamMap::ChatToResponses(m) = self {
            m.open_if_unstarted(out);
        }
    }

    /// The client's stream kind, for its error event.
    pub(crate) fn client_kind(&self) -> StreamKind {
        match self {
            StreamMap::ChatToMessages(_) => StreamKind::Messages,
            StreamMap::MessagesToChat(_) => StreamKind::Chat,
            StreamMap::ChatToResponses(_) => StreamKind::Responses,
        }
    }
}
