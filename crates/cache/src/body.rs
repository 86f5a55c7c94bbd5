//! [`CacheBody`]: the tee that copies a missed answer into the flight and,
//! once it ended cleanly, into the store.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::sse::Parser;
use llm_proxy_core::usage::is_usage_only_chunk;
use llm_proxy_core::{Body, BoxError};

use crate::flight::Leader;
use crate::service::Shared;
use crate::stats::Counters;
use crate::{CacheKey, Entry, EntryBody, UsageChunk};

/// The body of a response the cache missed: the upstream's frames pass to
/// the client as they come, unchanged and without waiting, while a copy goes
/// to the requests coalesced on this one and, at a clean end, to the store
/// (written by a spawned task, never in the client's way).
///
/// Stored only when it ended cleanly: a JSON body that parses, or an SSE
/// stream that ended with `data: [DONE]` and nothing broken before it. An
/// error of the upstream body, or the client dropping this body before its
/// end, leaves nothing stored. When the client leaves while coalesced
/// requests still read the answer, a task takes over reading the upstream
/// body for them (and stores the answer if it completes); it stops, dropping
/// the upstream body, once no one reads any more.
pub struct CacheBody {
    inner: Option<Body>,
    tee: Option<Tee>,
}

impl std::fmt::Debug for CacheBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBody")
            .field("ended", &self.inner.is_none())
            .field("teeing", &self.tee.is_some())
            .finish()
    }
}

pub(crate) struct Tee {
    pub leader: Leader,
    pub shared: Arc<Shared>,
    pub key: CacheKey,
    pub content_type: Option<HeaderValue>,
    pub watch: Watch,
    pub bytes: usize,
    pub too_large: bool,
    pub handed_over: bool,
}

/// How the tee decides that an answer ended cleanly.
pub(crate) enum Watch {
    /// A JSON body: it must parse (checked in the store task).
    Json,
    /// An SSE stream: it must end with `data: [DONE]`.
    Sse(Box<SseWatch>),
}

pub(crate) struct SseWatch {
    parser: Parser,
    frames: u32,
    done: bool,
    broken: bool,
    usage: UsageChunk,
}

impl Watch {
    pub fn sse() -> Self {
        Watch::Sse(Box::new(SseWatch {
            parser: Parser::new(),
            frames: 0,
            done: false,
            broken: false,
            usage: UsageChunk::Absent,
        }))
    }
}

impl SseWatch {
    fn observe(&mut self, data: &[u8]) {
        let index = self.frames;
        self.frames = self.frames.saturating_add(1);
        if self.broken {
            return;
        }
        let at_boundary = !self.parser.has_partial();
        if self.parser.push(data).is_err() {
            self.broken = true;
            return;
        }
        let (mut events, mut usage_here) = (0, false);
        while let Some(event) = self.parser.next_event() {
            events += 1;
            if self.done || is_error_event(&event.data) {
                self.broken = true;
            } else if event.is_done() {
                self.done = true;
            } else if is_usage_only_chunk(&event.data) {
                usage_here = true;
            }
        }
        if usage_here {
            let alone = at_boundary && events == 1 && !self.parser.has_partial();
            self.usage = match self.usage {
                UsageChunk::Absent if alone => UsageChunk::Frame(index),
                _ => UsageChunk::Inside,
            };
        }
    }

    fn clean_end(&self) -> bool {
        self.done && !self.broken && !self.parser.has_partial()
    }
}

/// An `{"error": …}` event, as a stream broken mid-way ends with.
fn is_error_event(data: &str) -> bool {
    data.contains("\"error\"")
        && serde_json::from_str::<serde_json::Value>(data)
            .is_ok_and(|value| value.get("error").is_some())
}

impl CacheBody {
    pub(crate) fn new(inner: Body, tee: Tee) -> Self {
        CacheBody {
            inner: Some(inner),
            tee: Some(tee),
        }
    }
}

impl Tee {
    fn observe(&mut self, data: &Bytes) {
        self.bytes += data.len();
        if self.bytes > self.shared.config.max_entry_bytes {
            // Too large to store: keep frames only while someone follows.
            self.too_large = true;
            self.leader.drop_frames_unless_followed();
        }
        self.leader.push(data);
        if let Watch::Sse(watch) = &mut self.watch {
            watch.observe(data);
        }
    }

