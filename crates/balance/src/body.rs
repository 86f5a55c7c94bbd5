//! The response body wrapper that takes the latency sample of `p2c_ewma` and
//! tells the backend's health how the body ended.
//!
//! The sample is the time from sending the request to the first body frame
//! (time to first token for a stream; the whole answer for a buffered one),
//! never the response head alone: an LLM server may send the head before it
//! has produced anything. A body that ends without a frame is sampled at its
//! end, and one that is over at its head (`content-length: 0`), which may
//! never be polled, at its head (`attempt.rs`). One dropped before its first frame (the client hung up) says the
//! first frame takes at least that long: its wait may raise the estimate,
//! never lower it, so that a server that sends heads and then nothing does
//! not look fast to clients that give up on it.
//!
//! A body that fails (the upstream broke it: a reset, a stall, invalid SSE)
//! is a failure of its backend, towards its ejection, at any frame; one
//! that ends, or is dropped after its first frame, without failing resets
//! the backend's failure count, unless a failure was counted after its head
//! came (a stream answered before the backend began to fail says nothing of
//! it now). The head's 200 alone does not: a server that breaks every
//! stream mid-way answers every head with 200. For that reason too, a
//! request panic-routed into its backend's ejection ends the ejection when
//! its body ends whole (its last frame read, or the body at its end after
//! a frame, as hyper stops reading a body of known length), not at its
//! head nor when its client leaves mid-way.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use llm_proxy_core::{BoxError, is_upstream_fault};

use crate::state::{BackendState, Epoch};

pin_project_lite::pin_project! {
    /// Watches `inner` for its backend: the time to its first frame into
    /// the latency estimate, and how it ends into the health state.
    pub(crate) struct FirstFrame<B> {
        #[pin]
        inner: B,
        watch: Option<Watch>,
    }

    impl<B> PinnedDrop for FirstFrame<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            match this.watch.take() {
                Some(watch) if watch.sampled => {
                    watch.state.clean_end_of(watch.seen);
                    if let Some(seen) = watch.ends_rest
                        && watch.ended
                    {
                        watch.state.whole_of(watch.epoch.now(), seen);
                    }
                }
                // Dropped before its first frame: the backend took at least
                // this long, and showed nothing of its health.
                Some(watch) => {
                    let (now, elapsed) = watch.epoch.now_since(watch.start);
                    watch.state.observe_at_least(now, elapsed);
                }
                None => {}
            }
        }
    }
}

/// The backend, the clock and the send time; the backend's failures
/// counted when the head came; whether the first frame was sampled; the
/// ejection a panic-routed request was sent into, which its whole end
/// ends; whether its last frame was read.
pub(crate) struct Watch {
    state: Arc<BackendState>,
    epoch: Epoch,
    start: Instant,
    seen: u64,
    sampled: bool,
    ends_rest: Option<u64>,
    ended: bool,
}

impl<B> FirstFrame<B> {
    /// Wrap `inner`, the body of an answer of `state`'s backend sent at
    /// `start` (none: nothing to record); `ends_rest`: the backend's
    /// ejections when the request was sent, if it was panic-routed into
    /// the one that still runs.
    pub(crate) fn new(
        inner: B,
        sample: Option<(Arc<BackendState>, Epoch, Instant)>,
        ends_rest: Option<u64>,
    ) -> Self {
        FirstFrame {
            inner,
            watch: sample.map(|(state, epoch, start)| Watch {
                seen: state.failures_seen(),
                state,
                epoch,
                start,
                sampled: false,
                ends_rest,
                ended: false,
            }),
        }
    }
}

impl<B: HttpBody<Error = BoxError>> HttpBody for FirstFrame<B> {
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(frame) = &polled
            && let Some(watch) = this.watch
        {
            // (A body at its end after a frame may not be polled again.)
            watch.ended |= frame.is_none()
                || (watch.ends_rest.is_some()
                    && matches!(frame, Some(Ok(_)))
                    && this.inner.is_end_stream());
            // The clock is read only where the frame tells something.
            match frame {
                Some(Err(e)) => {
                    // Taken: no clean end at the drop. An error that is not
                    // the upstream's (a translation that cannot go on) is
                    // no failure of it either.
                    if let Some(watch) = this.watch.take()
                        && is_upstream_fault(e)
                    {
                        let (now, elapsed) = watch.epoch.now_since(watch.start);
                        watch.state.record_failure(now, elapsed, false);
                    }
                }
                _ if !watch.sampled => {
                    watch.sampled = true;
                    let (now, elapsed) = watch.epoch.now_since(watch.start);
                    watch.state.observe(now, elapsed);
                }
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
