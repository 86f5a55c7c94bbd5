//! The mock's configuration and its injected failures.

use std::time::Duration;

/// How a [`Mock`](crate::Mock) behaves for every request.
///
/// Each field can be overridden per request with an `x-mock-*` header (see
/// the [crate docs](crate#per-request-headers)).
#[derive(Clone, Debug, Default)]
pub struct MockConfig {
    /// Delay before the response head is sent.
    pub latency: Duration,
    /// Pace of streamed tokens; `None` streams as fast as the client reads.
    pub tokens_per_second: Option<f64>,
    /// Model ids listed by `GET /models`; empty lists `["mock-model"]`.
    pub models: Vec<String>,
    /// A failure injected into every request.
    pub failure: Option<Failure>,
    /// Sent as `system_fingerprint` (and the `x-mock-name` response header)
    /// so tests can tell upstreams apart.
    pub name: String,
    /// The APIs (dialects) served; `None` serves them all. The routes of an
    /// API not listed answer `404` in that API's error format, as a server
    /// that does not speak it would: `Some(vec![MockApi::ChatCompletions])`
    /// plays a chat-only server (an older llama.cpp or Ollama),
    /// `Some(vec![MockApi::Messages])` an Anthropic-only one.
    /// `GET /models` is always served.
    pub apis: Option<Vec<MockApi>>,
}

/// An API (dialect) the mock can speak; see [`MockConfig::apis`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MockApi {
    /// OpenAI's `POST /chat/completions`.
    ChatCompletions,
    /// OpenAI's legacy `POST /completions`.
    Completions,
    /// OpenAI's `POST /embeddings`.
    Embeddings,
    /// OpenAI's Responses API: `/responses` and its sub-routes.
    Responses,
    /// Anthropic's Messages API: `POST /messages` and
    /// `POST /messages/count_tokens`.
    Messages,
}

impl MockApi {
    /// Every API, in declaration order.
    pub const ALL: [MockApi; 5] = [
        MockApi::ChatCompletions,
        MockApi::Completions,
        MockApi::Embeddings,
        MockApi::Responses,
        MockApi::Messages,
    ];

    /// The API's name as [`FromStr`](std::str::FromStr) reads it:
    /// `chat-completions`, `completions`, `embeddings`, `responses` or
    /// `messages`.
    pub fn name(self) -> &'static str {
        match self {
            MockApi::ChatCompletions => "chat-completions",
            MockApi::Completions => "completions",
            MockApi::Embeddings => "embeddings",
            MockApi::Responses => "responses",
            MockApi::Messages => "messages",
        }
    }

    /// The API a route (a path without `/v1`, see [`MockStats::requests_for`](
    /// crate::MockStats::requests_for)) belongs to; `None` for `/models` and
    /// unknown routes.
    pub(crate) fn of_route(route: &str) -> Option<Self> {
        let under = |prefix: &str| {
            route
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        match route {
            "/chat/completions" => Some(MockApi::ChatCompletions),
            "/completions" => Some(MockApi::Completions),
            "/embeddings" => Some(MockApi::Embeddings),
            _ if under("/responses") => Some(MockApi::Responses),
            _ if under("/messages") => Some(MockApi::Messages),
            _ => None,
        }
    }
}

impl std::fmt::Display for MockApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MockApi {
    type Err = String;

    /// Reads [`MockApi::name`]; `chat` and `anthropic` are accepted for
    /// `chat-completions` and `messages`, and `_` for `-`.
    fn from_str(s: &str) -> Result<Self, String> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        match wanted.as_str() {
            "chat" => return Ok(MockApi::ChatCompletions),
            "anthropic" => return Ok(MockApi::Messages),
            _ => {}
        }
        MockApi::ALL
            .into_iter()
            .find(|api| api.name() == wanted)
            .ok_or_else(|| {
                format!(
                    "unknown API `{s}`: expected one of chat-completions, completions, \
                     embeddings, responses, messages"
                )
            })
    }
}

/// A failure the mock injects instead of (or in the middle of) an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answer with this status and an OpenAI-style error JSON body.
    Status(u16),
    /// Answer `429 Too Many Requests` with a `retry-after` header.
    RateLimited {
        /// The `retry-after` header's value, in seconds.
        retry_after_secs: u64,
    },
    /// Send the response head and `after_chunks` body frames (SSE events for
    /// streamed requests, none for the others), then fail the body so the
    /// server aborts the connection (HTTP/1) or resets the stream (HTTP/2).
    DropMidStream {
        /// How many body frames to send before failing.
        after_chunks: usize,
    },
    /// Never send the response head. The response future stays pending until
    /// it is dropped.
    Hang,
    /// Answer `200 text/event-stream` with a body that is not valid SSE JSON
    /// and has no `[DONE]`.
    InvalidSse,
}

impl Failure {
    /// `retry-after` of a [`Failure::RateLimited`] chosen by the
    /// `x-mock-fail: 429` header.
    pub(crate) const DEFAULT_RETRY_AFTER_SECS: u64 = 1;
    /// `after_chunks` of a [`Failure::DropMidStream`] chosen by the
    /// `x-mock-fail: drop` header without `x-mock-drop-after`.
    pub(crate) const DEFAULT_DROP_AFTER: usize = 2;
}

impl MockConfig {
    /// The model ids listed by `GET /models`.
    pub(crate) fn model_ids(&self) -> Vec<&str> {
        if self.models.is_empty() {
            vec![crate::DEFAULT_MODEL]
        } else {
            self.models.iter().map(String::as_str).collect()
        }
    }

    /// Whether the routes of `api` are served.
    pub(crate) fn serves(&self, api: MockApi) -> bool {
        self.apis.as_ref().is_none_or(|apis| apis.contains(&api))
    }

    /// Whether the mock speaks Anthropic's Messages API and no OpenAI API:
    /// then `/models` and unknown routes answer in Anthropic's format too.
    pub(crate) fn anthropic_only(&self) -> bool {
        self.apis.as_ref().is_some_and(|apis| {
            apis.contains(&MockApi::Messages) && apis.iter().all(|api| *api == MockApi::Messages)
        })
    }

    /// The pause between streamed tokens, if any.
    ///
    /// A rate so slow its interval passes what a `Duration` holds waits for
    /// ever between tokens (it streamed at once before, as no rate does).
    pub(crate) fn token_interval(&self) -> Option<Duration> {
        self.tokens_per_second
            .filter(|tps| tps.is_finite() && *tps > 0.0)
            .map(|tps| Duration::try_from_secs_f64(1.0 / tps).unwrap_or(Duration::MAX))
            .filter(|interval| !interval.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slower_the_rate_the_longer_the_interval() {
        let interval = |tps| {
            MockConfig {
                tokens_per_second: Some(tps),
                ..MockConfig::default()
            }
            .token_interval()
        };
        assert_eq!(interval(4.0), Some(Duration::from_millis(250)));
        assert!(interval(1e-10).unwrap() < interval(1e-30).unwrap());
        assert_eq!(interval(1e-30), Some(Duration::MAX));
        assert_eq!(interval(f64::NAN), None);
        assert_eq!(interval(0.0), None);
        assert_eq!(interval(1e300), None, "faster than a nanosecond: no pause");
    }
}