    /// The upstream body ended without error.
    fn finish(mut self) {
        let frames = self.leader.complete();
        let kind = match &self.watch {
            Watch::Sse(watch) if !watch.clean_end() => None,
            Watch::Sse(watch) => Some(Kind::Stream(watch.usage)),
            Watch::Json => Some(Kind::Json),
        };
        let counters = &self.shared.counters;
        let (Some(kind), Some(frames), false) = (kind, frames, self.too_large) else {
            Counters::bump(&counters.not_stored);
            self.leader.retire();
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.leader.retire();
            return;
        };
        runtime.spawn(store(self, frames, kind));
    }

    /// The answer will not be finished: fail the flight, store nothing.
    fn abandon(mut self) {
        Counters::bump(&self.shared.counters.not_stored);
        self.leader.fail();
    }
}

/// What a cleanly ended answer is stored as.
enum Kind {
    Json,
    Stream(UsageChunk),
}

/// Build the entry off the client's path and write it; the flight stays
/// joinable (as a finished answer) until the store has it.
async fn store(tee: Tee, frames: Vec<Bytes>, kind: Kind) {
    let Tee {
        leader,
        shared,
        key,
        content_type,
        ..
    } = tee;
    let counters = &shared.counters;
    match entry(frames, kind, content_type) {
        Some(_) if !counters.store_allowed() => Counters::bump(&counters.not_stored),
        Some(entry) => {
            let len = entry.body_len() as u64;
            match shared.store.put(key, entry, shared.config.ttl).await {
                Ok(()) => {
                    counters.store_ok();
                    Counters::bump(&counters.stored);
                    counters
                        .stored_bytes
                        .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                }
                Err(error) => counters.store_error(shared.store.kind(), "put", &error),
            }
        }
        None => Counters::bump(&counters.not_stored),
    }
    leader.retire();
}

/// The frames copied into one allocation (they may be slices of larger
/// network buffers, which the store must not keep alive), as an entry.
fn entry(frames: Vec<Bytes>, kind: Kind, content_type: Option<HeaderValue>) -> Option<Entry> {
    let mut all = BytesMut::with_capacity(frames.iter().map(Bytes::len).sum());
    frames.iter().for_each(|frame| all.extend_from_slice(frame));
    let all = all.freeze();
    let body = match kind {
        Kind::Json => {
            serde_json::from_slice::<serde::de::IgnoredAny>(&all).ok()?;
            EntryBody::Json(all)
        }
        Kind::Stream(usage) => {
            let mut start = 0;
            let frames = frames
                .iter()
                .map(|frame| {
                    start += frame.len();
                    all.slice(start - frame.len()..start)
                })
                .collect();
            EntryBody::Stream { frames, usage }
        }
    };
    Some(Entry {
        stored_at_ms: crate::clock::now_ms(),
        content_type: content_type.map(|ct| Bytes::copy_from_slice(ct.as_bytes())),
        body,
    })
}

impl HttpBody for CacheBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let (Some(tee), Some(data)) = (this.tee.as_mut(), frame.data_ref()) {
                    tee.observe(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                this.inner = None;
                if let Some(tee) = this.tee.take() {
                    tee.abandon();
                }
                Poll::Ready(Some(Err(error)))
            }
            None => {
                this.inner = None;
                if let Some(tee) = this.tee.take() {
                    tee.finish();
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Until the inner body said `None`, the tee has not finished: the
        // server must poll once more even if the inner body knows it is done.
        self.inner.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for CacheBody {
    fn drop(&mut self) {
        let Some(mut tee) = self.tee.take() else {
            return;
        };
        let Some(inner) = self.inner.take() else {
            return tee.abandon();
        };
        if inner.is_end_stream() {
            // Every byte went out: hyper drops a body of known length after
            // its last frame without polling it to `None`. That is a clean end.
            return tee.finish();
        }
        if tee.handed_over || !tee.leader.retire_unless_followed() {
            // Nobody else reads: dropping the upstream body cancels its work.
            return tee.abandon();
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return tee.abandon();
        };
        tee.handed_over = true;
        runtime.spawn(read_for_followers(CacheBody::new(inner, tee)));
    }
}

/// Keep reading an answer whose client left, while coalesced requests read
/// it; dropping `body` when they are gone cancels the upstream work.
async fn read_for_followers(mut body: CacheBody) {
    while let Some(Ok(_)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let followed = body
            .tee
            .as_ref()
            .is_some_and(|tee| tee.leader.retire_unless_followed());
        if !followed {
            return;
        }
    }
}
