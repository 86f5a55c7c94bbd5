//! [`CacheBody`]: the tee that copies a missed answer into the flight and,
//! once it ended cleanly, into the store.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::sse::{Outline, Outlines, SseError};
use llm_proxy_core::usage::is_usage_only_chunk;
use llm_proxy_core::{Body, BoxError, BudgetHold, StreamKind};

use crate::flight::{Dropped, Flight, Leader};
use crate::service::Shared;
use crate::stats::Counters;
use crate::{CacheKey, Entry, EntryBody, UsageChunk};

/// The body of a response the cache missed: the upstream's frames pass to
/// the client as they come, unchanged and without waiting, while a copy goes
/// to the requests coalesced on this one and, at a clean end, to the store
/// (after the last frame; in a spawned task when the store waits).
///
/// Stored only when it ended cleanly: a JSON body that parses (for Responses,
/// a response with `"status": "completed"`), or an SSE stream that ended
/// with its dialect's last event (`data: [DONE]`, `response.completed`,
/// `message_stop`) and nothing broken or failed before it. An answer from a
/// fallback model ([`ServedByFallback`](llm_proxy_core::fallback::ServedByFallback))
/// reaches the client and the coalesced requests but is never stored (in
/// the shared scope under auth it does not come here: the coalesced
/// requests may be other keys', which start over with their own requests). An
/// error of the upstream body, or the client dropping this body before its
/// end, leaves nothing stored.
///
/// The upstream body is read by whichever reader of the answer needs its
/// next frame first (the crate's docs say how coalesced requests share
/// an answer): when the client reads
/// more slowly than a coalesced request's, or leaves, that request's body
/// reads on (and the answer is stored if it completes); the upstream body
/// is dropped once no one reads any more.
pub struct CacheBody {
    flight: Arc<Flight>,
    /// Every frame went out (or the body failed).
    done: bool,
    /// The pause before the error a follower read for this client, so
    /// that hyper writes out the frames before it (the upstream body's own
    /// error event among them): the upstream body pauses so itself only
    /// for the reader that polls it.
    flush: llm_proxy_core::FlushBeforeError,
}

impl std::fmt::Debug for CacheBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBody")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// A flight's upstream body while it is read, with its tee, and what a
/// follower read of it that the leader's client has not had yet.
pub(crate) struct Source {
    /// `None` once it ended (or failed).
    inner: Option<Body>,
    /// `None` once the answer was finished or abandoned.
    tee: Option<Tee>,
    /// Frames for the leader's client, read from the upstream by a
    /// follower, oldest first.
    queue: VecDeque<Frame<Bytes>>,
    /// Their bytes: at most `max_entry_bytes` (then the followers wait).
    queued: usize,
    /// The upstream body's error, read by a follower: the leader's client
    /// gets it after the queue.
    error: Option<BoxError>,
    /// The leader's client left: nothing more is queued for it.
    leader_gone: bool,
    /// A follower waits for the queue to shrink.
    blocked: bool,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("reading", &self.inner.is_some())
            .field("queued", &self.queued)
            .field("leader_gone", &self.leader_gone)
            .finish_non_exhaustive()
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
    /// The answer's frames kept (to store, and for the requests that
    /// follow it), counted against the proxy's body budget; nothing once
    /// they are dropped.
    pub held: Option<BudgetHold>,
    /// `false` for an answer that must reach the client and the followers
    /// but not the store (one from a fallback model).
    pub storable: bool,
}

/// How the tee decides that an answer ended cleanly.
pub(crate) enum Watch {
    /// A JSON body: it must parse and follow the rule (checked when it
    /// ends, before its followers are told).
    Json(JsonRule),
    /// An SSE stream: it must end with its dialect's clean last event.
    Sse(Box<SseWatch>),
}

/// What a JSON answer must be, besides JSON, to be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum JsonRule {
    /// Nothing more (chat, completions, embeddings, Messages).
    Any,
    /// A Responses `response` whose top-level `status` is `completed` (not
    /// `incomplete`, `failed`, …).
    CompletedResponse,
}

