use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use llm_proxy_core::sse::{Outlines, SequenceNumbers, SseError};
use llm_proxy_core::{BoxError, Error, FlushBeforeError, NotUpstreamFault, StreamKind};
use tokio::time::{Instant, Sleep};

use crate::pool::Lease;

pin_project_lite::pin_project! {
    /// An upstream's response body on its way to the client.
    ///
    /// Bytes pass through as they arrive, unchanged; frames the upstream
    /// sent together (read at once) leave as one frame. The body
    ///
    /// - fails when the upstream is silent for longer than the idle timeout;
    /// - for an SSE stream of a model API, watches the events: a stream that
    ///   breaks, ends before its dialect's last event (`data: [DONE]`,
    ///   `response.completed`, `message_stop`), or carries a data payload
    ///   that is not a JSON object (checked by its shape, `{…}`: the proxy
    ///   does not parse every event) gets one final error event with the
    ///   code `stream_interrupted` and then fails, so the client's
    ///   connection is closed rather than cleanly ended (an event it
    ///   refuses, and what came after it, are withheld unless a frame that
    ///   went out already holds its start, or a comment line since the
    ///   event before it);
    /// - when dropped (the client went away), drops the upstream body, which
    ///   closes the upstream connection and stops the upstream's work.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        // Armed (reset to now + idle_timeout) only when the upstream has made
        // progress since it was last armed and the body is about to wait: a
        // body that is ready at once costs no clock read and no timer.
        #[pin]
        idle: Sleep,
        idle_armed: bool,
        idle_timeout: Duration,
        watch: Option<Box<StreamWatch>>,
        state: State,
        upstream: Arc<str>,
        // The pooled connection the body arrives on, given back to its pool
        // once the body has ended (dropped with the body otherwise, which
        // closes the connection).
        lease: Option<Lease>,
        // What the upstream body gave after the frames gathered into the
        // last one (its end, an error, trailers), for the next poll.
        held: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            // hyper drops a body with a known length after its last frame
            // without polling it to the end: the connection is still reusable.
            let mut this = this.project();
            if this.inner.is_end_stream()
                && let Some(lease) = this.lease.take()
            {
                lease.release();
            }
            // An HTTP/2 answer whose last byte came without its stream's
            // end (nginx's end comes in an empty frame of its own): take in
            // an end that has arrived meanwhile, so that the stream is not
            // reset (`CANCEL`, which the server may log as a client gone).
            if !this.inner.is_end_stream() && this.inner.size_hint().exact() == Some(0) {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = this.inner.as_mut().poll_frame(&mut cx);
            }
        }
    }
}

struct StreamWatch {
    kind: StreamKind,
    outlines: Outlines,
    done: bool,
    /// A Responses stream's numbering, for an error event the proxy adds.
    numbers: SequenceNumbers,
    /// Where in the stream the event the watch refused begins (just past
    /// the blank line that ended the one before: with any comment lines
    /// between the two), when it refused a whole event.
    refused_at: Option<u64>,
}

/// Why a watched stream is cut: the upstream's fault (not a valid stream
/// of its kind), or the proxy's own (its answers' budget is full: not held
/// against the upstream).
#[derive(Debug)]
enum Cut {
    Garbled(String),
    OverBudget(String),
}

impl From<SseError> for Cut {
    fn from(e: SseError) -> Self {
        match e {
            SseError::OverBudget { .. } => Cut::OverBudget(e.to_string()),
            SseError::EventTooLarge { .. } => Cut::Garbled(e.to_string()),
        }
    }
}

/// Just the `type` of an event's data, which also checks that it is JSON.
#[derive(serde::Deserialize)]
struct Typed<'a> {
    #[serde(default, rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

enum State {
    Streaming,
    /// Send this error event, let the server flush it, then fail with the
    /// error (which makes the server close the connection).
    Interrupting {
        event: Option<Bytes>,
        flush: FlushBeforeError,
        error: Option<BoxError>,
    },
    Finished,
}

