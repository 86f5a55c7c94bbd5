//! Cache keys: a blake3 hash of the endpoint, the scope and the canonical
//! request body minus the fields of [`excluded_fields`] and a `"stream":
//! false` where that is the default (for Messages, also minus
//! `metadata.user_id`, plus the `anthropic-version` and `anthropic-beta`
//! headers), and the values of the configured
//! [`key_headers`](crate::CacheConfig::key_headers) a request has.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use llm_proxy_core::canonical::{
    write_canonical, write_canonical_map_without, write_canonical_object_from_slice,
};
use llm_proxy_core::credential::presented_key;
use llm_proxy_core::{Endpoint, RequestMeta};
use serde_json::{Map, Value};

use crate::CacheScope;

/// Top-level body fields of chat completions, completions and embeddings
/// requests left out of the key because they do not change the answer
/// (docs/caching.md justifies each one):
///
/// - `user`, `safety_identifier`: end-user ids for the provider's abuse
///   monitoring;
/// - `prompt_cache_key`: a routing hint for the provider's prompt cache;
/// - `stream_options`: its `include_usage` only decides whether the usage
///   chunk is sent, which the cache decides per client at replay; its other
///   fields go back into the key (see `write_canonical_body`).
///
/// `stream` is part of the key: a streamed entry holds SSE frames, a plain
/// one a JSON body. Only `"stream": false` is left out, where it asks for
/// what no `stream` does (see `stream_defaults_off`).
pub const EXCLUDED_FIELDS: &[&str] = &[
    "prompt_cache_key",
    "safety_identifier",
    "stream_options",
    "user",
];

/// Top-level body fields of Responses requests left out of the key: the same
/// end-user ids and prompt-cache hint as [`EXCLUDED_FIELDS`]. Unlike chat,
/// `stream_options` stays in: its `include_obfuscation` changes the events.
pub const RESPONSES_EXCLUDED_FIELDS: &[&str] = &["prompt_cache_key", "safety_identifier", "user"];

/// The top-level body fields left out of the key of a request to `endpoint`.
/// None for Messages, whose one end-user id is nested (`metadata.user_id`,
/// left out separately).
pub fn excluded_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::Responses => RESPONSES_EXCLUDED_FIELDS,
        Endpoint::Messages => &[],
        _ => EXCLUDED_FIELDS,
    }
}

/// [`EXCLUDED_FIELDS`] and `stream`, for a body with `"stream": false`.
const EXCLUDED_FIELDS_AND_STREAM: &[&str] = &[
    "prompt_cache_key",
    "safety_identifier",
    "stream",
    "stream_options",
    "user",
];

/// [`RESPONSES_EXCLUDED_FIELDS`] and `stream`, for a body with `"stream": false`.
const RESPONSES_EXCLUDED_FIELDS_AND_STREAM: &[&str] =
    &["prompt_cache_key", "safety_identifier", "stream", "user"];

/// Whether `endpoint`'s API has a `stream` parameter that defaults to
/// `false`, so that `"stream": false` asks for the answer an absent `stream`
/// gets: chat completions, completions, Responses and Messages. Not
/// embeddings, which have no `stream` (an upstream may refuse the field).
fn stream_defaults_off(endpoint: Endpoint) -> bool {
    matches!(
        endpoint,
        Endpoint::ChatCompletions
            | Endpoint::Completions
            | Endpoint::Responses
            | Endpoint::Messages
    )
}

/// The top-level fields left out of the key of `body`: those of
/// [`excluded_fields`], and `stream` when it is `false` where that is the
/// default.
fn skipped_fields(endpoint: Endpoint, body: &Map<String, Value>) -> &'static [&'static str] {
    let unstreamed =
        stream_defaults_off(endpoint) && body.get("stream") == Some(&Value::Bool(false));
    match (endpoint, unstreamed) {
        (_, false) => excluded_fields(endpoint),
        (Endpoint::Responses, true) => RESPONSES_EXCLUDED_FIELDS_AND_STREAM,
        (Endpoint::Messages, true) => &["stream"],
        (_, true) => EXCLUDED_FIELDS_AND_STREAM,
    }
}

/// Request headers that go into the key of a Messages request: they select
/// the API version and beta features, which change the answer.
const MESSAGES_KEY_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-beta"),
    HeaderName::from_static("anthropic-version"),
];

/// Changes whenever what goes into a key or an entry changes meaning, so that
/// entries of an older proxy in a shared Redis are never served.
const KEY_VERSION: &[u8] = b"llm-proxy-cache/key/v1\0";

/// Whose entries a request reads and writes, as it goes into the key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyScope {
    /// Shared by every caller ([`CacheScope::Shared`]).
    Shared,
    /// The name the auth layer gave the caller's key.
    Identity(Arc<str>),
    /// The blake3 hash of the credential the client presented.
    Credential([u8; 32]),
    /// No credential and no identity.
    Anonymous,
}

impl KeyScope {
    /// The scope of a request: for [`CacheScope::PerKey`], the auth layer's
    /// identity when set, else a hash of the key the client presented
    /// ([`presented_key`]: `Authorization: Bearer`, scheme in any case, else
    /// `x-api-key`, else `api-key`), else a hash of any other non-empty
    /// `authorization`, `x-api-key` or `api-key` value, else anonymous.
    pub fn of_request(meta: &RequestMeta, headers: &HeaderMap, scope: CacheScope) -> KeyScope {
        if scope == CacheScope::Shared {
            return KeyScope::Shared;
        }
        if let Some(identity) = meta.identity() {
            return KeyScope::Identity(identity.name.clone());
        }
        // The key as the auth layer reads it, so that `Bearer k`,
        // `bearer k` and `x-api-key: k` are one scope. A credential of
        // another form (`Basic …`) is a scope of its own, hashed whole and
        // tagged apart: never anonymous, never a key's.
        if let Some(key) = presented_key(headers) {
            return KeyScope::Credential(*blake3::hash(key).as_bytes());
        }
        let other = llm_proxy_core::credential::CREDENTIAL_HEADERS
            .iter()
            .filter_map(|name| headers.get(name))
            .map(|value| value.as_bytes().trim_ascii())
            .find(|value| !value.is_empty());
        match other {
            Some(other) => KeyScope::Credential(
                *blake3::Hasher::new()
                    .update(b"other credential:")
                    .update(other)
                    .finalize()
                    .as_bytes(),
            ),
            None => KeyScope::Anonymous,
        }
    }

