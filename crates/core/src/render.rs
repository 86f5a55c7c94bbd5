//! The edge of a stack: [`Error`]s become OpenAI-style error responses.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Body, Error};

/// Turns every [`Error`] of the inner service into its error response, so
/// the stack can be served by hyper or nested in axum (`Error = Infallible`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RenderErrorsLayer;

impl<S> Layer<S> for RenderErrorsLayer {
    type Service = RenderErrors<S>;

    fn layer(&self, inner: S) -> RenderErrors<S> {
        RenderErrors {
            inner,
            failed: None,
        }
    }
}

/// The service of [`RenderErrorsLayer`].
#[derive(Debug)]
pub struct RenderErrors<S> {
    inner: S,
    /// An error from `poll_ready`, answered on the next call.
    failed: Option<Error>,
}

impl<S: Clone> Clone for RenderErrors<S> {
    fn clone(&self) -> Self {
        RenderErrors {
            inner: self.inner.clone(),
            failed: None,
        }
    }
}

impl<S, R> Service<R> for RenderErrors<S>
where
    S: Service<R, Response = Response<Body>, Error = Error>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = RenderFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.failed.is_none()
            && let Err(e) = ready!(self.inner.poll_ready(cx))
        {
            self.failed = Some(e);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: R) -> RenderFuture<S::Future> {
        match self.failed.take() {
            Some(e) => RenderFuture {
                inner: None,
                failed: Some(e),
            },
            None => RenderFuture {
                inner: Some(self.inner.call(req)),
                failed: None,
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`RenderErrors`].
    pub struct RenderFuture<F> {
        #[pin]
        inner: Option<F>,
        failed: Option<Error>,
    }
}

impl<F> Future for RenderFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Ok(e.into_response()));
        }
        match this.inner.as_pin_mut() {
            Some(f) => Poll::Ready(Ok(ready!(f.poll(cx)).unwrap_or_else(Error::into_response))),
            None => Poll::Ready(Ok(Error::NoUpstreamAvailable(
                "polled after completion".into(),
            )
            .into_response())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{ServiceExt, service_fn};

    #[tokio::test]
    async fn errors_become_responses() {
        let svc = RenderErrorsLayer.layer(service_fn(|_: ()| async {
            Err::<Response<Body>, _>(Error::MissingModel)
        }));
        let resp = svc.oneshot(()).await.unwrap();
        assert_eq!(resp.status(), 400);
    }
}
