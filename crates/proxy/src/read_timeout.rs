//! A bound on the wait for each piece of a client's request body, and on
//! the whole of a body the proxy buffers.
//!
//! hyper bounds the wait for a request's head (`header_read_timeout`), not
//! for its body: a client that sends a head, then one byte of its body a
//! minute, would hold its connection, its permit and up to `max_body_bytes`
//! of buffer for as long as it likes. [`ReadTimeout`] fails the body with
//! [`Error::RequestTimeout`] (408) when no frame comes for the timeout, as
//! nginx's `client_body_timeout` does.
//!
//! A wait per piece does not bound a body sent a byte every few seconds: it
//! would hold its connection and, when the proxy buffers it, its share of
//! `max_buffered_body_bytes` for hours (one HTTP/2 connection's 128 streams
//! of 4 MiB each are half the default budget). A body the proxy buffers
//! has a deadline too ([`ReadTimeout::with_deadline`]): it must come whole
//! within it, counted from the first wait for it, or it fails with
//! [`Error::RequestBodyTooSlow`] (408). A body streamed on to the upstream (a
//! file upload) has none: the upstream takes it at its own pace.
//!
//! A body that is there at once (the usual small request, read with its
//! head) never arms a timer nor reads the clock.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::{BoxError, Error, Waited};
use tokio::time::{Instant, Sleep};

pin_project_lite::pin_project! {
    /// A request body whose every wait for the next frame is bounded.
    pub(crate) struct ReadTimeout<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // The bound on the whole body, if any, and once the body is first
        // waited for, when it ends.
        whole: Option<Duration>,
        deadline: Option<Instant>,
        // Made on the first wait, reset after a frame came.
        sleep: Option<Pin<Box<Sleep>>>,
        // A frame came since the timer was last set.
        progressed: bool,
        // Where the time waited for the client's bytes is counted, and
        // since when the body is waited for now.
        waited: Option<Waited>,
        waiting_since: Option<Instant>,
    }
}

impl<B> ReadTimeout<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Self {
        ReadTimeout {
            inner,
            timeout,
            whole: None,
            deadline: None,
            sleep: None,
            progressed: false,
            waited: None,
            waiting_since: None,
        }
    }

    /// Count the time waited for the body's bytes in `waited` (a body
    /// streamed on to the upstream is not: that wait is the upstream's).
    pub(crate) fn counting_in(mut self, waited: Option<Waited>) -> Self {
        self.waited = waited;
        self
    }

    /// The whole body must come within `whole` of the first wait for it.
    pub(crate) fn with_deadline(mut self, whole: Option<Duration>) -> Self {
        self.whole = whole;
        self
    }
}

/// A read error of the client's body, as the request's error: the client
/// gone mid-body (its connection closed or reset, its HTTP/2 stream reset)
/// is [`Error::ClientClosedRequest`], counted 499 as a request abandoned
/// before its answer is; anything else is passed on, to be answered 400:
/// broken framing, and failures hyper does not say the cause of.
fn client_error(e: impl Into<BoxError>) -> BoxError {
    let e = e.into();
    if client_went_away(&*e) {
        Box::new(Error::ClientClosedRequest)
    } else {
        e
    }
}

/// Whether `e`, or an error it was caused by, says the peer went away:
/// hyper's body cut short (HTTP/1: the connection ended before the
/// announced length or the last chunk), a reset or closed connection, or
/// an HTTP/2 stream or connection the peer reset or told to go away.
fn client_went_away(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_io() || (h2.is_remote() && (h2.is_reset() || h2.is_go_away()));
        }
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
    })
}

impl<B> HttpBody for ReadTimeout<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.progressed = true;
            if let (Some(waited), Some(since)) = (&*this.waited, this.waiting_since.take()) {
                waited.add(since.elapsed());
            }
            return Poll::Ready(frame.map(|f| f.map_err(client_error)));
        }
        if this.waited.is_some() && this.waiting_since.is_none() {
            *this.waiting_since = Some(Instant::now());
        }
        let timeout = *this.timeout;
        let sleep = match this.sleep {
            Some(sleep) => {
                if std::mem::take(this.progressed) {
                    sleep
                        .as_mut()
                        .reset(until(Instant::now() + timeout, *this.deadline));
                }
                sleep
            }
            None => {
                let now = Instant::now();
                *this.deadline = this.whole.map(|whole| now + whole);
                let first = until(now + timeout, *this.deadline);
                this.sleep.insert(Box::pin(tokio::time::sleep_until(first)))
            }
        };
        ready!(sleep.as_mut().poll(cx));
        if let (Some(waited), Some(since)) = (&*this.waited, this.waiting_since.take()) {
            waited.add(since.elapsed());
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let error = match (*this.whole, *this.deadline) {
            (Some(whole), Some(deadline)) if sleep.deadline() >= deadline => {
                Error::RequestBodyTooSlow {
                    within_ms: ms(whole),
                }
            }
            _ => Error::RequestTimeout {
                waited_ms: ms(timeout),
            },
        };
        Poll::Ready(Some(Err(Box::new(error))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `next`, or the deadline when it comes first.
fn until(next: Instant, deadline: Option<Instant>) -> Instant {
    deadline.map_or(next, |deadline| next.min(deadline))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_fails_with_408_and_a_steady_one_does_not() {
        // One frame now, one after 5 s, then nothing: the 10 s bound is per
        // wait, so the second frame comes through and the silence fails.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = StreamBody::new(tokio_stream_shim(rx));
        let mut body = std::pin::pin!(ReadTimeout::new(body, Duration::from_secs(10)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
                .await
                .unwrap();
            tx
        });
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "b"
        );
        let start = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        let err = err.downcast::<Error>().unwrap();
        assert_eq!(err.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.code(), "request_timeout");
        drop(feeder.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_trickle_fails_at_the_deadline_for_the_whole_body() {
        // A byte every 5 s: never 10 s without one, but the whole body is
        // not there 12 s after the first wait.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let body = StreamBody::new(tokio_stream_shim(rx));
        let mut body = std::pin::pin!(
            ReadTimeout::new(body, Duration::from_secs(10))
                .with_deadline(Some(Duration::from_secs(12)))
        );
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let start = Instant::now();
        assert!(body.frame().await.unwrap().is_ok());
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(12));
        let err = err.downcast::<Error>().unwrap();
        assert!(matches!(
            *err,
            Error::RequestBodyTooSlow { within_ms: 12_000 }
        ));
        assert_eq!(err.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.code(), "request_timeout");
        feeder.abort();
    }

    /// The receiver as a stream, without a dependency for one adapter.
    #[tokio::test(start_paused = true)]
    async fn the_time_waited_for_the_bytes_is_counted() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = StreamBody::new(tokio_stream_shim(rx));
        let waited = Waited::new();
        let mut body = std::pin::pin!(
            ReadTimeout::new(body, Duration::from_secs(10)).counting_in(Some(waited.clone()))
        );
        // There at once: no wait.
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(waited.total(), Duration::ZERO);
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"b"))))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        body.frame().await.unwrap().unwrap();
        // Work between reads is not waiting: 5 s for "b", then 1 s of the
        // 2 s to the end.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(body.frame().await.is_none());
        assert_eq!(waited.total(), Duration::from_secs(6));
        feeder.await.unwrap();
    }

    fn tokio_stream_shim<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