pub(crate) struct SseWatch {
    kind: StreamKind,
    outlines: Outlines,
    frames: u32,
    done: bool,
    broken: bool,
    usage: UsageChunk,
}

impl Watch {
    /// Watch a stream of `kind`, its held event counted against `budget`
    /// (`usage_refused`: the upstream refused `stream_options`).
    pub fn sse(
        kind: StreamKind,
        budget: Option<&llm_proxy_core::BodyBudget>,
        usage_refused: bool,
    ) -> Self {
        Watch::Sse(Box::new(SseWatch {
            kind,
            outlines: Outlines::new().counted_in(budget),
            frames: 0,
            done: false,
            broken: false,
            usage: if usage_refused {
                UsageChunk::Refused
            } else {
                UsageChunk::Absent
            },
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
        let at_boundary = !self.outlines.has_partial();
        let SseWatch {
            kind,
            outlines,
            done,
            broken,
            ..
        } = self;
        let (mut events, mut usage_here) = (0, false);
        let read = outlines.push(data, |event| {
            if event.is_blank() {
                // A keep-alive (`data: ` with nothing in it) carries
                // nothing, before or after the end; replayed as it came.
                return Ok(());
            }
            events += 1;
            if *done {
                // Nothing may follow the last event but a `[DONE]`: the one
                // some servers end a Responses or Messages stream with, as
                // a chat stream ends, or a chat stream's second (the
                // upstream check lets either pass).
                *broken |= !event.is_done();
                return Ok(());
            }
            match *kind {
                StreamKind::Chat => {
                    // Named `error`, as Responses and Messages streams name
                    // theirs, or shaped as one.
                    if event.event == b"error" || is_error_event(event.data) {
                        *broken = true;
                    } else if event.is_done() {
                        *done = true;
                    } else if is_usage_only_chunk(event.data) {
                        usage_here = true;
                    }
                }
                kind => match dialect_end(kind, event) {
                    Some(true) => *done = true,
                    Some(false) => *broken = true,
                    None => {}
                },
            }
            Ok::<_, SseError>(())
        });
        if read.is_err() {
            self.broken = true;
            return;
        }
        if usage_here {
            let alone = at_boundary && events == 1 && !self.outlines.has_partial();
            self.usage = match self.usage {
                UsageChunk::Absent | UsageChunk::Refused if alone => UsageChunk::Frame(index),
                _ => UsageChunk::Inside,
            };
        }
    }

    fn clean_end(&self) -> bool {
        self.done && !self.broken && !self.outlines.has_partial()
    }
}

/// How an event of a Responses or Messages stream bears on the stream's end:
/// `Some(true)` for the clean last event (`response.completed`,
/// `message_stop`), `Some(false)` for an end that is not a success
/// (`response.failed`, `response.incomplete`, and `error`, which the
/// upstream sends when it fails mid-way and the proxy when the upstream
/// breaks), `None` for any other. The event's name is its `event:` line,
/// else its data's `type`, as the upstream client reads it.
fn dialect_end(kind: StreamKind, event: Outline<'_>) -> Option<bool> {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(default, rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        response: Option<Status<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(default, borrow)]
        status: Option<std::borrow::Cow<'a, str>>,
    }
    let data = event.text();
    let name = match event.event {
        b"" => {
            llm_proxy_core::object_from_str::<Typed<'_>>(&data)
                .ok()?
                .kind?
        }
        name => llm_proxy_core::utf8_lossy(name),
    };
    match (kind, &*name) {
        (_, "error") => Some(false),
        // As a whole answer's: `completed` only (some servers end a capped
        // or failed answer with this event and say so in its status).
        (StreamKind::Responses, "response.completed") => {
            let typed = llm_proxy_core::object_from_str::<Typed<'_>>(&data).ok();
            let status = typed
                .as_ref()
                .and_then(|t| t.response.as_ref()?.status.as_deref());
            Some(status.is_none_or(|s| s == "completed"))
        }
        (StreamKind::Responses, "response.failed" | "response.incomplete") => Some(false),
        (StreamKind::Messages, "message_stop") => Some(true),
        _ => None,
    }
}

/// An error in a chat stream: `{"error": …}`, as a stream broken mid-way
/// ends with, or an error object (`"object": "error"`, as vLLM's older
/// servers and those that copy them send mid-stream, before `[DONE]`; or
/// `"type": "error"`).
fn is_error_event(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Chunk<'a> {
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
        #[serde(default, borrow)]
        object: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    static ERROR: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"error"));
    ERROR.find(data).is_some()
        && llm_proxy_core::object_from_str::<Chunk<'_>>(&llm_proxy_core::utf8_lossy(data))
            .is_ok_and(|chunk| {
                is_error_shape(
                    chunk.error.is_some(),
                    chunk.object.as_deref(),
                    chunk.kind.as_deref(),
                )
            })
}

