//! An https upstream with a private CA, trusted through `tls_ca_file`.

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tests::*;

type Negotiated = Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>;

/// The config of one upstream at `https://localhost:{port}/v1` whose
/// certificate `pem` is trusted through `tls_ca_file` (written in the
/// scratch directory `dir`), with the upstream keys `extra`.
fn https_upstream(dir: &str, port: u16, pem: &str, extra: &str) -> String {
    let ca = scratch_dir(dir).join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    one_upstream(
        &format!("https://localhost:{port}/v1"),
        &format!("tls_ca_file = \"{}\"\n{extra}", ca.display()),
    )
}

/// A TLS mock upstream on 127.0.0.1 with a self-signed certificate for
/// `localhost`; returns its port, the certificate's PEM, the mock's stats
/// and the protocol ALPN settled on for each connection.
async fn tls_mock() -> (
    u16,
    String,
    llm_proxy_mock::MockStats,
    tokio::task::JoinHandle<()>,
    Negotiated,
) {
    let (acceptor, pem) = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mock = Mock::new(MockConfig {
        name: "tls".into(),
        ..MockConfig::default()
    });
    let stats = mock.stats();
    let alpn = Negotiated::default();
    let negotiated = alpn.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let mock = mock.clone();
            let negotiated = negotiated.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                negotiated.lock().unwrap().push(alpn);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(tls),
                        TowerToHyperService::new(mock),
                    )
                    .await;
            });
        }
    });
    (port, pem, stats, task, alpn)
}

