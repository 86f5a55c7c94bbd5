//! Tests of the cache layer over a fake upstream that counts its calls.
#![allow(clippy::unwrap_used)] // a test should panic on unexpected input

mod coalesce;
mod dialects;
mod fake;
mod requests;
mod streams;
mod stress;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

use crate::{CacheConfig, CacheLayer, CacheStats, MemoryStore, Store};
use fake::Fake;

type Svc = BoxCloneSyncService<Request<Body>, Response<Body>, Error>;

/// The parse layer, the cache and the fake upstream, as the proxy stacks them.
struct Harness {
    svc: Svc,
    fake: Fake,
    stats: CacheStats,
}

fn harness(config: CacheConfig) -> Harness {
    harness_with(config, MemoryStore::new(1000, 1 << 20))
}

fn harness_with(config: CacheConfig, store: impl Store) -> Harness {
    let fake = Fake::default();
    let cache = CacheLayer::new(config, store);
    let stats = cache.stats();
    let svc = ParseLayer::new(ParseLimits::default()).layer(cache.layer(fake.clone()));
    Harness {
        svc: BoxCloneSyncService::new(svc),
        fake,
        stats,
    }
}

/// Read `body` as hyper reads one of known length: until it says it is at
/// its end, then drop it without polling for the end; parsed as JSON.
async fn read_as_hyper_does(mut body: Body) -> serde_json::Value {
    let mut read = Vec::new();
    while !http_body::Body::is_end_stream(&body) {
        let frame = body.frame().await.unwrap().unwrap();
        read.extend_from_slice(frame.data_ref().unwrap());
    }
    drop(body);
    serde_json::from_slice(&read).unwrap()
}

/// A whole answer.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    frames: Vec<Bytes>,
    error: Option<String>,
}

impl Answer {
    fn cache(&self) -> &str {
        self.headers
            .get("x-llm-proxy-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("absent")
    }

    fn body(&self) -> Bytes {
        Bytes::from(self.frames.concat())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body()).unwrap()
    }
}

fn post(path: &str, body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::post(path).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(full(body.to_owned())).unwrap()
}

fn chat(body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    post("/v1/chat/completions", body, headers)
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_USAGE: &str = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;

impl Harness {
    async fn send(&self, req: Request<Body>) -> Answer {
        // Boxed: a `Send` future of the service trips rustc's higher-ranked
        // inference over the `dyn Error` in `Body` otherwise.
        let call: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
            Box::pin(self.svc.clone().oneshot(req));
        let response = call.await.unwrap();
        let (parts, mut body) = response.into_parts();
        let (mut frames, mut error) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => frames.extend(frame.into_data().ok()),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        settle().await;
        Answer {
            status: parts.status,
            headers: parts.headers,
            frames,
            error,
        }
    }

    fn calls(&self) -> usize {
        self.fake.calls()
    }
}

/// Let spawned store tasks run.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A store whose every call fails, as Redis down would; counts its calls.
#[derive(Clone, Default)]
struct BrokenStore {
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl BrokenStore {
    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fail<T>(&self) -> crate::StoreFuture<'_, T> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async {
            Err(crate::StoreError::Backend {
                store: "broken",
                message: "connection refused".into(),
            })
        })
    }
}

impl Store for BrokenStore {
    fn get(&self, _: crate::CacheKey) -> crate::StoreFuture<'_, Option<crate::Entry>> {
        self.fail()
    }

    fn put(
        &self,
        _: crate::CacheKey,
        _: crate::Entry,
        _: std::time::Duration,
    ) -> crate::StoreFuture<'_, ()> {
        self.fail()
    }

    fn kind(&self) -> &'static str {
        "broken"
    }
}