/// An error object by its fields: an `error` member (OpenAI, OpenRouter),
/// `"object": "error"` (vLLM), `"type": "error"` (Anthropic).
fn is_error_shape(error: bool, object: Option<&str>, kind: Option<&str>) -> bool {
    error || object == Some("error") || kind == Some("error")
}

/// How far past `max_entry_bytes` an answer too large to store is still kept
/// for the requests that follow it (they joined before it grew too large).
const FOLLOWED_CAP_FACTOR: usize = 4;

impl CacheBody {
    pub(crate) fn new(inner: Body, tee: Tee) -> Self {
        let flight = tee.leader.flight().clone();
        *flight.source() = Some(Source {
            inner: Some(inner),
            tee: Some(tee),
            queue: VecDeque::new(),
            queued: 0,
            error: None,
            leader_gone: false,
            blocked: false,
        });
        if flight.followed() {
            // A follower may have looked for the source before it was here.
            flight.wake_all();
        }
        CacheBody {
            flight,
            done: false,
            flush: llm_proxy_core::FlushBeforeError::default(),
        }
    }
}

/// How reading the upstream body once went.
enum Read {
    Frame(Frame<Bytes>),
    End,
    Failed(BoxError),
}

impl Source {
    /// Read the upstream body once, with `waker`; a frame has gone to the
    /// tee (and through it to the followers and the store). At the end the
    /// tee is taken out, for [`settle`] to run once the source's lock is
    /// let go.
    fn read(&mut self, waker: &std::task::Waker) -> Poll<(Read, Option<Tee>)> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready((Read::End, None));
        };
        let mut cx = Context::from_waker(waker);
        Poll::Ready(match Pin::new(inner).poll_frame(&mut cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(tee), Some(data)) = (self.tee.as_mut(), frame.data_ref()) {
                    tee.observe(data);
                }
                (Read::Frame(frame), None)
            }
            Poll::Ready(Some(Err(error))) => {
                self.inner = None;
                (Read::Failed(error), self.tee.take())
            }
            Poll::Ready(None) => {
                self.inner = None;
                (Read::End, self.tee.take())
            }
        })
    }

    /// The most the leader's queue holds before followers wait for it.
    fn window(&self) -> usize {
        self.tee
            .as_ref()
            .map_or(usize::MAX, |tee| tee.shared.config.max_entry_bytes)
    }
}

/// What the end of the upstream body leaves to do with its tee: store a
/// complete answer (`failed` false), or fail the flight.
fn settle(tee: Option<Tee>, failed: bool) {
    match tee {
        Some(tee) if failed => tee.abandon(),
        Some(tee) => tee.finish(),
        None => {}
    }
}

