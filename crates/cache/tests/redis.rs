//! `RedisStore` and the cache layer against a real `redis-server` per test.
#![allow(clippy::unwrap_used, missing_docs)] // a test should panic on unexpected input

// The workspace's one redis-server helper, from the end-to-end tests
// package (which this crate cannot depend on); it asks its crate root for
// `free_port`.
#[allow(dead_code)]
#[path = "../../../tests/redis_server.rs"]
mod redis_server;

/// A free port on 127.0.0.1, for [`redis_server`].
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use llm_proxy_cache::{
    CacheConfig, CacheKey, CacheLayer, CacheStats, Entry, EntryBody, RedisStore, StatsSnapshot,
    Store, StoreError, UsageChunk,
};
use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
use redis_server::RedisServer;
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt, service_fn};

/// Catches hangs only.
const HANG: Duration = Duration::from_secs(5);

fn entry() -> Entry {
    Entry {
        stored_at_ms: 1_700_000_000_000,
        content_type: Some(Bytes::from_static(b"text/event-stream")),
        body: EntryBody::Stream {
            frames: vec![
                Bytes::from_static(b"data: {\"choices\":[]}\n\n"),
                Bytes::from_static(b"data: [DONE]\n\n"),
            ]
            .into(),
            usage: UsageChunk::Absent,
        },
    }
}

async fn redis_cli(server: &RedisServer, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

#[tokio::test]
async fn put_get_and_expiry() {
    let server = RedisServer::start().await;
    let store = RedisStore::connect(&server.url(), "t1:").await.unwrap();
    let key = CacheKey::from_bytes([9; 32]);
    assert_eq!(store.get(key).await.unwrap(), None);
    store
        .put(key, entry(), Duration::from_millis(1500))
        .await
        .unwrap();
    assert_eq!(store.get(key).await.unwrap(), Some(entry()));
    let name = format!("t1:cache:{}", key.to_hex());
    assert_eq!(store.redis_key(&key), name);
    let pttl = redis_cli(&server, &["PTTL", &name]).await;
    assert!(
        matches!(pttl, redis::Value::Int(ms) if ms > 0 && ms <= 1500),
        "expires by Redis's TTL: {pttl:?}"
    );
    // Gone once the TTL has run out (polled, bounded).
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if store.get(key).await.unwrap().is_none() {
            gone = true;
            break;
        }
    }
    assert!(gone, "expired by Redis");
}

#[tokio::test]
async fn the_longest_ttl_is_stored_with_an_expiry_redis_accepts() {
    let server = RedisServer::start().await;
    let store = RedisStore::connect(&server.url(), "t3:").await.unwrap();
    let key = CacheKey::from_bytes([4; 32]);
    store.put(key, entry(), Duration::MAX).await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), Some(entry()));
    let pttl = redis_cli(&server, &["PTTL", &store.redis_key(&key)]).await;
    let century_ms = 100 * 365 * 24 * 3600 * 1000;
    assert!(
        matches!(pttl, redis::Value::Int(ms) if ms > century_ms - 60_000 && ms <= century_ms),
        "a century: {pttl:?}"
    );
}

#[tokio::test]
async fn a_damaged_value_is_an_error_not_a_panic() {
    let server = RedisServer::start().await;
    let store = RedisStore::connect(&server.url(), "t2:").await.unwrap();
    let key = CacheKey::from_bytes([1; 32]);
    redis_cli(&server, &["SET", &store.redis_key(&key), "garbage"]).await;
    assert!(matches!(store.get(key).await, Err(StoreError::Corrupt(_))));
}

