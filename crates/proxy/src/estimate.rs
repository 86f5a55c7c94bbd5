//! Token counting without an upstream that counts: `POST
//! /v1/messages/count_tokens` and `POST /v1/responses/input_tokens` are
//! answered with the auth layer's estimate (prompt bytes / 4) and
//! `x-llm-proxy-estimate: true` when no upstream serves them natively.

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, header};
use llm_proxy_core::{Body, Endpoint, Error, RequestMeta, full};
use tower_layer::Layer;
use tower_service::Service;

type Inner = crate::stack::Stack;
use llm_proxy_core::BoxFuture;

/// Answers token-count requests locally when no upstream can.
#[derive(Clone, Copy, Debug, Default)]
pub struct EstimateLayer;

impl<S> Layer<S> for EstimateLayer {
    type Service = Estimate<S>;

    fn layer(&self, inner: S) -> Estimate<S> {
        Estimate { inner }
    }
}

/// The service of [`EstimateLayer`].
#[derive(Clone, Debug)]
pub struct Estimate<S> {
    inner: S,
}

impl Service<Request<Body>> for Estimate<Inner> {
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        let counted = req.extensions().get::<RequestMeta>().and_then(|m| {
            let endpoint = m.endpoint();
            let counts = matches!(
                endpoint,
                Endpoint::MessagesCountTokens | Endpoint::ResponsesInputTokens
            );
            counts.then(|| (endpoint, m.original_body().map_or(0, |b| b.len()) / 4))
        });
        let fut = self.inner.call(req);
        let Some((endpoint, tokens)) = counted else {
            return fut;
        };
        Box::pin(async move {
            match fut.await {
                Err(Error::ApiNotServed(_)) => Ok(estimate(endpoint, tokens)),
                other => other,
            }
        })
    }
}

fn estimate(endpoint: Endpoint, tokens: usize) -> Response<Body> {
    let body = match endpoint {
        Endpoint::ResponsesInputTokens => {
            serde_json::json!({"object": "response.input_tokens", "input_tokens": tokens})
        }
        _ => serde_json::json!({"input_tokens": tokens}),
    };
    let mut resp = Response::new(full(body.to_string()));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-llm-proxy-estimate", HeaderValue::from_static("true"));
    resp
}
