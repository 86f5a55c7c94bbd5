//! Graceful shutdown in-process: stop accepting, report draining, let the
//! in-flight stream finish, then return.

use http::Method;
use tests::*;
use tower::ServiceExt;

#[tokio::test]
async fn drain_lets_an_in_flight_stream_finish() {
    let up = paced_mock("slow", 20.0).await;
    let port = free_port();
    let mut p = proxy(&format!(
        "drain_timeout_secs = 10\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let probe = format!("http://127.0.0.1:{port}/readyz");
    wait_listening(format!("127.0.0.1:{port}").parse().unwrap()).await;
    assert_eq!(
        send(request(Method::GET, &probe, &[], "")).await.status,
        200
    );
    let resp = client()
        .request(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-tokens", "10"),
            ],
            chat("m", true),
        ))
        .await
        .expect("stream starts");
    p.begin_shutdown();
    // /readyz reports draining from the moment draining starts.
    let service = p.service.clone();
    eventually_async(|| {
        let service = service.clone();
        async move {
            let req = http::Request::get("/readyz")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap();
            service.oneshot(req).await.unwrap().status() == 503
        }
    })
    .await;
    // No new connections.
    eventually_async(|| async { tokio::net::TcpStream::connect(p.addr).await.is_err() }).await;
    // A readiness probe on the metrics listener, still open, sees the drain.
    let draining = send(request(Method::GET, &probe, &[], "")).await;
    assert_eq!(
        (draining.status, draining.text().as_str()),
        (http::StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    );
    let (body, broke) = read_stream(resp).await;
    assert!(!broke);
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
    p.stop().await.expect("serve returns Ok");
}

async fn eventually_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn metrics_connections_close_before_serve_returns() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock(MockConfig::default()).await;
    let port = free_port();
    let p = proxy(&format!(
        "drain_timeout_secs = 1\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    // A scrape whose head is still coming at the shutdown.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Accepted and being read before the shutdown begins.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    p.stop().await.expect("serve returns Ok");
    // Closed by then, not at its header timeout (10 s) on the runtime
    // `serve` has returned to.
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the metrics connection is closed once serve returns");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
