//! The balancer over real upstream clients and mock LLM servers on
//! 127.0.0.1: dead and failing upstreams, streamed responses.

use std::time::Duration;

use http::Request;
use http_body_util::BodyExt;
use llm_proxy_balance::{Backend, Balance, BalanceConfig, BalanceHandle, Strategy};
use llm_proxy_core::{Body, ParseLayer, ParseLimits, UPSTREAM_HEADER};
use llm_proxy_mock::{Failure, Mock, MockConfig, MockServer};
use llm_proxy_upstream::{Upstream, UpstreamConfig};
use tower::ServiceExt;
use tower_layer::Layer;

/// Catches hangs only.
const HANG: Duration = Duration::from_secs(10);

async fn mock(name: &str, failure: Option<Failure>, tokens_per_second: Option<f64>) -> MockServer {
    let cfg = MockConfig {
        name: name.to_owned(),
        failure,
        tokens_per_second,
        ..MockConfig::default()
    };
    llm_proxy_mock::spawn(Mock::new(cfg))
        .await
        .expect("bind a mock on 127.0.0.1")
}

fn upstream(name: &str, url: &str) -> Backend<Upstream> {
    let cfg = UpstreamConfig::new(name, url.parse().expect("a valid URL"));
    Backend::new(name, Upstream::new(cfg).expect("an upstream client"))
}

/// A URL on 127.0.0.1 where nothing listens.
async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a local address");
    drop(listener);
    format!("http://{addr}/v1")
}

fn chat(stream: bool) -> Request<Body> {
    let body = serde_json::json!({
        "model": "mock-model",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    });
    Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(llm_proxy_core::full(body.to_string()))
        .expect("a valid request")
}

fn stack(
    backends: Vec<Backend<Upstream>>,
    cfg: BalanceConfig,
) -> (
    llm_proxy_core::Parse<Balance<Upstream>>,
    BalanceHandle<Upstream>,
) {
    let balance = Balance::new(backends, cfg);
    let handle = balance.handle();
    (
        ParseLayer::new(ParseLimits::default()).layer(balance),
        handle,
    )
}

fn rr() -> BalanceConfig {
    BalanceConfig {
        strategy: Strategy::RoundRobin,
        ..BalanceConfig::default()
    }
}

