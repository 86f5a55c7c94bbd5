use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use llm_proxy_core::sse::Parser;
use llm_proxy_core::{BoxError, Error, StreamKind};
use tokio::time::{Instant, Sleep};

use crate::pool::Lease;

pin_project_lite::pin_project! {
    /// An upstream's response body on its way to the client.
    ///
    /// Frames pass through as they arrive, unchanged. The body
    ///
    /// - fails when the upstream is silent for longer than the idle timeout;
    /// - for an SSE stream of a model API, watches the events: a stream that
    ///   breaks, ends before its dialect's last event (`data: [DONE]`,
    ///   `response.completed`, `message_stop`), or carries a data payload
    ///   that is not a JSON object (checked by its shape, `{…}`: the proxy
    ///   does not parse every event) gets one final error event with the
    ///   code `stream_interrupted` and then fails, so the client's
    ///   connection is closed rather than cleanly ended;
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
        // Frames of one burst, gathered before they are handed on (see
        // `poll_frame`); the lease's driver poll count when the body last
        // yielded to let the driver run, and how often it re-yielded since.
        burst: VecDeque<Frame<Bytes>>,
        yielded_at: Option<u64>,
        spins: u8,
        releasing: bool,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            // hyper drops a body with a known length after its last frame
            // without polling it to the end: the connection is still reusable.
            let this = this.project();
            if this.inner.is_end_stream()
                && let Some(lease) = this.lease.take()
            {
                lease.release();
            }
        }
    }
}

struct StreamWatch {
    kind: StreamKind,
    parser: Parser,
    done: bool,
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
        flushed: bool,
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
                    parser: Parser::new(),
                    done: false,
                })
            }),
            state: State::Streaming,
            upstream,
            lease: None,
            burst: VecDeque::new(),
            yielded_at: None,
            spins: 0,
            releasing: false,
        }
    }

    /// Give `lease` back to its pool when the body has been received whole.
    pub(crate) fn with_lease(mut self, lease: Option<Lease>) -> Self {
        self.lease = lease;
        self
    }
}

impl StreamWatch {
    /// Feed a chunk; `Err(reason)` when the stream is not a valid stream of
    /// its kind.
    fn observe(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.parser.push(chunk).map_err(|e| e.to_string())?;
        while let Some(event) = self.parser.next_event() {
            if self.kind == StreamKind::Chat && event.is_done() {
                self.done = true;
                continue;
            }
            if self.done && self.kind == StreamKind::Chat {
                return Err("data after [DONE]".into());
            }
            // Each dialect's events are JSON objects. Checking the shape is
            // enough to catch a garbled stream; the client's parser reads the
            // rest. The full parse is only needed for a `type` with no
            // `event:` line to name it.
            if !looks_like_object(&event.data) {
                return Err("the upstream sent an SSE event whose data is not JSON".into());
            }
            let typed;
            let name = match (self.kind, event.event.as_deref()) {
                (StreamKind::Chat, _) => "",
                (_, Some(name)) => name,
                (_, None) => {
                    let Ok(parsed) = serde_json::from_str::<Typed<'_>>(&event.data) else {
                        return Err("the upstream sent an SSE event whose data is not JSON".into());
                    };
                    typed = parsed;
                    typed.kind.as_deref().unwrap_or("")
                }
            };
            // The dialect's own last event, or the upstream's own error event:
            // either is a clean end of the stream.
            self.done |= match self.kind {
                StreamKind::Chat => false,
                StreamKind::Responses => matches!(
                    name,
                    "response.completed" | "response.failed" | "response.incomplete" | "error"
                ),
                StreamKind::Messages => matches!(name, "message_stop" | "error"),
            };
        }
        Ok(())
    }
}

/// `{…}`, give or take surrounding whitespace.
fn looks_like_object(data: &str) -> bool {
    let data = data.trim_ascii();
    data.starts_with('{') && data.ends_with('}')
}

