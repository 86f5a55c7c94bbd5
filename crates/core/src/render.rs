//! The edge of a stack: [`Error`]s become error responses, in the shape of
//! the request's API (Anthropic's on `/v1/messages*`, OpenAI's elsewhere).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Body, Dialect, Endpoint, Error};

/// Turns every [`Error`] of the inner service into its error response, so
/// the stack can be served by hyper or nested in axum (`Error = Infallible`).
/// The response speaks the dialect of the request's path: a Claude Code
/// client on `/v1/messages` reads Anthropic's error shape.
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

impl<S, B> Service<http::Request<B>> for RenderErrors<S>
where
    S: Service<http::Request<B>, Response = Response<Body>, Error = Error>,
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

    fn call(&mut self, req: http::Request<B>) -> RenderFuture<S::Future> {
        let path = req.uri().path();
        let dialect = Endpoint::from_path(path)
            .unwrap_or(Endpoint::Passthrough)
            .dialect_at(path);
        match self.failed.take() {
            Some(e) => RenderFuture {
                inner: None,
                failed: Some(e),
                dialect,
            },
            None => RenderFuture {
                inner: Some(self.inner.call(req)),
                failed: None,
                dialect,
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
        dialect: Dialect,
    }
}

impl<F> Future for RenderFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let dialect = *this.dialect;
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Ok(e.into_response_in(dialect)));
        }
        match this.inner.as_pin_mut() {
            Some(f) => Poll::Ready(Ok(
                ready!(f.poll(cx)).unwrap_or_else(|e| e.into_response_in(dialect))
            )),
            None => Poll::Ready(Ok(Error::NoUpstreamAvailable(
                "polled after completion".into(),
            )
            .into_response_in(dialect))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{ServiceExt, service_fn};

    #[tokio::test]
    async fn errors_become_responses_in_the_request_s_dialect() {
        let svc = RenderErrorsLayer.layer(service_fn(|_: http::Request<()>| async {
            Err::<Response<Body>, _>(Error::MissingModel)
        }));
        for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
            let req = http::Request::post(path).body(()).unwrap();
            let resp = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 400);
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            // Anthropic's shape has a top-level `type`.
            assert_eq!(json["type"] == "error", anthropic, "{path}: {json}");
        }
    }
}