impl UpstreamBody {
    /// Wrap an upstream's body. `watch` turns on the SSE checks for a stream
    /// of that kind.
    pub fn new(
        inner: Incoming,
        idle_timeout: Duration,
        watch: Option<StreamKind>,
        upstream: Arc<str>,
    ) -> Self {
        UpstreamBody {
            inner,
            // Armed from the response head until the first frame.
            idle: tokio::time::sleep(idle_timeout),
            idle_armed: true,
            idle_timeout,
            watch: watch.map(|kind| {
                Box::new(StreamWatch {
                    kind,
                    outlines: Outlines::new(),
                    done: false,
                    numbers: SequenceNumbers::default(),
                    refused_at: None,
                })
            }),
            state: State::Streaming,
            upstream,
            lease: None,
            held: None,
        }
    }

    /// Bound the watched stream's held event by `budget`, which counts
    /// what every layer holds of answers (see [`Outlines::bounded_by`]):
    /// past it, the stream is cut with an error event, as one the proxy
    /// cannot hold (not the upstream's fault: no ejection).
    pub(crate) fn bounded_by(mut self, budget: Option<&llm_proxy_core::BodyBudget>) -> Self {
        if let (Some(watch), Some(_)) = (&mut self.watch, budget) {
            let outlines = std::mem::take(&mut watch.outlines);
            watch.outlines = outlines.bounded_by(budget);
        }
        self
    }

    /// Give `lease` back to its pool when the body has been received whole.
    pub(crate) fn with_lease(mut self, lease: Option<Lease>) -> Self {
        self.lease = lease;
        self
    }
}

impl StreamWatch {
    /// Feed a chunk; `Err` when the stream is not a valid stream of its
    /// kind, or the proxy cannot hold its event.
    fn observe(&mut self, chunk: &[u8]) -> Result<(), Cut> {
        let StreamWatch {
            kind,
            outlines,
            done,
            numbers,
            refused_at,
        } = self;
        let kind = *kind;
        *refused_at = None;
        outlines.push_spanned(chunk, |event, span| {
            let read = Self::read(kind, done, numbers, &event);
            if read.is_err() {
                *refused_at = Some(span.start);
            }
            read
        })
    }

    /// One whole event of the stream: `Err` when it has no place in a
    /// stream of `kind`.
    fn read(
        kind: StreamKind,
        done: &mut bool,
        numbers: &mut SequenceNumbers,
        event: &llm_proxy_core::sse::Outline<'_>,
    ) -> Result<(), Cut> {
        let garbled = |reason: &str| Cut::Garbled(reason.into());
        // A keep-alive (`data: ` with nothing in it) is not a garbled
        // event: it carries nothing, and passes on as it came.
        if event.is_blank() {
            return Ok(());
        }
        if kind == StreamKind::Chat && event.is_done() {
            *done = true;
            return Ok(());
        }
        // Some servers end a Responses or Messages stream with chat's
        // `[DONE]` after its last event: harmless (the SDKs stop at
        // it), passed on, and no fault of the upstream's.
        if *done && event.is_done() {
            return Ok(());
        }
        if *done && kind == StreamKind::Chat {
            return Err(garbled("data after [DONE]"));
        }
        // Each dialect's events are JSON objects. Checking the shape is
        // enough to catch a garbled stream; the client's parser reads the
        // rest. The full parse is only needed for a `type` with no
        // `event:` line to name it.
        if !looks_like_object(event.data) {
            return Err(garbled(NOT_JSON));
        }
        let text;
        let typed;
        let name = match (kind, event.event) {
            (StreamKind::Chat, _) => &b""[..],
            (_, b"") => {
                text = event.text();
                typed = llm_proxy_core::object_from_str::<Typed<'_>>(&text)
                    .map_err(|_| garbled(NOT_JSON))?;
                typed.kind.as_deref().unwrap_or("").as_bytes()
            }
            (_, name) => name,
        };
        if kind == StreamKind::Responses {
            numbers.observe(event.data);
        }
        // The dialect's own last event, or the upstream's own error event:
        // either is a clean end of the stream.
        *done |= match kind {
            StreamKind::Chat => false,
            StreamKind::Responses => matches!(
                name,
                b"response.completed" | b"response.failed" | b"response.incomplete" | b"error"
            ),
            StreamKind::Messages => matches!(name, b"message_stop" | b"error"),
        };
        Ok(())
    }
}

