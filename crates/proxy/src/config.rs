//! The TOML configuration file of the `llm-proxy` binary (DESIGN.md's contract).
//!
//! Unknown keys are errors that name the key and its line. Secrets are a
//! literal or `env:NAME`. Nothing unknown is accepted and ignored.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use llm_proxy_core::Api;
use serde::Deserialize;
use toml::Spanned;

/// A configuration error: one line naming the file, the line and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// The longest an error message gets, in characters (a value it quotes may
/// be as long as the file).
const MAX_ERROR_CHARS: usize = 1000;

impl ConfigError {
    /// An error saying `text`: on one line (control characters a value
    /// brought in, a newline or a terminal's escape, written as escapes)
    /// and at most [`MAX_ERROR_CHARS`] long.
    fn new(text: String) -> Self {
        if text.len() <= MAX_ERROR_CHARS && !text.chars().any(char::is_control) {
            return ConfigError(text);
        }
        let mut line = String::with_capacity(text.len().min(MAX_ERROR_CHARS + 8));
        for (n, c) in text.chars().enumerate() {
            if n == MAX_ERROR_CHARS {
                line.push('…');
                break;
            }
            if c.is_control() {
                line.extend(c.escape_default());
            } else {
                line.push(c);
            }
        }
        ConfigError(line)
    }

    fn at(file: &Path, src: &str, offset: usize, msg: impl std::fmt::Display) -> Self {
        let line = src[..offset.min(src.len())].matches('\n').count() + 1;
        ConfigError::new(format!("{}:{line}: {msg}", file.display()))
    }

    /// An error about the value at `keys`: on the line of its key, or of
    /// the table that lacks it (its value is then a default), else of the
    /// file as a whole.
    fn near(file: &Path, src: &str, keys: &[Seg<'_>], msg: impl std::fmt::Display) -> Self {
        match key_offset(src, keys) {
            Some(offset) => ConfigError::at(file, src, offset, msg),
            None => ConfigError::new(format!("{}: {msg}", file.display())),
        }
    }
}

/// One step of a path to a value in the config text: a key of a table, or
/// the nth table of an array of tables (`[[upstream]]`).
#[derive(Clone, Copy, Debug)]
enum Seg<'a> {
    Key(&'a str),
    Item(usize),
}

/// Where the key at `keys` starts in `src` (for an item, where the item
/// starts). A key the text does not have, as a value left to its default,
/// is placed at the last step it does have; `None` when not even the first.
fn key_offset(src: &str, keys: &[Seg<'_>]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    // Only on the way to an error, of text that parsed already.
    let doc = DeTable::parse(src).ok()?;
    let mut at: Option<&DeValue<'_>> = None;
    let mut offset = None;
    for seg in keys {
        let table = match at {
            None => Some(doc.get_ref()),
            Some(value) => value.as_table(),
        };
        let next = match *seg {
            Seg::Key(name) => table
                .and_then(|table| table.get_key_value(name))
                .map(|(key, value)| (key.span().start, value.get_ref())),
            Seg::Item(n) => at
                .and_then(DeValue::as_array)
                .and_then(|items| items.get(n))
                .map(|item| (item.span().start, item.get_ref())),
        };
        let Some((start, value)) = next else { break };
        offset = Some(start);
        at = Some(value);
    }
    offset
}

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to serve on.
    #[serde(default = "defaults::listen")]
    pub listen: Spanned<String>,
    /// Requests with a larger body are answered 413.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Request bodies held in memory at once, all requests together; a body
    /// that would pass it is answered 503 `server_overloaded`. Absent: 1 GiB,
    /// or `max_body_bytes` when that is more.
    #[serde(default)]
    pub max_buffered_body_bytes: Option<usize>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[serde(default = "defaults::drain_timeout_secs")]
    pub drain_timeout_secs: f64,
    /// Clients that take longer to send their request head are cut off.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A request body the proxy buffers must come whole within this long.
    #[serde(default = "defaults::request_body_timeout_ms")]
    pub request_body_timeout_ms: u64,
    /// A connection whose client takes none of its answers' bytes for this
    /// long is closed (nginx's `send_timeout`).
    #[serde(default = "defaults::send_timeout_ms")]
    pub send_timeout_ms: u64,
    /// Connections served at once; more wait in the accept queue.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections one client address may hold at once; more are closed
    /// as they are accepted. `0`: no limit.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// Server threads (one single-threaded runtime each); absent or `0`:
    /// one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Response ids (and, apart, conversation ids) remembered in memory;
    /// when full, the key holding the most loses its least recently used.
    #[serde(default = "defaults::max_response_ids")]
    pub max_response_ids: usize,
    /// How long a response or conversation id is remembered unused, in
    /// days.
    #[serde(default = "defaults::response_id_ttl_days")]
    pub response_id_ttl_days: u64,
    /// Send `x-llm-proxy-upstream` on responses.
    #[serde(default = "defaults::yes")]
    pub upstream_header: bool,
    /// Send `x-llm-proxy-overhead-ms` on the answers to `/v1/*`.
    #[serde(default = "defaults::yes")]
    pub overhead_header: bool,
    /// Log one line per request when its response ends.
    #[serde(default)]
    pub access_log: bool,
    /// Origins browser apps may call the proxy from (`*`: any); empty:
    /// no CORS.
    #[serde(default)]
    pub cors_allow_origins: Vec<Spanned<String>>,
    /// Serve `/metrics` on this address instead of on `listen`.
    #[serde(default)]
    pub metrics_listen: Option<Spanned<String>>,
    /// The upstream servers.
    #[serde(default)]
    pub upstream: Vec<UpstreamSection>,
    /// How requests are spread over upstreams.
    #[serde(default)]
    pub balance: Option<BalanceSection>,
    /// The response cache.
    #[serde(default)]
    pub cache: Option<CacheSection>,
    /// API keys and limits.
    #[serde(default)]
    pub auth: Option<AuthSection>,
}

/// `[balance]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalanceSection {
    /// `round_robin | weighted | least_requests | p2c_ewma | prefix_affinity`.
    #[serde(default)]
    pub strategy: Option<Spanned<String>>,
    /// Failover attempts before the first response byte.
    #[serde(default = "defaults::max_retries")]
    pub max_retries: u32,
    /// Consecutive failures before an upstream rests.
    #[serde(default = "defaults::eject_after_failures")]
    pub eject_after_failures: u32,
    /// First rest, doubling on repeated ejection (up to 10×).
    #[serde(default = "defaults::eject_secs")]
    pub eject_secs: f64,
    /// Active health checks every this many seconds; 0 = passive only.
    #[serde(default)]
    pub health_check_secs: f64,
    /// Path the health check GETs, joined like a client path.
    #[serde(default)]
    pub health_check_path: Option<String>,
    /// Whether a passing health check ends an ejection (as Envoy's
    /// `successful_active_health_check_uneject_host`).
    #[serde(default = "defaults::yes")]
    pub health_check_uneject: bool,
    /// Model -> models tried in order when all upstreams of the first fail.
    #[serde(default)]
    pub fallbacks: std::collections::HashMap<String, Vec<String>>,
    /// Retry budget: retries allowed as a fraction of requests (10 s window).
    #[serde(default)]
    pub retry_budget_ratio: Option<f32>,
    /// Retry budget: retries always allowed per second.
    #[serde(default)]
    pub retry_budget_min_per_sec: Option<u32>,
    /// Knobs of `prefix_affinity`.
    #[serde(default)]
    pub prefix_affinity: Option<PrefixSection>,
}

/// `[balance.prefix_affinity]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixSection {
    /// Bytes of canonical prompt text per hashed block.
    pub block_bytes: Option<usize>,
    /// Blocks that make up the routing key.
    pub prefix_blocks: Option<usize>,
    /// Points per upstream on the hash ring.
    pub virtual_nodes: Option<usize>,
    /// ε of the bounded load `(1 + ε) × mean`.
    pub load_factor: Option<f64>,
    /// Least slack above the mean, in requests.
    pub min_slack: Option<u32>,
    /// In-flight spread (max − min) above which prefix routing yields to least load.
    pub max_spread: Option<u32>,
}

/// `[cache]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Turn the cache layer on.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// `memory` or `redis`.
    #[serde(default = "defaults::memory")]
    pub backend: Spanned<String>,
    /// Memory store: most entries kept.
    #[serde(default = "defaults::max_entries")]
    pub max_entries: Spanned<usize>,
    /// Memory store: most body bytes kept.
    #[serde(default = "defaults::max_bytes")]
    pub max_bytes: Spanned<usize>,
    /// How long an entry lives.
    #[serde(default = "defaults::ttl_secs")]
    pub ttl_secs: Spanned<f64>,
    /// `per_key` or `shared`.
    #[serde(default)]
    pub scope: Option<Spanned<String>>,
    /// Redis URL for `backend = "redis"`.
    #[serde(default)]
    pub redis_url: Option<Spanned<String>>,
    /// Prefix of every Redis key.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// Request headers whose values join the key.
    #[serde(default)]
    pub key_headers: Option<Spanned<Vec<String>>>,
}

/// `[auth]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Turn the auth layer on.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// `memory` (this process) or `redis` (shared through `redis_url`).
    #[serde(default = "defaults::memory")]
    pub backend: Spanned<String>,
    /// Redis URL for `backend = "redis"`.
    #[serde(default)]
    pub redis_url: Option<Spanned<String>>,
    /// Prefix of every Redis key.
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// The keys.
    #[serde(default)]
    pub keys: Vec<KeySection>,
}

/// One `[[auth.keys]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    /// The key's name (its identity in logs, metrics, cache scope).
    pub name: Spanned<String>,
    /// The key: literal or `env:NAME`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// The key's SHA-256, hex.
    #[serde(default)]
    pub key_sha256: Option<Spanned<String>>,
    /// Models this key may use.
    #[serde(default)]
    pub models: Option<Spanned<Vec<String>>>,
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<Spanned<u32>>,
    /// Tokens per minute.
    #[serde(default)]
    pub tokens_per_minute: Option<Spanned<u32>>,
    /// May use other `/v1/*` routes.
    #[serde(default)]
    pub passthrough: bool,
}

/// One `[[upstream]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// Unique name.
    pub name: Spanned<String>,
    /// Base URL with its version prefix.
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    /// The upstream's own key: literal or `env:NAME`.
    #[serde(default)]
    pub api_key: Option<Spanned<String>>,
    /// Models served; absent = every model.
    #[serde(default)]
    pub models: Option<Spanned<Vec<String>>>,
    /// Model -> the name this upstream serves it under.
    #[serde(default)]
    pub served_names: Option<Spanned<BTreeMap<String, String>>>,
    /// Headers set on every request to it: name -> literal or `env:NAME`.
    #[serde(default)]
    pub headers: Option<Spanned<BTreeMap<String, String>>>,
    /// `openai` or `anthropic`: how the key is sent, and the default `apis`.
    #[serde(default)]
    pub protocol: Option<Spanned<String>>,
    /// Connect timeout.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Request sent -> response head.
    #[serde(default = "defaults::first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two body chunks.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Extra PEM root for a private CA.
    #[serde(default)]
    pub tls_ca_file: Option<Spanned<String>>,
    /// An in-process mock upstream instead of `url`.
    #[serde(default)]
    pub mock: Option<MockSection>,
    /// Share for strategy `weighted` (0 drains it).
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// The APIs the server serves natively.
    #[serde(default)]
    pub apis: Option<Spanned<Vec<String>>>,
    /// Pass WebSocket upgrades on `/v1/responses` through (needs
    /// `"responses"` in `apis`).
    #[serde(default)]
    pub websocket: Option<Spanned<bool>>,
    /// Longest silence of a WebSocket session between turns (within a
    /// turn, `idle_timeout_ms`).
    #[serde(default = "defaults::websocket_idle_timeout_ms")]
    pub websocket_idle_timeout_ms: u64,
    /// How long an unused pooled connection is kept: below the server's
    /// own keep-alive timeout.
    #[serde(default = "defaults::pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Offer HTTP/2 to an `https://` upstream (default `true`).
    #[serde(default)]
    pub http2: Option<Spanned<bool>>,
}

/// `mock = { … }`: an in-process mock LLM on a loopback port.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockSection {
    /// Delay before the response head.
    #[serde(default)]
    pub latency_ms: u64,
    /// Streaming pace; absent = as fast as possible.
    #[serde(default)]
    pub tokens_per_second: Option<Spanned<f64>>,
}

// The sections that may hold a secret (a literal key, a Redis password)
// show only their name or nothing in `Debug`.
impl std::fmt::Debug for KeySection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySection")
            .field("name", self.name.get_ref())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for UpstreamSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSection")
            .field("name", self.name.get_ref())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CacheSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheSection")
            .field("enabled", &self.enabled)
            .field("backend", self.backend.get_ref())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSection")
            .field("enabled", &self.enabled)
            .field("backend", self.backend.get_ref())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