#[tokio::test]
async fn https_upstream_with_private_ca() {
    let (port, pem, stats, task, _) = tls_mock().await;
    let url = format!("https://localhost:{port}/v1");
    let trusted = proxy(&https_upstream("tls", port, &pem, "")).await;
    let answer = post_json(&trusted.url("/v1/chat/completions"), &chat("m", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        sse_data(&answer.body).last().map(String::as_str),
        Some("[DONE]")
    );
    assert_eq!(stats.requests(), 1);

    // Without the CA the certificate is not trusted: 502, nothing sent.
    let untrusted = proxy(&one_upstream(&url, "")).await;
    let answer = post_json(&untrusted.url("/v1/chat/completions"), &chat("m", false)).await;
    answer.assert_error(502, "upstream_error", "bad_gateway");
    // Its kind, not rustls' account (the certificate's names and dates).
    let said = answer.text();
    assert!(said.contains("certificate was not accepted"), "{said}");
    assert!(!said.contains("UnknownIssuer"), "{said}");
    assert_eq!(stats.requests(), 1);
    task.abort();
}

/// Out of file descriptors, a connection to an https upstream (hyper's
/// client, DNS, then TLS) fails as one to an http upstream does: 503,
/// and no failure of the upstream's.
#[tokio::test]
async fn out_of_descriptors_an_https_upstream_is_not_blamed() {
    let (port, pem, stats, task, _) = tls_mock().await;
    let p = proxy(&format!(
        "{}[balance]\neject_after_failures = 1\nmax_retries = 2\n",
        https_upstream("tls-emfile", port, &pem, "")
    ))
    .await;
    out_of_descriptors_is_503_and_no_failure(&p).await;
    assert!(stats.requests() >= 1);
    task.abort();
}

#[tokio::test]
async fn a_websocket_tunnel_to_an_https_upstream() {
    // The upstream offers h2 and http/1.1 by ALPN; an upgrade is an
    // HTTP/1.1 exchange, so the proxy's own connection for it offers only
    // http/1.1.
    let (port, pem, stats, task, alpn) = tls_mock().await;
    let p = proxy(&https_upstream(
        "tls-ws",
        port,
        &pem,
        "apis = [\"responses\"]\nwebsocket = true",
    ))
    .await;
    let (mut socket, head) = tests::ws::connect(p.addr, &[]).await.unwrap();
    assert_eq!(head.status(), 101);
    let events =
        tests::ws::turn(&mut socket, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    assert_eq!(stats.requests(), 1);
    // One connection, not settled on h2 (no ALPN at all means HTTP/1.1).
    let alpn = alpn.lock().unwrap().clone();
    assert_eq!(alpn.len(), 1);
    assert_ne!(alpn[0].as_deref(), Some(b"h2".as_slice()));
    task.abort();
}

/// Streams on one HTTP/2 upstream connection share its flow-control window:
/// data the proxy has received for a stream whose client does not read
/// holds the connection's window until it is read. Clients that stop
/// reading (each within `send_timeout`) must not take the window from the
/// connection's other streams, which would then get their heads and no
/// body until the idle timeout breaks them.
#[tokio::test]
async fn clients_that_stop_reading_do_not_starve_an_h2_upstreams_other_streams() {
    let (port, pem, _stats, task, alpn) = tls_mock().await;
    let p = proxy(&format!(
        "send_timeout_ms = 60000\n{}",
        https_upstream("tls-h2-window", port, &pem, "")
    ))
    .await;
    // Four long, fast streams whose client reads their heads and nothing
    // more (HTTP/2 with a 64 KiB window, so that nothing but flow control
    // holds them back): each can take a stream's whole window upstream,
    // together more than hyper's default window for the connection.
    let sender = h2c_small_window(p.addr).await;
    let mut unread = Vec::new();
    for _ in 0..4 {
        let req = streamed_chat_h2(p.addr, &[("x-mock-tokens", "1000000")]);
        let resp = tokio::time::timeout(HANG, sender.clone().send_request(req))
            .await
            .expect("a head in time")
            .expect("a head");
        assert_eq!(resp.status(), 200);
        unread.push(resp);
    }
    // Let the upstream fill whatever windows it may.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let answer = tokio::time::timeout(
        HANG,
        client().request(request(
            http::Method::POST,
            &p.url("/v1/chat/completions"),
            &[("content-type", "application/json")],
            chat("m", false),
        )),
    )
    .await
    .expect("a head in time")
    .expect("answered");
    assert_eq!(answer.status(), 200);
    let body = tokio::time::timeout(HANG, http_body_util::BodyExt::collect(answer.into_body()))
        .await
        .expect("the other stream's body is not starved")
        .expect("a whole body");
    assert!(!body.to_bytes().is_empty());
    // All on one HTTP/2 connection.
    let alpn = alpn.lock().unwrap().clone();
    assert_eq!(alpn, [Some(b"h2".to_vec())]);
    drop(unread);
    task.abort();
}

/// `http2 = false`: the proxy offers the https upstream HTTP/1.1 only (with
/// HTTP/2, requests in flight together share one connection, up to the
/// server's stream cap).
#[tokio::test]
async fn http2_false_keeps_an_https_upstream_on_http1_connections() {
    let (port, pem, stats, task, alpn) = tls_mock().await;
    let p = proxy(&https_upstream("tls-h1", port, &pem, "http2 = false")).await;
    let url = p.url("/v1/chat/completions");
    let body = chat("m", true);
    let (a, b) = tokio::join!(post_json(&url, &body), post_json(&url, &body));
    for answer in [a, b] {
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(
            sse_data(&answer.body).last().map(String::as_str),
            Some("[DONE]")
        );
    }
    assert_eq!(stats.requests(), 2);
    let alpn = alpn.lock().unwrap().clone();
    assert!(!alpn.is_empty());
    for protocol in &alpn {
        assert_ne!(protocol.as_deref(), Some(b"h2".as_slice()), "{alpn:?}");
    }
    task.abort();
}

/// An HTTP/2 upstream over TLS that refuses its first `refusals` streams
/// (`REFUSED_STREAM`, as a server at its stream cap does) and answers the
/// others with a chat completion; its port, the certificate's PEM, and the
/// streams it answered.
async fn refusing_h2(refusals: usize) -> (u16, String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (acceptor, pem) = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let counted = answered.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let (seen, answered) = (seen.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) < refusals {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    let body = serde_json::json!({
                        "id": "c", "object": "chat.completion", "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "hi"}}],
                    })
                    .to_string();
                    let head = http::Response::builder()
                        .header("content-type", "application/json")
                        .body(())
                        .unwrap();
                    if let Ok(mut send) = respond.send_response(head, false) {
                        let _ = send.send_data(body.into(), true);
                    }
                }
            });
        }
    });
    (port, pem, answered)
}

