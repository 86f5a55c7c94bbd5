//! A refused request's body read to its end, so that its client reads the
//! refusal.
//!
//! A layer that answers before it has read the whole body (a `413` for a
//! declared length over `max_body_bytes`, one over it midway, a `401`)
//! drops the rest. hyper then closes the HTTP/1 connection with the
//! client's unread bytes still in the socket, and the kernel answers those
//! with a reset, which can destroy the answer in the client's receive
//! buffer before the client has read it: a client still writing its body
//! (Python's `httpx`, under the `openai` SDK) sees a connection error, and
//! retries the whole upload. RFC 9112 §9.6 asks a server to close in
//! stages for this; nginx reads the rest ("discards the body", then lingers
//! on close). [`Lingering`] does the same: a body dropped before its end is
//! read to it on a task of its own — within [`DISCARD_BYTES`] and
//! [`DISCARD_FOR`], each wait at most [`DISCARD_WAIT`] — while hyper sends
//! the answer; the connection then goes on (a body read whole leaves it
//! fit for the next request) or closes with nothing unread.
//!
//! Not for HTTP/2, where dropping the body resets the stream alone, nor for
//! a client that waits for `100 Continue` before it sends its body (reading
//! it would ask for the upload the answer refuses).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

/// The most of a dropped body read: past it, the connection is closed.
pub(crate) const DISCARD_BYTES: usize = 64 << 20;
/// The longest a dropped body is read for (nginx's `lingering_time`).
pub(crate) const DISCARD_FOR: Duration = Duration::from_secs(30);
/// The longest wait for its next bytes (nginx's `lingering_timeout`).
pub(crate) const DISCARD_WAIT: Duration = Duration::from_secs(5);

/// A request body read to its end when dropped before it (see the module).
pub(crate) struct Lingering<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    inner: Option<B>,
    linger: bool,
}

impl<B> Lingering<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    /// `req`'s body, to be read to its end if dropped before it: an
    /// HTTP/1 body sent without waiting for `100 Continue`.
    pub(crate) fn wrap(req: Request<B>) -> Request<Lingering<B>> {
        let linger = req.version() <= Version::HTTP_11
            && !req.headers().contains_key(header::EXPECT)
            && !req.body().is_end_stream();
        req.map(|body| Lingering {
            inner: Some(body),
            linger,
        })
    }
}

impl<B> HttpBody for Lingering<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl<B> Drop for Lingering<B>
where
    B: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        if !self.linger || body.is_end_stream() || body.size_hint().lower() > DISCARD_BYTES as u64 {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(body));
        }
    }
}

/// Read `body` to its end, or to the first error, or until it passes the
/// bounds; its bytes are dropped as they come.
async fn discard<B>(mut body: B)
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    let _within = tokio::time::timeout(DISCARD_FOR, async {
        let mut read = 0usize;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(DISCARD_WAIT, body.frame()).await {
            read = read.saturating_add(frame.data_ref().map_or(0, Bytes::len));
            if read > DISCARD_BYTES {
                return;
            }
        }
    })
    .await;
}