mod defaults {
    use toml::Spanned;
    pub fn listen() -> Spanned<String> {
        Spanned::new(0..0, "127.0.0.1:8080".to_owned())
    }
    pub fn max_body_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub const MAX_BUFFERED_BODY_BYTES: usize = 1024 * 1024 * 1024;
    pub fn drain_timeout_secs() -> f64 {
        30.0
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn send_timeout_ms() -> u64 {
        60_000
    }
    pub fn request_body_timeout_ms() -> u64 {
        60_000
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn max_response_ids() -> usize {
        100_000
    }
    /// As long as OpenAI keeps a stored response.
    pub fn response_id_ttl_days() -> u64 {
        30
    }
    pub fn yes() -> bool {
        true
    }
    pub fn connect_timeout_ms() -> u64 {
        2_000
    }
    pub fn first_byte_timeout_ms() -> u64 {
        60_000
    }
    pub fn idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn pool_idle_timeout_ms() -> u64 {
        4_000
    }
    pub fn websocket_idle_timeout_ms() -> u64 {
        600_000
    }
    pub fn max_entries() -> Spanned<usize> {
        Spanned::new(0..0, 10_000)
    }
    pub fn max_bytes() -> Spanned<usize> {
        Spanned::new(0..0, 268_435_456)
    }
    pub fn ttl_secs() -> Spanned<f64> {
        Spanned::new(0..0, 3600.0)
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn max_retries() -> u32 {
        2
    }
    pub fn eject_after_failures() -> u32 {
        3
    }
    pub fn eject_secs() -> f64 {
        30.0
    }
    pub fn memory() -> Spanned<String> {
        Spanned::new(0..0, "memory".to_owned())
    }
}

/// A validated upstream, secrets resolved (its `Debug` shows no key).
#[derive(Clone)]
pub struct UpstreamSpec {
    /// Unique name.
    pub name: String,
    /// Where it is.
    pub target: Target,
    /// Its own key, resolved.
    pub api_key: Option<String>,
    /// Models served; `None` = every model.
    pub models: Option<Vec<String>>,
    /// Model -> the name this upstream serves it under (the body's `model`
    /// is rewritten for it); empty: every model under its own name.
    pub served_names: BTreeMap<String, String>,
    /// Headers set on every request to it, replacing the client's of the
    /// same name; values resolved (its `Debug` shows only the names).
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Share for strategy `weighted`.
    pub weight: u32,
    /// How the upstream wants its key, and its native dialect.
    pub protocol: Protocol,
    /// The APIs it serves natively.
    pub apis: Vec<Api>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// First-byte timeout.
    pub first_byte_timeout: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
    /// Extra PEM roots, read from `tls_ca_file`.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Pass WebSocket upgrades on `/v1/responses` through to it.
    pub websocket: bool,
    /// Longest silence of a WebSocket session between turns.
    pub websocket_idle_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Offer HTTP/2 (ALPN) to an `https://` upstream.
    pub http2: bool,
}

impl std::fmt::Debug for UpstreamSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSpec")
            .field("name", &self.name)
            .field("target", &self.target)
            .field("api_key", &self.api_key.as_ref().map(|_| "***"))
            .field("models", &self.models)
            .field("served_names", &self.served_names)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .field("weight", &self.weight)
            .field("protocol", &self.protocol)
            .field("apis", &self.apis)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field(
                "extra_roots_pem",
                &self.extra_roots_pem.as_ref().map(Vec::len),
            )
            .field("websocket", &self.websocket)
            .field("websocket_idle_timeout", &self.websocket_idle_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("http2", &self.http2)
            .finish()
    }
}

/// An upstream's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OpenAI-compatible: `Authorization: Bearer <key>`.
    OpenAi,
    /// Anthropic: `x-api-key: <key>`; serves Messages.
    Anthropic,
}

impl Protocol {
    /// The APIs served when `apis` is not given.
    pub fn default_apis(self) -> Vec<Api> {
        match self {
            Protocol::OpenAi => vec![Api::ChatCompletions, Api::Completions, Api::Embeddings],
            Protocol::Anthropic => vec![Api::Messages],
        }
    }
}

/// Where an upstream lives.
#[derive(Debug, Clone)]
pub enum Target {
    /// A real server at this base URL.
    Url(http::Uri),
    /// An in-process mock.
    Mock {
        /// Delay before the response head.
        latency: Duration,
        /// Streaming pace.
        tokens_per_second: Option<f64>,
    },
}

/// The configuration after validation: what the proxy is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to serve on.
    pub listen: SocketAddr,
    /// Body limit.
    pub max_body_bytes: usize,
    /// Bound on the request bodies held at once.
    pub max_buffered_body_bytes: usize,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// Header read timeout.
    pub header_read_timeout: Duration,
    /// The longest a body the proxy buffers may take to come whole.
    pub request_body_timeout: Duration,
    /// Send timeout: how long a client may take none of its answers' bytes.
    pub send_timeout: Duration,
    /// Connection limit.
    pub max_connections: usize,
    /// Connections one client IP address may hold at once (`0`: no limit).
    pub max_connections_per_ip: usize,
    /// Server threads (shards), at least 1.
    pub workers: usize,
    /// Response ids (and conversation ids) remembered in memory, each.
    pub max_response_ids: usize,
    /// How long an id is remembered unused.
    pub response_id_ttl: Duration,
    /// Send `x-llm-proxy-upstream`.
    pub upstream_header: bool,
    /// Send `x-llm-proxy-overhead-ms`.
    pub overhead_header: bool,
    /// Log one line per request when its response ends.
    pub access_log: bool,
    /// Origins allowed by CORS (`*`: any); empty: no CORS.
    pub cors_allow_origins: Vec<String>,
    /// Separate metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// The upstreams, in config order.
    pub upstreams: Vec<UpstreamSpec>,
    /// The auth layer's keys, when auth is on.
    pub auth: Option<AuthSpec>,
    /// The balancer's settings (defaults when `[balance]` is absent).
    pub balance: llm_proxy_balance::BalanceConfig,
    /// The cache, when on.
    pub cache: Option<CacheSpec>,
}

/// The cache layer's settings.
#[derive(Debug, Clone)]
pub struct CacheSpec {
    /// Entry lifetime.
    pub ttl: Duration,
    /// Whose answers may serve whom.
    pub scope: llm_proxy_cache::CacheScope,
    /// Where entries live.
    pub store: CacheStore,
    /// Request headers whose values join the key.
    pub key_headers: Vec<http::HeaderName>,
}

/// Where cache entries live (its `Debug` shows no Redis password).
#[derive(Clone, PartialEq, Eq)]
pub enum CacheStore {
    /// In this process, bounded by entries and bytes.
    Memory {
        /// Most entries.
        max_entries: usize,
        /// Most body bytes.
        max_bytes: usize,
    },
    /// In Redis, shared by every proxy using it.
    Redis {
        /// The Redis URL.
        url: String,
        /// Prefix of every key.
        key_prefix: String,
    },
}

/// The auth layer's settings.
#[derive(Debug, Clone)]
pub struct AuthSpec {
    /// The keys, hashed.
    pub keys: Vec<llm_proxy_auth::KeySpec>,
    /// Where the limit counters live.
    pub backend: LimitStore,
}

/// Where rate-limit state lives (its `Debug` shows no Redis password).
#[derive(Clone, PartialEq, Eq)]
pub enum LimitStore {
    /// In this process.
    Memory,
    /// In Redis, shared by every proxy using it.
    Redis {
        /// The Redis URL.
        url: String,
        /// Prefix of every key.
        key_prefix: String,
    },
}

impl std::fmt::Debug for CacheStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheStore::Memory {
                max_entries,
                max_bytes,
            } => f
                .debug_struct("Memory")
                .field("max_entries", max_entries)
                .field("max_bytes", max_bytes)
                .finish(),
            CacheStore::Redis { url, key_prefix } => redis_debug(f, url, key_prefix),
        }
    }
}

impl std::fmt::Debug for LimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitStore::Memory => f.write_str("Memory"),
            LimitStore::Redis { url, key_prefix } => redis_debug(f, url, key_prefix),
        }
    }
}

fn redis_debug(f: &mut std::fmt::Formatter<'_>, url: &str, key_prefix: &str) -> std::fmt::Result {
    f.debug_struct("Redis")
        .field("url", &llm_proxy_core::redact::url(url))
        .field("key_prefix", &key_prefix)
        .finish()
}

impl Settings {
    /// Read, parse and validate a config file.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let bytes = read_bounded(path).map_err(|e| {
            ConfigError::new(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            ))
        })?;
        let src = String::from_utf8(bytes).map_err(|e| {
            // TOML is UTF-8: say where the first byte that is not lies.
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            let line = bytes[..valid].iter().filter(|&&b| b == b'\n').count() + 1;
            ConfigError::new(format!(
                "{}:{line}: not UTF-8 (byte 0x{:02x}); a TOML file is UTF-8",
                path.display(),
                bytes[valid]
            ))
        })?;
        Settings::from_str(path, &src)
    }

    /// Parse and validate config text; `path` only names it in errors.
    pub fn from_str(path: &Path, src: &str) -> Result<Settings, ConfigError> {
        let syntax = |e: toml::de::Error| {
            let span = e.span().unwrap_or(0..0);
            let mut message = e.message().trim().to_owned();
            // toml names no key here; its span is the key's.
            if message == "duplicate key"
                && let Some(key) = src.get(span.clone()).filter(|k| !k.is_empty())
            {
                message = format!("duplicate key `{}`", key.trim());
            }
            ConfigError::at(path, src, span.start, &message)
        };
        let de = toml::Deserializer::parse(src).map_err(syntax)?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = key_path(e.path());
            let e = e.into_inner();
            let offset = e.span().map_or(0, |s| s.start);
            let message = plain_types(e.message().trim());
            // The path names the key a value is wrong for; an unknown key
            // is named by the message, within the path's table.
            let message = if key.is_empty() {
                message
            } else {
                format!("`{key}`: {message}")
            };
            ConfigError::at(path, src, offset, &message)
        })?;
        validate(path, src, cfg)
    }
}

/// Whether two listeners could not both bind: one port (not 0: port 0
/// twice is two ports, each chosen by the system), and one address, or an
/// unspecified one that covers the other's (`0.0.0.0` every IPv4 address,
/// `[::]` every address: its sockets take IPv4 too).
fn binds_over(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: std::net::IpAddr, other: std::net::IpAddr| {
        wide.is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    // (`::ffff:127.0.0.1` is 127.0.0.1 to a dual-stack socket.)
    let (a_ip, b_ip) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port()
        && a.port() != 0
        && (a_ip == b_ip || covers(a_ip, b_ip) || covers(b_ip, a_ip))
}

/// A value's key as the config spells it (`upstream[0].weight`), without
/// the steps `Spanned` adds.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    use std::fmt::Write as _;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(key, "[{index}]");
            }
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if name.starts_with("$__serde_spanned") {
                    continue;
                }
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Unknown => {}
        }
    }
    key
}

/// serde's words for a value of the wrong type said in the config's
/// terms: `expected usize` is `expected a whole number` to whoever writes
/// TOML, `expected struct MockSection` `expected a table`.
fn plain_types(message: &str) -> String {
    let hint = if message.starts_with("invalid type: map") {
        // `[upstream]` for `[[upstream]]`.
        "expected an array (`[[…]]` for tables)"
    } else {
        "expected an array"
    };
    let mut plain = message
        .replace(" as i128", "")
        .replace("invalid type: map", "invalid type: table")
        .replace("expected a sequence", hint);
    // (The largest is said: a value past it is told as if negative.)
    for (int, max) in [
        ("usize", usize::MAX as u64),
        ("u64", u64::MAX),
        ("u32", u32::MAX.into()),
        ("u16", u16::MAX.into()),
        ("u8", u8::MAX.into()),
    ] {
        plain = plain.replace(
            &format!("expected {int}"),
            &format!("expected a whole number from 0 to {max}"),
        );
    }
    for float in ["f64", "f32"] {
        plain = plain.replace(&format!("expected {float}"), "expected a number");
    }
    if let Some(at) = plain.find("expected struct ") {
        plain.truncate(at);
        plain.push_str("expected a table");
    }
    plain
}

/// The most a file the config reads (the config itself, a `tls_ca_file`)
/// may hold: a path to a device or a huge file by mistake is refused
/// instead of read without end.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Read `path` whole, refusing more than [`MAX_FILE_BYTES`].
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {} MiB", MAX_FILE_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

/// The most `max_response_ids` can be: what the map's 32-bit slots count.
const MAX_RESPONSE_IDS: usize = u32::MAX as usize - 1;

/// The longest `response_id_ttl_days`: ten years.
const MAX_RESPONSE_ID_TTL_DAYS: u64 = 3650;

/// The most `max_connections` can be: what one semaphore can count.
const MAX_CONNECTIONS: usize = tokio::sync::Semaphore::MAX_PERMITS;
/// The most `workers`: one thread (and runtime, and upstream pool) each.
const MAX_WORKERS: usize = 1024;

