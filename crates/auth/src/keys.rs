//! API keys: held only as SHA-256 hashes, looked up by hash.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use foldhash::fast::RandomState;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::limit::Limits;
pub use llm_proxy_core::credential::presented_key;

/// One configured key, as the auth layer is given it.
#[derive(Clone, Debug)]
pub struct KeySpec {
    /// The key's name: the caller's identity in logs, metrics and cache scope.
    pub name: String,
    /// SHA-256 of the key (the key itself is never kept).
    pub sha256: [u8; 32],
    /// Models this key may use; `None` = every model.
    pub models: Option<Vec<String>>,
    /// Requests per minute (GCRA, burst = the limit). `Some(0)` is taken
    /// as 1 ([`Gcra::per_minute`](crate::limit::Gcra::per_minute)): to refuse a
    /// key, leave it out.
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute (`Some(0)`: as 1).
    pub tokens_per_minute: Option<u32>,
    /// May this key use routes beyond the model APIs (any path the auth
    /// layer sees that is not a model API's: `/v1/files`, and an
    /// embedder's own routes behind the layer alike).
    pub passthrough: bool,
}

impl KeySpec {
    /// A spec from a plain key (hashed here; the plain key is not kept).
    pub fn from_key(name: impl Into<String>, key: &str) -> Self {
        KeySpec {
            name: name.into(),
            sha256: sha256(key.as_bytes()),
            models: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            passthrough: false,
        }
    }
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Parse a 64-digit hex SHA-256.
pub fn parse_sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A key the layer knows: its name, allowlist, limits and limiter state.
#[derive(Debug)]
pub struct KeyEntry {
    /// The key's name.
    pub name: Arc<str>,
    models: Option<Arc<HashSet<String>>>,
    /// May use passthrough routes.
    pub passthrough: bool,
    /// Its limits and their local state.
    pub limits: Limits,
    /// Its counters, read by metrics.
    pub stats: KeyStats,
}

/// Per-key counters: rate-limited requests and tokens by model.
#[derive(Debug, Default)]
pub struct KeyStats {
    /// Requests answered 429 by this layer.
    pub rate_limited: std::sync::atomic::AtomicU64,
    tokens: std::sync::Mutex<HashMap<Arc<str>, [u64; 2], RandomState>>,
}

/// Distinct model labels kept per key; later models count as `other`, so a
/// client cannot grow the metrics without bound by inventing model names.
const MAX_MODELS_PER_KEY: usize = 64;

/// The longest model name kept as a label; longer ones (a client's, passed
/// to an upstream that takes any name) count as `other`, so that neither a
/// scrape nor the map grows with what a client sends.
const MAX_MODEL_LABEL_BYTES: usize = 256;

/// Whether `model` may be a metrics label as it is: short enough, and
/// without control characters. The text format escapes only `\`, `"` and
/// a line feed; a carriage return (or another control character) in a label
/// breaks scrapers that read line by line (Python's `prometheus_client`).
fn fits_a_label(model: &str) -> bool {
    model.len() <= MAX_MODEL_LABEL_BYTES && !model.contains(|c: char| c.is_control() && c != '\n')
}

impl KeyStats {
    /// Count `input` and `output` tokens used with `model`.
    pub fn add_tokens(&self, model: &Arc<str>, input: u64, output: u64) {
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        // The counts come from an upstream: saturate rather than overflow.
        let add = |slot: &mut [u64; 2]| {
            slot[0] = slot[0].saturating_add(input);
            slot[1] = slot[1].saturating_add(output);
        };
        // One lookup for a model already counted (every request but its first).
        if let Some(slot) = map.get_mut(model) {
            return add(slot);
        }
        if map.len() < MAX_MODELS_PER_KEY && fits_a_label(model) {
            add(map.entry(model.clone()).or_default());
        } else {
            add(map.entry(Arc::from("other")).or_default());
        }
    }

    /// Tokens by model: `(model, input, output)`.
    pub fn tokens(&self) -> Vec<(Arc<str>, u64, u64)> {
        let map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(m, t)| (m.clone(), t[0], t[1])).collect()
    }
}

impl KeyEntry {
    /// Whether the key may use any model of an upstream serving `models`
    /// (`None`: any model).
    pub fn allows_any_model(&self, models: Option<&[String]>) -> bool {
        match (&self.models, models) {
            (None, _) | (_, None) => true,
            (Some(allowed), Some(models)) => models.iter().any(|m| allowed.contains(m)),
        }
    }

    /// Whether the key may use `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }

    /// The key's allowlist, for the request's extensions; `None` when it
    /// may use any model.
    pub fn allowlist(&self) -> Option<llm_proxy_core::ModelAllowlist> {
        self.models.clone().map(llm_proxy_core::ModelAllowlist)
    }
}

/// Every configured key, by hash.
#[derive(Debug, Default)]
pub struct KeyTable {
    /// By SHA-256, hashed with foldhash (seeded at random per table):
    /// SipHash over the 32 bytes took as long as the rest of the lookup.
    by_hash: HashMap<[u8; 32], Arc<KeyEntry>, RandomState>,
}

