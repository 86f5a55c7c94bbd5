//! Server-sent events: what a streamed answer of any dialect provides to the
//! paced body, and how events are written.

use std::fmt;

use bytes::Bytes;
use serde_json::Value;

/// A streamed answer, rendered one SSE event at a time as the body is polled.
pub(crate) trait SseEvents: fmt::Debug + Send + 'static {
    /// Whether event `index` carries a token, which streaming paces.
    fn is_token_event(&self, index: usize) -> bool;

    /// Event `index` (one whole SSE event, ending with a blank line), or
    /// `None` after the last.
    fn event(&self, index: usize) -> Option<Bytes>;
}

/// `value` as one unnamed SSE event: `data: <json>\n\n`.
pub(crate) fn data_event(value: &Value) -> Bytes {
    let mut event = b"data: ".to_vec();
    event.extend_from_slice(value.to_string().as_bytes());
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

/// `value` as one named SSE event: `event: <name>\ndata: <json>\n\n`.
pub(crate) fn named_event(name: &str, value: &Value) -> Bytes {
    let mut event = format!("event: {name}\ndata: ").into_bytes();
    event.extend_from_slice(value.to_string().as_bytes());
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}