/// The shortest `ttl_secs`: an entry that expires as it is stored is
/// a cache that answers nothing.
const MIN_TTL_SECS: f64 = 0.001;

/// The longest `ttl_secs`: ten years ("for ever", without overflowing a clock).
const MAX_TTL_SECS: f64 = 10.0 * 365.0 * 86_400.0;

/// `s` as a browser sends an origin (`http` or `https`, a host, a port
/// unless the scheme's own: a browser leaves out `:443` and `:80`), in
/// lowercase; `None` when it is not one.
fn origin(s: &str) -> Option<String> {
    let s = s.to_ascii_lowercase();
    let (scheme, rest) = s.split_once("://")?;
    let default_port = match scheme {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let rest = rest.strip_suffix(default_port).unwrap_or(rest);
    let fine = !rest.is_empty()
        && !rest.ends_with(':')
        && !rest.contains(['/', '?', '#', '@', ' ', '*'])
        && http::uri::Authority::try_from(rest).is_ok();
    fine.then(|| format!("{scheme}://{rest}"))
}

/// A timeout of 0 ms would fail every request (or close every connection)
/// at once: a mistake, not a setting.
fn positive_ms(
    path: &Path,
    src: &str,
    at: &[Seg<'_>],
    key: &str,
    ms: u64,
) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(ConfigError::near(
            path,
            src,
            at,
            format!("{key} must be at least 1 (milliseconds)"),
        ));
    }
    Ok(Duration::from_millis(ms))
}

fn duration_secs(
    path: &Path,
    src: &str,
    at: &[Seg<'_>],
    key: &str,
    secs: f64,
) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        // (`1e300` as written, not as its 300 digits.)
        let shown = if secs.abs() >= 1e15 {
            format!("{secs:e}")
        } else {
            secs.to_string()
        };
        let why = if secs >= 0.0 {
            "a number of seconds a clock can count (under 1.8e19)"
        } else {
            "a non-negative number of seconds"
        };
        ConfigError::near(path, src, at, format!("{key} must be {why}, not {shown}"))
    })
}

/// An upstream's `served_names`: each a model it serves (in its `models`,
/// when it lists them) and a name, both non-empty.
fn served_names(
    name: &str,
    up: &UpstreamSection,
    websocket: bool,
    err: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let Some(names) = &up.served_names else {
        return Ok(BTreeMap::new());
    };
    let at = names.span();
    // Listed, its models are the upstream's in `GET /v1/models`, and a
    // name given the wrong way round is caught here.
    let Some(models) = &up.models else {
        return Err(err(
            at,
            format!(
                "upstream `{name}`: `served_names` needs `models`, the names clients use for the models it serves"
            ),
        ));
    };
    for (model, served) in names.get_ref() {
        if model.trim().is_empty() || served.trim().is_empty() {
            return Err(err(
                at,
                format!(
                    "upstream `{name}`: `served_names` holds an empty name ({model:?} = {served:?})"
                ),
            ));
        }
        if served.trim() != served || served.chars().any(char::is_control) {
            return Err(err(
                at,
                format!(
                    "upstream `{name}`: `served_names`: {served:?} has space at an end or a control character"
                ),
            ));
        }
        if model == served {
            return Err(err(
                at,
                format!("upstream `{name}`: `served_names` gives `{model}` its own name"),
            ));
        }
        if !models.get_ref().contains(model) {
            return Err(err(
                at,
                format!(
                    "upstream `{name}`: `served_names` names model `{model}`, which its `models` does not list"
                ),
            ));
        }
    }
    if websocket && !names.get_ref().is_empty() {
        // A WebSocket session's messages go upstream as the client sent
        // them: a model in one would reach the upstream under the
        // client's name for it.
        return Err(err(
            at,
            format!(
                "upstream `{name}`: `served_names` is not built for WebSocket sessions (`websocket = true`): \
                 their messages, which name the model, are passed through unchanged"
            ),
        ));
    }
    Ok(names.get_ref().clone())
}

/// An upstream's `headers`: each name one the proxy does not set itself
/// (nor its `api_key`), each value (after `env:`) non-empty header text.
fn upstream_headers(
    name: &str,
    up: &UpstreamSection,
    key_header: Option<&str>,
    err: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, ConfigError> {
    let Some(headers) = &up.headers else {
        return Ok(Vec::new());
    };
    let at = headers.span();
    let mut out: Vec<(http::HeaderName, http::HeaderValue)> = Vec::new();
    for (header, value) in headers.get_ref() {
        let bad = |why: &str| {
            err(
                at.clone(),
                format!("upstream `{name}`: header `{header}`: {why}"),
            )
        };
        let parsed = http::HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| bad("not a header name"))?;
        llm_proxy_upstream::settable_header(&parsed).map_err(bad)?;
        if key_header == Some(parsed.as_str()) {
            return Err(bad("`api_key` sets this header"));
        }
        if out.iter().any(|(seen, _)| *seen == parsed) {
            return Err(bad("given twice (header names are case-insensitive)"));
        }
        let value = resolve_secret(value).map_err(|m| bad(&m))?;
        if value.is_empty() {
            return Err(bad("empty value"));
        }
        if value.trim() != value {
            // HTTP/2 calls a field value with space at an end malformed.
            return Err(bad("space at an end of the value"));
        }
        let value = http::HeaderValue::from_str(&value)
            .map_err(|_| bad("the value must be printable text"))?;
        out.push((parsed, value));
    }
    Ok(out)
}

fn validate(path: &Path, src: &str, cfg: Config) -> Result<Settings, ConfigError> {
    let err =
        |span: std::ops::Range<usize>, msg: String| ConfigError::at(path, src, span.start, msg);
    let auth = match &cfg.auth {
        Some(a) if a.enabled => Some(validate_auth(path, src, a)?),
        _ => None,
    };
    let cache = match &cfg.cache {
        Some(c) if c.enabled => Some(validate_cache(path, src, c)?),
        _ => None,
    };
    let listen = parse_addr(cfg.listen.get_ref())
        .map_err(|m| err(cfg.listen.span(), format!("`listen`: {m}")))?;
    let metrics_listen = match &cfg.metrics_listen {
        Some(m) if !m.get_ref().is_empty() => Some(
            parse_addr(m.get_ref()).map_err(|e| err(m.span(), format!("`metrics_listen`: {e}")))?,
        ),
        _ => None,
    };
    if let Some(metrics) = metrics_listen
        && binds_over(metrics, listen)
    {
        let what = if metrics == listen {
            format!("is `listen` ({listen})")
        } else {
            format!("({metrics}) takes the port of `listen` ({listen})")
        };
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("metrics_listen")],
            format!(
                "`metrics_listen` {what}: give metrics an address of their own, or leave it out to serve them on `listen`"
            ),
        ));
    }
    let mut cors_allow_origins = Vec::with_capacity(cfg.cors_allow_origins.len());
    for origin in &cfg.cors_allow_origins {
        let o = origin.get_ref();
        let normal = if o == "*" {
            Some(o.clone())
        } else {
            self::origin(o)
        };
        let Some(normal) = normal else {
            return Err(err(
                origin.span(),
                format!(
                    "`cors_allow_origins`: `{o}` is not an origin: `*`, or a scheme and host \
                     as a browser sends them (`https://app.example.com`, \
                     `http://localhost:3000`), without a path or a trailing slash"
                ),
            ));
        };
        cors_allow_origins.push(normal);
    }
    if cfg.max_body_bytes == 0 {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("max_body_bytes")],
            "`max_body_bytes` must be at least 1: with 0 every request with a body is refused",
        ));
    }
    if cfg.workers > MAX_WORKERS {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("workers")],
            format!(
                "`workers` must be between 0 (one per CPU) and {MAX_WORKERS}, not {}",
                cfg.workers
            ),
        ));
    }
    if cfg.max_connections == 0 || cfg.max_connections > MAX_CONNECTIONS {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("max_connections")],
            format!(
                "`max_connections` must be between 1 and {MAX_CONNECTIONS}, not {}",
                cfg.max_connections
            ),
        ));
    }
    if cfg.max_connections_per_ip > cfg.max_connections {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("max_connections_per_ip")],
            format!(
                "`max_connections_per_ip` ({}) is over `max_connections` ({}): it would never \
                 apply; 0 turns it off",
                cfg.max_connections_per_ip, cfg.max_connections
            ),
        ));
    }
    if !(1..=MAX_RESPONSE_IDS).contains(&cfg.max_response_ids) {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("max_response_ids")],
            format!(
                "`max_response_ids` must be between 1 and {MAX_RESPONSE_IDS}, not {}",
                cfg.max_response_ids
            ),
        ));
    }
    if !(1..=MAX_RESPONSE_ID_TTL_DAYS).contains(&cfg.response_id_ttl_days) {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("response_id_ttl_days")],
            format!(
                "`response_id_ttl_days` must be from 1 to {MAX_RESPONSE_ID_TTL_DAYS} (ten years), not {}",
                cfg.response_id_ttl_days
            ),
        ));
    }
    let max_buffered_body_bytes = match cfg.max_buffered_body_bytes {
        None => defaults::MAX_BUFFERED_BODY_BYTES.max(cfg.max_body_bytes),
        Some(n) if n < cfg.max_body_bytes => {
            return Err(ConfigError::near(
                path,
                src,
                &[Seg::Key("max_buffered_body_bytes")],
                format!(
                    "`max_buffered_body_bytes` ({n}) must be at least `max_body_bytes` ({}): \
                     no body that large could ever be read (and a body's parsed form counts \
                     too, several times its size: give it room for many)",
                    cfg.max_body_bytes
                ),
            ));
        }
        Some(n) => n,
    };
    for (key, ms) in [
        ("header_read_timeout_ms", cfg.header_read_timeout_ms),
        ("request_body_timeout_ms", cfg.request_body_timeout_ms),
        ("send_timeout_ms", cfg.send_timeout_ms),
    ] {
        positive_ms(path, src, &[Seg::Key(key)], &format!("`{key}`"), ms)?;
    }
    if cfg.upstream.is_empty() {
        return Err(ConfigError::new(format!(
            "{}: no [[upstream]] configured: at least one is needed",
            path.display()
        )));
    }
    let mut names = HashSet::new();
    let mut upstreams = Vec::with_capacity(cfg.upstream.len());
    for (index, up) in cfg.upstream.into_iter().enumerate() {
        let name = up.name.get_ref().clone();
        // (It is sent back in a header, which readers trim: `a ` would
        // read as `a`, another upstream.)
        if !is_display_name(&name) || http::HeaderValue::from_str(&name).is_err() {
            return Err(err(
                up.name.span(),
                format!(
                    "upstream name `{name}` must be non-empty printable text, \
                     without space at either end or invisible characters"
                ),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                up.name.span(),
                format!("duplicate upstream name `{name}`"),
            ));
        }
        let protocol = match up
            .protocol
            .as_ref()
            .map(|p| (p.get_ref().as_str(), p.span()))
        {
            None | Some(("openai", _)) => Protocol::OpenAi,
            Some(("anthropic", _)) => Protocol::Anthropic,
            Some((other, span)) => {
                return Err(err(
                    span,
                    format!(
                        "upstream `{name}`: protocol `{other}`: expected \"openai\" or \"anthropic\""
                    ),
                ));
            }
        };
        let apis = match &up.apis {
            // The in-process mock speaks every dialect.
            None if up.mock.is_some() => vec![
                Api::ChatCompletions,
                Api::Completions,
                Api::Embeddings,
                Api::Responses,
                Api::Messages,
            ],
            None => protocol.default_apis(),
            Some(list) if list.get_ref().is_empty() => {
                return Err(err(
                    list.span(),
                    format!(
                        "upstream `{name}`: `apis` is empty, so it would serve nothing; leave it out for its protocol's APIs"
                    ),
                ));
            }
            Some(list) => {
                let mut apis = Vec::new();
                for api in list.get_ref() {
                    let parsed = Api::from_name(api).ok_or_else(|| {
                        err(
                            list.span(),
                            format!(
                                "upstream `{name}`: unknown api `{api}`: expected chat_completions, completions, embeddings, responses or messages"
                            ),
                        )
                    })?;
                    if !apis.contains(&parsed) {
                        apis.push(parsed);
                    }
                }
                apis
            }
        };
        let websocket = match &up.websocket {
            Some(ws) if *ws.get_ref() && !apis.contains(&Api::Responses) => {
                return Err(err(
                    ws.span(),
                    format!(
                        "upstream `{name}`: `websocket = true` needs \"responses\" in `apis` (WebSocket upgrades are on /v1/responses)"
                    ),
                ));
            }
            Some(ws) => *ws.get_ref(),
            None => false,
        };
        let target = match (&up.url, &up.mock) {
            (Some(url), None) => Target::Url(parse_url(url.get_ref()).map_err(|m| {
                err(
                    url.span(),
                    format!(
                        "upstream `{name}`: bad url `{}`: {m}",
                        llm_proxy_core::redact::url(url.get_ref())
                    ),
                )
            })?),
            (None, Some(mock)) => {
                if let Some(tps) = &mock.tokens_per_second
                    && !(tps.get_ref().is_finite() && *tps.get_ref() > 0.0)
                {
                    let (at, tps) = (tps.span(), tps.get_ref());
                    return Err(err(
                        at,
                        format!(
                            "upstream `{name}`: mock `tokens_per_second` must be above 0, not {tps}: leave it out to stream as fast as the client reads"
                        ),
                    ));
                }
                Target::Mock {
                    latency: Duration::from_millis(mock.latency_ms),
                    tokens_per_second: mock.tokens_per_second.as_ref().map(|t| *t.get_ref()),
                }
            }
            (Some(url), Some(_)) => {
                return Err(err(
                    url.span(),
                    format!("upstream `{name}`: give `url` or `mock`, not both"),
                ));
            }
            (None, None) => {
                return Err(err(
                    up.name.span(),
                    format!(
                        "upstream `{name}`: `url` is missing (or `mock`, for an in-process mock)"
                    ),
                ));
            }
        };
        let api_key = up
            .api_key
            .as_ref()
            .map(|k| {
                let key = resolve_secret(k.get_ref())
                    .map_err(|m| err(k.span(), format!("upstream `{name}`: `api_key`: {m}")))?;
                if key.is_empty() {
                    return Err(err(
                        k.span(),
                        format!(
                            "upstream `{name}`: `api_key` is empty: leave it out to send no key"
                        ),
                    ));
                }
                // (A variable set from a file or a paste often ends in a
                // newline or a space: sent, the key is wrong, and HTTP/2
                // calls such a value malformed.)
                if key.trim_matches([' ', '\t', '\r', '\n']) != key {
                    return Err(err(
                        k.span(),
                        format!(
                            "upstream `{name}`: `api_key` has space or a line break at an end: it would be sent as part of the key"
                        ),
                    ));
                }
                if http::HeaderValue::from_str(&key).is_err() {
                    return Err(err(
                        k.span(),
                        format!(
                            "upstream `{name}`: `api_key` must be printable text (it is sent as a header)"
                        ),
                    ));
                }
                Ok(key)
            })
            .transpose()?;
        let extra_roots_pem = match up.tls_ca_file.as_ref().filter(|f| !f.get_ref().is_empty()) {
            None => None,
            Some(ca) if !matches!(&target, Target::Url(u) if u.scheme_str() == Some("https")) => {
                return Err(err(
                    ca.span(),
                    format!(
                        "upstream `{name}`: `tls_ca_file` is for an https `url`; this upstream does not use TLS"
                    ),
                ));
            }
            Some(ca) => {
                let file = PathBuf::from(ca.get_ref());
                let file = if file.is_relative() {
                    path.parent().map(|d| d.join(&file)).unwrap_or(file)
                } else {
                    file
                };
                let pem = read_bounded(&file).map_err(|e| {
                    err(
                        ca.span(),
                        format!(
                            "upstream `{name}`: cannot read tls_ca_file `{}`: {e}",
                            file.display()
                        ),
                    )
                })?;
                llm_proxy_upstream::check_roots_pem(&pem).map_err(|e| {
                    err(
                        ca.span(),
                        format!("upstream `{name}`: tls_ca_file `{}`: {e}", file.display()),
                    )
                })?;
                Some(pem)
            }
        };
        if let Some(models) = &up.models
            && let Some(fault) =
                models_fault(models.get_ref(), "serve nothing", "serve every model")
        {
            return Err(err(models.span(), format!("upstream `{name}`: {fault}")));
        }
        let served_names = served_names(&name, &up, websocket, &err)?;
        let key_header = api_key.as_ref().map(|_| match protocol {
            Protocol::OpenAi => "authorization",
            Protocol::Anthropic => "x-api-key",
        });
        let headers = upstream_headers(&name, &up, key_header, &err)?;
        let ms = |key: &str, value: u64| {
            let at = [Seg::Key("upstream"), Seg::Item(index), Seg::Key(key)];
            positive_ms(
                path,
                src,
                &at,
                &format!("upstream `{name}`: `{key}`"),
                value,
            )
        };
        let connect_timeout = ms("connect_timeout_ms", up.connect_timeout_ms)?;
        let first_byte_timeout = ms("first_byte_timeout_ms", up.first_byte_timeout_ms)?;
        let idle_timeout = ms("idle_timeout_ms", up.idle_timeout_ms)?;
        let websocket_idle_timeout = ms("websocket_idle_timeout_ms", up.websocket_idle_timeout_ms)?;
        let pool_idle_timeout = ms("pool_idle_timeout_ms", up.pool_idle_timeout_ms)?;
        let http2 = match &up.http2 {
            Some(h2) if !matches!(&target, Target::Url(url) if url.scheme() == Some(&http::uri::Scheme::HTTPS)) =>
            {
                return Err(err(
                    h2.span(),
                    format!(
                        "upstream `{name}`: `http2` is for https:// upstreams (an http:// one, or a mock, speaks HTTP/1.1)"
                    ),
                ));
            }
            Some(h2) => *h2.get_ref(),
            None => true,
        };
        upstreams.push(UpstreamSpec {
            name,
            target,
            api_key,
            models: up.models.map(Spanned::into_inner),
            served_names,
            headers,
            weight: up.weight,
            protocol,
            apis,
            connect_timeout,
            first_byte_timeout,
            idle_timeout,
            extra_roots_pem,
            websocket,
            websocket_idle_timeout,
            pool_idle_timeout,
            http2,
        });
    }
    Ok(Settings {
        listen,
        max_body_bytes: cfg.max_body_bytes,
        max_buffered_body_bytes,
        drain_timeout: duration_secs(
            path,
            src,
            &[Seg::Key("drain_timeout_secs")],
            "`drain_timeout_secs`",
            cfg.drain_timeout_secs,
        )?,
        header_read_timeout: Duration::from_millis(cfg.header_read_timeout_ms),
        request_body_timeout: Duration::from_millis(cfg.request_body_timeout_ms),
        send_timeout: Duration::from_millis(cfg.send_timeout_ms),
        max_connections: cfg.max_connections,
        max_connections_per_ip: cfg.max_connections_per_ip,
        workers: match cfg.workers {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => n,
        },
        max_response_ids: cfg.max_response_ids,
        response_id_ttl: Duration::from_secs(cfg.response_id_ttl_days * 24 * 3600),
        upstream_header: cfg.upstream_header,
        overhead_header: cfg.overhead_header,
        access_log: cfg.access_log,
        cors_allow_origins,
        metrics_listen,
        balance: match &cfg.balance {
            Some(b) => validate_balance(path, src, b, &upstreams)?,
            None => llm_proxy_balance::BalanceConfig::default(),
        },
        upstreams,
        auth,
        cache,
    })
}

