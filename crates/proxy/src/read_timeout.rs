//! A bound on the wait for each piece of a client's request body.
//!
//! hyper bounds the wait for a request's head (`header_read_timeout`), not
//! for its body: a client that sends a head, then one byte of its body a
//! minute, would hold its connection, its permit and up to `max_body_bytes`
//! of buffer for as long as it likes. [`ReadTimeout`] fails the body with
//! [`Error::RequestTimeout`] (408) when no frame comes for the timeout, as
//! nginx's `client_body_timeout` does. A body that is there at once (the
//! usual small request, read with its head) never arms a timer.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::{BoxError, Error};
use tokio::time::{Instant, Sleep};

pin_project_lite::pin_project! {
    /// A request body whose every wait for the next frame is bounded.
    pub(crate) struct ReadTimeout<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // Made on the first wait, reset after a frame came.
        sleep: Option<Pin<Box<Sleep>>>,
        // A frame came since the timer was last set.
        progressed: bool,
    }
}

impl<B> ReadTimeout<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Self {
        ReadTimeout {
            inner,
            timeout,
            sleep: None,
            progressed: false,
        }
    }
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
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = *this.timeout;
        let sleep = match this.sleep {
            Some(sleep) => {
                if std::mem::take(this.progressed) {
                    sleep.as_mut().reset(Instant::now() + timeout);
                }
                sleep
            }
            None => this.sleep.insert(Box::pin(tokio::time::sleep(timeout))),
        };
        ready!(sleep.as_mut().poll(cx));
        let waited_ms = u64::try_from(this.timeout.as_millis()).unwrap_or(u64::MAX);
        Poll::Ready(Some(Err(Box::new(Error::RequestTimeout { waited_ms }))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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

    /// The receiver as a stream, without a dependency for one adapter.
    fn tokio_stream_shim<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
