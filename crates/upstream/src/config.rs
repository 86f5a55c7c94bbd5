use std::sync::Arc;
use std::time::Duration;

/// How the upstream expects its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>` (OpenAI-compatible servers).
    #[default]
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
}

/// Everything the upstream client needs to know about one upstream.
/// (Its `Debug` shows no key, and the URL without credentials.)
#[derive(Clone)]
pub struct UpstreamConfig {
    /// A name for logs, metrics and the `x-llm-proxy-upstream` header.
    pub name: Arc<str>,
    /// Base URL with its version prefix, e.g. `http://10.0.0.5:8000/v1`.
    pub url: http::Uri,
    /// The upstream's own key, sent instead of the client's.
    pub api_key: Option<String>,
    /// How to send `api_key`.
    pub auth_style: AuthStyle,
    /// Longest wait for a TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Longest wait from sending the request to the response head.
    pub first_byte_timeout: Duration,
    /// Longest silence between two chunks of the response body.
    pub idle_timeout: Duration,
    /// How long an unused pooled connection is kept. Keep it below the
    /// upstream's keep-alive timeout (uvicorn, under vLLM, closes after 5 s),
    /// or a reused connection may be reset by the server.
    pub pool_idle_timeout: Duration,
    /// Extra trusted root certificates, PEM, for a private CA.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Per-thread connection pools for sharded servers: one pool per shard
    /// index `0..shards` (see [`crate::shard`]), plus one shared pool for
    /// callers outside any shard. `0` (the default): the shared pool only.
    pub shards: usize,
    /// Accept [`Upstream::upgrade`](crate::Upstream::upgrade) calls
    /// (WebSocket): each opens its own HTTP/1.1 connection.
    pub upgrades: bool,
    /// Offer HTTP/2 (ALPN `h2`) to an `https://` upstream (the default).
    /// HTTP/2 puts every request of a pool on one connection, whose
    /// concurrent streams the server limits (often 100–250): past that,
    /// requests wait. `false` keeps to HTTP/1.1, one pooled connection per
    /// request in flight, as nginx proxies. `http://` upstreams speak
    /// HTTP/1.1 either way.
    pub http2: bool,
    /// Headers set on every request to this upstream, in place of any the
    /// client sent under the same name (an OpenAI organization or project,
    /// a gateway's own key): nginx's `proxy_set_header`, LiteLLM's
    /// `extra_headers`. A name the proxy itself manages (framing,
    /// connection, `host`, content coding, the `api_key`'s header) is
    /// refused by [`Upstream::new`](crate::Upstream::new), see
    /// [`settable_header`](crate::settable_header). Their values are marked
    /// sensitive, and `Debug` shows only their names.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &llm_proxy_core::redact::url(&self.url.to_string()))
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("auth_style", &self.auth_style)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field(
                "extra_roots_pem",
                &self.extra_roots_pem.as_ref().map(Vec::len),
            )
            .field("shards", &self.shards)
            .field("upgrades", &self.upgrades)
            .field("http2", &self.http2)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl UpstreamConfig {
    /// A config with default timeouts (connect 2 s, first byte 60 s, idle 60 s).
    pub fn new(name: impl Into<Arc<str>>, url: http::Uri) -> Self {
        UpstreamConfig {
            name: name.into(),
            url,
            api_key: None,
            auth_style: AuthStyle::Bearer,
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(4),
            extra_roots_pem: None,
            shards: 0,
            upgrades: false,
            http2: true,
            headers: Vec::new(),
        }
    }

    /// Set the upstream's own key.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }
}

/// Why an [`Upstream`](crate::Upstream) could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The URL is not one to send requests to: not an absolute http(s) URL,
    /// or one with credentials or a port out of range.
    #[error("upstream `{name}`: url `{url}`: {reason}")]
    BadUrl {
        /// The upstream's name.
        name: Arc<str>,
        /// The URL given, without secrets ([`llm_proxy_core::redact::url`]).
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The name cannot be sent as a header value (`x-llm-proxy-upstream`).
    #[error("upstream name `{0:?}` must be printable text (it is sent as a header)")]
    BadName(Arc<str>),
    /// The key cannot be sent as a header value.
    #[error("upstream `{0}`: api_key contains characters not allowed in an HTTP header")]
    BadKey(Arc<str>),
    /// A header of [`UpstreamConfig::headers`] is one the proxy sets itself,
    /// or is given twice.
    #[error("upstream `{name}`: header `{header}`: {reason}")]
    BadHeader {
        /// The upstream's name.
        name: Arc<str>,
        /// The header's name.
        header: http::HeaderName,
        /// Why it cannot be set.
        reason: &'static str,
    },
    /// The extra root certificates could not be used.
    #[error("upstream `{name}`: tls roots: {reason}")]
    BadRoots {
        /// The upstream's name.
        name: Arc<str>,
        /// What was wrong.
        reason: String,
    },
}