fn validate_cache(path: &Path, src: &str, c: &CacheSection) -> Result<CacheSpec, ConfigError> {
    let err =
        |span: std::ops::Range<usize>, msg: String| ConfigError::at(path, src, span.start, msg);
    let scope = match c.scope.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
        None | Some(("per_key", _)) => llm_proxy_cache::CacheScope::PerKey,
        Some(("shared", _)) => llm_proxy_cache::CacheScope::Shared,
        Some((other, span)) => {
            return Err(err(
                span,
                format!("[cache] scope `{other}`: expected \"per_key\" or \"shared\""),
            ));
        }
    };
    let store = match c.backend.get_ref().as_str() {
        "memory" => {
            // Unused (DESIGN.md's example shows it beside the memory
            // backend), but a typo in it is still caught.
            if let Some(url) = &c.redis_url {
                check_redis_url(url.get_ref())
                    .map_err(|m| err(url.span(), format!("[cache] `redis_url`: {m}")))?;
            }
            for (key, value) in [("max_entries", &c.max_entries), ("max_bytes", &c.max_bytes)] {
                if *value.get_ref() == 0 {
                    return Err(err(
                        value.span(),
                        format!("[cache] `{key}` must be at least 1"),
                    ));
                }
            }
            CacheStore::Memory {
                max_entries: *c.max_entries.get_ref(),
                max_bytes: *c.max_bytes.get_ref(),
            }
        }
        "redis" => {
            let url = c
                .redis_url
                .as_ref()
                .map_or("redis://127.0.0.1:6379", |u| u.get_ref().as_str());
            let span = c.redis_url.as_ref().map_or(c.backend.span(), |u| u.span());
            check_redis_url(url).map_err(|m| err(span, format!("[cache] `redis_url`: {m}")))?;
            CacheStore::Redis {
                url: url.to_owned(),
                key_prefix: c
                    .key_prefix
                    .clone()
                    .unwrap_or_else(|| "llm-proxy:".to_owned()),
            }
        }
        other => {
            return Err(err(
                c.backend.span(),
                format!("[cache] backend `{other}`: expected \"memory\" or \"redis\""),
            ));
        }
    };
    let mut key_headers = Vec::new();
    if let Some(names) = &c.key_headers {
        for name in names.get_ref() {
            let parsed = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                err(
                    names.span(),
                    format!("[cache] `key_headers`: `{name}` is not a header name"),
                )
            })?;
            if !key_headers.contains(&parsed) {
                key_headers.push(parsed);
            }
        }
    }
    let secs = *c.ttl_secs.get_ref();
    if !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&secs) {
        return Err(err(
            c.ttl_secs.span(),
            format!(
                "[cache] `ttl_secs` must be from {MIN_TTL_SECS} to {MAX_TTL_SECS} (ten years), not {secs}: \
                 to store nothing, leave out [cache] or set `enabled = false`"
            ),
        ));
    }
    Ok(CacheSpec {
        ttl: duration_secs(
            path,
            src,
            &[Seg::Key("cache"), Seg::Key("ttl_secs")],
            "[cache] `ttl_secs`",
            secs,
        )?,
        scope,
        store,
        key_headers,
    })
}

fn validate_balance(
    path: &Path,
    src: &str,
    b: &BalanceSection,
    upstreams: &[UpstreamSpec],
) -> Result<llm_proxy_balance::BalanceConfig, ConfigError> {
    use llm_proxy_balance::{BalanceConfig, HealthCheck, PrefixConfig, Strategy};
    let prefix = {
        let p = b.prefix_affinity.as_ref();
        let d = PrefixConfig::default();
        PrefixConfig {
            block_bytes: p.and_then(|p| p.block_bytes).unwrap_or(d.block_bytes),
            prefix_blocks: p.and_then(|p| p.prefix_blocks).unwrap_or(d.prefix_blocks),
            virtual_nodes: p.and_then(|p| p.virtual_nodes).unwrap_or(d.virtual_nodes),
            load_factor: p.and_then(|p| p.load_factor).unwrap_or(d.load_factor),
            min_slack: p.and_then(|p| p.min_slack).unwrap_or(d.min_slack),
            max_spread: p.and_then(|p| p.max_spread).unwrap_or(d.max_spread),
        }
    };
    check_balance_numbers(path, src, b)?;
    let strategy = match b
        .strategy
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("p2c_ewma", _)) => Strategy::P2cEwma,
        Some(("round_robin", _)) => Strategy::RoundRobin,
        Some(("weighted", _)) => Strategy::Weighted,
        Some(("least_requests", _)) => Strategy::LeastRequests,
        Some(("prefix_affinity", _)) => Strategy::PrefixAffinity(prefix),
        Some((other, span)) => {
            return Err(ConfigError::at(
                path,
                src,
                span.start,
                format!(
                    "[balance] strategy `{other}`: expected round_robin, weighted, least_requests, p2c_ewma or prefix_affinity"
                ),
            ));
        }
    };
    let served: HashSet<&str> = upstreams
        .iter()
        .flat_map(|u| u.models.iter().flatten())
        .map(String::as_str)
        .collect();
    let every_model = upstreams.iter().any(|u| u.models.is_none());
    for (from, to) in &b.fallbacks {
        if !every_model && !served.contains(from.as_str()) {
            return Err(ConfigError::near(
                path,
                src,
                &[Seg::Key("balance"), Seg::Key("fallbacks"), Seg::Key(from)],
                format!(
                    "[balance] fallbacks: `{from}` is a model no upstream serves, so it never needs a fallback"
                ),
            ));
        }
        if to.iter().any(|model| model == from) {
            return Err(ConfigError::near(
                path,
                src,
                &[Seg::Key("balance"), Seg::Key("fallbacks"), Seg::Key(from)],
                format!("[balance] fallbacks: `{from}` falls back to itself"),
            ));
        }
        for model in to {
            if !every_model && !served.contains(model.as_str()) {
                return Err(ConfigError::near(
                    path,
                    src,
                    &[Seg::Key("balance"), Seg::Key("fallbacks"), Seg::Key(from)],
                    format!(
                        "[balance] fallbacks: `{from}` falls back to `{model}`, which no upstream serves"
                    ),
                ));
            }
        }
    }
    let mut cfg = BalanceConfig {
        strategy,
        max_retries: b.max_retries,
        eject_after_failures: b.eject_after_failures,
        eject: duration_secs(
            path,
            src,
            &[Seg::Key("balance"), Seg::Key("eject_secs")],
            "[balance] `eject_secs`",
            b.eject_secs,
        )?,
        fallbacks: b.fallbacks.clone(),
        ..BalanceConfig::default()
    };
    let every = duration_secs(
        path,
        src,
        &[Seg::Key("balance"), Seg::Key("health_check_secs")],
        "[balance] `health_check_secs`",
        b.health_check_secs,
    )?;
    if let Some(p) = &b.health_check_path
        && !p.starts_with('/')
    {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("balance"), Seg::Key("health_check_path")],
            format!("[balance] `health_check_path` must start with `/`, not `{p}`"),
        ));
    }
    // A path no request can carry would fail every probe: every upstream
    // marked down by the checker itself.
    if let Some(p) = &b.health_check_path
        && !is_url_path(p)
    {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("balance"), Seg::Key("health_check_path")],
            format!(
                "[balance] `health_check_path` `{p}` is not a URL path (%-encode spaces and other characters a URL cannot hold)"
            ),
        ));
    }
    if !every.is_zero() {
        let mut hc = HealthCheck::every(every);
        if let Some(p) = &b.health_check_path {
            hc.path = p.clone();
        }
        hc.uneject = b.health_check_uneject;
        cfg.health_check = Some(hc);
    }
    if let Some(r) = b.retry_budget_ratio {
        cfg.retry_budget.ratio = r;
    }
    if let Some(m) = b.retry_budget_min_per_sec {
        cfg.retry_budget.min_per_sec = m;
    }
    Ok(cfg)
}