/// A stream the upstream refused (`REFUSED_STREAM`: it processed none of
/// it) is sent again, and is no failure of the upstream's: with
/// `eject_after_failures = 1` it stays in rotation.
#[tokio::test]
async fn refused_h2_streams_are_sent_again_and_not_held_against_the_upstream() {
    let (port, pem, answered) = refusing_h2(2).await;
    let p = proxy(&https_upstream(
        "tls-refused",
        port,
        &pem,
        "[balance]\nmax_retries = 2\neject_after_failures = 1",
    ))
    .await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 1);
    let readyz = send(request(http::Method::GET, &p.url("/readyz"), &[], "")).await;
    assert_eq!(readyz.status, 200, "a refused stream ejected the upstream");
    let metrics = p.metrics().await;
    assert!(
        metrics.contains("llm_proxy_upstream_failures_total{upstream=\"up\"} 0\n")
            && metrics.contains("llm_proxy_retries_total 2\n"),
        "{metrics}"
    );
}

/// Refused every time, the request is a 502 counted for the upstream
/// that refused it (its `upstream` label), as any other 502 it causes.
#[tokio::test]
async fn a_502_of_refused_h2_streams_is_counted_for_the_upstream() {
    let (port, pem, answered) = refusing_h2(usize::MAX).await;
    let p = proxy(&https_upstream(
        "tls-refused-all",
        port,
        &pem,
        "[balance]\nmax_retries = 1",
    ))
    .await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    answer.assert_error(502, "upstream_error", "bad_gateway");
    assert_eq!(answered.load(std::sync::atomic::Ordering::SeqCst), 0);
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(
            "llm_proxy_requests_total{route=\"chat_completions\",status=\"502\",upstream=\"up\"} 1\n"
        ),
        "{metrics}"
    );
}

/// An HTTP/2 connection to the upstream that goes silently dead (the flow
/// dropped: frozen, not closed) is found out by its unanswered ping, within
/// the upstream's `idle_timeout_ms`, and the next request opens a new one
/// instead of waiting its first-byte timeout on the dead one.
#[tokio::test]
async fn a_silently_dead_h2_connection_is_found_out_by_its_ping() {
    let (port, pem, _stats, task, alpn) = tls_mock().await;
    let relay = tests::relay::Relay::start(([127, 0, 0, 1], port).into()).await;
    let p = proxy(&https_upstream(
        "tls-ping",
        relay.addr.port(),
        &pem,
        "idle_timeout_ms = 1000\nfirst_byte_timeout_ms = 20000\npool_idle_timeout_ms = 60000",
    ))
    .await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(alpn.lock().unwrap().clone(), [Some(b"h2".to_vec())]);
    relay.freeze();
    // Pinged every 500 ms, dead after a ping unanswered for 500 ms more.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let started = std::time::Instant::now();
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(relay.accepted(), 2, "a new connection");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "answered on a new connection, not after the first-byte timeout"
    );
    task.abort();
}

/// A server that takes the TCP connection and never answers the TLS
/// handshake is bounded by `connect_timeout_ms` (TCP and TLS together),
/// not by the first-byte timeout: 504 `upstream_timeout`, connecting. The
/// first-byte timeout is past the test's bound, so waiting on it fails.
#[tokio::test]
async fn a_tls_handshake_never_answered_is_bounded_by_the_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let p = proxy(&format!(
        "{}[balance]\nmax_retries = 0\n",
        one_upstream(
            &format!("https://127.0.0.1:{port}/v1"),
            "connect_timeout_ms = 300\nfirst_byte_timeout_ms = 60000\n",
        )
    ))
    .await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    answer.assert_error(504, "timeout_error", "upstream_timeout");
    assert!(answer.text().contains("connecting"), "{}", answer.text());
    // A WebSocket upgrade's connect too.
    let ws = proxy(&format!(
        "{}apis = [\"responses\"]\nwebsocket = true\n[balance]\nmax_retries = 0\n",
        one_upstream(
            &format!("https://127.0.0.1:{port}/v1"),
            "connect_timeout_ms = 300\nfirst_byte_timeout_ms = 60000\n",
        )
    ))
    .await;
    let refused = tests::ws::connect(ws.addr, &[])
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.0, 504, "{}", refused.1);
    assert!(refused.1.contains("upstream_timeout"), "{}", refused.1);
    silent.abort();
}

