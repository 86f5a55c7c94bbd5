//! The mock served over real sockets on 127.0.0.1.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llm_proxy_mock::{Mock, MockConfig, MockServer, MockStats, spawn};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

fn streamed_chat(server: &MockServer, tokens: usize) -> Request<Full<Bytes>> {
    let body = json!({
        "model": "m",
        "stream": true,
        "messages": [{"role": "user", "content": "over the wire"}],
    });
    Request::post(format!("{}/chat/completions", server.base_url()))
        .header("content-type", "application/json")
        .header("x-mock-tokens", tokens.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid request")
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn paced_server(tokens_per_second: f64) -> (MockServer, MockStats) {
    let server = spawn(Mock::new(MockConfig {
        tokens_per_second: Some(tokens_per_second),
        ..MockConfig::default()
    }))
    .await
    .expect("bind 127.0.0.1");
    let stats = server.stats.clone();
    (server, stats)
}

/// Reads a streamed answer frame by frame: the first event arrives while the
/// mock is still producing the rest.
async fn streams_incrementally(client: HttpClient) {
    let (server, stats) = paced_server(50.0).await;
    let response = client
        .request(streamed_chat(&server, 5))
        .await
        .expect("response head");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut events: Vec<String> = Vec::new();
    let mut buffered = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if events.is_empty() && buffered.is_empty() {
            // The first event is here; the tokens are still to come.
            assert_eq!(stats.in_flight(), 1);
        }
        buffered.push_str(std::str::from_utf8(&data).expect("UTF-8"));
        while let Some(end) = buffered.find("\n\n") {
            events.push(buffered[..end].to_owned());
            buffered.drain(..end + 2);
        }
    }
    assert!(buffered.is_empty());
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|event| {
            let data = event.strip_prefix("data: ").expect("data event");
            serde_json::from_str(data).expect("JSON chunk")
        })
        .collect();
    // Role, 5 tokens, finish.
    assert_eq!(chunks.len(), 7);
    assert_eq!(chunks[6]["choices"][0]["finish_reason"], "stop");
    eventually("the stream to end", || stats.in_flight() == 0).await;
    assert_eq!(stats.cancelled(), 0);
    assert_eq!(stats.requests_for("/v1/chat/completions"), 1);
}

#[tokio::test]
async fn streams_incrementally_over_http1() {
    streams_incrementally(http1()).await;
}

#[tokio::test]
async fn streams_incrementally_over_h2c() {
    streams_incrementally(h2c()).await;
}

#[tokio::test]
async fn dropping_a_streamed_response_cancels_it() {
    let (server, stats) = paced_server(5.0).await;
    let response = http1()
        .request(streamed_chat(&server, 100))
        .await
        .expect("response head");
    let mut body = response.into_body();
    assert!(body.frame().await.is_some());
    drop(body);
    eventually("the server to see the hang-up", || stats.cancelled() == 1).await;
    assert_eq!(stats.in_flight(), 0);
}

async fn injected_drop_aborts_the_body(client: HttpClient) {
    let server = spawn(Mock::default()).await.expect("bind 127.0.0.1");
    let mut request = streamed_chat(&server, 8);
    request
        .headers_mut()
        .insert("x-mock-fail", "drop".parse().expect("header value"));
    let response = client.request(request).await.expect("response head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The two frames before the drop arrive (maybe in one read), then the error.
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received.extend_from_slice(&frame.into_data().unwrap_or_default()),
            Some(Err(error)) => break error,
            None => panic!("the body ended cleanly"),
        }
    };
    let text = String::from_utf8(received).expect("UTF-8");
    assert_eq!(text.matches("data: ").count(), 2, "{text} then {error}");
}

#[tokio::test]
async fn injected_drop_aborts_the_connection_over_http1() {
    injected_drop_aborts_the_body(http1()).await;
}

#[tokio::test]
async fn injected_drop_resets_the_stream_over_h2c() {
    injected_drop_aborts_the_body(h2c()).await;
}

#[tokio::test]
async fn models_and_errors_over_the_wire() {
    let server = spawn(Mock::default()).await.expect("bind 127.0.0.1");
    let client = http1();
    let get = |path: &str| {
        Request::get(format!("{}{path}", server.base_url()))
            .body(Full::new(Bytes::new()))
            .expect("valid request")
    };
    let response = client.request(get("/models")).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let list: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(list["data"][0]["id"], "mock-model");
    let response = client.request(get("/nowhere")).await.expect("response");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(server.stats.last_path().as_deref(), Some("/v1/nowhere"));
    assert_eq!(server.stats.requests(), 2);
}

#[tokio::test]
async fn dropping_the_server_stops_it() {
    let server = spawn(Mock::default()).await.expect("bind 127.0.0.1");
    let addr = server.addr;
    drop(server);
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("the listener closed");
}