/// The most retries a request may make: each one is a whole attempt on
/// an upstream, back to back.
const MAX_RETRIES: u32 = 10;

/// The shortest first rest of an ejected upstream.
const MIN_EJECT_SECS: f64 = 0.001;

/// The shortest interval of active health checks.
const MIN_HEALTH_CHECK_SECS: f64 = 0.1;
/// The longest probe interval: a day. (Longer is a mistake, not a
/// schedule; the probe task itself takes any interval, as tokio caps a
/// period at about 30 years.)
const MAX_HEALTH_CHECK_SECS: f64 = 86_400.0;

/// `[balance]` numbers that cannot work (a value the balancer would
/// otherwise clamp, or one that turns it into a retry loop) are refused.
fn check_balance_numbers(path: &Path, src: &str, b: &BalanceSection) -> Result<(), ConfigError> {
    let fail = |keys: &[&str], msg: String| {
        let at: Vec<Seg<'_>> = std::iter::once("balance")
            .chain(keys.iter().copied())
            .map(Seg::Key)
            .collect();
        Err(ConfigError::near(
            path,
            src,
            &at,
            format!("[balance] {msg}"),
        ))
    };
    if b.max_retries > MAX_RETRIES {
        return fail(
            &["max_retries"],
            format!(
                "`max_retries` must be at most {MAX_RETRIES}, not {}",
                b.max_retries
            ),
        );
    }
    if b.eject_after_failures == 0 {
        return fail(
            &["eject_after_failures"],
            "`eject_after_failures` must be at least 1".into(),
        );
    }
    // (Negative and not-a-number: `duration_secs` says so.)
    if (0.0..MIN_EJECT_SECS).contains(&b.eject_secs) {
        return fail(
            &["eject_secs"],
            format!(
                "`eject_secs` must be at least {MIN_EJECT_SECS}, not {}: an ejection that ends as it starts keeps a failing upstream in turn",
                b.eject_secs
            ),
        );
    }
    let every = b.health_check_secs;
    let every_ok = every == 0.0 || (MIN_HEALTH_CHECK_SECS..=MAX_HEALTH_CHECK_SECS).contains(&every);
    if !every_ok {
        return fail(
            &["health_check_secs"],
            format!(
                "`health_check_secs` must be 0 (no active checks) or from {MIN_HEALTH_CHECK_SECS} to {MAX_HEALTH_CHECK_SECS} (a day), not {every}"
            ),
        );
    }
    if let Some(r) = b.retry_budget_ratio
        && !(0.0..=1.0).contains(&r)
    {
        return fail(
            &["retry_budget_ratio"],
            format!("`retry_budget_ratio` must be from 0 to 1 (a fraction of requests), not {r}"),
        );
    }
    if let Some(p) = &b.prefix_affinity {
        use llm_proxy_balance::PrefixConfig as P;
        let bounded = [
            ("block_bytes", p.block_bytes, P::BLOCK_BYTES),
            ("prefix_blocks", p.prefix_blocks, P::PREFIX_BLOCKS),
            ("virtual_nodes", p.virtual_nodes, P::VIRTUAL_NODES),
        ];
        for (key, value, bounds) in bounded {
            if let Some(v) = value
                && !bounds.contains(&v)
            {
                return fail(
                    &["prefix_affinity", key],
                    format!(
                        "prefix_affinity `{key}` must be from {} to {}, not {v}",
                        bounds.start(),
                        bounds.end()
                    ),
                );
            }
        }
        if let Some(f) = p.load_factor
            && !(f >= 0.0 && f.is_finite())
        {
            return fail(
                &["prefix_affinity", "load_factor"],
                format!("prefix_affinity `load_factor` must be a number ≥ 0, not {f}"),
            );
        }
    }
    Ok(())
}

fn validate_auth(path: &Path, src: &str, a: &AuthSection) -> Result<AuthSpec, ConfigError> {
    let err =
        |span: std::ops::Range<usize>, msg: String| ConfigError::at(path, src, span.start, msg);
    let backend = match a.backend.get_ref().as_str() {
        "memory" => {
            // Unused (DESIGN.md's example shows it beside the memory
            // backend), but a typo in it is still caught.
            if let Some(url) = &a.redis_url {
                check_redis_url(url.get_ref())
                    .map_err(|m| err(url.span(), format!("[auth] `redis_url`: {m}")))?;
            }
            LimitStore::Memory
        }
        "redis" => {
            let url = a
                .redis_url
                .as_ref()
                .map_or("redis://127.0.0.1:6379", |u| u.get_ref().as_str());
            let span = a.redis_url.as_ref().map_or(a.backend.span(), |u| u.span());
            check_redis_url(url).map_err(|m| err(span, format!("[auth] `redis_url`: {m}")))?;
            LimitStore::Redis {
                url: url.to_owned(),
                key_prefix: a
                    .key_prefix
                    .clone()
                    .unwrap_or_else(|| "llm-proxy:".to_owned()),
            }
        }
        other => {
            return Err(err(
                a.backend.span(),
                format!("[auth] backend `{other}`: expected \"memory\" or \"redis\""),
            ));
        }
    };
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    if a.keys.is_empty() {
        return Err(ConfigError::near(
            path,
            src,
            &[Seg::Key("auth")],
            "[auth] has no [[auth.keys]], so every request would be refused (401): \
             add a key, or set `enabled = false`",
        ));
    }
    let mut keys = Vec::with_capacity(a.keys.len());
    for k in &a.keys {
        let name = k.name.get_ref().clone();
        // (It names the key in logs and metrics: text, on one line.)
        if !is_display_name(&name) {
            return Err(err(
                k.name.span(),
                format!(
                    "[[auth.keys]] name `{name}` must be non-empty text without control \
                     characters, invisible characters or space at either end"
                ),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                k.name.span(),
                format!("[[auth.keys]] name `{name}` must be unique and non-empty"),
            ));
        }
        let sha256 = match (&k.key, &k.key_sha256) {
            (Some(key), None) => {
                let plain = resolve_secret(key.get_ref())
                    .map_err(|m| err(key.span(), format!("key `{name}`: `key`: {m}")))?;
                if plain.is_empty() || !plain.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(err(
                        key.span(),
                        format!("key `{name}`: a key is non-empty printable ASCII without spaces"),
                    ));
                }
                llm_proxy_auth::sha256(plain.as_bytes())
            }
            (None, Some(hex)) => {
                llm_proxy_auth::parse_sha256_hex(hex.get_ref()).ok_or_else(|| {
                    err(
                        hex.span(),
                        format!("key `{name}`: `key_sha256` must be 64 hex digits"),
                    )
                })?
            }
            _ => {
                return Err(err(
                    k.name.span(),
                    format!("key `{name}`: give exactly one of `key` and `key_sha256`"),
                ));
            }
        };
        if !hashes.insert(sha256) {
            return Err(err(
                k.name.span(),
                format!("key `{name}`: the same key is configured twice"),
            ));
        }
        for (what, value) in [
            ("requests_per_minute", &k.requests_per_minute),
            ("tokens_per_minute", &k.tokens_per_minute),
        ] {
            if let Some(value) = value
                && *value.get_ref() == 0
            {
                return Err(err(
                    value.span(),
                    format!(
                        "key `{name}`: `{what}` must be at least 1 (leave it out for no limit)"
                    ),
                ));
            }
        }
        if let Some(models) = &k.models
            && let Some(fault) = models_fault(
                models.get_ref(),
                "let the key use no model",
                "allow every model, or remove the key",
            )
        {
            return Err(err(models.span(), format!("key `{name}`: {fault}")));
        }
        keys.push(llm_proxy_auth::KeySpec {
            name,
            sha256,
            models: k.models.as_ref().map(|m| m.get_ref().clone()),
            requests_per_minute: k.requests_per_minute.as_ref().map(|r| *r.get_ref()),
            tokens_per_minute: k.tokens_per_minute.as_ref().map(|t| *t.get_ref()),
            passthrough: k.passthrough,
        });
    }
    Ok(AuthSpec { keys, backend })
}

/// A Redis URL the client accepts: `redis://`, `rediss://`, `redis+unix://`.
pub(crate) fn check_redis_url(url: &str) -> Result<(), String> {
    let shown = || llm_proxy_core::redact::url(url);
    // The URL parser drops tabs and newlines and ends the URL at a `#`
    // (a password holding one would be cut there): refused, not guessed.
    if url.chars().any(char::is_control) {
        return Err(format!("`{}` holds a control character", shown()));
    }
    if url.contains('#') {
        return Err(format!(
            "`{}`: a `#` starts a fragment; %-encode it (`%23`) in a password",
            shown()
        ));
    }
    let client = redis::Client::open(url).map_err(|e| {
        format!(
            "`{}`: {e} (expected redis://[[user]:password@]host[:port][/db], or rediss:// for TLS; port 1 to 65535)",
            shown()
        )
    })?;
    let info = client.get_connection_info();
    if info.redis_settings().db() < 0 {
        // The client would send `SELECT -1` on every connection, and every
        // one would fail: a mistake to say now.
        return Err(format!(
            "`{}`: the database number must be 0 or more",
            shown()
        ));
    }
    match info.addr() {
        redis::ConnectionAddr::Tcp(_, 0) | redis::ConnectionAddr::TcpTls { port: 0, .. } => {
            Err(format!("`{}`: port 0 is no port to connect to", shown()))
        }
        _ => Ok(()),
    }
}

/// What is wrong with a `models` list, if anything: empty (it would
/// `empty`; left out, it would `absent`), a name that is empty, has space
/// at an end or invisible characters (no client sends it so), or `*`,
/// which is no wildcard here (LiteLLM's is): a model of that name.
fn models_fault(models: &[String], empty: &str, absent: &str) -> Option<String> {
    if models.is_empty() {
        return Some(format!(
            "`models` is empty, so it would {empty}; leave it out to {absent}"
        ));
    }
    if models.iter().any(|m| m == "*") {
        return Some(format!(
            "`models` holds `*`, which is no wildcard: leave `models` out to {absent}"
        ));
    }
    let bad = models.iter().find(|m| !is_display_name(m))?;
    Some(format!(
        "`models` holds {bad:?}: a model name is non-empty printable text, without space \
         at either end or invisible characters"
    ))
}

/// Whether `name` can name an upstream or a key in headers, logs and
/// metrics: two names that look alike are the same name. Not blank, no
/// whitespace at either end and none but plain spaces inside, no control
/// character, and no character Unicode says a renderer may show as
/// nothing (`Default_Ignorable_Code_Point`: zero-width spaces and joiners,
/// direction marks and isolates, the soft hyphen, the BOM, variation
/// selectors, the Hangul fillers).
fn is_display_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.trim() == name
        && !name
            .chars()
            .any(|c| c.is_control() || is_default_ignorable(c) || (c.is_whitespace() && c != ' '))
}

/// Unicode's `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt,
/// Unicode 16), unassigned ranges included as the property includes them.
/// (No crate in use carries the property; the list has not changed since
/// Unicode 9 but for U+180F.)
fn is_default_ignorable(c: char) -> bool {
    matches!(c,
        '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}'..='\u{1160}' | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}' | '\u{feff}'
        | '\u{ffa0}' | '\u{fff0}'..='\u{fff8}' | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e0fff}')
}