/// A follower's read of `flight`'s upstream body, when the frame it wants
/// has not come: `true` if it read something (the flight changed), `false`
/// when there is nothing to read now (the upstream has nothing yet, the
/// leader's queue is full, or the body is gone); the caller has asked to
/// be woken when the flight changes.
pub(crate) fn pull(flight: &Arc<Flight>) -> bool {
    let mut slot = flight.source();
    let Some(source) = slot.as_mut() else {
        return false;
    };
    if source.inner.is_none() {
        return false;
    }
    if !source.leader_gone && source.queued >= source.window() {
        source.blocked = true;
        return false;
    }
    let Poll::Ready((read, tee)) = source.read(flight.fan_out()) else {
        return false;
    };
    let failed = matches!(read, Read::Failed(_));
    match read {
        Read::Frame(frame) if !source.leader_gone => {
            source.queued += frame.data_ref().map_or(0, Bytes::len);
            source.queue.push_back(frame);
        }
        Read::Failed(error) if !source.leader_gone => source.error = Some(error),
        Read::Frame(_) | Read::Failed(_) | Read::End => {}
    }
    let leader_gone = source.leader_gone;
    if leader_gone && source.inner.is_none() {
        *slot = None;
    }
    drop(slot);
    settle(tee, failed);
    if !leader_gone {
        // Its queue grew, or its end came.
        flight.wake_leader();
    }
    true
}

/// The last follower of `flight` left: if the leader's client left too,
/// nobody reads the upstream body any more, and dropping it cancels its
/// work (unless a request joined the flight meanwhile).
pub(crate) fn unread(flight: &Arc<Flight>) {
    let mut slot = flight.source();
    let Some(source) = slot.as_mut() else {
        return;
    };
    if !source.leader_gone
        || source
            .tee
            .as_mut()
            .is_some_and(|tee| tee.leader.retire_unless_followed())
    {
        return;
    }
    // Every byte through the tee (a follower of known length stops at its
    // last byte, without reading the end): a clean end, stored.
    let clean = source.inner.as_ref().is_some_and(HttpBody::is_end_stream);
    let tee = source.tee.take();
    *slot = None;
    drop(slot);
    settle(tee, !clean);
}

impl Tee {
    fn observe(&mut self, data: &Bytes) {
        self.bytes += data.len();
        let max = self.shared.config.max_entry_bytes;
        // No room in the budget for the frames: not kept at all (not
        // stored, and the requests that follow are cut: they may have
        // answered their clients already). A long answer is held in steps
        // of an eighth more than it holds, so that most of its frames leave
        // the shared count alone, and it is over-counted by an eighth at
        // most; a one-frame answer is held exactly.
        let room = self.held.as_mut().is_none_or(|held| {
            let kept = held.held();
            self.bytes <= kept
                || held.hold(
                    self.bytes
                        .max(kept + kept / 8)
                        .min(max.saturating_mul(FOLLOWED_CAP_FACTOR)),
                )
        });
        if self.bytes > max || !room {
            // Too large to store: keep frames only for those who follow
            // already, and only so far.
            self.too_large = true;
            let (cap, why) = if room {
                (max.saturating_mul(FOLLOWED_CAP_FACTOR), Dropped::TooLarge)
            } else {
                (0, Dropped::BudgetFull)
            };
            if self.leader.too_large(self.bytes, cap, why) {
                self.held = None;
            }
        }
        self.leader.push(data);
        if let Watch::Sse(watch) = &mut self.watch {
            watch.observe(data);
        }
    }

