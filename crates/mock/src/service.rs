//! The [`Mock`] service: routes a request, applies latency and injected
//! failures, and answers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, BoxError};
use serde_json::Value;

use crate::anthropic;
use crate::body::MockBody;
use crate::config::{Failure, MockApi, MockConfig};
use crate::error::Dialect;
use crate::openai::{self, Api, ApiError, Generation, GenerationParams};
use crate::responses::{self, Responses};
use crate::sse::SseEvents;
use crate::stats::{InFlight, MockStats};

/// Completion tokens produced when `x-mock-tokens` does not say.
pub(crate) const DEFAULT_TOKENS: usize = 8;
/// The most completion tokens `x-mock-tokens` may ask for.
const MAX_TOKENS: usize = 1_000_000;

/// The response header carrying [`MockConfig::name`].
const NAME_HEADER: HeaderName = HeaderName::from_static("x-mock-name");

/// A deterministic OpenAI-compatible LLM as a tower `Service`.
///
/// Cheap to clone; clones share their configuration, [`MockStats`] and the
/// Responses API's remembered responses.
#[derive(Clone, Debug, Default)]
pub struct Mock {
    shared: Arc<Shared>,
    stats: MockStats,
}

#[derive(Debug, Default)]
struct Shared {
    config: MockConfig,
    name_header: Option<HeaderValue>,
    responses: Responses,
}

