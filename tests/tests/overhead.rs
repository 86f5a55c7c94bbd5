//! `x-llm-proxy-overhead-ms` and `llm_proxy_overhead_seconds`: the proxy's
//! own time to the response head, leaving out what it waited on others —
//! the upstream's answer, the client's body, a coalesced leader, the
//! upstream's whole answer that a translation reads. Each wait here is a
//! second, and the proxy's own time is far below that: an overhead under
//! half a second shows the wait was left out (with it counted, the figure
//! would be over a second).

use std::time::{Duration, Instant};

use http::Method;
use tests::*;
use tokio::io::AsyncWriteExt;

/// The wait each test puts in front of the proxy.
const WAIT: Duration = Duration::from_secs(1);

/// The overhead an answer tells, checked to be well under [`WAIT`].
fn overhead_under_the_wait(headers: &http::HeaderMap) -> f64 {
    let value = headers
        .get("x-llm-proxy-overhead-ms")
        .expect("the overhead header")
        .to_str()
        .unwrap();
    let (whole, fraction) = value.split_once('.').expect("milliseconds with decimals");
    assert!(
        whole.bytes().all(|b| b.is_ascii_digit()) && fraction.len() == 3,
        "{value}"
    );
    let ms: f64 = value.parse().unwrap();
    assert!(
        ms < WAIT.as_secs_f64() * 1000.0 / 2.0,
        "{ms} ms counts the wait"
    );
    ms
}

fn latency() -> String {
    WAIT.as_millis().to_string()
}

#[tokio::test]
async fn the_overhead_leaves_out_the_upstreams_and_the_clients_waits() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    // The upstream takes a second to answer.
    let started = Instant::now();
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-mock-latency-ms", &latency()),
        ],
        chat("m", false),
    ))
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(started.elapsed() >= WAIT);
    overhead_under_the_wait(&answer.headers);

    // The client sends half its body, then the rest a second later.
    let body = chat("m", false);
    let (first, rest) = body.split_at(body.len() / 2);
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{first}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(WAIT).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    let raw = answer_text(&mut conn).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let mut headers = http::HeaderMap::new();
    for line in raw.split("\r\n\r\n").next().unwrap().lines().skip(1) {
        let (name, value) = line.split_once(':').unwrap();
        headers.insert(
            http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            value.trim().parse().unwrap(),
        );
    }
    overhead_under_the_wait(&headers);

    let metrics = send(request(Method::GET, &p.url("/metrics"), &[], "")).await;
    assert!(
        metrics
            .text()
            .contains("llm_proxy_overhead_seconds_count{route=\"chat_completions\"} 2"),
        "{}",
        metrics.text()
    );
}

#[tokio::test]
async fn a_coalesced_followers_wait_for_its_leader_is_not_overhead() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}\n[cache]\nenabled = true\n",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let ask = || {
        send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-latency-ms", &latency()),
            ],
            chat("m", false),
        ))
    };
    let (a, b) = tokio::join!(ask(), ask());
    assert_eq!(up.stats.requests(), 1, "one upstream call for both");
    let kinds: Vec<_> = [&a, &b]
        .iter()
        .map(|x| x.header("x-llm-proxy-cache").unwrap_or("").to_owned())
        .collect();
    assert!(kinds.contains(&"hit".to_owned()), "a follower: {kinds:?}");
    for answer in [&a, &b] {
        assert_eq!(answer.status, 200, "{}", answer.text());
        overhead_under_the_wait(&answer.headers);
    }
}

/// An upstream that sends a chat answer's head at once and its body a
/// second later.
async fn slow_body_upstream() -> std::net::SocketAddr {
    raw_upstream(|mut conn| async move {
        let Some(_) = read_request(&mut conn).await else {
            return;
        };
        let text = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        })
        .to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            text.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        tokio::time::sleep(WAIT).await;
        let _ = conn.write_all(text.as_bytes()).await;
    })
    .await
}