    /// The upstream body ended without error.
    fn finish(mut self) {
        self.leader.keep_held(self.held.take());
        // A JSON answer is judged before its end is told: its followers
        // wait for it whole, and one that is no answer to share (an error
        // some servers send with `200`) fails the flight, which sends them
        // to the upstream on their own rather than hand them the error as a
        // hit.
        let json = match &self.watch {
            Watch::Json(rule) => {
                let rule = *rule;
                let all = self.leader.frames().map(|frames| joined(&frames));
                if all.as_ref().is_some_and(|all| !json_follows(all, rule)) {
                    Counters::bump(&self.shared.counters.not_stored);
                    self.leader.fail();
                    return;
                }
                all
            }
            Watch::Sse(_) => None,
        };
        let frames = self.leader.complete();
        let kind = match (&self.watch, frames) {
            (Watch::Sse(watch), Some(frames)) if watch.clean_end() => {
                Some(Kind::Stream(frames, watch.usage))
            }
            (Watch::Json(_), _) => json.map(Kind::Json),
            _ => None,
        };
        let counters = &self.shared.counters;
        let storable = self.storable && !self.too_large;
        let (Some(kind), true) = (kind, storable) else {
            Counters::bump(&counters.not_stored);
            self.leader.retire();
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.leader.retire();
            return;
        };
        // Tried here first: a store that answers at once (the memory store
        // never waits) costs no task. One that waits (Redis) goes on in a
        // task, which polls it again (so the first poll's waker, a no-op,
        // is never needed).
        let mut store = Box::pin(store(self, kind));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if store.as_mut().poll(&mut cx).is_pending() {
            runtime.spawn(store);
        }
    }

    /// The answer will not be finished: fail the flight, store nothing.
    fn abandon(mut self) {
        Counters::bump(&self.shared.counters.not_stored);
        self.leader.keep_held(self.held.take());
        self.leader.fail();
    }
}

/// What a cleanly ended answer is stored as.
enum Kind {
    /// Its bytes, judged an answer ([`json_follows`]).
    Json(Bytes),
    /// Its frames, and where the usage chunk is.
    Stream(Vec<Bytes>, UsageChunk),
}

/// Build the entry off the client's path and write it; the flight stays
/// joinable (as a finished answer) until the store has it.
async fn store(tee: Tee, kind: Kind) {
    let Tee {
        mut leader,
        shared,
        key,
        content_type,
        ..
    } = tee;
    let counters = &shared.counters;
    if counters.store_allowed() {
        let entry = entry(kind, content_type);
        let len = entry.body_len() as u64;
        match shared.put(key, entry).await {
            Ok(false) => {
                counters.store_ok();
                Counters::bump(&counters.not_stored);
            }
            Ok(true) => {
                counters.store_ok();
                Counters::bump(&counters.stored);
                counters
                    .stored_bytes
                    .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            }
            Err(error) => counters.store_error(shared.store.kind(), "put", &error),
        }
    } else {
        Counters::bump(&counters.not_stored);
    }
    leader.retire();
}

/// The frames copied into one allocation (they may be slices of larger
/// network buffers, which the store must not keep alive).
fn joined(frames: &[Bytes]) -> Bytes {
    let mut all = BytesMut::with_capacity(frames.iter().map(Bytes::len).sum());
    frames.iter().for_each(|frame| all.extend_from_slice(frame));
    all.freeze()
}