/// Whether `p` is a path (and query) a request can carry as it is: ASCII,
/// no fragment, every `%` an escape, and what `http` parses.
fn is_url_path(p: &str) -> bool {
    p.is_ascii() && !p.contains('#') && escapes_whole(p) && p.parse::<http::Uri>().is_ok()
}

/// Whether every `%` in `p` starts an escape (`%` and two hex digits).
fn escapes_whole(p: &str) -> bool {
    let bytes = p.as_bytes();
    bytes.iter().enumerate().all(|(at, b)| {
        *b != b'%'
            || bytes
                .get(at + 1..at + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:8080"))
}

fn parse_url(s: &str) -> Result<http::Uri, String> {
    // Before parsing, and anywhere: a password with a `/` would read as a
    // host and a path (`user:2024/secret@host` as host `user`, port 2024),
    // and the password be sent as the path. An `@` a path holds is `%40`.
    if s.contains('@') {
        return Err(
            "credentials in the URL are not sent: give the key as `api_key` (an `@` in the path is written `%40`)"
                .into(),
        );
    }
    let uri: http::Uri = s.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err("the scheme must be http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("there is no host".into());
    }
    // (`[fe80::1%25eth0]`: the resolver the client uses takes no zone, and
    // every request would fail to connect.)
    if uri.host().is_some_and(|host| host.contains('%')) {
        return Err("an IPv6 address with a zone (`%…`) is not supported".into());
    }
    if uri.query().is_some() {
        return Err("a base URL takes no query".into());
    }
    if s.contains('#') {
        return Err("a base URL takes no fragment".into());
    }
    if !escapes_whole(uri.path()) {
        return Err(
            "every `%` in the path must start an escape (`%` and two hex digits): %-encode a `%` as `%25`"
                .into(),
        );
    }
    llm_proxy_upstream::port_of(uri.authority().expect("a host was found"))
        .map_err(str::to_owned)?;
    Ok(uri)
}

/// A secret: `env:NAME` reads the environment variable, anything else is literal.
pub fn resolve_secret(value: &str) -> Result<String, String> {
    match value.strip_prefix("env:") {
        Some("") => Err("`env:` names no variable (`env:NAME`)".into()),
        Some(var) => match std::env::var(var) {
            Ok(value) if value.is_empty() => Err(format!("environment variable `{var}` is empty")),
            Ok(value) => Ok(value),
            Err(std::env::VarError::NotPresent) => {
                Err(format!("environment variable `{var}` is not set"))
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("environment variable `{var}` is not UTF-8"))
            }
        },
        None => Ok(value.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str) -> Result<Settings, String> {
        Settings::from_str(Path::new("t.toml"), src).map_err(|e| e.to_string())
    }

    const MIN: &str = "[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/v1\"\n";

    #[test]
    fn upstream_headers_are_header_text_the_proxy_does_not_set() {
        let ok = load(&format!(
            "{MIN}headers = {{ \"OpenAI-Organization\" = \"org-1\", x-team = \"a b\" }}\n"
        ))
        .unwrap();
        let headers: Vec<_> = ok.upstreams[0]
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            headers,
            [("openai-organization", "org-1"), ("x-team", "a b")]
        );
        assert!(load(MIN).unwrap().upstreams[0].headers.is_empty());
        // `authorization` is the operator's to set, unless `api_key` does.
        assert!(
            load(&format!(
                "{MIN}headers = {{ authorization = \"Bearer x\" }}\n"
            ))
            .is_ok()
        );
        for (extra, error) in [
            (
                "api_key = \"k\"\nheaders = { Authorization = \"Bearer x\" }",
                "t.toml:5: upstream `a`: header `Authorization`: `api_key` sets this header",
            ),
            (
                "protocol = \"anthropic\"\napi_key = \"k\"\nheaders = { x-api-key = \"x\" }",
                "t.toml:6: upstream `a`: header `x-api-key`: `api_key` sets this header",
            ),
            (
                "headers = { Host = \"evil\" }",
                "t.toml:4: upstream `a`: header `Host`: the proxy sets this header itself",
            ),
            (
                "headers = { \"x a\" = \"1\" }",
                "t.toml:4: upstream `a`: header `x a`: not a header name",
            ),
            (
                "headers = { x-a = \"1\", X-A = \"2\" }",
                "t.toml:4: upstream `a`: header `x-a`: given twice",
            ),
            (
                "headers = { x-a = \"\" }",
                "t.toml:4: upstream `a`: header `x-a`: empty value",
            ),
            (
                "headers = { x-a = \"v \" }",
                "t.toml:4: upstream `a`: header `x-a`: space at an end of the value",
            ),
            (
                "headers = { X-Request-Id = \"fixed\" }",
                "t.toml:4: upstream `a`: header `X-Request-Id`: the proxy sends each request's own id",
            ),
            (
                "headers = { x-a = \"a\\nb\" }",
                "t.toml:4: upstream `a`: header `x-a`: the value must be printable text",
            ),
            (
                "headers = { x-a = \"env:LLM_PROXY_TEST_SURELY_UNSET\" }",
                "t.toml:4: upstream `a`: header `x-a`: environment variable `LLM_PROXY_TEST_SURELY_UNSET` is not set",
            ),
        ] {
            let e = load(&format!("{MIN}{extra}\n")).unwrap_err();
            assert!(e.starts_with(error), "{extra}: {e}");
        }
        // Its `Debug` shows the names, not the values.
        let debug = format!("{:?}", ok.upstreams[0]);
        assert!(
            debug.contains("openai-organization") && !debug.contains("org-1"),
            "{debug}"
        );
    }

    #[test]
    fn served_names_map_a_listed_model_to_a_name_and_nothing_else() {
        let ok = load(&format!(
            "{MIN}models = [\"llama\", \"qwen\"]\n\
             served_names = {{ llama = \"meta-llama/Llama-3.1-8B-Instruct\" }}\n"
        ))
        .unwrap();
        assert_eq!(
            ok.upstreams[0].served_names,
            BTreeMap::from([(
                "llama".to_owned(),
                "meta-llama/Llama-3.1-8B-Instruct".to_owned()
            )])
        );
        assert!(load(MIN).unwrap().upstreams[0].served_names.is_empty());
        let l = "models = [\"llama\"]\n";
        for (extra, error) in [
            (
                "served_names = { x = \"y\" }".to_owned(),
                "t.toml:4: upstream `a`: `served_names` needs `models`",
            ),
            (
                format!("{l}served_names = {{ lama = \"x\" }}"),
                "t.toml:5: upstream `a`: `served_names` names model `lama`, which its `models` does not list",
            ),
            (
                format!("{l}served_names = {{ llama = \"llama\" }}"),
                "t.toml:5: upstream `a`: `served_names` gives `llama` its own name",
            ),
            (
                format!("{l}served_names = {{ llama = \" x\" }}"),
                "t.toml:5: upstream `a`: `served_names`: \" x\" has space at an end",
            ),
            (
                format!("{l}served_names = {{ llama = \" \" }}"),
                "t.toml:5: upstream `a`: `served_names` holds an empty name (\"llama\" = \" \")",
            ),
            (
                format!("{l}served_names = {{ \"\" = \"x\" }}"),
                "t.toml:5: upstream `a`: `served_names` holds an empty name (\"\" = \"x\")",
            ),
            (format!("{l}served_names = {{ llama = 3 }}"), "t.toml:5"),
            (
                format!(
                    "{l}apis = [\"responses\"]\nwebsocket = true\nserved_names = {{ llama = \"x\" }}"
                ),
                "t.toml:7: upstream `a`: `served_names` is not built for WebSocket sessions",
            ),
        ] {
            let e = load(&format!("{MIN}{extra}\n")).unwrap_err();
            assert!(e.starts_with(error), "{extra}: {e}");
        }
    }

    #[test]
    fn minimal_config_has_defaults() {
        let s = load(MIN).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.max_body_bytes, 4 * 1024 * 1024);
        assert_eq!(s.max_buffered_body_bytes, 1 << 30);
        let big = load(&format!("max_body_bytes = {}\n{MIN}", 2u64 << 30)).unwrap();
        assert_eq!(big.max_buffered_body_bytes, 2 << 30, "never below one body");
        assert_eq!(s.upstreams.len(), 1);
        assert_eq!(s.upstreams[0].pool_idle_timeout, Duration::from_secs(4));
        let short = load(&format!("{MIN}pool_idle_timeout_ms = 1500\n")).unwrap();
        assert_eq!(
            short.upstreams[0].pool_idle_timeout,
            Duration::from_millis(1500)
        );
        assert!(s.upstream_header);
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(s.workers, cpus);
    }

    #[test]
    fn cors_origins_are_origins() {
        let s = load(&format!(
            "cors_allow_origins = [\"https://App.example.com\", \"http://localhost:3000\", \"*\"]\n{MIN}"
        ))
        .unwrap();
        assert_eq!(
            s.cors_allow_origins,
            ["https://app.example.com", "http://localhost:3000", "*"]
        );
        // As a browser sends it: without the scheme's own port.
        let s = load(&format!(
            "cors_allow_origins = [\"https://a.example:443\", \"http://b.example:80\", \"https://c.example:80\"]\n{MIN}"
        ))
        .unwrap();
        assert_eq!(
            s.cors_allow_origins,
            [
                "https://a.example",
                "http://b.example",
                "https://c.example:80"
            ]
        );
        assert!(load(MIN).unwrap().cors_allow_origins.is_empty());
        for bad in [
            "https://app.example.com/",
            "app.example.com",
            "ftp://app.example.com",
            "https://",
            "https://*.example.com",
            "https://user@app.example.com",
            "https://app.example.com:",
        ] {
            let e = load(&format!("cors_allow_origins = [\"{bad}\"]\n{MIN}")).unwrap_err();
            assert!(
                e.contains("is not an origin") && e.contains(":1:"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn values_that_cannot_work_are_refused() {
        let refused = |src: String, says: &str| {
            let e = load(&src).unwrap_err();
            assert!(e.contains(says), "{src}: {e}");
        };
        refused(
            format!("workers = 18446744073709551615\n{MIN}"),
            "`workers` must be between 0",
        );
        refused(
            format!("workers = 1025\n{MIN}"),
            "`workers` must be between 0",
        );
        refused(
            format!("max_body_bytes = 0\n{MIN}"),
            "`max_body_bytes` must be at least 1",
        );
        refused(
            format!("listen = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"\n{MIN}"),
            "`metrics_listen` is `listen`",
        );
        for (listen, metrics) in [
            ("127.0.0.1:9000", "0.0.0.0:9000"),
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("127.0.0.1:9000", "[::]:9000"),
            ("[::1]:9000", "[::]:9000"),
            ("127.0.0.1:9000", "[::ffff:127.0.0.1]:9000"),
            ("[::ffff:0.0.0.0]:9000", "127.0.0.1:9000"),
        ] {
            refused(
                format!("listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\n{MIN}"),
                "takes the port of `listen`",
            );
        }
        // Each of these binds beside the other.
        for (listen, metrics) in [
            ("127.0.0.1:9000", "127.0.0.2:9000"),
            ("0.0.0.0:9000", "[::1]:9000"),
            ("127.0.0.1:9000", "0.0.0.0:9001"),
        ] {
            let text = format!("listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\n{MIN}");
            assert!(load(&text).is_ok(), "{text}");
        }
        for (url, says) in [
            (
                "http://127.0.0.1:99999/v1",
                "the port must be a number from 1 to 65535",
            ),
            (
                "http://u:p@127.0.0.1:9/v1",
                "credentials in the URL are not sent",
            ),
            (
                "http://u:p/w@127.0.0.1:9/v1",
                "credentials in the URL are not sent",
            ),
            ("http://127.0.0.1:9/v1#f", "a base URL takes no fragment"),
            (
                "http://127.0.0.1:9/v%zz",
                "every `%` in the path must start an escape",
            ),
        ] {
            refused(MIN.replace("http://127.0.0.1:9/v1", url), says);
        }
        // An `@` in the path is written `%40`: a raw one could be a
        // password's, and is refused.
        let settings = load(&MIN.replace(
            "http://127.0.0.1:9/v1",
            "https://gw.example.com/v1/team%40prod",
        ))
        .unwrap();
        assert!(
            matches!(&settings.upstreams[0].target, Target::Url(u) if u.path() == "/v1/team%40prod")
        );
        for url in [
            "https://gw.example.com/v1/team@prod",
            "https://user:2024/secret@api.example.com/v1",
        ] {
            refused(
                MIN.replace("http://127.0.0.1:9/v1", url),
                "credentials in the URL are not sent",
            );
        }
        // (A tab as it is; a line break as TOML escapes it.)
        for key in [" sk-1", "sk-1 ", "sk-1\t", "sk-1\\n", "sk-1\\r\\n"] {
            refused(
                format!("{MIN}api_key = \"{key}\"\n"),
                "t.toml:4: upstream `a`: `api_key` has space or a line break at an end",
            );
        }
        refused(
            format!("{MIN}api_key = \"env:\"\n"),
            "`env:` names no variable",
        );
        for eject in ["0", "0.0009"] {
            refused(
                format!("{MIN}[balance]\neject_secs = {eject}\n"),
                "t.toml:5: [balance] `eject_secs` must be at least 0.001",
            );
        }
        assert!(load(&format!("{MIN}[balance]\neject_secs = 0.001\n")).is_ok());
        refused(
            format!("{MIN}models = []\n"),
            "t.toml:4: upstream `a`: `models` is empty",
        );
        refused(
            format!("{MIN}api_key = \"a\\nb\"\n"),
            "t.toml:4: upstream `a`: `api_key` must be printable",
        );
        let served = "[[upstream]]\nname = \"a\"\nurl = \"http://h/v1\"\nmodels = [\"m\", \"n\"]\n";
        refused(
            format!("{served}[balance]\nfallbacks = {{ \"m\" = [\"m\"] }}\n"),
            "`m` falls back to itself",
        );
        refused(
            format!("{served}[balance]\nfallbacks = {{ \"x\" = [\"m\"] }}\n"),
            "`x` is a model no upstream serves",
        );
        assert!(
            load(&format!(
                "{served}[balance]\nfallbacks = {{ \"m\" = [\"n\"] }}\n"
            ))
            .is_ok()
        );
        assert!(load(&format!("workers = 1024\n{MIN}")).is_ok());
        assert!(
            load(&format!(
                "listen = \"127.0.0.1:0\"\nmetrics_listen = \"127.0.0.1:0\"\n{MIN}"
            ))
            .is_ok()
        );
    }

    #[test]
    fn limits_that_cannot_work_are_refused() {
        let e = load(&format!("max_response_ids = 0\n{MIN}")).unwrap_err();
        assert!(
            e.contains("`max_response_ids` must be between 1 and 4294967294, not 0"),
            "{e}"
        );
        let e = load(&format!("max_response_ids = 4294967295\n{MIN}")).unwrap_err();
        assert!(
            e.contains("`max_response_ids` must be between 1 and"),
            "{e}"
        );
        let e = load(&format!(
            "max_connections = 10\nmax_connections_per_ip = 11\n{MIN}"
        ))
        .unwrap_err();
        assert!(e.contains("`max_connections_per_ip` (11) is over"), "{e}");
        let ok = load(&format!(
            "max_connections = 10\nmax_connections_per_ip = 10\n{MIN}"
        ))
        .unwrap();
        assert_eq!((ok.max_connections, ok.max_connections_per_ip), (10, 10));
        assert_eq!(load(MIN).unwrap().max_connections_per_ip, 0);
        let e = load(&format!("max_connections = 4611686018427387904\n{MIN}")).unwrap_err();
        assert!(e.contains("`max_connections` must be between 1 and"), "{e}");
        let e = load(&format!(
            "max_body_bytes = 2000\nmax_buffered_body_bytes = 1999\n{MIN}"
        ))
        .unwrap_err();
        assert!(
            e.contains("`max_buffered_body_bytes` (1999) must be at least `max_body_bytes` (2000)"),
            "{e}"
        );
        let e = load(&format!("header_read_timeout_ms = 0\n{MIN}")).unwrap_err();
        assert!(
            e.contains("`header_read_timeout_ms` must be at least 1"),
            "{e}"
        );
        for key in [
            "connect_timeout_ms",
            "first_byte_timeout_ms",
            "idle_timeout_ms",
        ] {
            let e = load(&format!("{MIN}{key} = 0\n")).unwrap_err();
            assert!(e.contains(&format!("`{key}` must be at least 1")), "{e}");
        }
        let e = load(&format!(
            "{MIN}[balance]\nhealth_check_secs = 5\nhealth_check_path = \"health\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("`health_check_path` must start with `/`"), "{e}");
        for ttl in ["1e19", "0", "nan"] {
            let e = load(&format!("{MIN}[cache]\nttl_secs = {ttl}\n")).unwrap_err();
            assert!(
                e.contains("t.toml:5: [cache] `ttl_secs` must be from"),
                "{e}"
            );
        }
        assert!(load(&format!("{MIN}[cache]\nttl_secs = 86400\n")).is_ok());
        let e = load(&format!("{MIN}\n\n[cache]\nmax_bytes = 0\n")).unwrap_err();
        assert!(
            e.contains("t.toml:7: [cache] `max_bytes` must be at least 1"),
            "{e}"
        );
        // DESIGN.md's example: a `redis_url` beside the memory backend.
        for section in ["cache", "auth"] {
            let keys = if section == "auth" {
                "[[auth.keys]]\nname = \"k\"\nkey = \"sk\"\n"
            } else {
                ""
            };
            let src = format!(
                "{MIN}[{section}]\nbackend = \"memory\"\nredis_url = \"redis://127.0.0.1:6379\"\n{keys}"
            );
            assert!(load(&src).is_ok(), "{section}: {:?}", load(&src).err());
        }
        let e = load(&format!("{MIN}[auth]\n")).unwrap_err();
        assert!(e.contains("[auth] has no [[auth.keys]]"), "{e}");
        for (balance, says) in [
            ("max_retries = 11", "`max_retries` must be at most 10"),
            (
                "eject_after_failures = 0",
                "`eject_after_failures` must be at least 1",
            ),
            ("health_check_secs = 0.001", "`health_check_secs` must be 0"),
            ("health_check_secs = 1e19", "`health_check_secs` must be 0"),
            (
                "retry_budget_ratio = -1.0",
                "`retry_budget_ratio` must be from 0 to 1",
            ),
            (
                "retry_budget_ratio = nan",
                "`retry_budget_ratio` must be from 0 to 1",
            ),
            (
                "[balance.prefix_affinity]\nblock_bytes = 0",
                "`block_bytes` must be from 16 to 65536",
            ),
            (
                "[balance.prefix_affinity]\nvirtual_nodes = 100000000",
                "`virtual_nodes` must be from 1 to 1024",
            ),
            (
                "[balance.prefix_affinity]\nload_factor = nan",
                "`load_factor` must be a number",
            ),
        ] {
            let e = load(&format!("{MIN}[balance]\n{balance}\n")).unwrap_err();
            assert!(e.contains(says), "{balance}: {e}");
        }
        let e = load(&format!("{MIN}connect_timeout_ms = 0\n")).unwrap_err();
        assert!(e.contains("upstream `a`: `connect_timeout_ms`"), "{e}");
        for (field, says) in [
            ("apis = []", "t.toml:4: upstream `a`: `apis` is empty"),
            (
                "models = [\"\"]",
                "t.toml:4: upstream `a`: `models` holds \"\": a model name is non-empty",
            ),
            (
                "models = [\"gpt-4o \"]",
                "t.toml:4: upstream `a`: `models` holds \"gpt-4o \": a model name",
            ),
            (
                "models = [\"a\\nb\"]",
                "t.toml:4: upstream `a`: `models` holds \"a\\nb\": a model name",
            ),
            (
                "models = [\"*\"]",
                "t.toml:4: upstream `a`: `models` holds `*`, which is no wildcard: leave \
                 `models` out to serve every model",
            ),
        ] {
            let e = load(&format!("{MIN}{field}\n")).unwrap_err();
            assert!(e.contains(says), "{field}: {e}");
        }
        for name in [" ", "a ", "\\ta", "a\\u200b"] {
            let e = load(&format!(
                "[[upstream]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:9/v1\"\n"
            ))
            .unwrap_err();
            assert!(
                e.contains("must be non-empty printable text"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn an_error_is_one_bounded_line_whatever_the_value_holds() {
        let e = load(&format!("listen = \"a\\nb\\u001b[31mred\"\n{MIN}")).unwrap_err();
        assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e:?}");
        assert!(e.contains("a\\nb\\u{1b}[31mred"), "{e}");
        let long = "x".repeat(100_000);
        let e = load(&format!("listen = \"{long}\"\n{MIN}")).unwrap_err();
        assert!(
            e.chars().count() <= MAX_ERROR_CHARS + 1 && e.ends_with('…'),
            "{}",
            e.len()
        );
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused_with_its_line() {
        let dir = std::env::temp_dir().join(format!("cfg-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        let mut text = MIN.as_bytes().to_vec();
        text.extend_from_slice(b"# caf\xe9\n");
        std::fs::write(&path, &text).unwrap();
        let e = Settings::from_file(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.ends_with("bad.toml:4: not UTF-8 (byte 0xe9); a TOML file is UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn a_redis_url_the_client_would_read_otherwise_is_refused() {
        for (url, says) in [
            ("redis://127.0.0.1:0", "port 0"),
            ("redis://:pa#ss@127.0.0.1:6379", "a `#` starts a fragment"),
            ("redis://127.0.0.1:6379/0\\n", "control character"),
            ("redis://127.0.0.1:6379/-1", "database number"),
        ] {
            let e = load(&format!(
                "{MIN}[cache]\nbackend = \"redis\"\nredis_url = \"{url}\"\n"
            ))
            .unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("pa#ss"), "no password shown: {e}");
        }
        assert!(check_redis_url("redis://:pa%23ss@127.0.0.1:6379/2").is_ok());
        assert!(check_redis_url("rediss://127.0.0.1").is_ok());
    }

    #[test]
    fn values_that_would_fail_every_request_are_refused() {
        for url in ["http://[fe80::1%25lo]:9/v1", "http://[::1%lo]:9/v1"] {
            let e = load(&format!("[[upstream]]\nname = \"a\"\nurl = \"{url}\"\n")).unwrap_err();
            assert!(e.contains("zone") || e.contains("invalid"), "{url}: {e}");
        }
        for p in ["/%zz", "/\\u00e9", "/h#frag", "/ok%2"] {
            let e = load(&format!(
                "{MIN}[balance]\nhealth_check_secs = 5\nhealth_check_path = \"{p}\"\n"
            ))
            .unwrap_err();
            assert!(e.contains("is not a URL path"), "{p}: {e}");
        }
        assert!(
            load(&format!(
                "{MIN}[balance]\nhealth_check_secs = 5\nhealth_check_path = \"/v1/m%2Fx?a=b\"\n"
            ))
            .is_ok()
        );
        for days in [0, 3651] {
            let e = load(&format!("response_id_ttl_days = {days}\n{MIN}")).unwrap_err();
            assert!(
                e.contains("`response_id_ttl_days` must be from 1 to 3650"),
                "{e}"
            );
        }
        let settings = load(&format!("response_id_ttl_days = 3650\n{MIN}")).unwrap();
        assert_eq!(
            settings.response_id_ttl,
            Duration::from_secs(3650 * 24 * 3600)
        );
        // A passing probe ends an ejection unless told not to.
        for (line, uneject) in [("", true), ("health_check_uneject = false\n", false)] {
            let settings = load(&format!("{MIN}[balance]\nhealth_check_secs = 5\n{line}")).unwrap();
            let check = settings.balance.health_check.expect("checks on");
            assert_eq!(check.uneject, uneject, "{line}");
        }
        for name in [
            " ",
            "a\\nb",
            "a\\u0000",
            "ops ",
            " ops",
            "o\\u200dps",
            "o\\u00a0ps",
            "o\\u2066ps",
            "o\\u061cps",
            "\\u3164",
            "o\\ufe0fps",
            "o\\U000e0041ps",
        ] {
            let e = load(&format!(
                "{MIN}[auth]\n[[auth.keys]]\nname = \"{name}\"\nkey = \"sk-1\"\n"
            ))
            .unwrap_err();
            assert!(e.contains("without control characters"), "{name}: {e}");
        }
        // Each on line 8, the key's own (not its section's `name`).
        for (line, said) in [
            (
                "models = []",
                "t.toml:8: key `k`: `models` is empty, so it would let the key use no model",
            ),
            (
                "models = [\"m\", \" \"]",
                "t.toml:8: key `k`: `models` holds \" \": a model name is non-empty",
            ),
            (
                "models = [\"*\"]",
                "t.toml:8: key `k`: `models` holds `*`, which is no wildcard: leave `models` out \
                 to allow every model",
            ),
            (
                "requests_per_minute = 0",
                "t.toml:8: key `k`: `requests_per_minute` must be at least 1",
            ),
            (
                "tokens_per_minute = 0",
                "t.toml:8: key `k`: `tokens_per_minute` must be at least 1",
            ),
        ] {
            let e = load(&format!(
                "{MIN}[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-1\"\n{line}\n"
            ))
            .unwrap_err();
            assert!(e.contains(said), "{line}: {e}");
        }
    }

    #[test]
    fn value_errors_name_their_line() {
        // Each bad value on line 4, after a comment, `listen`, and a blank.
        let head = "# llm-proxy\nlisten = \"127.0.0.1:9000\"\n\n";
        let second = "[[upstream]]\nname = \"b\"\nurl = \"http://127.0.0.1:9/v1\"\n";
        let top = [
            "max_body_bytes = 0",
            "workers = 1025",
            "max_connections = 0",
            "max_connections_per_ip = 10001",
            "max_buffered_body_bytes = 1",
            "header_read_timeout_ms = 0",
            "send_timeout_ms = 0",
            "drain_timeout_secs = -1.0",
            "metrics_listen = \"127.0.0.1:9000\"",
        ];
        for bad in top {
            let e = load(&format!("{head}{bad}\n{MIN}")).unwrap_err();
            assert!(e.starts_with("t.toml:4: "), "{bad}: {e}");
        }
        // The second upstream's key, not the first's (line 10).
        let e = load(&format!("{head}{MIN}{second}connect_timeout_ms = 0\n")).unwrap_err();
        assert!(
            e.starts_with("t.toml:10: upstream `b`: `connect_timeout_ms`"),
            "{e}"
        );
        let sections = [
            "[balance]\nmax_retries = 11",
            "[balance]\neject_after_failures = 0",
            "[balance]\neject_secs = -1.0",
            "[balance]\nhealth_check_secs = 0.001",
            "[balance]\nretry_budget_ratio = 2.0",
            "[balance]\nhealth_check_path = \"health\"",
            "[balance]\nhealth_check_path = \"/a b\"",
            "[balance.prefix_affinity]\nblock_bytes = 0",
            "[balance.prefix_affinity]\nload_factor = -1.0",
            "[balance.fallbacks]\nnone = [\"a\"]",
            "[balance.fallbacks]\na = [\"a\"]",
            "[balance.fallbacks]\na = [\"none\"]",
        ];
        let models =
            "[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/v1\"\nmodels = [\"a\"]\n";
        for bad in sections {
            // The section's header on line 8, its key on line 9.
            let e = load(&format!("{head}{models}{bad}\n")).unwrap_err();
            assert!(e.starts_with("t.toml:9: [balance] "), "{bad}: {e}");
        }
        // A section whose problem is the whole section: its header's line.
        let e = load(&format!("{head}{MIN}[auth]\n")).unwrap_err();
        assert!(e.starts_with("t.toml:7: [auth] has no"), "{e}");
    }

    #[test]
    fn a_mock_pace_that_cannot_work_is_refused() {
        let mock = "[[upstream]]\nname = \"m\"\nmock = { tokens_per_second = TPS }\n";
        let table = "[[upstream]]\nname = \"m\"\n[upstream.mock]\nlatency_ms = 1\ntokens_per_second = TPS\n";
        for tps in ["0.0", "-5.0", "nan", "inf"] {
            // The error names the key's own line.
            for (src, line) in [(mock, 3), (table, 5)] {
                let e = load(&src.replace("TPS", tps)).unwrap_err();
                assert!(
                    e.contains(&format!(
                        "t.toml:{line}: upstream `m`: mock `tokens_per_second` must be above 0"
                    )),
                    "{tps}: {e}"
                );
            }
        }
        assert!(load(&mock.replace("TPS", "0.5")).is_ok());
    }

    #[test]
    fn a_health_check_path_that_is_no_url_path_is_refused() {
        // The probe could never be sent: every upstream would be marked
        // unhealthy by the checker, and `/readyz` would answer 503.
        let e = load(&format!(
            "{MIN}[balance]\nhealth_check_secs = 1\nhealth_check_path = \"/models?a b\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("[balance] `health_check_path` `/models?a b` is not a URL path"),
            "{e}"
        );
        assert!(
            load(&format!(
                "{MIN}[balance]\nhealth_check_secs = 1\nhealth_check_path = \"/models?a=b%20c\"\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn an_empty_api_key_is_refused() {
        // As one from an empty variable: it would go out as
        // `Authorization: Bearer ` (or an empty `x-api-key`).
        let e = load(&format!("{MIN}api_key = \"\"\n")).unwrap_err();
        assert!(
            e.contains("t.toml:4: upstream `a`: `api_key` is empty"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_holds_no_secret() {
        let src = format!(
            "{MIN}api_key = \"sk-upstream-s3cret\"\n\
             [cache]\nbackend = \"redis\"\nredis_url = \"redis://:s3cret@127.0.0.1:6379\"\n\
             [auth]\nbackend = \"redis\"\nredis_url = \"redis://u:s3cret@127.0.0.1:6379\"\n\
             [[auth.keys]]\nname = \"k\"\nkey = \"sk-client-s3cret\"\n"
        );
        let settings = load(&src).unwrap();
        let raw: Config = toml::from_str(&src).unwrap();
        let upstream =
            llm_proxy_upstream::UpstreamConfig::new("u", "http://127.0.0.1:9/v1".parse().unwrap())
                .api_key("sk-upstream-s3cret");
        for shown in [
            format!("{settings:?}"),
            format!("{raw:?}"),
            format!("{upstream:?}"),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn a_password_is_not_echoed() {
        let e = check_redis_url("redis://:s3cret@bad host:notaport").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        let e = load(&MIN.replace("http://127.0.0.1:9/v1", "ftp://bob:s3cret@127.0.0.1:9/v1"))
            .unwrap_err();
        assert!(e.contains("bad url") && !e.contains("s3cret"), "{e}");
        // Nor in a URL mistyped past what a parser takes.
        for typo in [
            "https:/bob:s3cret@127.0.0.1:9/v1",
            "https//bob:s3cret@127.0.0.1:9/v1",
        ] {
            let e = load(&MIN.replace("http://127.0.0.1:9/v1", typo)).unwrap_err();
            assert!(!e.contains("s3cret"), "{e}");
        }
        let e = check_redis_url("redis:/:s3cret@127.0.0.1:6379").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn workers_explicit_or_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        assert_eq!(load(&format!("workers = 3\n{MIN}")).unwrap().workers, 3);
        assert_eq!(load(&format!("workers = 0\n{MIN}")).unwrap().workers, cpus);
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = load(&format!("{MIN}bogus = 1\n")).unwrap_err();
        assert!(e.starts_with("t.toml:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
        let e = load("listen = \"x\"\n[[upstream]]\nname=\"a\"\nurl=\"http://h/v1\"\nnope=2\n")
            .unwrap_err();
        assert!(
            e.starts_with("t.toml:1:") || e.starts_with("t.toml:5:"),
            "{e}"
        );
        let e = load(&format!(
            "{MIN}[[upstream]]\nname = \"a\"\nurl = \"http://h/v1\"\n"
        ))
        .unwrap_err();
        assert_eq!(e, "t.toml:5: duplicate upstream name `a`");
        // A value of the wrong type: its key, in the config's words.
        for (text, want) in [
            (
                "max_body_bytes = -1\n",
                "t.toml:1: `max_body_bytes`: invalid value: integer `-1`, expected a whole \
                 number from 0 to 18446744073709551615",
            ),
            (
                "listen = 8080\n",
                "t.toml:1: `listen`: invalid type: integer `8080`, expected a string",
            ),
            (
                &format!("{MIN}weight = 18446744073709551616\n"),
                "t.toml:4: `upstream[0].weight`: invalid type: integer `18446744073709551616`, \
                 expected a whole number from 0 to 4294967295",
            ),
            (
                "[[upstream]]\nname = \"a\"\nmock = true\n",
                "t.toml:3: `upstream[0].mock`: invalid type: boolean `true`, expected a table",
            ),
            (
                &format!("{MIN}[upstream.headers]\nx = 1\n"),
                "t.toml:5: `upstream[0].headers.x`: invalid type: integer `1`, expected a string",
            ),
            (
                "[upstream]\nname = \"a\"\n",
                "t.toml:1: `upstream`: invalid type: table, expected an array (`[[…]]` for tables)",
            ),
            (
                &format!("{MIN}models = \"m\"\n"),
                "t.toml:4: `upstream[0].models`: invalid type: string \"m\", expected an array",
            ),
            (
                "listen = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n",
                "t.toml:2: duplicate key `listen`",
            ),
        ] {
            assert_eq!(load(text).unwrap_err(), want, "{text}");
        }
        let e = load("[[upstream]]\nname = \"a\"\nurl = \"ftp://h/v1\"\n").unwrap_err();
        assert!(e.starts_with("t.toml:3: upstream `a`: bad url"), "{e}");
        let e = load(&format!("{MIN}websocket = true\n")).unwrap_err();
        assert!(
            e.starts_with("t.toml:4: upstream `a`: `websocket = true` needs \"responses\""),
            "{e}"
        );
        let e = load(&format!("{MIN}http2 = false\n")).unwrap_err();
        assert!(
            e.starts_with("t.toml:4: upstream `a`: `http2` is for https:// upstreams"),
            "{e}"
        );
        let https = "[[upstream]]\nname = \"a\"\nurl = \"https://h/v1\"\n";
        assert!(load(https).unwrap().upstreams[0].http2);
        assert!(!load(&format!("{https}http2 = false\n")).unwrap().upstreams[0].http2);
        let ok = load(&format!("{MIN}websocket = true\napis = [\"responses\"]\n")).unwrap();
        assert!(ok.upstreams[0].websocket);
        assert_eq!(
            ok.upstreams[0].websocket_idle_timeout,
            Duration::from_secs(600)
        );
        let e = load(&format!("{MIN}apis = [\"chat\"]\n")).unwrap_err();
        assert!(
            e.starts_with("t.toml:4: upstream `a`: unknown api `chat`"),
            "{e}"
        );
        let e = load(&format!("{MIN}[cache]\nscope = \"everyone\"\n")).unwrap_err();
        assert!(e.starts_with("t.toml:5: [cache] scope `everyone`"), "{e}");
        let e = load(&format!(
            "{MIN}[cache]\nkey_headers = [\"ok\", \"not ok\"]\n"
        ))
        .unwrap_err();
        assert!(
            e.starts_with("t.toml:5: [cache] `key_headers`: `not ok` is not a header name"),
            "{e}"
        );
        let keyed = load(&format!(
            "{MIN}[cache]\nkey_headers = [\"OpenAI-Project\", \"openai-project\", \"x-a\"]\n"
        ))
        .unwrap();
        assert_eq!(
            keyed.cache.unwrap().key_headers,
            ["openai-project", "x-a"],
            "lowercased, once each"
        );
        // A CA file that holds no certificate: said at load, with its key,
        // line and path, not when the first upstream connection is made.
        let bad =
            std::env::temp_dir().join(format!("llm-proxy-config-{}-bad.pem", std::process::id()));
        std::fs::write(&bad, "not a certificate\n").unwrap();
        let e = load(&format!(
            "[[upstream]]\nname = \"a\"\nurl = \"https://h/v1\"\ntls_ca_file = \"{}\"\n",
            bad.display()
        ))
        .unwrap_err();
        let _ = std::fs::remove_file(&bad);
        assert!(
            e.starts_with("t.toml:4: upstream `a`: tls_ca_file `")
                && e.ends_with("bad.pem`: no certificate found in the PEM data"),
            "{e}"
        );
        let e = load(&format!("{MIN}tls_ca_file = \"ca.pem\"\n")).unwrap_err();
        assert_eq!(
            e,
            "t.toml:4: upstream `a`: `tls_ca_file` is for an https `url`; this upstream does not use TLS"
        );
        let e = load(&format!("{MIN}[balance]\neject_secs = -1\n")).unwrap_err();
        assert!(
            e.contains("`eject_secs` must be a non-negative number"),
            "{e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
        // Too large is not negative.
        let e = load(&format!("drain_timeout_secs = 1e300\n{MIN}")).unwrap_err();
        assert!(
            e.ends_with("must be a number of seconds a clock can count (under 1.8e19), not 1e300"),
            "{e}"
        );
    }

    #[test]
    fn the_readme_config_loads() {
        // The README's example, its secrets given as literals.
        let readme = include_str!("../../../README.md");
        let blocks: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .collect();
        assert!(!blocks.is_empty(), "the README has a TOML example");
        for block in blocks {
            let src = block.replace("\"env:", "\"sk-from-env-");
            let s = load(&src).unwrap_or_else(|e| panic!("{e}\n{block}"));
            assert!(s.auth.is_some(), "the example has [auth]: {block}");
        }
    }

    #[test]
    fn env_secrets() {
        // SAFETY of the test: a unique variable name, set once.
        let src = "[[upstream]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key = \"env:LLM_PROXY_TEST_UNSET_VAR\"\n";
        let e = load(src).unwrap_err();
        assert_eq!(
            e,
            "t.toml:4: upstream `a`: `api_key`: environment variable `LLM_PROXY_TEST_UNSET_VAR` is not set"
        );
        let s = load("[[upstream]]\nname = \"a\"\nurl = \"http://h/v1\"\napi_key = \"sk-lit\"\n")
            .unwrap();
        assert_eq!(s.upstreams[0].api_key.as_deref(), Some("sk-lit"));
    }
}
