//! What the cache layer is configured with (the store is built separately).

use std::time::Duration;

/// Whose answers a request may be served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheScope {
    /// Each caller has its own entries: the auth layer's key name when it ran,
    /// else an [`Identity`](llm_proxy_core::Identity) the request carries in
    /// its extensions (how an embedder's own auth — cookies, sessions, mTLS,
    /// a gateway's JWT — names its tenants), else a hash of the credential
    /// the client presented (`authorization`, else `x-api-key`, else
    /// `api-key`; none: one anonymous scope, shared by every such caller).
    /// No tenant can learn from hit timing what another tenant asked.
    #[default]
    PerKey,
    /// One set of entries for every caller.
    Shared,
}

/// Settings of a [`CacheLayer`](crate::CacheLayer).
///
/// Build it with struct-update syntax so that new fields keep their defaults:
///
/// ```
/// use std::time::Duration;
/// use llm_proxy_cache::{CacheConfig, CacheScope};
///
/// let config = CacheConfig {
///     ttl: Duration::from_secs(600),
///     scope: CacheScope::Shared,
///     ..CacheConfig::default()
/// };
/// assert_eq!(config.max_wait, Duration::from_secs(60));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long a stored answer may be served.
    pub ttl: Duration,
    /// Whose answers a request may be served.
    pub scope: CacheScope,
    /// How long a coalesced request waits for the response head of the
    /// identical request in flight before it goes upstream itself (the proxy
    /// passes its first-byte timeout).
    pub max_wait: Duration,
    /// Answers larger than this (body bytes) are passed on but not stored.
    pub max_entry_bytes: usize,
    /// Request headers whose values go into the key, beside the two
    /// `anthropic-*` ones that always do: headers an upstream answers
    /// differently to (a provider's own feature header, such as
    /// `openai-beta`). A request with none of them
    /// has the key it had without this.
    pub key_headers: Vec<http::HeaderName>,
}

impl Default for CacheConfig {
    /// One hour TTL, per-key scope, 60 s `max_wait`, 16 MiB entries at most,
    /// no headers in the key but the `anthropic-*` ones.
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(3600),
            scope: CacheScope::PerKey,
            max_wait: Duration::from_secs(60),
            max_entry_bytes: 16 * 1024 * 1024,
            key_headers: Vec::new(),
        }
    }
}