    /// Appends the scope's bytes as the key hashes them.
    fn write_into(&self, out: &mut Vec<u8>) {
        match self {
            KeyScope::Shared => out.push(b'S'),
            KeyScope::Anonymous => out.push(b'A'),
            KeyScope::Credential(hash) => {
                out.push(b'C');
                out.extend_from_slice(hash);
            }
            KeyScope::Identity(name) => {
                out.push(b'I');
                out.extend_from_slice(&(name.len() as u64).to_le_bytes());
                out.extend_from_slice(name.as_bytes());
            }
        }
    }
}

/// The key of one cache entry: 32 bytes of blake3.
///
/// Its [`Hash`] writes one `u64` taken from the key's bytes (they are a
/// cryptographic hash already, well mixed), so that the cache's own maps
/// hash one word with foldhash (seeded at random per map: a client cannot
/// aim many keys at one bucket) instead of SipHash over 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CacheKey([u8; 32]);

impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Bytes 8..16: not the bytes `shard_hash` picks shards with, so that
        // the keys of one shard do not share their low bits in its map.
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[8..16]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

impl CacheKey {
    /// The key of a request to `endpoint` in `scope` with this JSON body.
    ///
    /// The body's numbers count as `serde_json` parsed them: bodies that
    /// differ only in an integer beyond 64 bits get one key. The cache
    /// layer does not serve such bodies
    /// ([`holds_inexact_integer`](llm_proxy_core::canonical::holds_inexact_integer));
    /// another user of keys should check too.
    ///
    /// ```
    /// use llm_proxy_cache::{CacheKey, KeyScope};
    /// use llm_proxy_core::Endpoint;
    ///
    /// let a = serde_json::json!({"model": "m", "messages": [], "user": "alice"});
    /// let b = serde_json::json!({"messages": [], "model": "m", "user": "bob"});
    /// let key = |v: &serde_json::Value| {
    ///     CacheKey::new(Endpoint::ChatCompletions, &KeyScope::Shared, v.as_object().unwrap())
    /// };
    /// assert_eq!(key(&a), key(&b));
    /// ```
    ///
    /// This is the key of a request without headers: for Messages, whose key
    /// also holds the `anthropic-version` and `anthropic-beta` headers, see
    /// [`CacheKey::with_headers`].
    pub fn new(endpoint: Endpoint, scope: &KeyScope, body: &Map<String, Value>) -> CacheKey {
        CacheKey::with_headers(endpoint, scope, body, &HeaderMap::new())
    }

    /// The key of a request to `endpoint` in `scope` with this JSON body and
    /// these request headers: `anthropic-beta` and `anthropic-version`, each
    /// value as sent, in order (always for Messages; for another endpoint
    /// when it has one, since translation forwards them to a Messages
    /// upstream).
    ///
    /// ```
    /// use llm_proxy_cache::{CacheKey, KeyScope};
    /// use llm_proxy_core::Endpoint;
    ///
    /// let body = serde_json::json!({"model": "m", "max_tokens": 9, "messages": []});
    /// let body = body.as_object().unwrap();
    /// let key = |beta: &'static str| {
    ///     let mut headers = http::HeaderMap::new();
    ///     headers.insert("anthropic-version", "2023-06-01".parse().unwrap());
    ///     headers.insert("anthropic-beta", beta.parse().unwrap());
    ///     CacheKey::with_headers(Endpoint::Messages, &KeyScope::Shared, body, &headers)
    /// };
    /// assert_ne!(key("output-128k-2025-02-19"), key("context-1m-2025-08-07"));
    /// ```
    pub fn with_headers(
        endpoint: Endpoint,
        scope: &KeyScope,
        body: &Map<String, Value>,
        headers: &HeaderMap,
    ) -> CacheKey {
        CacheKey::build(endpoint, None, scope, body, headers, &[])
    }

    fn build(
        endpoint: Endpoint,
        query: Option<&str>,
        scope: &KeyScope,
        body: &Map<String, Value>,
        headers: &HeaderMap,
        key_headers: &[HeaderName],
    ) -> CacheKey {
        let Ok((key, ())) = CacheKey::build_with(
            endpoint,
            query,
            scope,
            headers,
            key_headers,
            |keyed| -> Result<(), std::convert::Infallible> {
                write_canonical_body(endpoint, body, keyed);
                Ok(())
            },
        );
        key
    }