fn error(upstream: &str, reason: &str) -> BoxError {
    format!("upstream `{upstream}`: {reason}").into()
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    /// Frames are handed on in bursts. hyper's client hands a body to its
    /// reader one chunk per poll of the connection's driver task, and hyper's
    /// server writes out what it has whenever the body it sends is pending:
    /// an upstream burst of N events read at once (a stream's opening events,
    /// a fast model's tokens, the last chunks) would leave in N `writev`s.
    /// So when the next chunk is not there yet, the body yields to let the
    /// driver run, gathering chunks, until the driver has run once and
    /// brought nothing new; then the burst goes out together. Only chunks
    /// already read are gathered: nothing waits on the network.
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        /// Yields while the driver has not run, before the burst goes anyway.
        const MAX_SPINS: u8 = 2;
        let mut this = self.project();
        loop {
            if *this.releasing {
                if let Some(frame) = this.burst.pop_front() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                *this.releasing = false;
            }
            match this.state {
                State::Finished => return Poll::Ready(None),
                State::Interrupting { .. } => return this.state.drain(this.upstream, cx),
                State::Streaming => {}
            }

            let outcome = match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    *this.idle_armed = false;
                    *this.yielded_at = None;
                    if let (Some(watch), Some(data)) = (this.watch.as_mut(), frame.data_ref())
                        && let Err(reason) = watch.observe(data)
                    {
                        // Pass this frame on, then end with the error event.
                        *this.state = State::interrupt(this.upstream, &reason, Some(watch.kind));
                        *this.releasing = true;
                    }
                    this.burst.push_back(frame);
                    continue;
                }
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
                            StreamKind::Messages => {
                                "the upstream ended the stream before message_stop"
                            }
                        }
                        .to_owned()),
                        _ => Ok(()),
                    }
                }
                Poll::Pending if !this.burst.is_empty() => {
                    let polls = this.lease.as_ref().map(Lease::driver_polls);
                    let yield_now = match (polls, *this.yielded_at) {
                        // hyper-util's client (https): no count to go by.
                        (None, _) => false,
                        (Some(now), None) => {
                            *this.yielded_at = Some(now);
                            *this.spins = 0;
                            true
                        }
                        // The driver has run since and brought nothing.
                        (Some(now), Some(then)) if now != then => false,
                        // Not yet (polled again before the driver ran).
                        (Some(_), Some(_)) => {
                            *this.spins += 1;
                            *this.spins <= MAX_SPINS
                        }
                    };
                    if yield_now {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    *this.yielded_at = None;
                    *this.releasing = true;
                    continue;
                }
                Poll::Pending => {
                    if !*this.idle_armed {
                        *this.idle_armed = true;
                        this.idle
                            .as_mut()
                            .reset(Instant::now() + *this.idle_timeout);
                    }
                    ready!(this.idle.as_mut().poll(cx));
                    Err(format!(
                        "no data from the upstream for {} ms",
                        this.idle_timeout.as_millis()
                    ))
                }
            };
            // The end, clean or not, comes after the frames gathered before it.
            *this.state = match outcome {
                Ok(()) => State::Finished,
                Err(reason) => {
                    State::interrupt(this.upstream, &reason, this.watch.as_ref().map(|w| w.kind))
                }
            };
            *this.releasing = true;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.burst.is_empty()
            && (matches!(self.state, State::Finished)
                || (matches!(self.state, State::Streaming)
                    && self.watch.is_none()
                    && self.inner.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        if self.watch.is_none() && matches!(self.state, State::Streaming) {
            let queued: u64 = self
                .burst
                .iter()
                .filter_map(Frame::data_ref)
                .map(|d| d.len() as u64)
                .sum();
            let inner = self.inner.size_hint();
            let mut hint = SizeHint::new();
            hint.set_lower(inner.lower().saturating_add(queued));
            if let Some(upper) = inner.upper() {
                hint.set_upper(upper.saturating_add(queued));
            }
            hint
        } else {
            SizeHint::default()
        }
    }
}

impl State {
    /// The state that ends the stream: an error event (for watched SSE
    /// streams), then the error itself.
    fn interrupt(upstream: &str, reason: &str, kind: Option<StreamKind>) -> State {
        tracing::warn!(upstream, reason, "upstream stream interrupted");
        let message = format!("upstream `{upstream}`: {reason}");
        let event = kind.map(|k| Error::stream_interrupted_event_for(k, &message));
        State::Interrupting {
            flushed: event.is_none(),
            event,
            error: Some(message.into()),
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
            flushed,
            error: err,
        } = self
        else {
            return Poll::Ready(None);
        };
        if let Some(event) = event.take() {
            return Poll::Ready(Some(Ok(Frame::data(event))));
        }
        if !*flushed {
            // hyper writes buffered frames out when the body is pending, and
            // drops them when it fails: pause once so the error event reaches
            // the client before the connection is closed.
            *flushed = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
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
            parser: Parser::new(),
            done: false,
        }
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
}
