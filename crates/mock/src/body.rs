//! The mock's response body: one frame, an injected failure, or a paced SSE
//! stream produced lazily, frame by frame, as the client reads it.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use llm_proxy_core::BoxError;
use tokio::time::{Instant, Sleep};

use crate::sse::SseEvents;
use crate::stats::InFlight;

/// How long a failing body waits before its error, so the server writes the
/// head and frames sent so far before it aborts the connection (hyper drops
/// unflushed HTTP/1 bytes and queued HTTP/2 frames of a failed body).
const FLUSH_BEFORE_DROP: Duration = Duration::from_millis(10);

/// The deadline of a pause too long to add to the clock (tokio's own
/// "far future": about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The error a body fails with under `Failure::DropMidStream`.
#[derive(Debug)]
pub(crate) struct DroppedMidStream;

impl fmt::Display for DroppedMidStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock: response dropped mid-stream (injected failure)")
    }
}

impl std::error::Error for DroppedMidStream {}

/// A response body that keeps its request counted in flight until it ends or
/// is dropped.
///
/// Nothing is produced ahead of the reader: a streamed answer's next event is
/// rendered when polled, and dropping the body stops the stream at once.
#[derive(Debug)]
pub(crate) struct MockBody {
    state: State,
    guard: InFlight,
}

#[derive(Debug)]
enum State {
    /// One frame, then the end.
    Once(Bytes),
    /// Fail, after [`FLUSH_BEFORE_DROP`].
    Fail,
    /// Fail when the pause is over.
    Failing(Pin<Box<Sleep>>),
    /// A streamed answer.
    Sse(Box<SseStream>),
    /// Ended.
    Done,
}

#[derive(Debug)]
struct SseStream {
    events: Box<dyn SseEvents>,
    next: usize,
    fail_after: Option<usize>,
    interval: Option<Duration>,
    /// The pause before the next token, while armed.
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl MockBody {
    /// `bytes` in one frame.
    pub(crate) fn once(bytes: Bytes, guard: InFlight) -> Self {
        Self {
            state: State::Once(bytes),
            guard,
        }
    }

    /// A body that fails before its first frame, once the head is out.
    pub(crate) fn fail(guard: InFlight) -> Self {
        Self {
            state: State::Fail,
            guard,
        }
    }

    /// The streamed answer `events`, a token every `interval`, failing after
    /// `fail_after` events if set.
    pub(crate) fn sse(
        events: Box<dyn SseEvents>,
        interval: Option<Duration>,
        fail_after: Option<usize>,
        guard: InFlight,
    ) -> Self {
        Self {
            state: State::Sse(Box::new(SseStream {
                events,
                next: 0,
                fail_after,
                interval,
                sleep: None,
                armed: false,
            })),
            guard: guard.streamed(),
        }
    }
}

impl MockBody {
    /// The body produced its last frame or its injected error.
    fn end(&mut self) {
        self.state = State::Done;
        self.guard.finish();
    }
}

impl http_body::Body for MockBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Once(bytes) => {
                    let bytes = std::mem::take(bytes);
                    this.end();
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                State::Fail => {
                    let pause = tokio::time::sleep(FLUSH_BEFORE_DROP);
                    this.state = State::Failing(Box::pin(pause));
                }
                State::Failing(pause) => {
                    ready!(pause.as_mut().poll(cx));
                    this.end();
                    return Poll::Ready(Some(Err(DroppedMidStream.into())));
                }
                State::Sse(stream) => match ready!(stream.poll_event(cx)) {
                    Some(Ok(event)) => return Poll::Ready(Some(Ok(Frame::data(event)))),
                    Some(Err(DroppedMidStream)) => this.state = State::Fail,
                    None => {
                        this.end();
                        return Poll::Ready(None);
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Once(bytes) => SizeHint::with_exact(bytes.len() as u64),
            State::Done => SizeHint::with_exact(0),
            State::Fail | State::Failing(_) | State::Sse(_) => SizeHint::default(),
        }
    }
}

impl SseStream {
    /// The next event; `Err` where the injected failure strikes; `None` after
    /// the last.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, DroppedMidStream>>> {
        if self.fail_after.is_some_and(|n| self.next >= n) {
            return Poll::Ready(Some(Err(DroppedMidStream)));
        }
        if let Some(interval) = self
            .interval
            .filter(|_| self.events.is_token_event(self.next))
        {
            ready!(self.poll_pause(interval, cx));
        }
        match self.events.event(self.next) {
            Some(event) => {
                self.next += 1;
                Poll::Ready(Some(Ok(event)))
            }
            // A drop injected after more events than the answer has still
            // fails, instead of ending cleanly.
            None if self.fail_after.is_some() => Poll::Ready(Some(Err(DroppedMidStream))),
            None => Poll::Ready(None),
        }
    }

    /// Waits `interval` once per call sequence: arms the timer, and disarms it
    /// when it fires.
    fn poll_pause(&mut self, interval: Duration, cx: &mut Context<'_>) -> Poll<()> {
        // A pace slower than the clock can count (1e-19 tokens per second)
        // waits as `tokio::time::sleep` does for such a duration.
        let now = Instant::now();
        let deadline = now
            .checked_add(interval)
            .unwrap_or_else(|| now + FAR_FUTURE);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(sleep.as_mut().poll(cx));
        self.armed = false;
        Poll::Ready(())
    }
}