/// The future of [`Mock`]'s responses.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Mock {
    /// A mock behaving as `config` says.
    pub fn new(config: MockConfig) -> Self {
        let responses = Responses::named(&config.name);
        let name_header = Some(config.name.as_str())
            .filter(|name| !name.is_empty())
            .and_then(|name| HeaderValue::from_str(name).ok());
        Self {
            shared: Arc::new(Shared {
                config,
                name_header,
                responses,
            }),
            stats: MockStats::default(),
        }
    }

    /// The configuration this mock was built from.
    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// The responses it created and remembers.
    pub(crate) fn responses(&self) -> &Responses {
        &self.shared.responses
    }

    /// The counters of this mock and all its clones.
    pub fn stats(&self) -> MockStats {
        self.stats.clone()
    }

    async fn respond<B>(
        self,
        parts: http::request::Parts,
        body: B,
        guard: InFlight,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let config = &self.shared.config;
        let path = crate::route_path(parts.uri.path());
        let api = MockApi::of_route(path);
        let dialect = match api {
            Some(MockApi::Messages) => Dialect::Anthropic,
            None if config.anthropic_only() => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        };
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                let error: BoxError = error.into();
                let error = ApiError::bad_request(
                    format!("could not read the request body: {error}"),
                    None,
                );
                return self.reply(Reply::Error(error), dialect, None, guard);
            }
        };
        self.stats.record_body(bytes.clone());
        if api.is_some_and(|api| !config.serves(api)) {
            // A server that does not speak this API: no latency, no failure.
            let error = unknown_route(&parts.method, path);
            return self.reply(Reply::Error(error), dialect, None, guard);
        }
        let overrides = match Overrides::from_headers(&parts.headers) {
            Ok(overrides) => overrides,
            Err(error) => return self.reply(Reply::Error(error), dialect, None, guard),
        };
        let latency = overrides.latency.unwrap_or(config.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let failure = overrides.failure.unwrap_or_else(|| config.failure.clone());
        let drop_after = match failure {
            None => None,
            Some(Failure::Hang) => return std::future::pending().await,
            Some(Failure::Status(status)) => {
                let error = ApiError::injected(status);
                return self.reply(Reply::Error(error), dialect, None, guard);
            }
            Some(Failure::RateLimited { retry_after_secs }) => {
                let error = ApiError::rate_limited(retry_after_secs);
                return self.reply(Reply::Error(error), dialect, None, guard);
            }
            Some(Failure::InvalidSse) => {
                return self.reply(Reply::InvalidSse, dialect, None, guard);
            }
            Some(Failure::DropMidStream { after_chunks }) => {
                Some(overrides.drop_after.unwrap_or(after_chunks))
            }
        };
        let tokens = overrides.tokens.unwrap_or(DEFAULT_TOKENS);
        let request = Route {
            method: &parts.method,
            path,
            headers: &parts.headers,
            bytes: &bytes,
            tokens,
            dialect,
        };
        let reply = self.route(&request).unwrap_or_else(Reply::Error);
        self.reply(reply, dialect, drop_after, guard)
    }

    /// The answer to `request`.
    fn route(&self, request: &Route<'_>) -> Result<Reply, ApiError> {
        let Route {
            method,
            path,
            bytes,
            tokens,
            ..
        } = *request;
        let config = &self.shared.config;
        let models = config.model_ids();
        let default_model = models.first().copied().unwrap_or(crate::DEFAULT_MODEL);
        let params = GenerationParams {
            tokens,
            default_model,
            fingerprint: &config.name,
        };
        if path == "/responses" || path.starts_with("/responses/") {
            return self.route_responses(request, &params);
        }
        if path == "/messages" || path.starts_with("/messages/") {
            return route_messages(request, &params);
        }
        if path == "/conversations" || path.starts_with("/conversations/") {
            return self.route_conversations(request);
        }
        match (method, path) {
            (&Method::POST, "/chat/completions" | "/completions") => {
                let api = if path == "/completions" {
                    Api::Completion
                } else {
                    Api::Chat
                };
                let generation = Generation::parse(api, &parse_json(bytes)?, bytes.len(), &params)?;
                if generation.stream {
                    Ok(Reply::Sse(Box::new(generation)))
                } else {
                    Ok(Reply::Json(generation.to_json()))
                }
            }
            (&Method::POST, "/embeddings") => {
                let answer = openai::embeddings(&parse_json(bytes)?, default_model, &config.name)?;
                Ok(Reply::Json(answer))
            }
            (&Method::GET, "/models") => Ok(Reply::Json(match request.dialect {
                Dialect::OpenAi => openai::model_list(&models),
                Dialect::Anthropic => anthropic::model_list(&models),
            })),
            (&Method::GET, _) if path.starts_with("/models/") => {
                let id = &path["/models/".len()..];
                if !models.contains(&id) {
                    return Err(ApiError::not_found(format!(
                        "The model '{id}' does not exist"
                    )));
                }
                Ok(Reply::Json(match request.dialect {
                    Dialect::OpenAi => openai::model(id),
                    Dialect::Anthropic => anthropic::model(id),
                }))
            }
            _ => Err(unknown_route(method, path)),
        }
    }

    /// The Responses API's routes.
    fn route_responses(
        &self,
        request: &Route<'_>,
        params: &GenerationParams<'_>,
    ) -> Result<Reply, ApiError> {
        let Route {
            method,
            path,
            bytes,
            ..
        } = *request;
        let responses = &self.shared.responses;
        let sub = path.strip_prefix("/responses").unwrap_or(path);
        let mut segments = sub.strip_prefix('/').map(|rest| rest.split('/'));
        let id = segments.as_mut().and_then(Iterator::next);
        let action = segments.as_mut().and_then(Iterator::next);
        let extra = segments.as_mut().and_then(Iterator::next);
        let reply = match (method, id, action, extra) {
            (&Method::POST, None, None, None) => {
                let created = responses.create(&parse_json(bytes)?, bytes, params)?;
                if created.stream {
                    return Ok(Reply::Sse(Box::new(created)));
                }
                created.into_json()
            }
            (&Method::POST, Some("input_tokens"), None, None) => {
                responses::input_tokens(&parse_json(bytes)?, bytes.len())?
            }
            (&Method::POST, Some("compact"), None, None) => {
                responses.compact(&parse_json(bytes)?, bytes, params)?
            }
            (&Method::GET, Some(id), None, None) if !id.is_empty() => responses.get(id)?,
            (&Method::DELETE, Some(id), None, None) if !id.is_empty() => responses.delete(id)?,
            (&Method::POST, Some(id), Some("cancel"), None) if !id.is_empty() => {
                responses.cancel(id)?
            }
            (&Method::GET, Some(id), Some("input_items"), None) if !id.is_empty() => {
                responses.input_items(id)?
            }
            _ => return Err(unknown_route(method, path)),
        };
        Ok(Reply::Json(reply))
    }

    /// The Conversations API's routes.
    fn route_conversations(&self, request: &Route<'_>) -> Result<Reply, ApiError> {
        let Route {
            method,
            path,
            bytes,
            ..
        } = *request;
        let responses = &self.shared.responses;
        let sub = path.strip_prefix("/conversations").unwrap_or(path);
        let segments: Vec<&str> = sub.split('/').skip(1).collect();
        let reply = match (method, segments.as_slice()) {
            (&Method::POST, []) => {
                let body = if bytes.is_empty() {
                    Value::Null
                } else {
                    parse_json(bytes)?
                };
                responses.create_conversation(&body, bytes)?
            }
            (&Method::GET, [id]) if !id.is_empty() => responses.get_conversation(id)?,
            (&Method::DELETE, [id]) if !id.is_empty() => responses.delete_conversation(id)?,
            (&Method::GET, [id, "items"]) if !id.is_empty() => responses.conversation_items(id)?,
            _ => return Err(unknown_route(method, path)),
        };
        Ok(Reply::Json(reply))
    }

    /// Turns `reply` into a response, with errors in `dialect`'s format;
    /// `drop_after` injects a mid-stream drop.
    fn reply(
        &self,
        reply: Reply,
        dialect: Dialect,
        drop_after: Option<usize>,
        guard: InFlight,
    ) -> Response<Body> {
        let (status, content_type, body) = match reply {
            Reply::Json(value) => (StatusCode::OK, JSON, json_body(&value, drop_after, guard)),
            Reply::Error(error) => {
                let body = json_body(&error.to_json(dialect), drop_after, guard);
                let mut response = self.response(error.status, JSON, body);
                if let Some(secs) = error.retry_after_secs {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(secs));
                }
                return response;
            }
            Reply::Sse(events) => {
                let interval = self.shared.config.token_interval();
                let body = MockBody::sse(events, interval, drop_after, guard);
                (StatusCode::OK, EVENT_STREAM, body)
            }
            Reply::InvalidSse => {
                let garbage = Bytes::from_static(b"data: {not json\n\n");
                (StatusCode::OK, EVENT_STREAM, MockBody::once(garbage, guard))
            }
        };
        self.response(status, content_type, body)
    }

    fn response(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: MockBody,
    ) -> Response<Body> {
        let mut response = Response::new(body.boxed_unsync());
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        if content_type == EVENT_STREAM {
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
        if let Some(name) = &self.shared.name_header {
            headers.insert(NAME_HEADER, name.clone());
        }
        response
    }
}

const JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream";

/// A request, as routing sees it.
#[derive(Clone, Copy)]
struct Route<'a> {
    method: &'a Method,
    /// The route: the path without `/v1` and query.
    path: &'a str,
    headers: &'a HeaderMap,
    bytes: &'a Bytes,
    /// Completion tokens to produce before a cap.
    tokens: usize,
    /// The error format of the route.
    dialect: Dialect,
}

/// Anthropic's Messages API routes.
fn route_messages(request: &Route<'_>, params: &GenerationParams<'_>) -> Result<Reply, ApiError> {
    let Route {
        method,
        path,
        headers,
        bytes,
        ..
    } = *request;
    if method != Method::POST || !matches!(path, "/messages" | "/messages/count_tokens") {
        return Err(unknown_route(method, path));
    }
    anthropic::check_headers(headers)?;
    let body = parse_json(bytes)?;
    if path == "/messages/count_tokens" {
        return Ok(Reply::Json(anthropic::count_tokens(&body, bytes.len())?));
    }
    let message = anthropic::Message::parse(&body, bytes.len(), params)?;
    if message.stream {
        Ok(Reply::Sse(Box::new(message)))
    } else {
        Ok(Reply::Json(message.to_json()))
    }
}

/// The `404` of a route the mock does not serve.
fn unknown_route(method: &Method, path: &str) -> ApiError {
    ApiError::not_found(format!("Invalid URL ({method} {path})"))
}

