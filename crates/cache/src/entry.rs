//! A stored answer, and its compact binary encoding for remote stores.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};

/// One stored answer (always a `200`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// When it was stored, in milliseconds since the Unix epoch.
    pub stored_at_ms: u64,
    /// The answer's `content-type`, if it had one.
    pub content_type: Option<Bytes>,
    /// The answer itself.
    pub body: EntryBody,
}

/// The body of an [`Entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryBody {
    /// A non-streamed answer: its JSON bytes, as the upstream sent them.
    Json(Bytes),
    /// A streamed answer: its SSE frames with their original boundaries,
    /// from the first through the dialect's last event (`data: [DONE]`,
    /// `response.completed` or `message_stop`).
    Stream {
        /// The frames, in order.
        frames: Arc<[Bytes]>,
        /// Where the usage-only chunk is, so that a replay can leave it out
        /// (chat and completions streams; always `Absent` for Responses and
        /// Messages, whose usage is part of their events).
        usage: UsageChunk,
    },
}

/// Where the usage-only chunk (`"choices": []` with `usage`) of a stored
/// stream is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageChunk {
    /// The stream has none.
    Absent,
    /// It is alone in the frame with this index: a replay skips that frame.
    Frame(u32),
    /// It shares a frame with other events: a replay filters the stream.
    Inside,
    /// The stream has none because the upstream refused `stream_options`
    /// (older Azure API versions, TGI): a request that asks for the usage
    /// chunk is not answered with it (its own answer from that upstream is
    /// the refusal).
    Refused,
}

/// Why stored bytes could not be decoded into an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored cache entry is malformed: {0}")]
pub struct DecodeError(&'static str);

impl DecodeError {
    /// An entry of the other kind (streamed or not) than its key's request.
    pub(crate) fn wrong_kind() -> Self {
        DecodeError("a streamed entry for a request that is not, or the reverse")
    }

    /// Stored bytes larger than any entry this proxy stores.
    #[cfg(feature = "redis")]
    pub(crate) fn too_large() -> Self {
        DecodeError("larger than any entry the proxy stores")
    }

    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        DecodeError("a test's")
    }
}

const FORMAT_VERSION: u8 = 1;
const KIND_JSON: u8 = 0;
const KIND_STREAM: u8 = 1;

impl Entry {
    /// A stream without the usage chunk because the upstream refused
    /// `stream_options` ([`UsageChunk::Refused`]).
    pub fn usage_refused(&self) -> bool {
        matches!(
            self.body,
            EntryBody::Stream {
                usage: UsageChunk::Refused,
                ..
            }
        )
    }

    /// The bytes of the answer's body (what stores bound their size by).
    pub fn body_len(&self) -> usize {
        match &self.body {
            EntryBody::Json(bytes) => bytes.len(),
            EntryBody::Stream { frames, .. } => frames.iter().map(Bytes::len).sum(),
        }
    }

    /// How old the entry is at `now_ms` (zero if it seems to come from the
    /// future: clocks of proxy instances sharing a store may disagree).
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.stored_at_ms))
    }

    /// The compact binary form: a version byte, the kind, the timestamp, then
    /// length-prefixed (u32, little-endian) content type and body parts.
    pub fn encode(&self) -> Vec<u8> {
        let ct = self.content_type.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(self.body_len() + ct.len() + 32);
        out.put_u8(FORMAT_VERSION);
        out.put_u8(match self.body {
            EntryBody::Json(_) => KIND_JSON,
            EntryBody::Stream { .. } => KIND_STREAM,
        });
        out.put_u64_le(self.stored_at_ms);
        put_chunk(&mut out, ct);
        match &self.body {
            EntryBody::Json(bytes) => put_chunk(&mut out, bytes),
            EntryBody::Stream { frames, usage } => {
                match usage {
                    UsageChunk::Absent => out.put_u8(0),
                    UsageChunk::Frame(index) => {
                        out.put_u8(1);
                        out.put_u32_le(*index);
                    }
                    UsageChunk::Inside => out.put_u8(2),
                    UsageChunk::Refused => out.put_u8(3),
                }
                out.put_u32_le(len_u32(frames.len()));
                for frame in frames.iter() {
                    put_chunk(&mut out, frame);
                }
            }
        }
        out
    }

    /// Decodes [`Entry::encode`]'s bytes. The entry's parts share `bytes`
    /// (no copy).
    pub fn decode(bytes: Bytes) -> Result<Entry, DecodeError> {
        let mut buf = bytes;
        if get_u8(&mut buf)? != FORMAT_VERSION {
            return Err(DecodeError("unknown format version"));
        }
        let kind = get_u8(&mut buf)?;
        if buf.remaining() < 8 {
            return Err(DecodeError("truncated timestamp"));
        }
        let stored_at_ms = buf.get_u64_le();
        let ct = get_chunk(&mut buf)?;
        let content_type = (!ct.is_empty()).then_some(ct);
        let body = match kind {
            KIND_JSON => EntryBody::Json(get_chunk(&mut buf)?),
            KIND_STREAM => {
                let usage = match get_u8(&mut buf)? {
                    0 => UsageChunk::Absent,
                    1 => UsageChunk::Frame(get_u32(&mut buf)?),
                    2 => UsageChunk::Inside,
                    3 => UsageChunk::Refused,
                    _ => return Err(DecodeError("unknown usage tag")),
                };
                let count = get_u32(&mut buf)? as usize;
                // Every frame takes at least its 4-byte length.
                if count > buf.remaining() / 4 {
                    return Err(DecodeError("frame count exceeds the data"));
                }
                let frames = (0..count)
                    .map(|_| get_chunk(&mut buf))
                    .collect::<Result<Arc<[Bytes]>, _>>()?;
                if let UsageChunk::Frame(index) = usage
                    && index as usize >= frames.len()
                {
                    return Err(DecodeError("usage frame index out of range"));
                }
                EntryBody::Stream { frames, usage }
            }
            _ => return Err(DecodeError("unknown entry kind")),
        };
        if buf.has_remaining() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Entry {
            stored_at_ms,
            content_type,
            body,
        })
    }
}