impl KeyTable {
    /// A table of `specs`. Two specs with one hash: the later one wins.
    pub fn new(specs: Vec<KeySpec>) -> Self {
        let by_hash = specs
            .into_iter()
            .map(|s| {
                let entry = KeyEntry {
                    name: Arc::from(s.name),
                    models: s.models.map(|m| Arc::new(m.into_iter().collect())),
                    passthrough: s.passthrough,
                    limits: Limits::new(s.requests_per_minute, s.tokens_per_minute),
                    stats: KeyStats::default(),
                };
                (s.sha256, Arc::new(entry))
            })
            .collect();
        KeyTable { by_hash }
    }

    /// The entry for the credential on `headers`, if it is a known key.
    ///
    /// The presented key is hashed and the hash looked up, so the time taken
    /// depends on the hash, not on how much of a real key was guessed.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Arc<KeyEntry>> {
        let key = presented_key(headers)?;
        self.by_hash.get(&sha256(key)).cloned()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// Every key, in no particular order.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.by_hash.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn model_labels_are_bounded_in_number_and_length() {
        let stats = KeyStats::default();
        for n in 0..70 {
            stats.add_tokens(&Arc::from(format!("m{n}")), 1, 0);
        }
        stats.add_tokens(&Arc::from("m0"), 1, 0);
        stats.add_tokens(&Arc::from("x".repeat(300)), 1, 0);
        let tokens = stats.tokens();
        assert_eq!(tokens.len(), MAX_MODELS_PER_KEY + 1);
        let count = |name: &str| {
            tokens
                .iter()
                .find(|(m, ..)| &**m == name)
                .map(|(_, input, _)| *input)
        };
        assert_eq!(count("m0"), Some(2));
        assert_eq!(count("other"), Some(7), "6 past the cap, 1 too long");
        // A long name is `other` even while there is room, as is one with
        // a control character the text format cannot escape.
        for name in ["x".repeat(300), "cr\rret".into(), "nul\0".into()] {
            let stats = KeyStats::default();
            stats.add_tokens(&Arc::from(name.as_str()), 1, 0);
            assert_eq!(&*stats.tokens()[0].0, "other", "{name:?}");
        }
        // A line feed is escaped (`\n`): kept.
        let stats = KeyStats::default();
        stats.add_tokens(&Arc::from("lf\nname"), 1, 0);
        assert_eq!(&*stats.tokens()[0].0, "lf\nname");
    }

    #[test]
    fn lookup_by_hash() {
        let mut spec = KeySpec::from_key("team-a", "sk-a");
        spec.models = Some(vec!["m1".into()]);
        let hashed = KeySpec {
            sha256: parse_sha256_hex(&hex(&sha256(b"sk-b"))).unwrap(),
            ..KeySpec::from_key("team-b", "unused")
        };
        let table = KeyTable::new(vec![spec, hashed]);
        let a = table
            .authenticate(&headers(&[("authorization", b"Bearer sk-a")]))
            .unwrap();
        assert_eq!(&*a.name, "team-a");
        assert!(a.allows_model("m1") && !a.allows_model("m2"));
        let b = table
            .authenticate(&headers(&[("x-api-key", b"sk-b")]))
            .unwrap();
        assert_eq!(&*b.name, "team-b");
        assert!(
            table
                .authenticate(&headers(&[("x-api-key", b"sk-c")]))
                .is_none()
        );
    }

    #[test]
    fn any_model_of_an_upstream_or_not() {
        let mut limited = KeySpec::from_key("limited", "sk-l");
        limited.models = Some(vec!["m1".into(), "m2".into()]);
        let table = KeyTable::new(vec![limited, KeySpec::from_key("open", "sk-o")]);
        let key = |k: &[u8]| {
            let mut value = b"Bearer ".to_vec();
            value.extend_from_slice(k);
            table
                .authenticate(&headers(&[("authorization", &value)]))
                .unwrap()
        };
        let (limited, open) = (key(b"sk-l"), key(b"sk-o"));
        let models = |m: &[&str]| m.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(limited.allows_any_model(Some(&models(&["m1"]))));
        assert!(limited.allows_any_model(Some(&models(&["m3", "m2"]))));
        assert!(!limited.allows_any_model(Some(&models(&["m3", "m4"]))));
        assert!(limited.allows_any_model(None));
        assert!(open.allows_any_model(None));
        assert!(open.allows_any_model(Some(&models(&["m3"]))));
    }

    #[test]
    fn token_counters_saturate_on_huge_usage() {
        let stats = KeyStats::default();
        let model: Arc<str> = Arc::from("m");
        stats.add_tokens(&model, u64::MAX - 1, 7);
        stats.add_tokens(&model, 5, u64::MAX);
        assert_eq!(stats.tokens(), vec![(model, u64::MAX, u64::MAX)]);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_hex_parsing() {
        assert!(parse_sha256_hex("00").is_none());
        assert!(parse_sha256_hex(&"zz".repeat(32)).is_none());
        assert_eq!(parse_sha256_hex(&"ab".repeat(32)), Some([0xab; 32]));
    }
}