/// The answer as an entry, in one allocation.
fn entry(kind: Kind, content_type: Option<HeaderValue>) -> Entry {
    let body = match kind {
        Kind::Json(all) => EntryBody::Json(all),
        Kind::Stream(frames, usage) => {
            let all = joined(&frames);
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
    Entry {
        stored_at_ms: crate::clock::now_ms(),
        content_type: content_type.map(|ct| owned_content_type(ct.as_bytes())),
        body,
    }
}

/// The content type as bytes of its own (the header value may be a slice of
/// the upstream connection's read buffer); the usual ones without a copy.
fn owned_content_type(ct: &[u8]) -> Bytes {
    const USUAL: [&[u8]; 2] = [b"application/json", b"text/event-stream"];
    match USUAL.iter().find(|usual| **usual == ct) {
        Some(usual) => Bytes::from_static(usual),
        None => Bytes::copy_from_slice(ct),
    }
}

/// Whether `body` is a JSON answer that follows `rule`. Never one that is
/// an error ([`is_error_shape`]): some OpenAI-compatible servers
/// (OpenRouter, vLLM) answer `200` with one; stored, it would be replayed
/// for the whole TTL.
fn json_follows(body: &[u8], rule: JsonRule) -> bool {
    #[derive(serde::Deserialize)]
    struct Answer<'a> {
        #[serde(default, borrow)]
        status: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        object: Option<std::borrow::Cow<'a, str>>,
        /// `null` reads as absent.
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
    }
    // Text first: serde_json skips the strings it ignores without checking
    // that they are UTF-8.
    let Some(Ok(answer)) =
        llm_proxy_core::utf8(body).map(llm_proxy_core::object_from_str::<Answer<'_>>)
    else {
        return false;
    };
    if is_error_shape(
        answer.error.is_some(),
        answer.object.as_deref(),
        answer.kind.as_deref(),
    ) {
        return false;
    }
    match rule {
        JsonRule::Any => true,
        JsonRule::CompletedResponse => answer.status.as_deref() == Some("completed"),
    }
}

impl HttpBody for CacheBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let flight = &this.flight;
        let mut slot = flight.source();
        // (Emptied only after the leader's client went, or here.)
        let Some(source) = slot.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        if let Some(frame) = source.queue.pop_front() {
            // What a follower read for this client while it was behind.
            source.queued -= frame.data_ref().map_or(0, Bytes::len);
            let unblocked = std::mem::take(&mut source.blocked);
            drop(slot);
            if unblocked {
                flight.wake_all();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if source.error.is_some() {
            if this.flush.poll(cx).is_pending() {
                return Poll::Pending;
            }
            let error = source.error.take();
            *slot = None;
            this.done = true;
            return Poll::Ready(error.map(Err));
        }
        // Followers may read the upstream too, and the last to poll it is
        // the one it wakes: with followers, it wakes every reader
        // ([`Flight::fan_out`]); without, this body, which also says where
        // it waits, for a follower that joins and polls it then. (Said
        // before the read with followers, whose waker may fire at once on
        // another thread; after it without, still under the source's lock,
        // which such a follower must take first.)
        let followed = flight.followed();
        let read = if followed {
            flight.leader_waits(cx);
            source.read(flight.fan_out())
        } else {
            source.read(cx.waker())
        };
        let Poll::Ready((read, tee)) = read else {
            if !followed {
                flight.leader_waits(cx);
            }
            return Poll::Pending;
        };
        match read {
            Read::Frame(frame) => Poll::Ready(Some(Ok(frame))),
            Read::Failed(error) => {
                // Kept as a follower's read of it keeps it, for the flush
                // pause first: a follower may have taken the upstream's own
                // pause before its error, and hyper drops the frames it
                // holds when a body fails without one.
                source.error = Some(error);
                drop(slot);
                settle(tee, true);
                self.poll_frame(cx)
            }
            Read::End => {
                *slot = None;
                drop(slot);
                this.done = true;
                settle(tee, false);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // As the inner body says, so that a layer above (auth's usage
        // watch) sees the end as hyper does. A server that stops polling
        // here drops the body, and the drop finishes the tee (a clean end).
        self.done
            || self.flight.source().as_ref().is_none_or(|source| {
                source.queue.is_empty()
                    && source.error.is_none()
                    && source.inner.as_ref().is_none_or(HttpBody::is_end_stream)
            })
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.flight.source();
        let Some(source) = slot.as_ref().filter(|_| !self.done) else {
            return SizeHint::with_exact(0);
        };
        let inner = source
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint);
        let queued = source.queued as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(queued));
        }
        hint.set_lower(inner.lower().saturating_add(queued));
        hint
    }
}

impl Drop for CacheBody {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut slot = self.flight.source();
        let Some(source) = slot.as_mut() else {
            return;
        };
        source.leader_gone = true;
        source.queue.clear();
        source.queued = 0;
        source.error = None;
        let unblocked = std::mem::take(&mut source.blocked);
        let clean = match &source.inner {
            // Every byte went out: hyper drops a body of known length
            // after its last frame without polling it to `None`. That is
            // a clean end.
            Some(inner) if inner.is_end_stream() => true,
            // Followers read on (they read the upstream themselves now).
            Some(_)
                if source
                    .tee
                    .as_mut()
                    .is_some_and(|tee| tee.leader.retire_unless_followed()) =>
            {
                drop(slot);
                if unblocked {
                    self.flight.wake_all();
                }
                return;
            }
            // Nobody else reads: dropping the upstream body cancels its work.
            _ => false,
        };
        let tee = source.tee.take();
        *slot = None;
        drop(slot);
        settle(tee, !clean);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a stream of `kind` made of `frames` ended cleanly.
    fn clean(kind: StreamKind, frames: &[&str]) -> bool {
        let Watch::Sse(mut watch) = Watch::sse(kind, None, false) else {
            unreachable!()
        };
        frames.iter().for_each(|f| watch.observe(f.as_bytes()));
        watch.clean_end()
    }

    #[test]
    fn chat_streams_with_an_error_chunk_are_not_clean() {
        let c = StreamKind::Chat;
        let delta = "data: {\"choices\":[{\"delta\":{\"content\":\"an error\"}}]}\n\n";
        let done = "data: [DONE]\n\n";
        assert!(
            clean(c, &[delta, done]),
            "a word in the content is no error"
        );
        for error in [
            r#"data: {"error":{"message":"boom"}}"#,
            r#"data: {"object":"error","message":"CUDA out of memory","code":500}"#,
            r#"data: {"type":"error","message":"m"}"#,
        ] {
            let error = format!("{error}\n\n");
            assert!(!clean(c, &[delta, &error, done]), "{error}");
        }
        assert!(clean(
            c,
            &[r#"data: {"error":null,"choices":[]}"#, "\n\n", done]
        ));
    }

    #[test]
    fn a_responses_stream_that_ends_completed_but_says_otherwise_is_not_clean() {
        let r = StreamKind::Responses;
        let end = |status: &str| {
            format!(
                "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"status\":\"{status}\"}}}}\n\n"
            )
        };
        assert!(clean(r, &[&end("completed")]));
        assert!(!clean(r, &[&end("incomplete")]));
        assert!(!clean(r, &[&end("failed")]));
    }

    #[test]
    fn a_done_after_a_responses_or_messages_stream_s_end_keeps_it_clean() {
        let done = "data: [DONE]\n\n";
        let completed = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\"}}\n\n";
        assert!(clean(StreamKind::Responses, &[completed, done]));
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(clean(StreamKind::Messages, &[stop, done]));
        // Anything else after the end is not.
        assert!(!clean(StreamKind::Messages, &[stop, "data: {}\n\n"]));
        // A chat stream's second `[DONE]`, as the upstream check reads it.
        assert!(clean(StreamKind::Chat, &[done, done]));
    }

    #[test]
    fn an_array_is_no_last_event() {
        // serde would read the type from an array's first element.
        for (kind, last) in [
            (StreamKind::Responses, r#"["response.completed"]"#),
            (StreamKind::Messages, r#"["message_stop"]"#),
        ] {
            assert!(!clean(kind, &[&format!("data: {last}\n\n")]), "{last}");
        }
    }

    #[test]
    fn keep_alives_neither_end_nor_break_a_stream() {
        let keep_alive = "data: \n\n";
        for (kind, end) in [
            (StreamKind::Chat, "data: [DONE]\n\n"),
            (
                StreamKind::Responses,
                "data: {\"type\":\"response.completed\"}\n\n",
            ),
            (
                StreamKind::Messages,
                "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            ),
        ] {
            assert!(clean(kind, &[keep_alive, end, keep_alive]), "{kind:?}");
            assert!(!clean(kind, &[keep_alive]), "{kind:?}");
        }
    }

    #[test]
    fn responses_streams_end_cleanly_only_with_response_completed() {
        let r = StreamKind::Responses;
        let created = "event: response.created\ndata: {\"type\":\"response.created\"}\n\n";
        let completed = "event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n";
        assert!(clean(r, &[created, completed]));
        assert!(!clean(r, &[created]));
        // Split anywhere, and named by `type` alone.
        assert!(clean(r, &[created, &completed[..9], &completed[9..]]));
        assert!(clean(r, &["data: {\"type\":\"response.completed\"}\n\n"]));
        assert!(
            !clean(r, &[&completed[..completed.len() - 1]]),
            "unfinished"
        );
        for end in ["response.failed", "response.incomplete", "error"] {
            let event = format!("event: {end}\ndata: {{\"type\":\"{end}\"}}\n\n");
            assert!(!clean(r, &[created, &event]), "{end}");
            assert!(!clean(r, &[created, &event, completed]), "{end}");
            let typed = format!("data: {{\"type\":\"{end}\"}}\n\n");
            assert!(!clean(r, &[created, &typed]), "{end}");
        }
        assert!(!clean(r, &[completed, created]), "nothing after the end");
        // (But chat's `[DONE]`, which some servers add.)
        assert!(clean(r, &[completed, "data: [DONE]\n\n"]));
        // `message_stop` is not the end of a Responses stream.
        assert!(!clean(r, &["event: message_stop\ndata: {}\n\n"]));
    }

    #[test]
    fn messages_streams_end_cleanly_only_with_message_stop() {
        let m = StreamKind::Messages;
        let start = "event: message_start\ndata: {\"type\":\"message_start\"}\n\n";
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert!(clean(m, &[start, stop]));
        assert!(clean(m, &[&format!("{start}{stop}")]));
        assert!(!clean(m, &[start]));
        let error = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n";
        assert!(!clean(m, &[start, error]));
        assert!(!clean(m, &[start, error, stop]));
        assert!(!clean(m, &[stop, "event: ping\ndata: {}\n\n"]));
        assert!(!clean(m, &["event: response.completed\ndata: {}\n\n"]));
        // The proxy's own event for a stream cut mid-way.
        let cut =
            llm_proxy_core::Error::stream_interrupted_event_for(m, "cut", &Default::default());
        assert!(!clean(m, &[start, std::str::from_utf8(&cut).unwrap()]));
    }

    #[test]
    fn only_completed_responses_follow_their_rule() {
        let completed = br#"{"id":"r","status":"completed","output":[]}"#;
        assert!(json_follows(completed, JsonRule::CompletedResponse));
        assert!(json_follows(completed, JsonRule::Any));
        for body in [
            &br#"{"id":"r","status":"incomplete"}"#[..],
            br#"{"id":"r","status":"failed"}"#,
            br#"{"id":"r"}"#,
            br#"{"id":"r","output":[{"status":"completed"}]}"#,
            br#"["completed"]"#,
            br#"{"status":"completed""#,
        ] {
            assert!(!json_follows(body, JsonRule::CompletedResponse));
        }
        assert!(json_follows(
            br#"{"id":"r","status":"failed"}"#,
            JsonRule::Any
        ));
    }

    #[test]
    fn an_error_answered_with_200_is_never_stored() {
        for body in [
            &br#"{"error":{"message":"upstream overloaded","code":502}}"#[..],
            br#"{"type":"error","error":{"type":"overloaded_error","message":"m"}}"#,
            br#"{"id":"r","status":"completed","error":{"code":"x"}}"#,
            br#"[{"id":"x"}]"#,
            br#""text""#,
            // Not JSON: a string (one it ignores) that is not UTF-8.
            b"{\"id\":\"r\xff\",\"choices\":[]}",
        ] {
            let text = String::from_utf8_lossy(body);
            assert!(!json_follows(body, JsonRule::Any), "{text}");
            assert!(!json_follows(body, JsonRule::CompletedResponse), "{text}");
        }
        // `error: null`, as every Responses object has, is no error.
        let fine = br#"{"id":"r","status":"completed","error":null}"#;
        assert!(json_follows(fine, JsonRule::CompletedResponse));
        assert!(json_follows(
            br#"{"type":"message","content":[]}"#,
            JsonRule::Any
        ));
    }
}