/// What to answer, before it becomes a response.
enum Reply {
    Json(Value),
    Error(ApiError),
    Sse(Box<dyn SseEvents>),
    InvalidSse,
}

fn json_body(value: &Value, drop_after: Option<usize>, guard: InFlight) -> MockBody {
    if drop_after.is_some() {
        // Not streamed: the head goes out, then the body fails at once.
        MockBody::fail(guard)
    } else {
        MockBody::once(Bytes::from(value.to_string()), guard)
    }
}

fn parse_json(bytes: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| {
        ApiError::bad_request(
            format!("We could not parse the JSON body of your request: {error}"),
            None,
        )
    })
}

/// Per-request overrides from `x-mock-*` headers.
#[derive(Debug, Default)]
struct Overrides {
    /// `Some(None)`: `x-mock-fail: none` turns a configured failure off.
    failure: Option<Option<Failure>>,
    latency: Option<Duration>,
    tokens: Option<usize>,
    drop_after: Option<usize>,
}

impl Overrides {
    fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let drop_after = header_number(headers, "x-mock-drop-after")?;
        let failure = match header_str(headers, "x-mock-fail")? {
            None => None,
            Some("none") => Some(None),
            Some("drop") => Some(Some(Failure::DropMidStream {
                after_chunks: drop_after.unwrap_or(Failure::DEFAULT_DROP_AFTER),
            })),
            Some("hang") => Some(Some(Failure::Hang)),
            Some("invalid-sse") => Some(Some(Failure::InvalidSse)),
            Some("429") => Some(Some(Failure::RateLimited {
                retry_after_secs: Failure::DEFAULT_RETRY_AFTER_SECS,
            })),
            Some(other) => match other
                .parse::<u16>()
                .ok()
                .filter(|s| (100..=999).contains(s))
            {
                Some(status) => Some(Some(Failure::Status(status))),
                None => {
                    return Err(ApiError::bad_request(
                        format!(
                            "x-mock-fail: expected an HTTP status, 'drop', 'hang', 'invalid-sse' or 'none', got '{other}'"
                        ),
                        None,
                    ));
                }
            },
        };
        let tokens = header_number(headers, "x-mock-tokens")?;
        if tokens.is_some_and(|n| n > MAX_TOKENS) {
            return Err(ApiError::bad_request(
                format!("x-mock-tokens: at most {MAX_TOKENS} tokens"),
                None,
            ));
        }
        Ok(Self {
            failure,
            latency: header_number(headers, "x-mock-latency-ms")?
                .map(|ms| Duration::from_millis(ms as u64)),
            tokens,
            drop_after,
        })
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, ApiError> {
    headers
        .get(name)
        .map(|value| {
            value.to_str().map(str::trim).map_err(|_| {
                ApiError::bad_request(format!("{name}: the value is not visible ASCII"), None)
            })
        })
        .transpose()
}

fn header_number(headers: &HeaderMap, name: &str) -> Result<Option<usize>, ApiError> {
    header_str(headers, name)?
        .map(|value| {
            value.parse().map_err(|_| {
                ApiError::bad_request(
                    format!("{name}: expected a whole number, got '{value}'"),
                    None,
                )
            })
        })
        .transpose()
}

impl<B> tower_service::Service<Request<B>> for Mock
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> ResponseFuture {
        let (parts, body) = request.into_parts();
        // Counted now, not when first polled, so a caller that never polls
        // (or times out at once) still shows up in the stats.
        let guard = self.stats.record_request(&parts);
        if crate::websocket::asks_upgrade(&parts) {
            let path = crate::route_path(parts.uri.path()).to_owned();
            let resp = self.accept(parts, &path, guard);
            return Box::pin(std::future::ready(Ok(resp)));
        }
        let mock = self.clone();
        Box::pin(async move { Ok(mock.respond(parts, body, guard).await) })
    }
}