/// Body parts are bounded by the layer's `max_entry_bytes` (far below 4 GiB).
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn put_chunk(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u32_le(len_u32(bytes.len()));
    out.extend_from_slice(bytes);
}

fn get_u8(buf: &mut Bytes) -> Result<u8, DecodeError> {
    buf.has_remaining()
        .then(|| buf.get_u8())
        .ok_or(DecodeError("truncated"))
}

fn get_u32(buf: &mut Bytes) -> Result<u32, DecodeError> {
    (buf.remaining() >= 4)
        .then(|| buf.get_u32_le())
        .ok_or(DecodeError("truncated length"))
}

fn get_chunk(buf: &mut Bytes) -> Result<Bytes, DecodeError> {
    let len = get_u32(buf)? as usize;
    if buf.remaining() < len {
        return Err(DecodeError("truncated data"));
    }
    Ok(buf.split_to(len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(frames: &[&'static str], usage: UsageChunk) -> Entry {
        Entry {
            stored_at_ms: 1_700_000_000_123,
            content_type: Some(Bytes::from_static(b"text/event-stream")),
            body: EntryBody::Stream {
                frames: frames
                    .iter()
                    .map(|f| Bytes::from_static(f.as_bytes()))
                    .collect(),
                usage,
            },
        }
    }

    #[test]
    fn round_trips() {
        let json = Entry {
            stored_at_ms: 5,
            content_type: None,
            body: EntryBody::Json(Bytes::from_static(b"{\"a\":1}")),
        };
        for entry in [
            json,
            stream(
                &["data: a\n\n", "", "data: [DONE]\n\n"],
                UsageChunk::Frame(1),
            ),
            stream(&[], UsageChunk::Absent),
            stream(&["x"], UsageChunk::Inside),
            stream(&["data: [DONE]\n\n"], UsageChunk::Refused),
        ] {
            let bytes = Bytes::from(entry.encode());
            assert_eq!(Entry::decode(bytes).unwrap(), entry);
        }
    }

    #[test]
    fn sizes_and_age() {
        let entry = stream(&["abc", "de"], UsageChunk::Absent);
        assert_eq!(entry.body_len(), 5);
        assert_eq!(
            entry.age(entry.stored_at_ms + 1500),
            Duration::from_millis(1500)
        );
        assert_eq!(entry.age(0), Duration::ZERO);
        // 1 version + 1 kind + 8 time + (4 + 17) content type + 1 usage + 4 count + 2 × 4 lengths + 5
        assert_eq!(entry.encode().len(), 1 + 1 + 8 + 21 + 1 + 4 + 8 + 5);
    }

    #[test]
    fn rejects_malformed() {
        let good = stream(&["data: x\n\n"], UsageChunk::Frame(0)).encode();
        for len in 0..good.len() {
            assert!(
                Entry::decode(Bytes::copy_from_slice(&good[..len])).is_err(),
                "{len}"
            );
        }
        let mut extra = good.clone();
        extra.push(0);
        assert!(Entry::decode(Bytes::from(extra)).is_err());
        let mut version = good.clone();
        version[0] = 9;
        assert!(Entry::decode(Bytes::from(version)).is_err());
        let bad_index = stream(&["data: x\n\n"], UsageChunk::Frame(1)).encode();
        assert!(Entry::decode(Bytes::from(bad_index)).is_err());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Entry::decode(Bytes::from(bytes));
        }
    }
}
