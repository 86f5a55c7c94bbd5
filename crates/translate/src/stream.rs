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

    /// The client's stream kind, for its error event.
    pub(crate) fn client_kind(&self) -> StreamKind {
        match self {
            StreamMap::ChatToMessages(_) => StreamKind::Messages,
            StreamMap::MessagesToChat(_) => StreamKind::Chat,
            StreamMap::ChatToResponses(_) => StreamKind::Responses,
        }
    }
}
