//! The cache layer over an inner service that pushes back (tower's
//! `ConcurrencyLimit`): a request holds one of the inner service's slots,
//! not two, and gives it back when it is answered from the cache.
#![allow(clippy::unwrap_used, missing_docs)] // a test should panic on unexpected input

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use llm_proxy_cache::{CacheConfig, CacheLayer, MemoryStore};
use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};

fn chat(content: &str) -> Request<Body> {
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#);
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap()
}

/// Parse, cache, then a limit of `limit` calls in flight, over an upstream
/// that counts its calls.
fn stack(
    limit: usize,
) -> (
    impl Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = service_fn(move |_req: Request<Body>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            let mut resp = Response::new(full(
                r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
            ));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            Ok::<_, Error>(resp)
        }
    });
    (over_a_limit(limit, upstream), calls)
}

/// Parse, cache, then a limit of `limit` calls in flight over `upstream`.
fn over_a_limit<U>(
    limit: usize,
    upstream: U,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Error, Future: Send> + Clone
where
    U: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    U::Future: Send + 'static,
{
    ServiceBuilder::new()
        .layer(ParseLayer::new(ParseLimits::default()))
        .layer(CacheLayer::new(
            CacheConfig::default(),
            MemoryStore::new(100, 1 << 20),
        ))
        .layer(ConcurrencyLimitLayer::new(limit))
        .service(upstream)
}

async fn answer(
    svc: impl Service<Request<Body>, Response = Response<Body>, Error = Error>,
    content: &str,
) -> String {
    let call = svc.oneshot(chat(content));
    let resp = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("answered, not stuck waiting for a slot")
        .unwrap();
    let status = resp.headers()["x-llm-proxy-cache"]
        .to_str()
        .unwrap()
        .to_owned();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test]
async fn a_request_takes_one_slot_of_a_limit_of_one() {
    let (svc, calls) = stack(1);
    assert_eq!(answer(svc.clone(), "a").await, "miss");
    assert_eq!(answer(svc.clone(), "a").await, "hit");
    assert_eq!(answer(svc, "b").await, "miss");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn requests_readied_together_each_take_one_slot() {
    let (svc, calls) = stack(4);
    // Four clones readied before any is called (as four connections whose
    // requests arrive together): they hold the four slots between them.
    let mut ready = Vec::new();
    for _ in 0..4 {
        let mut svc = svc.clone();
        svc.ready().await.unwrap();
        ready.push(svc);
    }
    let calls_made = ready.into_iter().enumerate().map(|(i, mut svc)| {
        let future = svc.call(chat(&format!("q{i}")));
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(5), future)
                .await
                .expect("answered, not stuck waiting for a slot")
                .unwrap();
            resp.into_body().collect().await.unwrap();
        }
    });
    futures_util::future::join_all(calls_made).await;
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_hit_gives_its_slot_back() {
    let (svc, _calls) = stack(1);
    assert_eq!(answer(svc.clone(), "a").await, "miss");
    // A ready service holds the one slot; it is answered from the store,
    // and the slot is free again for the next request.
    let mut held = svc.clone();
    held.ready().await.unwrap();
    let hit = held.call(chat("a"));
    drop(held);
    let resp = tokio::time::timeout(Duration::from_secs(5), hit)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.headers()["x-llm-proxy-cache"], "hit");
    assert_eq!(answer(svc, "b").await, "miss");
}

/// A follower gives its slot back while it waits: with a limit of one, the
/// leader's second call (the resend without `stream_options`, which the
/// upstream refused) must not wait for the follower's `max_wait`.
#[tokio::test]
async fn a_follower_holds_no_slot_while_it_waits() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = service_fn(move |_req: Request<Body>| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut resp = if n == 0 {
                let mut resp = Response::new(full(
                    r#"{"error":{"message":"unknown field stream_options"}}"#,
                ));
                *resp.status_mut() = http::StatusCode::BAD_REQUEST;
                resp
            } else {
                Response::new(full(
                    "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
                ))
            };
            let kind = if n == 0 {
                "application/json"
            } else {
                "text/event-stream"
            };
            resp.headers_mut()
                .insert("content-type", kind.parse().unwrap());
            Ok::<_, Error>(resp)
        }
    });
    let svc = over_a_limit(1, upstream);
    let streamed = || {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(full(
                r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}"#,
            ))
            .unwrap()
    };
    let mut leader = svc.clone();
    ServiceExt::<Request<Body>>::ready(&mut leader)
        .await
        .unwrap();
    let leading = tokio::spawn(leader.call(streamed()));
    // Readied once the leader's first call gives its slot back; then it
    // follows the leader's flight.
    let mut follower = svc.clone();
    ServiceExt::<Request<Body>>::ready(&mut follower)
        .await
        .unwrap();
    let following = tokio::spawn(follower.call(streamed()));
    for task in [leading, following] {
        let resp = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("answered, not stuck behind a follower's slot")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "refused once, sent again");
}