#[tokio::test]
async fn reading_the_whole_answer_to_translate_it_is_not_overhead() {
    let up = slow_body_upstream().await;
    let p = proxy(&one_upstream(
        &format!("http://{up}/v1"),
        "apis = [\"chat_completions\"]",
    ))
    .await;
    let answer = send(request(
        Method::POST,
        &p.url("/v1/messages"),
        &[
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ],
        serde_json::json!({
            "model": "m", "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}]
        })
        .to_string(),
    ))
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["type"], "message");
    overhead_under_the_wait(&answer.headers);
}

#[tokio::test]
async fn the_header_can_be_turned_off_and_the_metric_stays() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "overhead_header = false\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-llm-proxy-overhead-ms"), None);
    let metrics = send(request(Method::GET, &p.url("/metrics"), &[], "")).await;
    assert!(
        metrics
            .text()
            .contains("llm_proxy_overhead_seconds_count{route=\"chat_completions\"} 1"),
        "{}",
        metrics.text()
    );
}

#[tokio::test]
async fn a_retrys_wait_for_the_upstream_is_not_overhead() {
    // The first attempt fails at once (503), the retry's answer takes a
    // second.
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let up = raw_upstream(move |mut conn| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let Some(_) = read_request(&mut conn).await else {
                return;
            };
            let (status, text) = if n == 0 {
                (
                    "503 Service Unavailable",
                    r#"{"error":{"message":"busy","type":"server_error","param":null,"code":null}}"#
                        .to_owned(),
                )
            } else {
                tokio::time::sleep(WAIT).await;
                (
                    "200 OK",
                    serde_json::json!({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                    })
                    .to_string(),
                )
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n",
                text.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(text.as_bytes()).await;
        }
    })
    .await;
    let p = proxy(&one_upstream(&format!("http://{up}/v1"), "")).await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "retried once"
    );
    overhead_under_the_wait(&answer.headers);
}

#[tokio::test]
async fn a_websocket_upstreams_handshake_is_not_overhead() {
    use tokio::io::AsyncReadExt;
    // The upstream takes a second to refuse the upgrade.
    let up = raw_upstream(|mut conn| async move {
        if !read_request_head(&mut conn).await {
            return;
        }
        tokio::time::sleep(WAIT).await;
        let text = r#"{"error":{"message":"busy","type":"server_error","param":null,"code":null}}"#;
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            text.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(text.as_bytes()).await;
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{up}/v1\"\napis = [\"responses\"]\nwebsocket = true\n"
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"GET /v1/responses HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(HANG, conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before a head: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    }
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 503"), "{raw}");
    let value = raw
        .lines()
        .find_map(|l| l.strip_prefix("x-llm-proxy-overhead-ms: "))
        .expect("the overhead header");
    let mut headers = http::HeaderMap::new();
    headers.insert("x-llm-proxy-overhead-ms", value.trim().parse().unwrap());
    overhead_under_the_wait(&headers);
}

#[tokio::test]
async fn reading_an_upstreams_refusal_of_stream_options_is_not_overhead() {
    // The cache asks a streamed chat for its usage; this upstream refuses
    // `stream_options` with an error whose body takes a second, then
    // answers the client's own request.
    let up = raw_upstream(|mut conn| async move {
        let Some((_, body)) = read_request(&mut conn).await else {
            return;
        };
        if String::from_utf8_lossy(&body).contains("stream_options") {
            let error = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":null,"code":null}}"#;
            let head = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                error.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            tokio::time::sleep(WAIT).await;
            let _ = conn.write_all(error.as_bytes()).await;
            return;
        }
        let delta = r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#;
        let text = format!("data: {delta}\n\ndata: [DONE]\n\n");
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n",
            text.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(text.as_bytes()).await;
    })
    .await;
    let p = proxy(&format!(
        "{}\n[cache]\n",
        one_upstream(&format!("http://{up}/v1"), "")
    ))
    .await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.text().contains("\"hi\""), "{}", answer.text());
    overhead_under_the_wait(&answer.headers);
}