    /// The key of everything but the body, which `write_body` appends to
    /// what is hashed; its error leaves the key unmade.
    fn build_with<T, E>(
        endpoint: Endpoint,
        query: Option<&str>,
        scope: &KeyScope,
        headers: &HeaderMap,
        key_headers: &[HeaderName],
        write_body: impl FnOnce(&mut Vec<u8>) -> Result<T, E>,
    ) -> Result<(CacheKey, T), E> {
        thread_local! {
            // What the key hashes is written out and hashed in one go (a
            // `blake3::Hasher` fed piece by piece pays for every piece):
            // one buffer per thread serves every key.
            static KEYED: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(1024));
        }
        KEYED.with_borrow_mut(|keyed| {
            keyed.clear();
            keyed.extend_from_slice(KEY_VERSION);
            keyed.extend_from_slice(endpoint.as_str().as_bytes());
            keyed.push(b'\0');
            if let Some(query) = query.filter(|q| !q.is_empty()) {
                // (Absent, the key is what it was before queries counted.)
                keyed.push(b'?');
                keyed.extend_from_slice(&(query.len() as u64).to_le_bytes());
                keyed.extend_from_slice(query.as_bytes());
            }
            scope.write_into(keyed);
            // They reach an Anthropic upstream whatever the client's API (a
            // translated chat request carries them too): in the key of any
            // request that has them, and always in a Messages key.
            if endpoint == Endpoint::Messages
                || MESSAGES_KEY_HEADERS
                    .iter()
                    .any(|name| headers.contains_key(name))
            {
                write_headers(keyed, headers, &MESSAGES_KEY_HEADERS);
            }
            // The configured ones, when the request has any (else the key
            // is what it was without them).
            if key_headers.iter().any(|name| headers.contains_key(name)) {
                keyed.push(b'\x01');
                write_headers(keyed, headers, key_headers);
            }
            let written = write_body(keyed);
            let key = CacheKey(*blake3::hash(keyed).as_bytes());
            if keyed.capacity() > MAX_KEPT_BUFFER {
                *keyed = Vec::with_capacity(1024);
            }
            Ok((key, written?))
        })
    }

    /// The key of a request whose body the parse layer buffered, or `None`
    /// when it did not. The request's query string, which goes upstream
    /// with it (Azure's `api-version`, say), is part of the key.
    pub fn for_request(
        meta: &RequestMeta,
        headers: &HeaderMap,
        query: Option<&str>,
        scope: CacheScope,
    ) -> Option<Self> {
        CacheKey::for_request_with(meta, headers, query, scope, &[])
    }

    /// [`CacheKey::for_request`], with the values of `key_headers` (those
    /// of them the request has) in the key too
    /// ([`CacheConfig::key_headers`](crate::CacheConfig::key_headers)).
    pub fn for_request_with(
        meta: &RequestMeta,
        headers: &HeaderMap,
        query: Option<&str>,
        scope: CacheScope,
        key_headers: &[HeaderName],
    ) -> Option<Self> {
        let body = meta.json()?;
        let scope = KeyScope::of_request(meta, headers, scope);
        Some(CacheKey::build(
            meta.endpoint(),
            query,
            &scope,
            body,
            headers,
            key_headers,
        ))
    }

    /// The key [`CacheKey::for_request_with`] gives a chat completions,
    /// completions or embeddings request, made in one pass over the
    /// body's bytes without building its value
    /// ([`write_canonical_object_from_slice`]); with what the pass saw of
    /// the body's top-level fields. `None` when the request is of another
    /// API (whose key leaves out nested fields), or its body is not the
    /// client's bytes (a layer edited it), or not one JSON object with
    /// unique keys: its key is then made from the parsed body.
    pub(crate) fn for_flat_request(
        meta: &RequestMeta,
        headers: &HeaderMap,
        query: Option<&str>,
        scope: CacheScope,
        key_headers: &[HeaderName],
        mut observe: impl FnMut(&str, &[u8]),
    ) -> Option<FlatBody> {
        let endpoint = meta.endpoint();
        if !matches!(
            endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
        ) || meta.is_edited()
        {
            return None;
        }
        let body = meta.original_body()?;
        let scope = KeyScope::of_request(meta, headers, scope);
        let unstreamed_skips_stream = stream_defaults_off(endpoint);
        let (key, (facts, stream_options)) =
            CacheKey::build_with(endpoint, query, &scope, headers, key_headers, |keyed| {
                let mut stream_options = None;
                let facts = write_canonical_object_from_slice(body, keyed, |field, value| {
                    observe(field, value);
                    if field == "stream_options" {
                        // Read as the tree path reads it: an object stays
                        // one (canonical bytes, so read they are).
                        stream_options = Some(llm_proxy_core::value_from_slice(value));
                    }
                    !(EXCLUDED_FIELDS.contains(&field)
                        || (unstreamed_skips_stream && field == "stream" && value == b"false"))
                })?;
                let stream_options = stream_options.transpose()?;
                write_stream_options(stream_options.as_ref(), keyed);
                Ok::<_, serde_json::Error>((facts, stream_options))
            })
            .ok()?;
        Some(FlatBody {
            key,
            inexact_integer: facts.inexact_integer,
            stream_options,
        })
    }

    /// A key from its bytes, as [`CacheKey::as_bytes`] gave them.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CacheKey(bytes)
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key in lowercase hex (64 characters), as stores name entries.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// A well-mixed number from the key, to pick a shard.
    pub(crate) fn shard_hash(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

/// The canonical bytes of a request body as they go into its key.
fn write_canonical_body(endpoint: Endpoint, body: &Map<String, Value>, canonical: &mut Vec<u8>) {
    let skipped = skipped_fields(endpoint, body);
    match body.get("metadata") {
        Some(Value::Object(metadata)) if endpoint == Endpoint::Messages => {
            // `metadata.user_id` is Anthropic's end-user id (as `user` is
            // OpenAI's): the body without `metadata`, then `metadata`
            // without `user_id`. Canonical JSON never holds a NUL byte,
            // so the separator keeps the two parts apart.
            let outside: &[&str] = if skipped.contains(&"stream") {
                &["metadata", "stream"]
            } else {
                &["metadata"]
            };
            write_canonical_map_without(body, outside, canonical);
            canonical.extend_from_slice(b"\0metadata\0");
            write_canonical_map_without(metadata, &["user_id"], canonical);
        }
        _ => {
            write_canonical_map_without(body, skipped, canonical);
            if excluded_fields(endpoint).contains(&"stream_options") {
                write_stream_options(body.get("stream_options"), canonical);
            }
        }
    }
}

/// What [`CacheKey::for_flat_request`] made of a body.
pub(crate) struct FlatBody {
    /// The request's key.
    pub(crate) key: CacheKey,
    /// The body holds a number for which
    /// [`holds_inexact_integer`](llm_proxy_core::canonical::holds_inexact_integer)
    /// is true: such a body is not served.
    pub(crate) inexact_integer: bool,
    /// The body's `stream_options`, parsed; `None` when it has none.
    pub(crate) stream_options: Option<Value>,
}

/// Appends what of a body's `stream_options` (left out of its canonical
/// bytes) goes into the key. Of an object, all but `include_usage` (the
/// cache asks for the usage chunk and decides per client at replay); the
/// rest (`include_obfuscation`, vLLM's `continuous_usage_stats`) changes
/// the stream. One that is not an object (nor `null`, which reads as
/// absent) goes in as sent: the cache cannot ask for the usage chunk in it,
/// so what is stored under it may lack one, and must never answer a client
/// that asked for it.
fn write_stream_options(options: Option<&Value>, canonical: &mut Vec<u8>) {
    match options {
        Some(Value::Object(options)) => {
            if options.keys().any(|k| k != "include_usage") {
                canonical.extend_from_slice(b"\0stream_options\0");
                write_canonical_map_without(options, &["include_usage"], canonical);
            }
        }
        None | Some(Value::Null) => {}
        Some(other) => {
            canonical.extend_from_slice(b"\0stream_options\0");
            write_canonical(other, canonical);
        }
    }
}

/// A key buffer grown past this (a huge request) is not kept for the next.
const MAX_KEPT_BUFFER: usize = 64 * 1024;

/// Appends each header of `names`: its name, how many values it has, and
/// each value (trimmed), length-prefixed.
fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap, names: &[HeaderName]) {
    for name in names {
        let values = headers.get_all(name);
        out.extend_from_slice(name.as_str().as_bytes());
        out.push(b'\0');
        out.extend_from_slice(&(values.iter().count() as u64).to_le_bytes());
        for value in values {
            let value = value.as_bytes().trim_ascii();
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
            out.extend_from_slice(value);
        }
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", &self.to_hex()[..16])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use bytes::Bytes;
    use llm_proxy_core::Identity;
    use proptest::prelude::*;
    use serde_json::json;

    fn meta(body: &str) -> RequestMeta {
        let json = serde_json::from_str(body).unwrap();
        RequestMeta::parsed(
            Endpoint::ChatCompletions,
            Bytes::from(body.to_owned()),
            json,
        )
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn configured_headers_split_the_key_only_when_sent() {
        let m = meta(r#"{"model":"m","messages":[]}"#);
        let listed = [HeaderName::from_static("openai-project")];
        let key = |pairs: &[(&'static str, &'static str)]| {
            CacheKey::for_request_with(&m, &headers(pairs), None, CacheScope::Shared, &listed)
                .unwrap()
        };
        let plain = CacheKey::for_request(&m, &HeaderMap::new(), None, CacheScope::Shared);
        // Without the header, the key of a proxy configured without it.
        assert_eq!(Some(key(&[])), plain);
        assert_eq!(key(&[("x-other", "1")]), key(&[]));
        let a = key(&[("openai-project", "proj_a")]);
        assert_ne!(a, key(&[]));
        assert_ne!(a, key(&[("openai-project", "proj_b")]));
        assert_eq!(a, key(&[("openai-project", " proj_a ")]), "trimmed");
        // Not listed, it does not count.
        let unlisted = CacheKey::for_request(
            &m,
            &headers(&[("openai-project", "proj_a")]),
            None,
            CacheScope::Shared,
        );
        assert_eq!(unlisted, plain);
    }

    /// Keys outlive a build: a Redis store shared by proxies of several
    /// versions, entries stored before an upgrade. The same request must
    /// get the same key from every version (`KEY_VERSION` changes when it
    /// may not); these were computed by the versions before session 18,
    /// which fed the hasher piece by piece.
    #[test]
    fn keys_do_not_change_between_versions() {
        let chat =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u"});
        let chat = chat.as_object().unwrap();
        let messages = json!({"model": "c", "max_tokens": 9, "messages": [],
            "metadata": {"user_id": "u", "k": 1}});
        let messages = messages.as_object().unwrap();
        let beta = headers(&[
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", " a "),
        ]);
        let team = KeyScope::Identity(Arc::from("team-a"));
        let presented = KeyScope::Credential([7; 32]);
        let keys = [
            CacheKey::new(Endpoint::ChatCompletions, &KeyScope::Shared, chat),
            CacheKey::new(Endpoint::ChatCompletions, &KeyScope::Anonymous, chat),
            CacheKey::new(Endpoint::ChatCompletions, &team, chat),
            CacheKey::new(Endpoint::Embeddings, &presented, chat),
            CacheKey::build(
                Endpoint::ChatCompletions,
                Some("api-version=1"),
                &team,
                chat,
                &beta,
                &[],
            ),
            CacheKey::with_headers(Endpoint::Messages, &KeyScope::Shared, messages, &beta),
        ];
        let hex: Vec<String> = keys.iter().map(CacheKey::to_hex).collect();
        assert_eq!(hex, GOLDEN, "{hex:#?}");
    }

    const GOLDEN: [&str; 6] = [
        "27b62da29fbd8ba49438d5855792c69066825c2267d5cb30641559a111b155c0",
        "c8617f261e151eed82cabdc82edc93e91271ee3745fef6fff614e8b0113b5894",
        "f2fff004c40dbc75bd9d895d2722eb944227683ba9229d612eb58f32fe9da211",
        "06d178dc27ccdffb825917bebb2f6202017de0a0db64a0a2f5411c4e38e29ab6",
        "0929e59674cef98685a262d2c6c1cde5518ff0a0a30091146ff726f286e643eb",
        "658e7393a3ce17bf57f5e4e6c68f6e86a9d24385fe8737fa97a00d3277a92115",
    ];

    #[test]
    fn excluded_fields_are_sorted_and_top_level_only() {
        assert!(EXCLUDED_FIELDS.is_sorted());
        let m = meta(r#"{"model":"m","messages":[{"role":"user","content":"hi","user":"x"}]}"#);
        let n = meta(r#"{"model":"m","messages":[{"role":"user","content":"hi","user":"y"}]}"#);
        let key =
            |m: &RequestMeta| CacheKey::for_request(m, &HeaderMap::new(), None, CacheScope::Shared);
        assert_ne!(key(&m), key(&n));
    }

    #[test]
    fn endpoint_and_stream_are_part_of_the_key() {
        let body = json!({"model": "m", "input": "x"});
        let map = body.as_object().unwrap();
        let chat = CacheKey::new(Endpoint::ChatCompletions, &KeyScope::Shared, map);
        let emb = CacheKey::new(Endpoint::Embeddings, &KeyScope::Shared, map);
        assert_ne!(chat, emb);
        let streamed = json!({"model": "m", "input": "x", "stream": true});
        let streamed = CacheKey::new(
            Endpoint::Embeddings,
            &KeyScope::Shared,
            streamed.as_object().unwrap(),
        );
        assert_ne!(emb, streamed);
    }

    #[test]
    fn stream_false_is_no_stream_where_that_is_the_default() {
        let key = |endpoint, body: Value| {
            CacheKey::new(endpoint, &KeyScope::Shared, body.as_object().unwrap())
        };
        let metadata = json!({"user_id": "a", "other": 1});
        for endpoint in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Responses,
            Endpoint::Messages,
        ] {
            for extra in [json!({}), json!({"metadata": metadata, "user": "u"})] {
                let with = |stream: Option<Value>| {
                    let mut body = json!({"model": "m", "input": "x", "messages": []});
                    body.as_object_mut()
                        .unwrap()
                        .extend(extra.as_object().unwrap().clone());
                    if let Some(stream) = stream {
                        body["stream"] = stream;
                    }
                    key(endpoint, body)
                };
                let absent = with(None);
                assert_eq!(with(Some(json!(false))), absent, "{endpoint:?} {extra}");
                assert_ne!(with(Some(json!(true))), absent, "{endpoint:?} {extra}");
            }
        }
        // Embeddings have no `stream`: a body that sends one is another body.
        assert_ne!(
            key(
                Endpoint::Embeddings,
                json!({"model": "m", "input": "x", "stream": false})
            ),
            key(Endpoint::Embeddings, json!({"model": "m", "input": "x"}))
        );
    }

    #[test]
    fn dialects_with_equal_bodies_do_not_collide() {
        let body = json!({"model": "m", "input": "x", "max_tokens": 5, "messages": []});
        let map = body.as_object().unwrap();
        let keys: std::collections::HashSet<_> = [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Responses,
            Endpoint::Messages,
        ]
        .into_iter()
        .map(|e| CacheKey::new(e, &KeyScope::Shared, map))
        .collect();
        assert_eq!(keys.len(), 4);
    }

    #[test]
    fn responses_keys_leave_out_end_user_ids_but_keep_stream_options() {
        assert!(RESPONSES_EXCLUDED_FIELDS.is_sorted());
        let key = |v: Value| {
            CacheKey::new(
                Endpoint::Responses,
                &KeyScope::Shared,
                v.as_object().unwrap(),
            )
        };
        let plain = key(json!({"model": "m", "store": false, "input": "x"}));
        let ids = json!({"model": "m", "store": false, "input": "x", "user": "u",
            "safety_identifier": "s", "prompt_cache_key": "p"});
        assert_eq!(key(ids), plain);
        let options = json!({"model": "m", "store": false, "input": "x",
            "stream_options": {"include_obfuscation": false}});
        assert_ne!(key(options), plain);
    }

    #[test]
    fn chat_keys_leave_out_only_include_usage_of_stream_options() {
        let key = |options: Option<Value>| {
            let mut body = json!({"model": "m", "messages": [], "stream": true});
            if let Some(options) = options {
                body["stream_options"] = options;
            }
            CacheKey::new(
                Endpoint::ChatCompletions,
                &KeyScope::Shared,
                body.as_object().unwrap(),
            )
        };
        let plain = key(None);
        for same in [
            json!({}),
            json!({"include_usage": true}),
            json!({"include_usage": false}),
            Value::Null,
        ] {
            assert_eq!(key(Some(same.clone())), plain, "{same}");
        }
        let stats = key(Some(
            json!({"include_usage": true, "continuous_usage_stats": true}),
        ));
        assert_ne!(stats, plain);
        assert_eq!(
            stats,
            key(Some(
                json!({"continuous_usage_stats": true, "include_usage": false})
            ))
        );
        assert_ne!(key(Some(json!({"include_obfuscation": false}))), plain);
        // One that is not an object keys apart from every object (it cannot
        // carry the cache's own `include_usage`), and from the others.
        let odd: Vec<_> = [json!(true), json!("x"), json!([1]), json!(1)]
            .into_iter()
            .map(|options| key(Some(options)))
            .collect();
        for (i, k) in odd.iter().enumerate() {
            assert_ne!(*k, plain);
            assert_ne!(*k, stats);
            assert!(odd[i + 1..].iter().all(|other| other != k));
        }
    }

    #[test]
    fn the_query_string_is_part_of_the_key() {
        let m = meta(r#"{"model":"m","messages":[]}"#);
        let key = |query| CacheKey::for_request(&m, &HeaderMap::new(), query, CacheScope::Shared);
        assert_eq!(key(None), key(Some("")));
        assert_eq!(
            key(None),
            Some(CacheKey::new(
                Endpoint::ChatCompletions,
                &KeyScope::Shared,
                m.json().unwrap()
            )),
            "no query: the key it always was"
        );
        assert_ne!(key(Some("api-version=2024-02-01")), key(None));
        assert_ne!(
            key(Some("api-version=2024-02-01")),
            key(Some("api-version=2025-04-01"))
        );
    }

    #[test]
    fn messages_keys_leave_out_only_metadata_user_id() {
        let key = |v: Value| {
            CacheKey::new(
                Endpoint::Messages,
                &KeyScope::Shared,
                v.as_object().unwrap(),
            )
        };
        let with =
            |metadata: Value| key(json!({"model": "m", "messages": [], "metadata": metadata}));
        assert_eq!(
            with(json!({"user_id": "a", "other": 1})),
            with(json!({"user_id": "b", "other": 1}))
        );
        assert_eq!(with(json!({"user_id": "a"})), with(json!({})));
        assert_ne!(
            with(json!({"user_id": "a", "other": 1})),
            with(json!({"other": 2}))
        );
        assert_ne!(with(json!("a")), with(json!("b")));
        assert_ne!(with(json!({})), key(json!({"model": "m", "messages": []})));
        // No `metadata` object: nothing left out, not even OpenAI's fields.
        let plain = key(json!({"model": "m", "messages": []}));
        assert_ne!(
            key(json!({"model": "m", "messages": [], "user": "u"})),
            plain
        );
        assert_ne!(
            key(json!({"model": "m", "messages": [], "user_id": "u"})),
            plain
        );
    }

    #[test]
    fn messages_keys_hold_the_anthropic_headers() {
        let body = json!({"model": "m", "messages": []});
        let map = body.as_object().unwrap();
        let key = |endpoint, pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(*name, value.parse().unwrap());
            }
            CacheKey::with_headers(endpoint, &KeyScope::Shared, map, &h)
        };
        let version = ("anthropic-version", "2023-06-01");
        let base = key(Endpoint::Messages, &[version]);
        assert_eq!(base, key(Endpoint::Messages, &[version, ("x-other", "1")]));
        assert_ne!(base, key(Endpoint::Messages, &[]));
        assert_ne!(
            base,
            key(Endpoint::Messages, &[("anthropic-version", "2024-01-01")])
        );
        let beta = |pairs: &[(&'static str, &'static str)]| {
            let mut all = vec![version];
            all.extend_from_slice(pairs);
            key(Endpoint::Messages, &all)
        };
        let (a, b) = (("anthropic-beta", "a"), ("anthropic-beta", "b"));
        assert_ne!(beta(&[a]), base);
        assert_ne!(beta(&[a]), beta(&[b]));
        assert_ne!(beta(&[a, b]), beta(&[("anthropic-beta", "a,b")]));
        assert_eq!(beta(&[("anthropic-beta", " a ")]), beta(&[a]));
        // Other endpoints read them when present: translated to Messages,
        // the request carries them upstream.
        let chat = key(Endpoint::ChatCompletions, &[version, a]);
        assert_ne!(chat, key(Endpoint::ChatCompletions, &[version, b]));
        assert_ne!(chat, key(Endpoint::ChatCompletions, &[]));
        assert_eq!(
            key(Endpoint::ChatCompletions, &[("x-other", "1")]),
            key(Endpoint::ChatCompletions, &[])
        );
    }

    #[test]
    fn per_key_scope_follows_identity_then_credential() {
        let m = meta(r#"{"model":"m"}"#);
        let per_key = |h: &HeaderMap| KeyScope::of_request(&m, h, CacheScope::PerKey);
        let bearer_a = per_key(&headers(&[("authorization", "Bearer a")]));
        assert_eq!(
            bearer_a,
            per_key(&headers(&[("authorization", "  Bearer a \t")]))
        );
        assert_ne!(
            bearer_a,
            per_key(&headers(&[("authorization", "Bearer b")]))
        );
        // The key counts, not the header that carried it or the scheme's case.
        assert_eq!(bearer_a, per_key(&headers(&[("x-api-key", "a")])));
        assert_eq!(
            bearer_a,
            per_key(&headers(&[("authorization", "bearer a")]))
        );
        // A credential of another form is a scope of its own.
        let basic_a = per_key(&headers(&[("authorization", "Basic a")]));
        assert!(basic_a != bearer_a && basic_a != KeyScope::Anonymous);
        assert_ne!(basic_a, per_key(&headers(&[("authorization", "Basic b")])));
        assert_ne!(bearer_a, per_key(&headers(&[("x-api-key", "Bearer a")])));
        // Azure's `api-key` is read as the auth layer reads it, whatever it
        // holds: a key, or a scope of its own, never the anonymous one.
        assert_eq!(bearer_a, per_key(&headers(&[("api-key", "a")])));
        let odd = per_key(&headers(&[("api-key", "Bearer a")]));
        assert!(odd != bearer_a && odd != KeyScope::Anonymous, "{odd:?}");
        assert_eq!(odd, per_key(&headers(&[("x-api-key", "Bearer a")])));
        assert_eq!(per_key(&HeaderMap::new()), KeyScope::Anonymous);
        assert_eq!(
            per_key(&headers(&[("authorization", " ")])),
            KeyScope::Anonymous
        );
        let both = headers(&[("authorization", "Bearer a"), ("x-api-key", "k")]);
        assert_eq!(per_key(&both), bearer_a);

        let mut with_identity = m.clone();
        with_identity.set_identity(Identity {
            name: Arc::from("team-a"),
        });
        assert_eq!(
            KeyScope::of_request(&with_identity, &both, CacheScope::PerKey),
            KeyScope::Identity(Arc::from("team-a"))
        );
        assert_eq!(
            KeyScope::of_request(&with_identity, &both, CacheScope::Shared),
            KeyScope::Shared
        );
    }

    #[test]
    fn scopes_do_not_collide() {
        let body = json!({"model": "m"});
        let map = body.as_object().unwrap();
        let scopes = [
            KeyScope::Shared,
            KeyScope::Anonymous,
            KeyScope::Identity(Arc::from("a")),
            KeyScope::Identity(Arc::from("b")),
            KeyScope::Credential([0; 32]),
            KeyScope::Credential([1; 32]),
        ];
        let keys: std::collections::HashSet<_> = scopes
            .iter()
            .map(|s| CacheKey::new(Endpoint::Completions, s, map))
            .collect();
        assert_eq!(keys.len(), scopes.len());
    }

    #[test]
    fn hex_and_debug() {
        let key = CacheKey::from_bytes([0xab; 32]);
        assert_eq!(key.to_hex(), "ab".repeat(32));
        assert_eq!(format!("{key:?}"), format!("CacheKey({})", "ab".repeat(8)));
        assert_eq!(CacheKey::from_bytes(*key.as_bytes()), key);
    }

    fn json_strategy() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z \\n\"é]{0,10}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z]{1,6}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A request body: a model plus random fields, none of them excluded.
    fn body_strategy() -> impl Strategy<Value = Map<String, Value>> {
        proptest::collection::btree_map("[a-z]{1,8}", json_strategy(), 0..6).prop_map(|m| {
            let mut map: Map<String, Value> = m
                .into_iter()
                .filter(|(k, _)| !EXCLUDED_FIELDS.contains(&k.as_str()))
                .collect();
            map.insert("model".into(), json!("m"));
            map
        })
    }

    /// Writes `value` with every object's keys reversed and whitespace between
    /// tokens.
    fn scrambled(value: &Value) -> String {
        match value {
            Value::Object(map) => {
                let fields: Vec<String> = map
                    .iter()
                    .rev()
                    .map(|(k, v)| {
                        format!(
                            "\n {} :\t{} ",
                            serde_json::to_string(k).unwrap(),
                            scrambled(v)
                        )
                    })
                    .collect();
                format!("{{ {} }}", fields.join(" , "))
            }
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(scrambled).collect();
                format!("[ {} ]", items.join(" ,\r\n"))
            }
            other => other.to_string(),
        }
    }

    /// Changes one leaf value somewhere in `value`, chosen by `pick`.
    fn mutate(value: &mut Value, pick: usize) -> bool {
        match value {
            Value::Object(map) if map.is_empty() => {
                map.insert("k".into(), Value::Null);
                true
            }
            Value::Array(items) if items.is_empty() => {
                items.push(Value::Null);
                true
            }
            Value::Object(map) => {
                let n = map.len();
                map.values_mut()
                    .nth(pick % n)
                    .is_some_and(|v| mutate(v, pick / n))
            }
            Value::Array(items) => {
                let n = items.len();
                items.get_mut(pick % n).is_some_and(|v| mutate(v, pick / n))
            }
            Value::Null => {
                *value = json!(0);
                true
            }
            Value::Bool(b) => {
                *b = !*b;
                true
            }
            Value::Number(n) => {
                *value = json!(n.as_i64().map_or(0, |i| i.wrapping_add(1)));
                true
            }
            Value::String(s) => {
                s.push('x');
                true
            }
        }
    }

    proptest! {
        #[test]
        fn key_ignores_key_order_and_whitespace(body in body_strategy()) {
            let value = Value::Object(body.clone());
            let reparsed: Map<String, Value> = serde_json::from_str(&scrambled(&value)).unwrap();
            let pretty: Map<String, Value> =
                serde_json::from_str(&serde_json::to_string_pretty(&value).unwrap()).unwrap();
            let key = |m: &Map<String, Value>| CacheKey::new(Endpoint::ChatCompletions, &KeyScope::Shared, m);
            prop_assert_eq!(key(&reparsed), key(&body));
            prop_assert_eq!(key(&pretty), key(&body));
        }

        #[test]
        fn key_changes_with_any_value(body in body_strategy(), pick in any::<usize>(), user in "[a-z]{0,5}") {
            let key = |m: &Map<String, Value>| CacheKey::new(Endpoint::ChatCompletions, &KeyScope::Shared, m);
            let mut changed = Value::Object(body.clone());
            prop_assert!(mutate(&mut changed, pick));
            let Value::Object(changed) = changed else { unreachable!() };
            prop_assert_ne!(key(&changed), key(&body));
            // ... but never with an excluded field.
            let mut with_user = body.clone();
            with_user.insert("user".into(), json!(user));
            with_user.insert("stream_options".into(), json!({"include_usage": true}));
            prop_assert_eq!(key(&with_user), key(&body));
        }
    }

    /// A chat, completions or embeddings body with `fields` added, for
    /// the flat key: the excluded fields and `stream` in their forms.
    fn flat_strategy() -> impl Strategy<Value = Map<String, Value>> {
        let special = prop_oneof![
            Just(("stream", json!(false))),
            Just(("stream", json!(true))),
            Just(("stream", Value::Null)),
            Just(("stream_options", json!({"include_usage": true}))),
            Just(("stream_options", json!({"include_usage": false, "x": [1]}))),
            Just(("stream_options", json!({"continuous_usage_stats": true}))),
            Just(("stream_options", Value::Null)),
            Just(("stream_options", json!("odd"))),
            // serde_json's raw-value marker: an object like any other.
            Just((
                "stream_options",
                json!({"$serde_json::private::RawValue": "{\"continuous_usage_stats\":true}"})
            )),
            Just(("user", json!("u"))),
            Just(("safety_identifier", json!({"a": 1}))),
            Just(("prompt_cache_key", json!(null))),
            Just(("store", json!(true))),
        ];
        (body_strategy(), proptest::collection::vec(special, 0..4)).prop_map(
            |(mut body, special)| {
                for (key, value) in special {
                    body.insert(key.into(), value);
                }
                body
            },
        )
    }

    proptest! {
        /// The key made in one pass over a body's bytes is the key made
        /// from its parsed value, whatever the scope, query and headers.
        #[test]
        fn the_flat_key_is_the_parsed_bodys(
            body in flat_strategy(),
            endpoint in prop_oneof![
                Just(Endpoint::ChatCompletions),
                Just(Endpoint::Completions),
                Just(Endpoint::Embeddings),
            ],
            shared in any::<bool>(),
            query in prop_oneof![Just(None), Just(Some("api-version=1"))],
            with_headers in any::<bool>(),
            compact in any::<bool>(),
        ) {
            // Keys reversed, or in the map's order (sorted, then the
            // special ones).
            let value = Value::Object(body.clone());
            let text = if compact { value.to_string() } else { scrambled(&value) };
            let m = RequestMeta::parsed(endpoint, Bytes::from(text), body);
            let h = if with_headers {
                headers(&[("authorization", "Bearer k"), ("anthropic-version", "1"),
                    ("x-team", "a")])
            } else {
                HeaderMap::new()
            };
            let scope = if shared { CacheScope::Shared } else { CacheScope::PerKey };
            let listed = [HeaderName::from_static("x-team")];
            let mut seen = Vec::new();
            let flat = CacheKey::for_flat_request(&m, &h, query, scope, &listed, |field, _| {
                seen.push(field.to_owned());
            })
            .unwrap();
            let parsed = CacheKey::for_request_with(&m, &h, query, scope, &listed).unwrap();
            prop_assert_eq!(flat.key, parsed);
            let json = m.json().unwrap();
            prop_assert_eq!(flat.stream_options.as_ref(), json.get("stream_options"));
            let mut fields: Vec<String> = json.keys().cloned().collect();
            fields.sort();
            prop_assert_eq!(seen, fields, "every top-level field seen, in key order");
        }
    }

    #[test]
    fn the_flat_key_is_for_unedited_flat_bodies_only() {
        let key = |m: &RequestMeta| {
            CacheKey::for_flat_request(
                m,
                &HeaderMap::new(),
                None,
                CacheScope::Shared,
                &[],
                |_, _| {},
            )
            .map(|flat| flat.key)
        };
        let body = r#"{"model":"m","messages":[],"seed":18446744073709551616}"#;
        let m = meta(body);
        let flat = CacheKey::for_flat_request(
            &m,
            &HeaderMap::new(),
            None,
            CacheScope::Shared,
            &[],
            |_, _| {},
        )
        .unwrap();
        assert!(flat.inexact_integer);
        assert!(flat.stream_options.is_none());
        // Edited: the bytes are not the body any more.
        let mut edited = meta(r#"{"model":"m","messages":[]}"#);
        edited.json_mut().unwrap().insert("n".into(), json!(2));
        assert_eq!(key(&edited), None);
        // Responses and Messages leave nested fields out: not flat.
        for endpoint in [Endpoint::Responses, Endpoint::Messages] {
            let m = RequestMeta::parsed(
                endpoint,
                Bytes::from_static(br#"{"model":"m"}"#),
                serde_json::from_str(r#"{"model":"m"}"#).unwrap(),
            );
            assert_eq!(key(&m), None, "{endpoint:?}");
        }
        // Not one object with unique keys (the parse layer refuses those).
        for bytes in [&br#"{"model":"m","n":1,"n":2}"#[..], b"[]", b"{"] {
            let m = RequestMeta::checked(
                Endpoint::ChatCompletions,
                Bytes::copy_from_slice(bytes),
                None,
                false,
                false,
                Default::default(),
            );
            assert_eq!(key(&m), None);
        }
        // Not buffered.
        assert_eq!(
            key(&RequestMeta::unbuffered(Endpoint::ChatCompletions)),
            None
        );
    }

    /// Only Messages reads `metadata` for an end-user id: a chat body with
    /// a `metadata` object still leaves its `user` (and the rest of
    /// `EXCLUDED_FIELDS`) out of the key.
    #[test]
    fn a_chat_body_with_metadata_still_leaves_user_out() {
        let key = |v: serde_json::Value| {
            CacheKey::new(
                Endpoint::ChatCompletions,
                &KeyScope::Shared,
                v.as_object().unwrap(),
            )
        };
        let alice = json!({"model": "m", "messages": [], "metadata": {"user_id": "x"},
            "user": "alice", "stream_options": {"include_usage": true}});
        let bob = json!({"model": "m", "messages": [], "metadata": {"user_id": "x"},
            "user": "bob"});
        assert_eq!(key(alice), key(bob));
    }

    /// A store picks a key's shard by its first eight bytes, and a map
    /// bucket by the next eight: both from the key, not a constant (all
    /// keys in one shard leave a sharded store a fraction of its bounds;
    /// all in one bucket make every lookup a scan).
    #[test]
    fn shard_and_map_hashes_come_from_the_key() {
        use std::hash::BuildHasher;
        let key = |model: &str| {
            let body = json!({"model": model, "messages": []});
            CacheKey::new(
                Endpoint::ChatCompletions,
                &KeyScope::Shared,
                body.as_object().unwrap(),
            )
        };
        let (a, b) = (key("a"), key("b"));
        let first = |k: &CacheKey| u64::from_le_bytes(k.as_bytes()[..8].try_into().unwrap());
        assert_eq!(a.shard_hash(), first(&a));
        assert_ne!(a.shard_hash(), b.shard_hash());
        let state = std::hash::RandomState::new();
        assert_ne!(state.hash_one(a), state.hash_one(b));
    }
}
