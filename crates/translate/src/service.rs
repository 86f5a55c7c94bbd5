//! [`TranslateLayer`], the [`Translate`] service and its [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, Uri, header};
use llm_proxy_core::refusal::{copy_request, refuses_stream_options};
use llm_proxy_core::{Body, Endpoint, Error, RequestMeta, Waited, call_boxed};
use tower_layer::Layer;
use tower_service::Service;

use crate::config::{Direction, Plan, TranslateConfig};
use crate::response::{self, Translating, Translation};
use crate::{chat_over_messages, messages_over_chat, responses_over_chat};

/// Wraps one upstream's service in a [`Translate`] service.
#[derive(Clone, Debug)]
pub struct TranslateLayer {
    config: Arc<TranslateConfig>,
}

impl TranslateLayer {
    /// A layer for an upstream described by `config`.
    pub fn new(config: TranslateConfig) -> Self {
        TranslateLayer {
            config: Arc::new(config),
        }
    }

    /// The upstream's dialects.
    pub fn config(&self) -> &TranslateConfig {
        &self.config
    }
}

impl<S> Layer<S> for TranslateLayer {
    type Service = Translate<S>;

    fn layer(&self, inner: S) -> Translate<S> {
        Translate {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Serves a request in the client's dialect from an upstream that speaks
/// another (see the [crate docs](crate)). Requests the upstream serves
/// natively pass through untouched. A clone of the inner service sends a
/// translated stream once more, without `stream_options`, when the
/// upstream refuses them.
#[derive(Clone, Debug)]
pub struct Translate<S> {
    inner: S,
    config: Arc<TranslateConfig>,
}

impl<S> Translate<S> {
    /// Wrap `inner`, an upstream described by `config`.
    pub fn new(inner: S, config: TranslateConfig) -> Self {
        TranslateLayer::new(config).layer(inner)
    }

    /// The upstream's dialects.
    pub fn config(&self) -> &TranslateConfig {
        &self.config
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, consuming the wrapper.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

type Translated = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`Translate`]: the inner future itself for a native
    /// request, the translation of its answer otherwise.
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Native { #[pin] inner: F },
        Translated { future: Translated },
        Failed { error: Option<Error> },
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Native { inner } => inner.poll(cx),
            StateProj::Translated { future } => future.as_mut().poll(cx),
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| Error::NoUpstreamAvailable("polled after completion".into())))),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S> Service<Request<Body>> for Translate<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> ResponseFuture<S::Future> {
        let endpoint = req
            .extensions()
            .get::<RequestMeta>()
            .map(RequestMeta::endpoint)
            .or_else(|| Endpoint::from_path(req.uri().path()))
            .unwrap_or(Endpoint::Passthrough);
        let state = match self.config.plan(endpoint) {
            Plan::Native => State::Native {
                inner: self.inner.call(req),
            },
            Plan::Refuse(why) => State::Failed {
                error: Some(TranslateConfig::refusal(why)),
            },
            Plan::Translate(direction) => match prepare(direction, &mut req) {
                Err(error) => State::Failed { error: Some(error) },
                Ok((translation, asked_usage, streamed)) => {
                    let budget = req
                        .extensions()
                        .get::<RequestMeta>()
                        .and_then(RequestMeta::budget)
                        .cloned();
                    // Should the upstream refuse the `stream_options` the
                    // translation added, the request goes once more
                    // without: a copy of its head (the body is in its
                    // `RequestMeta`) and a clone of the service, readied
                    // only then.
                    let again = asked_usage.then(|| (copy_request(&req), self.inner.clone()));
                    let waited = req.extensions().get::<Waited>().cloned();
                    let future = translated(
                        self.inner.call(req),
                        Translating {
                            translation,
                            streamed,
                            budget,
                            waited,
                        },
                        again,
                    );
                    State::Translated { future }
                }
            },
        };
        ResponseFuture { state }
    }
}

/// The inner answer, translated; `again`: the request (head) to send once
/// more without `stream_options`, and the service to send it with, should
/// the upstream refuse them (see [`refuses_stream_options`]).
fn translated<F, S>(
    answer: F,
    translating: Translating,
    again: Option<(Request<Body>, S)>,
) -> Translated
where
    F: Future<Output = Result<Response<Body>, Error>> + Send + 'static,
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Send + 'static,
    S::Future: Send + 'static,
{
    Box::pin(async move {
        let mut answer = answer.await?;
        if let Some((mut req, mut inner)) = again {
            let (refused, first) =
                refuses_stream_options(answer, req.extensions().get::<Waited>()).await;
            answer = if refused {
                tracing::debug!("the upstream refused stream_options; retrying without");
                drop(first);
                if let Some(json) = req
                    .extensions_mut()
                    .get_mut::<RequestMeta>()
                    .and_then(RequestMeta::json_mut)
                {
                    json.shift_remove("stream_options");
                }
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                call_boxed(&mut inner, req).await?
            } else {
                first
            };
        }
        response::translate(answer, translating).await
    })
}

/// Rewrite the request for the upstream: body, endpoint, path, headers.
/// Also whether the translated body asks for the usage chunk
/// (`stream_options`: a chat body is built whole by the translation, so
/// that is always the translation's own doing), and whether the client
/// asked for a stream.
fn prepare(
    direction: Direction,
    req: &mut Request<Body>,
) -> Result<(Translation, bool, bool), Error> {
    let meta = req
        .extensions_mut()
        .get_mut::<RequestMeta>()
        .ok_or_else(|| {
            Error::Misconfigured(
                "the translate layer needs the parse layer's RequestMeta in front of it".into(),
            )
        })?;
    let json = meta.json().ok_or(Error::InvalidBody)?;
    let (body, translation) = match direction {
        Direction::MessagesOverChat => {
            let (body, ctx) = messages_over_chat::request::request(json)?;
            (body, Translation::MessagesOverChat(ctx))
        }
        Direction::ChatOverMessages => {
            let (body, ctx) = chat_over_messages::request::request(json)?;
            (body, Translation::ChatOverMessages(ctx))
        }
        Direction::ResponsesOverChat => {
            let (body, ctx) = responses_over_chat::request::request(json)?;
            (body, Translation::ResponsesOverChat(Box::new(ctx)))
        }
    };
    let asked_usage = direction.upstream_endpoint() == Endpoint::ChatCompletions
        && body.contains_key("stream_options");
    let streamed = meta.is_stream();
    meta.translate_to(direction.upstream_endpoint(), body);
    *req.uri_mut() = upstream_uri(req.uri(), direction.upstream_path())?;
    let headers = req.headers_mut();
    // The answer is parsed here: it must come uncompressed.
    headers.remove(header::ACCEPT_ENCODING);
    if direction == Direction::ChatOverMessages && !headers.contains_key("anthropic-version") {
        headers.insert(
            "anthropic-version",
            HeaderValue::from_static(chat_over_messages::ANTHROPIC_VERSION),
        );
    }
    tracing::debug!(?direction, "translated request");
    Ok((translation, asked_usage, streamed))
}

/// `uri` with its path replaced by `path` (query kept).
fn upstream_uri(uri: &Uri, path: &str) -> Result<Uri, Error> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|e| Error::ApiNotServed(format!("cannot build the upstream path: {e}")))?,
    );
    Uri::from_parts(parts)
        .map_err(|e| Error::ApiNotServed(format!("cannot build the upstream URI: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_path_keeping_query() {
        let uri: Uri = "/v1/messages?beta=true".parse().unwrap();
        assert_eq!(
            upstream_uri(&uri, "/v1/chat/completions").unwrap(),
            "/v1/chat/completions?beta=true"
        );
        let uri: Uri = "http://h:1/v1/chat/completions".parse().unwrap();
        assert_eq!(
            upstream_uri(&uri, "/v1/messages").unwrap(),
            "http://h:1/v1/messages"
        );
    }
}
