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

use crate::body::MockBody;
use crate::config::{Failure, MockConfig};
use crate::openai::{self, Api, ApiError, Generation, GenerationParams};
use crate::stats::{InFlight, MockStats};

/// Completion tokens produced when `x-mock-tokens` does not say.
const DEFAULT_TOKENS: usize = 8;
/// The most completion tokens `x-mock-tokens` may ask for.
const MAX_TOKENS: usize = 1_000_000;

/// The response header carrying [`MockConfig::name`].
const NAME_HEADER: HeaderName = HeaderName::from_static("x-mock-name");

/// A deterministic OpenAI-compatible LLM as a tower `Service`.
///
/// Cheap to clone; clones share their configuration and [`MockStats`].
#[derive(Clone, Debug, Default)]
pub struct Mock {
    shared: Arc<Shared>,
    stats: MockStats,
}

#[derive(Debug, Default)]
struct Shared {
    config: MockConfig,
    name_header: Option<HeaderValue>,
}

/// The future of [`Mock`]'s responses.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Mock {
    /// A mock behaving as `config` says.
    pub fn new(config: MockConfig) -> Self {
        let name_header = Some(config.name.as_str())
            .filter(|name| !name.is_empty())
            .and_then(|name| HeaderValue::from_str(name).ok());
        Self {
            shared: Arc::new(Shared {
                config,
                name_header,
            }),
            stats: MockStats::default(),
        }
    }

    /// The configuration this mock was built from.
    pub fn config(&self) -> &MockConfig {
        &self.shared.config
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
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                let error: BoxError = error.into();
                let error = ApiError::bad_request(
                    format!("could not read the request body: {error}"),
                    None,
                );
                return self.reply(Reply::Error(error), None, guard);
            }
        };
        self.stats.record_body(bytes.clone());
        let overrides = match Overrides::from_headers(&parts.headers) {
            Ok(overrides) => overrides,
            Err(error) => return self.reply(Reply::Error(error), None, guard),
        };
        let config = &self.shared.config;
        let latency = overrides.latency.unwrap_or(config.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let failure = overrides.failure.unwrap_or_else(|| config.failure.clone());
        let drop_after = match failure {
            None => None,
            Some(Failure::Hang) => return std::future::pending().await,
            Some(Failure::Status(status)) => {
                return self.reply(Reply::Error(ApiError::injected(status)), None, guard);
            }
            Some(Failure::RateLimited { retry_after_secs }) => {
                let error = ApiError::rate_limited(retry_after_secs);
                return self.reply(Reply::Error(error), None, guard);
            }
            Some(Failure::InvalidSse) => return self.reply(Reply::InvalidSse, None, guard),
            Some(Failure::DropMidStream { after_chunks }) => {
                Some(overrides.drop_after.unwrap_or(after_chunks))
            }
        };
        let tokens = overrides.tokens.unwrap_or(DEFAULT_TOKENS);
        let reply = self
            .route(
                &parts.method,
                crate::route_path(parts.uri.path()),
                &bytes,
                tokens,
            )
            .unwrap_or_else(Reply::Error);
        self.reply(reply, drop_after, guard)
    }

    /// The answer to `method path` with body `bytes`.
    fn route(
        &self,
        method: &Method,
        path: &str,
        bytes: &Bytes,
        tokens: usize,
    ) -> Result<Reply, ApiError> {
        let config = &self.shared.config;
        let models = config.model_ids();
        let default_model = models.first().copied().unwrap_or(crate::DEFAULT_MODEL);
        match (method, path) {
            (&Method::POST, "/chat/completions" | "/completions") => {
                let api = if path == "/completions" {
                    Api::Completion
                } else {
                    Api::Chat
                };
                let params = GenerationParams {
                    tokens,
                    default_model,
                    fingerprint: &config.name,
                };
                let generation = Generation::parse(api, &parse_json(bytes)?, bytes.len(), &params)?;
                if generation.stream {
                    Ok(Reply::Sse(generation))
                } else {
                    Ok(Reply::Json(generation.to_json()))
                }
            }
            (&Method::POST, "/embeddings") => {
                let answer = openai::embeddings(&parse_json(bytes)?, default_model, &config.name)?;
                Ok(Reply::Json(answer))
            }
            (&Method::GET, "/models") => Ok(Reply::Json(openai::model_list(&models))),
            (&Method::GET, _) if path.starts_with("/models/") => {
                let id = &path["/models/".len()..];
                if models.contains(&id) {
                    Ok(Reply::Json(openai::model(id)))
                } else {
                    Err(ApiError::not_found(format!(
                        "The model '{id}' does not exist"
                    )))
                }
            }
            _ => Err(ApiError::not_found(format!(
                "Invalid URL ({method} {path})"
            ))),
        }
    }

    /// Turns `reply` into a response; `drop_after` injects a mid-stream drop.
    fn reply(&self, reply: Reply, drop_after: Option<usize>, guard: InFlight) -> Response<Body> {
        let (status, content_type, body) = match reply {
            Reply::Json(value) => (StatusCode::OK, JSON, json_body(&value, drop_after, guard)),
            Reply::Error(error) => {
                let body = json_body(&error.to_json(), drop_after, guard);
                let mut response = self.response(error.status, JSON, body);
                if let Some(secs) = error.retry_after_secs {
                    response
                        .headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(secs));
                }
                return response;
            }
            Reply::Sse(generation) => {
                let interval = self.shared.config.token_interval();
                let body = MockBody::sse(generation, interval, drop_after, guard);
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

/// What to answer, before it becomes a response.
enum Reply {
    Json(Value),
    Error(ApiError),
    Sse(Generation),
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
        let mock = self.clone();
        Box::pin(async move { Ok(mock.respond(parts, body, guard).await) })
    }
}
