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

    /// The pause between streamed tokens, if any.
    pub(crate) fn token_interval(&self) -> Option<Duration> {
        self.tokens_per_second
            .filter(|tps| tps.is_finite() && *tps > 0.0)
            .and_then(|tps| Duration::try_from_secs_f64(1.0 / tps).ok())
            .filter(|interval| !interval.is_zero())
    }
}