#[tokio::test]
async fn a_value_larger_than_any_entry_is_refused_unread() {
    let server = RedisServer::start().await;
    assert_eq!(RedisStore::DEFAULT_MAX_VALUE_BYTES, 40 << 20);
    let store = RedisStore::connect(&server.url(), "t3:")
        .await
        .unwrap()
        .with_max_value_bytes(1 << 20);
    let key = CacheKey::from_bytes([3; 32]);
    // 8 MiB of another program's data under a cache key: refused, and no
    // more than the largest value (1 MiB here) and a byte of it is read.
    let big = "x".repeat(8 << 20);
    redis_cli(&server, &["SET", &store.redis_key(&key), &big]).await;
    drop(big);
    let sent = || async {
        let redis::Value::BulkString(info) = redis_cli(&server, &["INFO", "stats"]).await else {
            panic!("INFO's text")
        };
        String::from_utf8(info)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = sent().await;
    let got = tokio::time::timeout(HANG, store.get(key)).await.unwrap();
    assert!(matches!(got, Err(StoreError::Corrupt(_))), "{got:?}");
    let read = sent().await - before;
    assert!(read < 2 << 20, "{read} bytes sent for one lookup");
    // A short value is read, and is no entry either; an absent key is none.
    redis_cli(&server, &["SET", &store.redis_key(&key), "z"]).await;
    assert!(matches!(store.get(key).await, Err(StoreError::Corrupt(_))));
    redis_cli(&server, &["DEL", &store.redis_key(&key)]).await;
    assert!(matches!(store.get(key).await, Ok(None)));
}

#[tokio::test]
async fn connecting_to_nothing_fails_fast() {
    let server = RedisServer::start().await;
    let url = server.url();
    drop(server);
    let started = Instant::now();
    assert!(RedisStore::connect(&url, "x:").await.is_err());
    assert!(started.elapsed() < HANG);
    assert!(RedisStore::connect("http://not-redis", "x:").await.is_err());
}

/// A proxy instance: the parse layer and a cache on `store` over an upstream
/// that counts its calls and numbers its answers.
struct Instance {
    svc: BoxCloneSyncService<Request<Body>, Response<Body>, Error>,
    stats: CacheStats,
}

fn instance(store: RedisStore, calls: Arc<AtomicUsize>) -> Instance {
    instance_with(store, calls, CacheConfig::default())
}

fn instance_with(store: RedisStore, calls: Arc<AtomicUsize>, config: CacheConfig) -> Instance {
    let upstream = service_fn(move |req: Request<Body>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let stream = req
            .extensions()
            .get::<llm_proxy_core::RequestMeta>()
            .is_some_and(|meta| meta.is_stream());
        async move {
            let body = if stream {
                format!(
                    "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{n}\"}}}}]}}\n\ndata: [DONE]\n\n"
                )
            } else {
                format!("{{\"answer\":{n}}}")
            };
            Ok::<_, Error>(Response::new(full(body)))
        }
    });
    let cache = CacheLayer::new(config, store);
    let stats = cache.stats();
    let svc = ParseLayer::new(ParseLimits::default()).layer(cache.layer(upstream));
    Instance {
        svc: BoxCloneSyncService::new(svc),
        stats,
    }
}