/// How [`late_ending_h2`] ends each answer after its last byte.
#[derive(Clone, Copy, Debug)]
enum H2End {
    /// An empty DATA frame with END_STREAM, a moment later (as nginx's
    /// often do).
    LateEmptyFrame,
    /// Trailers, a moment later.
    Trailers,
}

/// An h2 upstream over TLS whose answers (JSON with its length, or an
/// event stream) end `end`: its port and certificate.
async fn late_ending_h2(end: H2End) -> (u16, String) {
    let (acceptor, pem) = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut sent = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            sent.extend_from_slice(&chunk);
                        }
                        let streamed = String::from_utf8_lossy(&sent).contains(r#""stream":true"#);
                        let message = serde_json::json!({"role": "assistant", "content": "hi"});
                        let (kind, text) = if streamed {
                            let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
                                let c = serde_json::json!({"id": "c", "object": "chat.completion.chunk",
                                    "model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                                format!("data: {c}\n\n")
                            };
                            let text = chunk(message, serde_json::Value::Null)
                                + &chunk(serde_json::json!({}), "stop".into())
                                + "data: [DONE]\n\n";
                            ("text/event-stream", text)
                        } else {
                            let text = serde_json::json!({"id": "c", "object": "chat.completion",
                                "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                "message": message}]})
                            .to_string();
                            ("application/json", text)
                        };
                        let mut head = http::Response::builder().header("content-type", kind);
                        if !streamed {
                            head = head.header("content-length", text.len());
                        }
                        let Ok(mut send) = respond.send_response(head.body(()).unwrap(), false)
                        else {
                            return;
                        };
                        let _ = send.send_data(text.into(), false);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        let _ = match end {
                            H2End::LateEmptyFrame => send.send_data(bytes::Bytes::new(), true),
                            H2End::Trailers => {
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("x-upstream-trailer", "1".parse().unwrap());
                                send.send_trailers(trailers)
                            }
                        };
                    });
                }
            });
        }
    });
    (port, pem)
}

/// An h2 answer whose end comes after its last byte — in an empty frame
/// of its own, or with trailers — is a whole answer: cached (the next
/// request is a hit), streamed or not (a stream, of no known length, ends
/// only past its trailers, which are not passed on).
#[tokio::test]
async fn an_h2_answer_ended_after_its_last_byte_is_whole() {
    for end in [H2End::LateEmptyFrame, H2End::Trailers] {
        let (port, pem) = late_ending_h2(end).await;
        let p = proxy(&format!(
            "{}[cache]\nenabled = true\n",
            https_upstream("tls-late-end", port, &pem, "")
        ))
        .await;
        for stream in [false, true] {
            let first = post_json(&p.url("/v1/chat/completions"), &chat("m", stream)).await;
            assert_eq!(first.status, 200, "{end:?}: {}", first.text());
            assert!(first.text().contains("hi"), "{end:?}: {}", first.text());
            let second = post_json(&p.url("/v1/chat/completions"), &chat("m", stream)).await;
            assert_eq!(
                second.header("x-llm-proxy-cache"),
                Some("hit"),
                "{end:?}, stream {stream}: {}",
                p.metrics().await
            );
            assert_eq!(second.body, first.body, "{end:?}, stream {stream}");
        }
    }
}

/// A safe request without a body that a reused https connection took and
/// closed unanswered (the server's keep-alive timeout ran out as it came)
/// is sent again on a new connection, as on `http://`: the client gets the
/// answer, not a 502.
#[tokio::test]
async fn a_get_on_an_https_connection_closed_unanswered_goes_out_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (acceptor, pem) = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first_connection = counted.fetch_add(1, Ordering::SeqCst) == 0;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                for n in 1.. {
                    head.clear();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    if first_connection && n == 2 {
                        // Closed with the request unanswered, and no
                        // close_notify: as a server whose keep-alive
                        // timeout ran out.
                        return;
                    }
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                  content-length: 14\r\n\r\n{\"object\":\"x\"}";
                    if tls.write_all(answer.as_bytes()).await.is_err() || tls.flush().await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let p = proxy(&https_upstream("tls-replay", port, &pem, "http2 = false")).await;
    for n in 0..2 {
        let answer = send(request(http::Method::GET, &p.url("/v1/files"), &[], "")).await;
        assert_eq!(answer.status, 200, "request {n}: {}", answer.text());
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2, "the replay's own");
    server.abort();
}
