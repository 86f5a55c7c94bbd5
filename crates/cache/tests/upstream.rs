//! The cache over the real upstream client and the mock LLM over sockets:
//! what the proxy stacks, minus the proxy (whose `[cache]` wiring has its
//! own end-to-end tests).
#![allow(clippy::unwrap_used, missing_docs)] // a test should panic on unexpected input

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use llm_proxy_cache::{CacheConfig, CacheLayer, MemoryStore};
use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
use llm_proxy_mock::{Mock, MockConfig, MockServer};
use llm_proxy_upstream::{Upstream, UpstreamConfig};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Svc = BoxCloneSyncService<Request<Body>, Response<Body>, Error>;

async fn stack(latency: Duration) -> (Svc, MockServer) {
    let mock = llm_proxy_mock::spawn(Mock::new(MockConfig {
        latency,
        ..MockConfig::default()
    }))
    .await
    .unwrap();
    let upstream = Upstream::new(UpstreamConfig::new(
        "mock",
        mock.base_url().parse().unwrap(),
    ))
    .unwrap();
    let cache = CacheLayer::new(CacheConfig::default(), MemoryStore::new(1000, 1 << 20));
    let svc = ParseLayer::new(ParseLimits::default()).layer(cache.layer(upstream));
    (BoxCloneSyncService::new(svc), mock)
}

const PATH: &str = "/v1/chat/completions";

fn chat(stream: bool, usage: bool, headers: &[(&str, &str)]) -> Request<Body> {
    let options = if usage {
        r#","stream_options":{"include_usage":true}"#
    } else {
        ""
    };
    let body = format!(
        r#"{{"model":"m","stream":{stream}{options},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let mut req = Request::post(PATH).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(full(body)).unwrap()
}

/// The cache label, the frames and whether the body failed.
async fn send(svc: &Svc, req: Request<Body>) -> (String, Vec<Bytes>, bool) {
    let call: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
        Box::pin(svc.clone().oneshot(req));
    let response = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap();
    let label = response.headers()["x-llm-proxy-cache"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut body = response.into_body();
    let (mut frames, mut failed) = (Vec::new(), false);
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => frames.extend(frame.into_data().ok()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await; // the store task
    (label, frames, failed)
}

/// The SSE events the frames carry, as text.
fn events(frames: &[Bytes]) -> Vec<String> {
    let mut parser = llm_proxy_core::sse::Parser::new();
    parser.push(&frames.concat()).unwrap();
    std::iter::from_fn(|| parser.next_event().map(|e| e.data)).collect()
}

fn has_usage_chunk(frames: &[Bytes]) -> bool {
    frames.iter().any(|f| {
        let f = String::from_utf8_lossy(f);
        f.contains("\"choices\":[]") && f.contains("\"usage\":{")
    })
}

/// Asking for the usage chunk adds `stream_options` to the client's bytes:
/// its spacing and numbers' spelling reach the upstream as sent.
#[tokio::test]
async fn the_usage_option_is_added_to_the_clients_bytes() {
    let (svc, mock) = stack(Duration::ZERO).await;
    let body = "{ \"model\" : \"m\", \"stream\": true, \"temperature\": 1e0,\n  \"messages\": [{\"content\": \"hi\", \"role\": \"user\"}] }\n";
    let req = Request::post(PATH)
        .header("content-type", "application/json")
        .body(full(body))
        .unwrap();
    let (label, _, failed) = send(&svc, req).await;
    assert_eq!((label.as_str(), failed), ("miss", false));
    let sent = mock.stats.last_request_body().unwrap();
    let want = body.replace("}] }", "}] ,\"stream_options\":{\"include_usage\":true}}");
    assert_eq!(std::str::from_utf8(&sent).unwrap(), want);
}

#[tokio::test]
async fn streams_are_stored_with_usage_and_replayed_frame_for_frame() {
    let (svc, mock) = stack(Duration::ZERO).await;
    let (label, first, failed) = send(&svc, chat(true, false, &[])).await;
    assert_eq!((label.as_str(), failed), ("miss", false));
    assert!(!has_usage_chunk(&first), "not asked for, not sent");
    let sent = mock.stats.last_request_body().unwrap();
    // Added to the client's bytes, which are otherwise as they came.
    assert_eq!(
        std::str::from_utf8(&sent).unwrap(),
        r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
        "asked for on the client's behalf"
    );
    let (label, replay, _) = send(&svc, chat(true, false, &[])).await;
    assert_eq!((label.as_str(), &replay), ("hit", &first));
    let (label, asked, _) = send(&svc, chat(true, true, &[])).await;
    assert_eq!(label, "hit");
    assert!(
        has_usage_chunk(&asked),
        "stored, and replayed to a client that asks"
    );
    let (first, asked) = (events(&first), events(&asked));
    assert_eq!(
        asked.len(),
        first.len() + 1,
        "the same events plus the usage chunk"
    );
    assert!(
        asked
            .iter()
            .all(|e| first.contains(e) || e.contains("\"usage\":{"))
    );
    assert_eq!(mock.stats.requests_for(PATH), 1);
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_is_not_stored() {
    let (svc, mock) = stack(Duration::ZERO).await;
    let (label, frames, failed) = send(&svc, chat(true, false, &[("x-mock-fail", "drop")])).await;
    assert_eq!(label, "miss");
    assert!(failed, "the client sees the break");
    assert!(String::from_utf8_lossy(&frames.concat()).contains("stream_interrupted"));
    assert_eq!(send(&svc, chat(true, false, &[])).await.0, "miss");
    assert_eq!(mock.stats.requests_for(PATH), 2);
}

#[tokio::test]
async fn concurrent_identical_requests_share_one_upstream_call() {
    let (svc, mock) = stack(Duration::from_millis(200)).await;
    for stream in [false, true] {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let svc = svc.clone();
                tokio::spawn(async move { send(&svc, chat(stream, false, &[])).await })
            })
            .collect();
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert!(
            answers
                .iter()
                .all(|a| a.1.concat() == answers[0].1.concat() && !a.2)
        );
        assert_eq!(answers.iter().filter(|a| a.0 == "hit").count(), 7);
    }
    assert_eq!(mock.stats.requests_for(PATH), 2);
}