#[tokio::test]
async fn a_dead_upstream_costs_clients_nothing() {
    let good = mock("good", None, None).await;
    let (svc, handle) = stack(
        vec![
            upstream("dead", &dead_url().await),
            upstream("good", &good.base_url()),
        ],
        rr(),
    );
    for _ in 0..8 {
        let resp = tokio::time::timeout(HANG, svc.clone().oneshot(chat(false)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[UPSTREAM_HEADER], "good");
        resp.into_body().collect().await.unwrap();
    }
    let dead = &handle.snapshot()[0];
    assert!(!dead.healthy && dead.ejections == 1, "{dead:?}");
    assert!(handle.retries_total() >= 1);
}

#[tokio::test]
async fn a_500ing_upstream_is_ejected_and_comes_back() {
    let bad = mock("bad", Some(Failure::Status(500)), None).await;
    let good = mock("good", None, None).await;
    let cfg = BalanceConfig {
        eject: Duration::from_millis(300),
        ..rr()
    };
    let (svc, handle) = stack(
        vec![
            upstream("bad", &bad.base_url()),
            upstream("good", &good.base_url()),
        ],
        cfg,
    );
    for _ in 0..8 {
        let resp = svc.clone().oneshot(chat(false)).await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(bad.stats.requests_for("/chat/completions"), 3);
    assert!(!handle.snapshot()[0].healthy);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(handle.snapshot()[0].healthy, "back after its rest");
}

#[tokio::test]
async fn a_stream_counts_in_flight_until_its_last_frame() {
    let slow = mock("slow", None, Some(50.0)).await;
    let (svc, handle) = stack(vec![upstream("slow", &slow.base_url())], rr());
    let resp = svc.clone().oneshot(chat(true)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(HANG, body.frame()).await.unwrap();
    assert!(first.is_some());
    assert_eq!(handle.snapshot()[0].in_flight, 1, "streaming");
    let rest = tokio::time::timeout(HANG, body.collect())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&rest.to_bytes()).contains("[DONE]"));
    assert_eq!(handle.snapshot()[0].in_flight, 0, "released at the end");

    // A client that hangs up mid-stream releases too.
    let resp = svc.oneshot(chat(true)).await.unwrap();
    let mut body = resp.into_body();
    let _ = body.frame().await;
    drop(body);
    assert_eq!(handle.snapshot()[0].in_flight, 0);
}

/// An upstream that answers every request with a `200 text/event-stream`
/// head and then nothing, holding the connection: HTTP up, model stuck.
async fn stuck_after_the_head() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("a local address");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                            transfer-encoding: chunked\r\n\r\n";
                if conn.write_all(head.as_bytes()).await.is_ok() {
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    format!("http://{addr}/v1")
}

/// Under `p2c_ewma`, a backend whose answers never come is learnt to be
/// slow from the clients that give up on it (their wait is a lower bound of
/// its latency), before the proxy's own 60 s timeouts: whether it hangs
/// before the head, or sends the head and then no token. Without that it
/// was never sampled, its default estimate decayed towards nothing, and it
/// drew nearly every request.
#[tokio::test]
async fn p2c_ewma_learns_from_clients_that_give_up() {
    let hung = mock("hung", Some(Failure::Hang), None).await;
    for (stuck, stream) in [
        (hung.base_url(), false),
        (stuck_after_the_head().await, true),
    ] {
        // Slower than the default estimate, so the stuck one looks better
        // until it is sampled.
        let healthy = llm_proxy_mock::spawn(Mock::new(MockConfig {
            name: "healthy".into(),
            latency: Duration::from_millis(300),
            ..MockConfig::default()
        }))
        .await
        .expect("bind a mock");
        let (svc, handle) = stack(
            vec![
                upstream("stuck", &stuck),
                upstream("healthy", &healthy.base_url()),
            ],
            BalanceConfig::default(),
        );
        let patience = Duration::from_millis(400);
        let mut gave_up = 0;
        for _ in 0..6 {
            let answered = tokio::time::timeout(patience, async {
                let resp = svc.clone().oneshot(chat(stream)).await.expect("an answer");
                let mut body = resp.into_body();
                // The first token (or the whole answer).
                body.frame().await;
                body
            })
            .await;
            match answered {
                Ok(body) => {
                    tokio::time::timeout(HANG, body.collect())
                        .await
                        .expect("no hang")
                        .expect("a whole body");
                }
                Err(_) => gave_up += 1,
            }
        }
        assert!(
            gave_up <= 1,
            "stream {stream}: {gave_up} of 6 requests went to the stuck backend; {:?}",
            handle.snapshot()
        );
    }
}

/// Round robin with one backend ejected shares its turns among the others,
/// instead of handing them all to its neighbour in config order.
#[tokio::test]
async fn round_robin_shares_an_ejected_backends_turns() {
    let a = mock("a", None, None).await;
    let c = mock("c", None, None).await;
    let (svc, handle) = stack(
        vec![
            upstream("a", &a.base_url()),
            upstream("dead", &dead_url().await),
            upstream("c", &c.base_url()),
        ],
        BalanceConfig {
            eject_after_failures: 1,
            ..rr()
        },
    );
    let send = || async {
        let resp = tokio::time::timeout(HANG, svc.clone().oneshot(chat(false)))
            .await
            .expect("no hang")
            .expect("an answer");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("a whole body");
    };
    for _ in 0..3 {
        send().await;
    }
    assert!(!handle.snapshot()[1].healthy, "dead is ejected");
    let calls = |m: &MockServer| m.stats.requests_for("/chat/completions");
    let (a0, c0) = (calls(&a), calls(&c));
    for _ in 0..100 {
        send().await;
    }
    let (a_n, c_n) = (calls(&a) - a0, calls(&c) - c0);
    assert_eq!((a_n, c_n), (50, 50));
}

#[tokio::test]
async fn prefix_affinity_keeps_a_growing_conversation_on_one_upstream() {
    let mocks = [
        mock("u1", None, None).await,
        mock("u2", None, None).await,
        mock("u3", None, None).await,
    ];
    let cfg = BalanceConfig {
        strategy: Strategy::PrefixAffinity(llm_proxy_balance::PrefixConfig::default()),
        ..BalanceConfig::default()
    };
    let backends = ["u1", "u2", "u3"]
        .iter()
        .zip(&mocks)
        .map(|(name, m)| upstream(name, &m.base_url()))
        .collect();
    let (svc, _handle) = stack(backends, cfg);
    // Eight conversations of short turns (each far below the key's 2 KiB),
    // sent turn by turn, each turn repeating the ones before it.
    for c in 0..8 {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "Be brief."}),
            serde_json::json!({"role": "user", "content": format!("conversation {c}: hello")}),
        ];
        let mut homes = Vec::new();
        for turn in 0..6 {
            let body = serde_json::json!({"model": "mock-model", "messages": messages});
            let req = Request::post("/v1/chat/completions")
                .header("content-type", "application/json")
                .body(llm_proxy_core::full(body.to_string()))
                .expect("a valid request");
            let resp = tokio::time::timeout(HANG, svc.clone().oneshot(req))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(resp.status(), 200);
            homes.push(resp.headers()[UPSTREAM_HEADER].clone());
            resp.into_body().collect().await.unwrap();
            messages.push(
                serde_json::json!({"role": "assistant", "content": format!("answer {turn}")}),
            );
            messages
                .push(serde_json::json!({"role": "user", "content": format!("question {turn}")}));
        }
        assert!(
            homes.iter().all(|home| *home == homes[0]),
            "conversation {c} moved: {homes:?}"
        );
    }
}
