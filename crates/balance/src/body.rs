//! The response body wrapper that takes the latency sample of `p2c_ewma`.
//!
//! The sample is the time from sending the request to the first body frame
//! (time to first token for a stream; the whole answer for a buffered one),
//! never the response head alone: an LLM server may send the head before it
//! has produced anything. A body that ends without a frame is sampled at its
//! end; one dropped before its first frame (the client hung up) gives no
//! sample, and one whose first poll fails counts as a failed attempt would.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Instant;

use crate::state::{BackendState, Epoch};

pin_project_lite::pin_project! {
    /// Records the time to the first frame of `inner` into a backend's
    /// latency estimate.
    pub(crate) struct FirstFrame<B> {
        #[pin]
        inner: B,
        sample: Option<(Arc<BackendState>, Epoch, Instant)>,
    }
}

impl<B> FirstFrame<B> {
    /// Wrap `inner`; `sample` is the backend, the clock and the send time
    /// (none: nothing to record).
    pub(crate) fn new(inner: B, sample: Option<(Arc<BackendState>, Epoch, Instant)>) -> Self {
        FirstFrame { inner, sample }
    }
}

impl<B: HttpBody> HttpBody for FirstFrame<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            if let Some((state, epoch, start)) = this.sample.take() {
                let now = epoch.now();
                match frame {
                    Some(Err(_)) => state.observe_failure(now, start.elapsed()),
                    _ => state.observe(now, start.elapsed()),
                }
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