impl Instance {
    /// Status label and body of one request.
    async fn ask(&self, body: &str) -> (String, Bytes) {
        let before = self.stats.snapshot();
        let req = Request::post("/v1/chat/completions")
            .header("authorization", "Bearer k")
            .body(full(body.to_owned()))
            .unwrap();
        let response = tokio::time::timeout(HANG, self.svc.clone().oneshot(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        let label = response.headers()["x-llm-proxy-cache"]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if label == "miss" {
            // The store task writes after the answer: wait until it is done
            // (stored, refused or failed), so the next request sees it.
            let settled =
                |s: StatsSnapshot| s.stored + s.not_stored + s.store_errors + s.store_skipped;
            let before = settled(before);
            tokio::time::timeout(HANG, async {
                while settled(self.stats.snapshot()) == before {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the store task finished");
        }
        (label, body)
    }
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn two_instances_on_one_redis_share_hits() {
    let server = RedisServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let a = instance(
        RedisStore::connect(&server.url(), "p:").await.unwrap(),
        calls.clone(),
    );
    let b = instance(
        RedisStore::connect(&server.url(), "p:").await.unwrap(),
        calls.clone(),
    );
    for body in [CHAT, STREAM] {
        let (label, first) = a.ask(body).await;
        assert_eq!(label, "miss");
        let (label, second) = b.ask(body).await;
        assert_eq!(label, "hit", "instance b finds what instance a stored");
        assert_eq!(second, first);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!((a.stats.snapshot().stored, b.stats.snapshot().hits), (2, 2));
    // Another key prefix is another cache.
    let c = instance(
        RedisStore::connect(&server.url(), "q:").await.unwrap(),
        calls.clone(),
    );
    assert_eq!(c.ask(CHAT).await.0, "miss");
}

#[tokio::test]
async fn redis_stopped_mid_test_degrades_to_misses() {
    let mut server = RedisServer::start().await;
    let store = RedisStore::connect(&server.url(), "d:").await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let proxy = instance(store.clone(), calls.clone());
    assert_eq!(proxy.ask(CHAT).await.0, "miss");
    assert_eq!(proxy.ask(CHAT).await.0, "hit");

    server.stop();
    let key = CacheKey::from_bytes([2; 32]);
    let started = Instant::now();
    assert!(store.get(key).await.is_err());
    assert!(
        store
            .put(key, entry(), Duration::from_secs(1))
            .await
            .is_err()
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bounded by the store's timeout"
    );

    for _ in 0..3 {
        let (label, body) = proxy.ask(CHAT).await;
        assert_eq!(label, "miss", "served from upstream while Redis is down");
        assert!(body.starts_with(b"{\"answer\":"));
        // Until the failed write gave up, the answer stays joinable for
        // identical requests: wait that out, so each request goes upstream.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    let stats = proxy.stats.snapshot();
    assert!(stats.store_errors >= 3, "{stats:?}");
    assert!(stats.store_skipped >= 1, "the breaker opened: {stats:?}");
}

/// A full Redis (`maxmemory`, no eviction) refuses writes with `OOM`: the
/// answers go unstored, but what is stored is still served — refused calls
/// are no outage, and do not make the cache skip Redis.
#[tokio::test]
async fn a_full_redis_refuses_writes_and_still_serves_hits() {
    let server = RedisServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let proxy = instance(
        RedisStore::connect(&server.url(), "f:").await.unwrap(),
        calls.clone(),
    );
    assert_eq!(proxy.ask(CHAT).await.0, "miss");
    assert_eq!(proxy.ask(CHAT).await.0, "hit");
    // Full from now on: any write is refused.
    redis_cli(&server, &["CONFIG", "SET", "maxmemory", "1"]).await;
    for n in 0..5 {
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"q{n}"}}]}}"#);
        assert_eq!(proxy.ask(&body).await.0, "miss");
    }
    let stats = proxy.stats.snapshot();
    assert_eq!(stats.store_errors, 5, "five refused writes");
    assert_eq!(stats.store_skipped, 0, "Redis was never skipped");
    assert_eq!(proxy.ask(CHAT).await.0, "hit");
}

#[tokio::test]
async fn an_entry_older_than_this_proxys_ttl_is_a_miss() {
    // Another instance (or this one before its `ttl_secs` was lowered)
    // wrote the entry for an hour; this one keeps answers for a second.
    let server = RedisServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let store = || async { RedisStore::connect(&server.url(), "ttl:").await.unwrap() };
    let long = instance(store().await, calls.clone());
    let short = CacheConfig {
        ttl: Duration::from_secs(1),
        ..CacheConfig::default()
    };
    let short = instance_with(store().await, calls.clone(), short);
    assert_eq!(long.ask(CHAT).await.0, "miss");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(short.ask(CHAT).await.0, "miss", "older than its own TTL");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_entry_of_the_other_kind_is_not_replayed() {
    // `stream` is in the key, so only a damaged or foreign store can hold a
    // streamed entry under a plain request's key: it is a miss, counted as
    // a store error, never SSE frames for a JSON request (or the reverse).
    let server = RedisServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let proxy = instance(
        RedisStore::connect(&server.url(), "kind:").await.unwrap(),
        calls.clone(),
    );
    assert_eq!(proxy.ask(CHAT).await.0, "miss");
    assert_eq!(proxy.ask(STREAM).await.0, "miss");
    let redis::Value::Array(keys) = redis_cli(&server, &["KEYS", "kind:cache:*"]).await else {
        panic!("a list of keys")
    };
    let mut by_kind = [String::new(), String::new()];
    for key in keys {
        let redis::Value::BulkString(name) = key else {
            panic!("a key name")
        };
        let name = String::from_utf8(name).unwrap();
        let redis::Value::BulkString(value) = redis_cli(&server, &["GET", &name]).await else {
            panic!("a value")
        };
        // The value's second byte is its kind: 0 JSON, 1 a stream.
        by_kind[usize::from(value[1])] = name;
    }
    let [json, stream] = by_kind;
    assert!(!json.is_empty() && !stream.is_empty());
    redis_cli(&server, &["COPY", &stream, &json, "REPLACE"]).await;
    let errors = proxy.stats.snapshot().store_errors;
    let (label, body) = proxy.ask(CHAT).await;
    assert_eq!(label, "miss");
    assert!(body.starts_with(b"{"), "a JSON answer: {body:?}");
    assert_eq!(proxy.stats.snapshot().store_errors, errors + 1);
    // And the reverse.
    redis_cli(&server, &["COPY", &json, &stream, "REPLACE"]).await;
    let (label, body) = proxy.ask(STREAM).await;
    assert_eq!(label, "miss");
    assert!(body.starts_with(b"data: "), "a stream: {body:?}");
}