const NOT_JSON: &str = "the upstream sent an SSE event whose data is not JSON";

/// `{…}`, give or take surrounding whitespace.
fn looks_like_object(data: &[u8]) -> bool {
    let data = data.trim_ascii();
    data.starts_with(b"{") && data.ends_with(b"}")
}

fn error(upstream: &str, reason: &str) -> BoxError {
    format!("upstream `{upstream}`: {reason}").into()
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    /// On a pooled `http://` connection the body drives the connection
    /// itself (see `pool.rs`): when hyper's channel has no chunk, the
    /// connection is polled here, reads what the socket holds into the
    /// channel, and the chunk is taken in the same poll. The chunks of a
    /// burst of events read at once are taken in one poll, one after the
    /// other, and leave as one frame (up to `GATHER_MAX` bytes).
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.state {
            State::Finished => return Poll::Ready(None),
            State::Interrupting { .. } => return this.state.drain(this.upstream, cx),
            State::Streaming => {}
        }

        let polled = loop {
            let polled = match this.held.take() {
                Some(held) => Poll::Ready(held),
                None => poll_next(this.inner.as_mut(), this.lease, cx),
            };
            // An upstream's trailers (HTTP/2 servers may send them) are
            // not passed on: they mean nothing to an LLM client, and hyper's
            // server ends a body at its trailers without polling it again,
            // so every layer above would take the answer for one cut short
            // (never cached, logged `cut`).
            match polled {
                Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {}
                polled => break polled,
            }
        };
        let outcome = match polled {
            Poll::Ready(Some(Ok(frame))) => {
                *this.idle_armed = false;
                let mut data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                };
                let start = frame_start(this.watch);
                let first = watch(this.watch, this.upstream, this.state, &data, start);
                if let Err(Some(keep)) = first {
                    data.truncate(keep);
                }
                let mut watched = first.is_ok();
                if watched && data.len() < GATHER_MAX && !this.inner.is_end_stream() {
                    // Whatever else the upstream has sent already goes
                    // out with this frame: one frame through the layers
                    // above and one chunk from hyper's server instead of
                    // one per event. Nothing waits for it.
                    let mut gathered: Option<BytesMut> = None;
                    let mut len = data.len();
                    while watched && len < GATHER_MAX {
                        let next = match poll_next(this.inner.as_mut(), this.lease, cx) {
                            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                                Ok(next) => next,
                                Err(frame) => {
                                    *this.held = Some(Some(Ok(frame)));
                                    break;
                                }
                            },
                            Poll::Ready(other) => {
                                *this.held = Some(other);
                                break;
                            }
                            Poll::Pending => break,
                        };
                        let seen = watch(this.watch, this.upstream, this.state, &next, start);
                        watched = seen.is_ok();
                        len += next.len();
                        let buf = gathered.get_or_insert_with(|| {
                            let mut buf = BytesMut::with_capacity(2 * len);
                            buf.extend_from_slice(&data);
                            buf
                        });
                        buf.extend_from_slice(&next);
                        if let Err(Some(keep)) = seen {
                            buf.truncate(keep);
                        }
                    }
                    if let Some(buf) = gathered {
                        data = buf.freeze();
                    }
                }
                if data.is_empty() && matches!(this.state, State::Interrupting { .. }) {
                    // All the frame held was refused: straight to the end.
                    return this.state.drain(this.upstream, cx);
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            // After the dialect's last event the stream has said all it
            // had to: a connection that then fails or goes quiet ends it
            // cleanly (no error event after `[DONE]`), though it is not
            // reused.
            Poll::Ready(Some(Err(_))) if said_all(this.watch) => Ok(()),
            Poll::Ready(Some(Err(e))) => Err(format!("the upstream connection failed: {e}")),
            Poll::Ready(None) => {
                // The upstream's message is complete: its connection can
                // serve another request.
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
                match this.watch.as_ref() {
                    Some(watch) if !watch.done => Err(match watch.kind {
                        StreamKind::Chat => "the upstream ended the stream without [DONE]",
                        StreamKind::Responses => {
                            "the upstream ended the stream before response.completed"
                        }
                        StreamKind::Messages => "the upstream ended the stream before message_stop",
                    }
                    .to_owned()),
                    _ => Ok(()),
                }
            }
            Poll::Pending => {
                if !*this.idle_armed {
                    *this.idle_armed = true;
                    this.idle
                        .as_mut()
                        .reset(Instant::now() + *this.idle_timeout);
                }
                ready!(this.idle.as_mut().poll(cx));
                if said_all(this.watch) {
                    Ok(())
                } else {
                    Err(format!(
                        "no data from the upstream for {} ms",
                        this.idle_timeout.as_millis()
                    ))
                }
            }
        };
        match outcome {
            Ok(()) => {
                *this.state = State::Finished;
                Poll::Ready(None)
            }
            Err(reason) => {
                let cut = this
                    .watch
                    .as_ref()
                    .is_some_and(|w| w.outlines.has_partial());
                *this.state = State::interrupt(
                    this.upstream,
                    Cut::Garbled(reason),
                    this.watch.as_deref(),
                    cut,
                );
                this.state.drain(this.upstream, cx)
            }
        }
    }

    /// Also at the last byte of a body of known length: hyper's server
    /// drops a body of known length after that byte without polling it
    /// again, and every layer above tells a clean end from a cut one by
    /// this. An HTTP/1 body is at its end there; an HTTP/2 stream may end
    /// only with a later empty frame (nginx's often do).
    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Finished)
            || (matches!(self.state, State::Streaming)
                && self.watch.is_none()
                && matches!(self.held, None | Some(None))
                && (self.inner.is_end_stream() || self.inner.size_hint().exact() == Some(0)))
    }

    fn size_hint(&self) -> SizeHint {
        if self.watch.is_none() && matches!(self.state, State::Streaming) {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

/// Frames gathered into one come to at most about this many bytes.
pub(crate) const GATHER_MAX: usize = 16 * 1024;

/// The upstream body's next frame. On a pooled connection, when hyper's
/// channel has none, the connection is driven once to read what the socket
/// holds (see `pool.rs`).
fn poll_next(
    mut inner: Pin<&mut Incoming>,
    lease: &mut Option<Lease>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
    if let Poll::Ready(polled) = inner.as_mut().poll_frame(cx) {
        return Poll::Ready(polled);
    }
    match lease {
        Some(lease) => {
            let _ = lease.drive(cx);
            inner.poll_frame(cx)
        }
        None => Poll::Pending,
    }
}

/// Where the next frame to go out begins in the watched stream.
fn frame_start(watch: &Option<Box<StreamWatch>>) -> u64 {
    watch.as_ref().map_or(0, |w| w.outlines.pushed())
}

/// Show a chunk of the frame that began at `frame_start` in the stream to
/// the stream's watch. `Err` when the stream broke there (the state is
/// then set to end it, after the frame), with how many bytes of the frame
/// go out: `Some(n)` when the refused event began in it (the client gets
/// the whole events before it, then the error event: an SDK reads `data:
/// {not json` as its own parse error, not the API error it can handle, and
/// the events after it would be read as if nothing had happened), `None`
/// for all of it: when the client holds the event's start already (or
/// lines before it: a keep-alive comment counts), and when the reader
/// itself gave up (an event past its size or the answers' budget: no
/// whole event was refused).
fn watch(
    watch: &mut Option<Box<StreamWatch>>,
    upstream: &str,
    state: &mut State,
    chunk: &[u8],
    frame_start: u64,
) -> Result<(), Option<usize>> {
    let Some(watch) = watch else {
        return Ok(());
    };
    let Err(why) = watch.observe(chunk) else {
        return Ok(());
    };
    let keep = watch
        .refused_at
        .and_then(|at| at.checked_sub(frame_start))
        .map(|keep| usize::try_from(keep).unwrap_or(usize::MAX));
    let cut = match keep {
        Some(_) => false,
        // The frame goes on, then the error event (or, if it ends
        // mid-event, just the failure). The events past the bad one reach
        // the client: their numbers count (the parser stopped at the bad
        // one).
        None => {
            if watch.kind == StreamKind::Responses {
                watch.numbers.observe(chunk);
            }
            !ends_an_event(chunk)
        }
    };
    *state = State::interrupt(upstream, why, Some(&**watch), cut);
    Err(keep)
}

/// Whether `frame` ends with the blank line that ends an event: the client
/// then holds whole events only.
fn ends_an_event(frame: &[u8]) -> bool {
    frame.ends_with(b"\n\n") || frame.ends_with(b"\r\r") || frame.ends_with(b"\r\n\r\n")
}

/// Whether a watched stream has sent its dialect's last event.
fn said_all(watch: &Option<Box<StreamWatch>>) -> bool {
    watch.as_ref().is_some_and(|w| w.done)
}

impl State {
    /// The state that ends the stream: an error event (for watched SSE
    /// streams), then the error itself, after a pause that lets what was
    /// sent (the head too, when the body fails at once) reach the client.
    ///
    /// `cut`: the client holds the start of an event (a line, or an event
    /// without its blank line). No event can follow then: its first line
    /// break would complete the cut one, and the client would act on it (a
    /// cut `data: [DONE]` would read as a clean end, cut JSON as garbage).
    /// The stream just fails, and the client, as SSE has it, drops the
    /// unfinished event with the connection.
    fn interrupt(upstream: &str, why: Cut, watch: Option<&StreamWatch>, cut: bool) -> State {
        let (reason, ours) = match &why {
            Cut::Garbled(reason) => (reason, false),
            Cut::OverBudget(reason) => (reason, true),
        };
        // Debug: the proxy logs the failed body with its request's id (an
        // embedder sees the body's error).
        tracing::debug!(upstream, reason, "upstream stream interrupted");
        let message = format!("upstream `{upstream}`: {reason}");
        let event = watch
            .filter(|_| !cut)
            .map(|w| Error::stream_interrupted_event_for(w.kind, &message, &w.numbers));
        let error: BoxError = if ours {
            // The proxy's memory, not the upstream's stream: no ejection.
            Box::new(NotUpstreamFault(message))
        } else {
            message.into()
        };
        State::Interrupting {
            flush: FlushBeforeError::default(),
            event,
            error: Some(error),
        }
    }

    /// Emit what an interrupted stream has left to say.
    fn drain(
        &mut self,
        upstream: &str,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let State::Interrupting {
            event,
            flush,
            error: err,
        } = self
        else {
            return Poll::Ready(None);
        };
        if let Some(event) = event.take() {
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        // The error event reaches the client before the connection closes.
        std::task::ready!(flush.poll(cx));
        let err = err
            .take()
            .unwrap_or_else(|| error(upstream, "stream failed"));
        *self = State::Finished;
        Poll::Ready(Some(Err(err)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(kind: StreamKind) -> StreamWatch {
        StreamWatch {
            kind,
            outlines: Outlines::new(),
            done: false,
            numbers: SequenceNumbers::default(),
            refused_at: None,
        }
    }

    /// The watch's verdict on `frames` (each read alone; the last one
    /// breaking the stream), the last frame as it goes on, and the error
    /// event to come.
    fn refused(kind: StreamKind, frames: &[&'static [u8]]) -> (Bytes, Option<String>) {
        let mut watched = Some(Box::new(watch(kind)));
        let mut state = State::Streaming;
        let (last, before) = frames.split_last().expect("a frame");
        for frame in before {
            let start = frame_start(&watched);
            assert!(super::watch(&mut watched, "u", &mut state, frame, start).is_ok());
        }
        let start = frame_start(&watched);
        let Err(keep) = super::watch(&mut watched, "u", &mut state, last, start) else {
            panic!("the stream is to break")
        };
        let sent = Bytes::from_static(&last[..keep.unwrap_or(last.len())]);
        let State::Interrupting { event, .. } = state else {
            panic!("the stream is to end")
        };
        let event = event.map(|e| String::from_utf8(e.to_vec()).unwrap());
        (sent, event)
    }

    #[test]
    fn a_refused_event_and_what_follows_it_are_withheld() {
        // The client gets the events before it, then the error event,
        // numbered after the last it got.
        let (sent, event) = refused(
            StreamKind::Responses,
            &[
                b"data: {\"type\":\"a\",\"sequence_number\":5}\n\n: ping\ndata: nope\n\n\
               data: {\"type\":\"b\",\"sequence_number\":7}\n\n",
            ],
        );
        assert_eq!(
            sent,
            &b"data: {\"type\":\"a\",\"sequence_number\":5}\n\n"[..]
        );
        let event = event.expect("an error event");
        assert!(event.contains("\"sequence_number\":6"), "{event}");
        let chat = &b"data: {\"choices\":[]}\n\n"[..];
        let ping = &b"event: ping\ndata: {\"type\":\"ping\"}\n\n"[..];
        for (kind, frame, kept) in [
            (StreamKind::Chat, &b"data: {not json\n\n"[..], chat),
            (
                StreamKind::Messages,
                b"event: content_block_delta\ndata: {\"type\n\n",
                ping,
            ),
            (
                StreamKind::Chat,
                b"data: [DONE]\n\ndata: {}\n\n",
                b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
            ),
        ] {
            let head = if kept.starts_with(b"event") {
                ping
            } else {
                chat
            };
            let whole: &'static [u8] = [head, frame].concat().leak();
            let (sent, event) = refused(kind, &[whole]);
            assert_eq!(sent, kept, "{kind:?}");
            assert!(event.is_some(), "{kind:?}");
        }
        // Alone in its frame: nothing of it goes on.
        let (sent, event) = refused(
            StreamKind::Chat,
            &[b"data: {\"choices\":[]}\n\n", b"data: {not json\n\n"],
        );
        assert!(sent.is_empty());
        assert!(event.is_some());
    }

    #[test]
    fn a_refused_event_read_with_others_cuts_the_frame_they_make() {
        // Two reads gathered into one frame: the first passes, the second
        // completes an event that began in the first and is refused. The
        // frame is cut where that event began, in the first read.
        let mut watched = Some(Box::new(watch(StreamKind::Chat)));
        let mut state = State::Streaming;
        let first = &b"data: {\"choices\":[]}\n\ndata: {not"[..];
        let second = &b" json\n\ndata: {\"choices\":[]}\n\n"[..];
        let start = frame_start(&watched);
        assert!(super::watch(&mut watched, "u", &mut state, first, start).is_ok());
        let Err(Some(keep)) = super::watch(&mut watched, "u", &mut state, second, start) else {
            panic!("the refused event began in this frame")
        };
        let frame = [first, second].concat();
        assert_eq!(&frame[..keep], b"data: {\"choices\":[]}\n\n");
        assert!(matches!(state, State::Interrupting { event: Some(_), .. }));
        // The next frame's start is past both reads.
        assert_eq!(frame_start(&watched), frame.len() as u64);
    }

    #[test]
    fn an_event_refused_after_the_client_got_its_start_goes_on_whole() {
        // Its first line went on in an earlier frame: the rest goes on,
        // then the error event, numbered after every event the client got.
        let (sent, event) = refused(
            StreamKind::Responses,
            &[
                b"data: {\"type\":\"a\",\"sequence_number\":5}\n\ndata: no",
                b"pe\n\ndata: {\"type\":\"b\",\"sequence_number\":7}\n\n",
            ],
        );
        assert_eq!(
            sent,
            &b"pe\n\ndata: {\"type\":\"b\",\"sequence_number\":7}\n\n"[..]
        );
        let event = event.expect("an error event");
        assert!(event.contains("\"sequence_number\":8"), "{event}");
        // One that ends mid-event: no event can follow.
        let (sent, event) = refused(StreamKind::Chat, &[b"data: {not", b" json\n\ndata: {\"cho"]);
        assert_eq!(sent, &b" json\n\ndata: {\"cho"[..]);
        assert!(event.is_none());
    }

    #[test]
    fn a_responses_stream_ends_at_its_last_event_named_either_way() {
        let mut named = watch(StreamKind::Responses);
        named
            .observe(b"event: response.created\ndata: {\"type\":\"response.created\"}\n\n")
            .unwrap();
        assert!(!named.done);
        named
            .observe(b"event: response.completed\ndata: {}\n\n")
            .unwrap();
        assert!(named.done, "named by the event line");

        let mut typed = watch(StreamKind::Responses);
        typed
            .observe(b"data: {\"type\":\"response.completed\",\"response\":{}}\n\n")
            .unwrap();
        assert!(typed.done, "named by the data's type");
    }

    #[test]
    fn a_done_after_the_last_event_of_a_responses_or_messages_stream_is_harmless() {
        for (kind, last) in [
            (
                StreamKind::Responses,
                &b"event: response.completed\ndata: {}\n\n"[..],
            ),
            (StreamKind::Messages, b"event: message_stop\ndata: {}\n\n"),
        ] {
            let mut w = watch(kind);
            assert!(w.observe(b"data: [DONE]\n\n").is_err(), "before the end");
            let mut w = watch(kind);
            w.observe(last).unwrap();
            w.observe(b"data: [DONE]\n\n").unwrap();
            assert!(w.done);
        }
    }

    #[test]
    fn data_that_is_not_an_object_breaks_the_stream() {
        for bad in [
            &b"data: {not json\n\n"[..],
            b"data: [1,2]\n\n",
            b"data: hello\n\n",
        ] {
            assert!(watch(StreamKind::Chat).observe(bad).is_err());
        }
        let mut messages = watch(StreamKind::Messages);
        assert!(
            messages
                .observe(b"data: {\"type\":\"message_stop\"\n\n")
                .is_err()
        );
        let mut chat = watch(StreamKind::Chat);
        chat.observe(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n")
            .unwrap();
        assert!(chat.done);
        assert!(chat.observe(b"data: {}\n\n").is_err(), "data after [DONE]");
    }

    #[test]
    fn keep_alives_are_not_a_broken_stream() {
        for kind in [
            StreamKind::Chat,
            StreamKind::Responses,
            StreamKind::Messages,
        ] {
            let mut w = watch(kind);
            w.observe(b": ping\n\ndata: \n\ndata:\n\ndata:  \n\n")
                .unwrap_or_else(|e| panic!("{kind:?}: {e:?}"));
            assert!(!w.done, "{kind:?}");
        }
    }
}

/// The time a request has been the upstream's to answer: since it was sent,
/// less the time its body spent waiting for the client's next bytes (a
/// slow upload is the client's time, bounded by its own read timeout).
#[derive(Debug)]
pub(crate) struct UploadClock {
    sent: std::time::Instant,
    state: std::sync::Mutex<Waits>,
}

#[derive(Debug, Default)]
struct Waits {
    /// Time spent waiting for the client, in waits that ended.
    waited: Duration,
    /// The wait going on now.
    since: Option<std::time::Instant>,
}

impl UploadClock {
    pub(crate) fn start() -> Arc<Self> {
        Arc::new(UploadClock {
            sent: std::time::Instant::now(),
            state: std::sync::Mutex::default(),
        })
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The time that counts against the first-byte timeout so far.
    pub(crate) fn upstreams_time(&self) -> Duration {
        let now = std::time::Instant::now();
        let waits = self.waits();
        let waiting = waits.since.map_or(Duration::ZERO, |since| now - since);
        (now - self.sent).saturating_sub(waits.waited + waiting)
    }

    fn waiting(&self, pending: bool) {
        let mut waits = self.waits();
        match (pending, waits.since) {
            (true, None) => waits.since = Some(std::time::Instant::now()),
            (false, Some(since)) => {
                waits.waited += since.elapsed();
                waits.since = None;
            }
            _ => {}
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body streamed upstream from the client: the time it waits
    /// for the client's bytes does not count against the first-byte
    /// timeout (see [`UploadClock`]).
    pub(crate) struct Uploading {
        #[pin]
        inner: llm_proxy_core::Body,
        clock: Arc<UploadClock>,
    }
}

impl Uploading {
    pub(crate) fn new(inner: llm_proxy_core::Body, clock: Arc<UploadClock>) -> Self {
        Uploading { inner, clock }
    }
}

/// A failure of the client's body is the client's, not the upstream's: its
/// own verdict (over the limit, a read timeout, the client gone), else an
/// unreadable body (broken chunks).
fn client_error(e: BoxError) -> BoxError {
    if e.is::<Error>() {
        e
    } else {
        Box::new(Error::UnreadableBody(e.to_string()))
    }
}

impl HttpBody for Uploading {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        this.clock.waiting(polled.is_pending());
        polled.map(|frame| frame.map(|frame| frame.map_err(client_error)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
