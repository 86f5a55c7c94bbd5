//! Every bad input a client or an upstream can send gets its exact status and
//! OpenAI-style body, or a clean close: never a panic or a hang.

use std::time::Duration;

use http::Method;
use http_body_util::BodyExt;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn one() -> (MockServer, TestProxy) {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 1024\n{}",
        one_upstream(
            &up.base_url(),
            "models = [\"m\"]\nfirst_byte_timeout_ms = 1000\nidle_timeout_ms = 1000"
        )
    ))
    .await;
    (up, p)
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let (up, p) = one().await;
    let url = p.url("/v1/chat/completions");
    post_json(&url, "{\"model\": \"m\",").await.assert_error(
        400,
        "invalid_request_error",
        "invalid_json",
    );
    post_json(&url, "")
        .await
        .assert_error(400, "invalid_request_error", "invalid_json");
    post_json(&url, "[1,2]")
        .await
        .assert_error(400, "invalid_request_error", "invalid_body");
    post_json(&url, "\"model\"")
        .await
        .assert_error(400, "invalid_request_error", "invalid_body");
    let missing = post_json(&url, "{\"messages\":[]}").await;
    missing.assert_error(400, "invalid_request_error", "missing_model");
    assert_eq!(missing.json()["error"]["param"], "model");
    post_json(&url, "{\"model\": 7}").await.assert_error(
        400,
        "invalid_request_error",
        "missing_model",
    );
    post_json(&url, "{\"model\": null}").await.assert_error(
        400,
        "invalid_request_error",
        "missing_model",
    );
    post_json(&p.url("/v1/embeddings"), "{\"input\":\"x\"}")
        .await
        .assert_error(400, "invalid_request_error", "missing_model");
    assert_eq!(up.stats.requests(), 0, "nothing bad reached the upstream");
}

#[tokio::test]
async fn unsupported_content_type_is_415() {
    let (_up, p) = one().await;
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[("content-type", "text/plain")],
        chat("m", false),
    ))
    .await;
    answer.assert_error(415, "invalid_request_error", "unsupported_media_type");
    let absent = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[],
        chat("m", false),
    ))
    .await;
    assert_eq!(absent.status, 200, "no content-type is accepted");
    // A coded body the proxy would have to read as JSON: said so, not
    // "invalid JSON", nor passed on for the upstream to decode.
    let gzip = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        chat("m", false),
    ))
    .await;
    gzip.assert_error(415, "invalid_request_error", "unsupported_media_type");
}

#[tokio::test]
async fn unknown_model_is_404_and_unknown_path_is_404() {
    let (_up, p) = one().await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("gpt-nope", false)).await;
    answer.assert_error(404, "not_found_error", "model_not_found");
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-nope")
    );
    send(request(Method::GET, &p.url("/nowhere"), &[], ""))
        .await
        .assert_error(404, "not_found_error", "route_not_found");
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let (_up, p) = one().await;
    let answer = send(request(
        Method::GET,
        &p.url("/v1/chat/completions"),
        &[],
        "",
    ))
    .await;
    answer.assert_error(405, "invalid_request_error", "method_not_allowed");
    assert_eq!(answer.header("allow"), Some("POST"));
    let answer = send(request(Method::DELETE, &p.url("/v1/models"), &[], "")).await;
    answer.assert_error(405, "invalid_request_error", "method_not_allowed");
    assert_eq!(answer.header("allow"), Some("GET, HEAD"));
}

/// A body whose HTTP framing is broken is not "invalid JSON": 400
/// `invalid_body`, saying it could not be read.
#[tokio::test]
async fn a_body_with_broken_chunks_is_400_invalid_body() {
    let (up, p) = one().await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\nzz\r\n",
    )
    .await
    .unwrap();
    let answer = answer_text(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains(r#""code":"invalid_body""#), "{answer}");
    assert!(
        answer.contains("could not read the request body"),
        "{answer}"
    );
    // Nothing after it on the connection can be read: said so.
    assert!(answer.contains("connection: close"), "{answer}");
    assert_eq!(up.stats.requests(), 0);
}

/// A body sent with a transfer coding besides `chunked` (`gzip, chunked`,
/// or `chunked` twice): hyper removes the chunking only, so the body would
/// reach the upstream still coded and unlabelled. 501, as nginx answers,
/// on a passthrough route and a model route alike; `chunked` alone passes.
#[tokio::test]
async fn a_transfer_coding_besides_chunked_is_501() {
    let (up, p) = one().await;
    for (path, codings) in [
        ("/v1/files", "transfer-encoding: gzip, chunked\r\n"),
        (
            "/v1/files",
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
        ),
        (
            "/v1/chat/completions",
            "transfer-encoding: identity, chunked\r\n",
        ),
    ] {
        let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\n{codings}\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let answer = answer_text(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 501"), "{codings}: {answer}");
        assert!(
            answer.contains(r#""code":"unsupported_transfer_coding""#),
            "{answer}"
        );
    }
    assert_eq!(up.stats.requests(), 0);
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          transfer-encoding: Chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = answer_text(&mut conn).await;
    assert!(!answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert_eq!(up.stats.requests(), 1, "chunked alone goes through");
}

/// Passthrough routes take the methods of an API, not `TRACE` (an upstream
/// that serves it would echo the key the proxy adds), `CONNECT` or made-up
/// ones: none reaches the upstream.
#[tokio::test]
async fn passthrough_refuses_trace_connect_and_unknown_methods() {
    let (up, p) = one().await;
    let all = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";
    for method in ["TRACE", "FOO"] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let answer = send(request(method.clone(), &p.url("/v1/files"), &[], "")).await;
        answer.assert_error(405, "invalid_request_error", "method_not_allowed");
        assert_eq!(answer.header("allow"), Some(all), "{method}");
    }
    // CONNECT with an origin-form target, as a raw request.
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(b"CONNECT /v1/files HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(HANG, conn.read(&mut buf))
        .await
        .expect("answered")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(up.stats.requests(), 0, "nothing reached the upstream");
    // The API's own methods still pass.
    for method in [Method::GET, Method::DELETE, Method::OPTIONS] {
        send(request(method, &p.url("/v1/files"), &[], "")).await;
    }
    assert_eq!(up.stats.requests(), 3);
}

#[tokio::test]
async fn body_over_limit_is_413() {
    let (up, p) = one().await;
    let big = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(2000));
    // Announced by content-length.
    post_json(&p.url("/v1/chat/completions"), &big)
        .await
        .assert_error(413, "invalid_request_error", "request_too_large");
    // Chunked, no content-length: found while reading.
    let chunks: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> = (0..4)
        .map(|_| Ok(http_body::Frame::data(bytes::Bytes::from(vec![b' '; 600]))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_stream(chunks));
    let req = http::Request::post(p.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = tokio::time::timeout(HANG, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(up.stats.requests(), 0);
}

fn futures_stream<T>(items: Vec<T>) -> impl futures_core::Stream<Item = T> {
    tokio_stream::iter(items)
}

#[tokio::test]
async fn body_over_limit_is_refused_without_reading_the_rest() {
    let (_up, p) = one().await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    // Announce 10 MB, send 10 bytes, and wait: the answer must come anyway.
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 10000000\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(HANG, conn.read(&mut buf))
        .await
        .expect("answered without the body")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("request_too_large"), "{head}");
}

/// A client that writes its whole body before it reads (as `httpx`
/// does under the `openai` SDK) reads the 413 for a body over the limit,
/// announced or chunked, instead of a reset: the rest of the body is read
/// and dropped, and after a body read whole the connection serves the next
/// request.
#[tokio::test]
async fn a_client_still_sending_its_body_reads_the_413() {
    let (up, p) = one().await;
    let body = vec![b' '; 8 << 20];
    for chunked in [false, true] {
        let conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let (mut read, mut write) = conn.into_split();
        let framing = if chunked {
            "transfer-encoding: chunked".to_owned()
        } else {
            format!("content-length: {}", body.len())
        };
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             {framing}\r\n\r\n"
        );
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            write.write_all(head.as_bytes()).await?;
            if chunked {
                for piece in sent.chunks(64 << 10) {
                    write
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                    write.write_all(piece).await?;
                    write.write_all(b"\r\n").await?;
                }
                write.write_all(b"0\r\n\r\n").await?;
            } else {
                write.write_all(&sent).await?;
            }
            Ok::<_, std::io::Error>(write)
        });
        let mut answer = Vec::new();
        let mut buf = vec![0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match tokio::time::timeout(HANG, read.read(&mut buf))
                .await
                .unwrap()
            {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) => panic!("chunked {chunked}: {e} after {answer:?}"),
            }
        }
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "chunked {chunked}: {text}"
        );
        // The whole body was taken: the connection goes on.
        let mut write = tokio::time::timeout(HANG, writer)
            .await
            .unwrap()
            .unwrap()
            .unwrap_or_else(|e| panic!("chunked {chunked}: the body was cut: {e}"));
        write
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        while !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200") {
            match tokio::time::timeout(HANG, read.read(&mut buf))
                .await
                .unwrap()
            {
                Ok(0) | Err(_) => panic!("chunked {chunked}: closed after the 413"),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    }
    assert_eq!(up.stats.requests(), 0);
}

/// A client that waits for `100 Continue` before its body is refused
/// without it: its body is not asked for (it would be read only to be
/// dropped).
#[tokio::test]
async fn a_client_expecting_100_continue_gets_the_413_without_it() {
    let (_up, p) = one().await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          expect: 100-continue\r\ncontent-length: 8000000\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = tokio::time::timeout(HANG, read_until_closed(&mut conn))
        .await
        .expect("answered and closed")
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let port = dead_port().await;
    let p = proxy(&one_upstream(&format!("http://127.0.0.1:{port}/v1"), "")).await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("m", false)).await;
    answer.assert_error(502, "upstream_error", "bad_gateway");
    assert!(
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`up`")
    );
    // Counted against the upstream that failed, as nginx's and Envoy's
    // per-upstream counters do.
    let metrics = p.metrics().await;
    let line = r#"llm_proxy_requests_total{route="chat_completions",status="502",upstream="up"} 1"#;
    assert!(metrics.contains(line), "{metrics}");
}

#[tokio::test]
async fn upstream_first_byte_timeout_is_504() {
    let (up, p) = one().await;
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-mock-fail", "hang"),
        ],
        chat("m", false),
    ))
    .await;
    answer.assert_error(504, "timeout_error", "upstream_timeout");
    let metrics = p.metrics().await;
    let line = r#"llm_proxy_requests_total{route="chat_completions",status="504",upstream="up"} 1"#;
    assert!(metrics.contains(line), "{metrics}");
    // The abandoned upstream request is cancelled, not left running.
    eventually("the hung upstream request is dropped", || {
        up.stats.in_flight() == 0
    })
    .await;
}

#[tokio::test]
async fn upstream_5xx_and_429_come_back_as_they_came() {
    let (_up, p) = one().await;
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-fail", "503")],
        chat("m", false),
    ))
    .await;
    assert_eq!(answer.status, 503);
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-fail", "429")],
        chat("m", false),
    ))
    .await;
    assert_eq!(answer.status, 429);
    assert!(answer.header("retry-after").is_some());
}

async fn broken_stream(p: &TestProxy, fail: &str) -> (String, bool) {
    let resp = client()
        .request(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-fail", fail),
                ("x-mock-tokens", "6"),
            ],
            chat("m", true),
        ))
        .await
        .expect("response head");
    assert_eq!(resp.status(), 200);
    let (body, broke) = read_stream(resp).await;
    (String::from_utf8_lossy(&body).into_owned(), broke)
}

/// A streamed chat request through a proxy in front of the (raw) upstream
/// at `addr`: the body the client got, and whether it broke.
/// A chat request through `p`, streamed or not: its answer, unread.
async fn stream_through(addr: std::net::SocketAddr) -> (bytes::Bytes, bool) {
    let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
    let resp = chat_through(&p, true).await;
    assert_eq!(resp.status(), 200);
    read_stream(resp).await
}

fn assert_interrupted(body: &str, broke: bool) {
    assert!(broke, "the connection is closed, not cleanly ended: {body}");
    assert!(!body.contains("[DONE]"), "no fake clean end: {body}");
    let events = sse_data(body.as_bytes());
    let last: serde_json::Value =
        serde_json::from_str(events.last().expect("an event")).expect("JSON error event");
    assert_eq!(last["error"]["code"], "stream_interrupted", "{body}");
    assert_eq!(last["error"]["type"], "upstream_error");
}

#[tokio::test]
async fn upstream_drop_mid_stream_ends_with_an_error_event_and_a_close() {
    let (_up, p) = one().await;
    let (body, broke) = broken_stream(&p, "drop").await;
    assert!(
        body.contains("\"delta\""),
        "some chunks came through first: {body}"
    );
    assert_interrupted(&body, broke);
}

#[tokio::test]
async fn invalid_sse_ends_with_an_error_event_and_a_close() {
    let (_up, p) = one().await;
    let (body, broke) = broken_stream(&p, "invalid-sse").await;
    assert_interrupted(&body, broke);
    // Withheld: the client's SDK would fail on it with a parse error of
    // its own, not the API error it can handle.
    assert!(!body.contains("{not json"), "{body}");
}

#[tokio::test]
async fn silent_upstream_mid_stream_hits_the_idle_timeout() {
    let up = paced_mock("slow", 1.0).await;
    let p = proxy(&one_upstream(&up.base_url(), "idle_timeout_ms = 150")).await;
    let (body, broke) = broken_stream(&p, "none").await;
    assert_interrupted(&body, broke);
    assert!(body.contains("no data from the upstream"), "{body}");
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_the_upstream() {
    let up = paced_mock("slow", 10.0).await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    start_raw_stream(&mut conn, 1000).await;
    assert_eq!(up.stats.in_flight(), 1);
    drop(conn);
    // 1000 tokens at 10/s would take 100 s: the upstream must stop long before.
    eventually("the upstream stream is cancelled", || {
        up.stats.cancelled() == 1
    })
    .await;
    eventually("nothing left in flight upstream", || {
        up.stats.in_flight() == 0
    })
    .await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_cut_off() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 200\n{}",
        one_upstream(&up.base_url(), "models = [\"m\"]")
    ))
    .await;
    // A kept-alive connection: one whole request first, then half a head.
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    conn.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // The proxy closes the connection (EOF or reset) within the bound.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled request head must be cut off");
}

async fn closed_by_proxy(conn: &mut tokio::net::TcpStream) -> bool {
    read_until_closed(conn).await.is_some()
}

#[tokio::test]
async fn a_client_that_sends_nothing_or_half_an_h2_preface_is_cut_off() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 200\nmax_connections = 1\n{}",
        one_upstream(&up.base_url(), "models = [\"m\"]")
    ))
    .await;
    for first in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        // The only connection the proxy takes: it must not be held forever.
        let mut silent = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        silent.write_all(first).await.unwrap();
        assert!(
            closed_by_proxy(&mut silent).await,
            "a connection that sent {first:?} and stalled must be closed"
        );
        // Its permit is back: the next client is served.
        let req = request(Method::GET, &p.url("/healthz"), &[], String::new());
        let health = tokio::time::timeout(HANG, send(req))
            .await
            .expect("the next client is served");
        assert_eq!(health.status, 200);
    }
}

/// Send a streamed chat request of `tokens` mock tokens on `conn`, raw, and
/// read its answer's first bytes: a 200 head.
async fn start_raw_stream(conn: &mut tokio::net::TcpStream, tokens: u32) {
    let body = chat("m", true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-mock-tokens: {tokens}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(HANG, conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn repeated_keys_are_refused_in_objects_only() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let post = |path: &str, body: &'static str| {
        send(request(
            Method::POST,
            &p.url(path),
            &[("content-type", "application/json")],
            body,
        ))
    };
    // An object whose model (or anything in it) reads two ways: refused.
    post(
        "/v1/chat/completions",
        r#"{"model":"m","model":"n","messages":[]}"#,
    )
    .await
    .assert_error(400, "invalid_request_error", "invalid_json");
    post("/v1/some/passthrough", r#"{"model":"m","x":{"a":1,"a":2}}"#)
        .await
        .assert_error(400, "invalid_request_error", "invalid_json");
    assert_eq!(up.stats.requests(), 0);
    // A passthrough body that is not an object goes on as it is, for the
    // upstream to judge (the mock has no such route: 404).
    let array = post("/v1/some/passthrough", r#"[{"a":1,"a":2}]"#).await;
    assert_eq!(array.status, 404, "{}", array.text());
    assert_eq!(up.stats.requests(), 1);
}

#[tokio::test]
async fn a_streamed_passthrough_body_over_the_limit_is_413_not_the_upstreams_fault() {
    // An upstream that reads whatever comes and never answers.
    let addr = raw_upstream(|mut conn| async move {
        let mut buf = vec![0u8; 8192];
        while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let p = proxy(&format!(
        "max_body_bytes = 1024\n{}",
        one_upstream(&format!("http://{addr}/v1"), "first_byte_timeout_ms = 5000")
    ))
    .await;
    // Not JSON, no length: streamed on to the upstream as it comes.
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let head = "POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut req = head.as_bytes().to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"400\r\n");
        req.extend_from_slice(&[b'x'; 1024]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    conn.write_all(&req).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    let read = tokio::time::timeout(HANG, async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") || !answer.ends_with(b"}") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no answer: {}",
        String::from_utf8_lossy(&answer)
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("request_too_large"), "{text}");
}

/// A proxy (whose one upstream reads whatever comes and never answers,
/// and is ejected by one failure) and a client connection whose chunked
/// `POST /v1/files` has sent its first chunk, on its way upstream.
async fn upload_under_way() -> (TestProxy, tokio::net::TcpStream) {
    // An upstream that reads whatever comes and never answers.
    let addr = raw_upstream(|mut conn| async move {
        let mut buf = vec![0u8; 8192];
        while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let p = proxy(&one_upstream(
        &format!("http://{addr}/v1"),
        "first_byte_timeout_ms = 5000\n[balance]\neject_after_failures = 1",
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    // The first chunk is on its way upstream; waited for.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (p, conn)
}

/// A streamed body the client breaks (a bad chunk) fails the upstream
/// request through no fault of the upstream's: the client's 400, and no
/// failure towards the upstream's ejection (one would eject it here).
#[tokio::test]
async fn a_streamed_body_the_client_breaks_is_400_and_not_held_against_the_upstream() {
    let (p, mut conn) = upload_under_way().await;
    // Then a broken chunk.
    conn.write_all(b"zz\r\n").await.unwrap();
    let answer = read_until_closed(&mut conn).await.expect("answered");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains(r#""code":"invalid_body""#), "{text}");
    let readyz = send(request(Method::GET, &p.url("/readyz"), &[], "")).await;
    assert_eq!(readyz.status, 200, "the client's body ejected the upstream");
}

/// A streamed body whose client goes mid-way (the connection closed after
/// the first chunk) is the client's abandoned request: counted 499, and no
/// failure towards the upstream's ejection.
#[tokio::test]
async fn a_streamed_body_whose_client_goes_is_499_and_not_held_against_the_upstream() {
    let (p, conn) = upload_under_way().await;
    // Then the client is gone.
    drop(conn);
    let line = "llm_proxy_requests_total{route=\"passthrough\",status=\"499\",upstream=\"\"} 1\n";
    let mut metrics = String::new();
    for _ in 0..250 {
        metrics = p.metrics().await;
        if metrics.contains(line) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.contains(line), "{metrics}");
    let readyz = send(request(Method::GET, &p.url("/readyz"), &[], "")).await;
    assert_eq!(
        readyz.status, 200,
        "the client's leaving ejected the upstream"
    );
}

#[tokio::test]
async fn an_upstream_that_breaks_after_done_ends_the_stream_cleanly() {
    // Sends a whole stream, [DONE] included, then resets instead of ending
    // the chunked body.
    let addr = raw_upstream(|mut conn| async move {
        if !read_request_head(&mut conn).await {
            return;
        }
        let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for event in [
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: [DONE]\n\n",
        ] {
            out.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
        }
        let _ = conn.write_all(&out).await;
        // Let the proxy read it all, then close without the last chunk.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(conn);
    })
    .await;
    let (body, broke) = stream_through(addr).await;
    let body = String::from_utf8_lossy(&body);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(!body.contains("stream_interrupted"), "{body}");
    assert!(!broke, "a clean end for a stream that said all it had to");
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 200\n{}",
        one_upstream(&up.base_url(), "models = [\"m\"]")
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    // The head promises 100 bytes; 10 come, then nothing.
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut conn)
        .await
        .expect("the proxy answers and closes, it does not wait for ever");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert_eq!(up.stats.requests(), 0, "nothing went upstream");
}

/// A chat request of exactly `len` bytes.
fn chat_of_len(len: usize) -> String {
    let head = r#"{"model":"m","messages":[{"role":"user","content":""#;
    let tail = r#""}]}"#;
    format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
}

/// A gauge of the proxy's metrics, by its full name.
async fn gauge(p: &TestProxy, name: &str) -> u64 {
    let metrics = p.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} gauge in {metrics}"))
}

/// Wait until the gauge `name` reads `bytes`.
async fn wait_gauge(p: &TestProxy, name: &str, bytes: u64) {
    let deadline = tokio::time::Instant::now() + HANG;
    while gauge(p, name).await != bytes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never {bytes}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Request body bytes held.
async fn wait_buffered(p: &TestProxy, bytes: u64) {
    wait_gauge(p, "llm_proxy_buffered_body_bytes", bytes).await;
}

/// Bytes of answers held.
async fn wait_answers(p: &TestProxy, bytes: u64) {
    wait_gauge(p, "llm_proxy_buffered_answer_bytes", bytes).await;
}

#[tokio::test]
async fn bodies_past_the_buffer_budget_are_503_until_it_is_given_back() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 1000\nmax_buffered_body_bytes = 3300\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let url = p.url("/v1/chat/completions");
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n\
                content-type: application/json\r\ncontent-length: 1000\r\n\r\n";
    // A head that announces a body and sends none takes nothing from the
    // others (900 fits beside it).
    let mut empty = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    empty.write_all(head.as_bytes()).await.unwrap();
    // (Time for the proxy to take the head in: nothing shows it.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(post_json(&url, &chat_of_len(900)).await.status, 200);
    wait_buffered(&p, 0).await;

    // One request announces 1000 bytes and sends 700 of them: what came is
    // held while the rest is awaited.
    let slow = chat_of_len(1000);
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&slow.as_bytes()[..700]).await.unwrap();
    wait_buffered(&p, 700).await;

    // A body holds its bytes and the value they are parsed into: a chat
    // request of 900 bytes, ~2800 in all (two objects, ~360 each, an array
    // and its strings), fits alone. Beside the 700: refused.
    let refused = post_json(&url, &chat_of_len(900)).await;
    refused.assert_error(503, "service_unavailable", "server_overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // 700 + 400 (~1800 parsed) fits.
    assert_eq!(post_json(&url, &chat_of_len(400)).await.status, 200);
    // The slow body completes and is answered; its bytes are given back.
    conn.write_all(&slow.as_bytes()[700..]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(HANG, conn.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    wait_buffered(&p, 0).await;
    assert_eq!(post_json(&url, &chat_of_len(900)).await.status, 200);
    assert_eq!(up.stats.requests(), 4);
    drop(empty);
}

/// An upstream that answers every request with `answer`'s head, then
/// `body` written 64 KiB at a time, closing the connection after; counts
/// the requests.
async fn large_answer_upstream(
    content_type: &'static str,
    body: Vec<u8>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let body = std::sync::Arc::new(body);
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let addr = raw_upstream(move |mut conn| {
        let (body, seen) = (body.clone(), seen.clone());
        async move {
            if read_request(&mut conn).await.is_none() {
                return;
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n"
            );
            let _ = conn.write_all(head.as_bytes()).await;
            for block in body.chunks(64 << 10) {
                if conn.write_all(block).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, count)
}

/// A streamed chat request to `p`, over HTTP/1.1.
async fn streamed_chat(p: &TestProxy) -> http::Response<hyper::body::Incoming> {
    client()
        .request(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[],
            chat("m", true),
        ))
        .await
        .unwrap()
}

#[tokio::test]
async fn an_endless_event_is_cut_where_the_buffer_budget_ends() {
    // One chunk whose content is 3 MiB long, with no line break: every
    // layer that reads the stream (the upstream client's check, the
    // cache's tee, its usage filter) holds it until its end.
    let mut stream =
        br#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""#
            .to_vec();
    stream.resize(stream.len() + (3 << 20), b'a');
    stream.extend_from_slice(b"\"}}]}\n\ndata: [DONE]\n\n");
    let (up, _) = large_answer_upstream("text/event-stream", stream).await;
    let config = |budget: &str| {
        format!(
            "max_body_bytes = 65536\n{budget}\n{}\n[cache]\nbackend = \"memory\"\n\
             [balance]\neject_after_failures = 1\n",
            one_upstream(&format!("http://{up}"), "")
        )
    };
    // Within the event limit (32 MiB) and the default budget: it passes.
    let roomy = proxy(&config("")).await;
    let resp = streamed_chat(&roomy).await;
    let (body, broke) = read_stream(resp).await;
    assert!(!broke);
    assert!(body.len() > 3 << 20, "{}", body.len());
    assert!(body.ends_with(b"data: [DONE]\n\n"));

    // With 1 MiB for all: the stream is cut long before its end, and every
    // layer gives back what it held. The client holds the start of an
    // event: no error event can follow it (its first line would end the
    // cut one), the stream just fails.
    let tight = proxy(&config("max_buffered_body_bytes = 1048576")).await;
    let resp = streamed_chat(&tight).await;
    assert_eq!(resp.status(), 200);
    let (body, broke) = read_stream(resp).await;
    let text = String::from_utf8_lossy(&body);
    assert!(broke, "the stream fails");
    assert!(body.len() < 2 << 20, "{}", body.len());
    assert!(!text.contains("[DONE]") && !text.contains("\"error\""));
    wait_buffered(&tight, 0).await;
    wait_answers(&tight, 0).await;
    // Nothing was stored: the next requests go upstream, and are cut again.
    // The proxy's memory is not the upstream's fault: no ejection.
    for _ in 0..3 {
        let resp = streamed_chat(&tight).await;
        assert_eq!(resp.headers()["x-llm-proxy-cache"], "miss");
        let (body, broke) = read_stream(resp).await;
        assert!(broke && body.len() < 2 << 20, "{}", body.len());
    }
    wait_answers(&tight, 0).await;
    wait_buffered(&tight, 0).await;
    let readyz = send(request(Method::GET, &tight.url("/readyz"), &[], "")).await;
    assert_eq!(readyz.status, 200, "the upstream was ejected");
}

#[tokio::test]
async fn an_endless_event_under_auth_and_translation_is_cut_and_gives_back_the_budget() {
    // A Messages client over a chat upstream, with a token limit: the
    // upstream client's check, auth's usage watch and the translation
    // each read the stream.
    let mut stream =
        br#"data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":""#
            .to_vec();
    stream.resize(stream.len() + (3 << 20), b'a');
    stream.extend_from_slice(b"\"}}]}\n\ndata: [DONE]\n\n");
    let (up, _) = large_answer_upstream("text/event-stream", stream).await;
    let p = proxy(&format!(
        "max_body_bytes = 65536\nmax_buffered_body_bytes = 1048576\n{}\n\
         [auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 100000\n",
        one_upstream(&format!("http://{up}"), "")
    ))
    .await;
    let body = r#"{"model":"m","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = client()
        .request(request(
            Method::POST,
            &p.url("/v1/messages"),
            &[("x-api-key", "sk-t"), ("anthropic-version", "2023-06-01")],
            body,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (body, _) = read_stream(resp).await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("event: error"),
        "{}",
        &text[text.len().saturating_sub(600)..]
    );
    assert!(!text.contains("message_stop"));
    wait_answers(&p, 0).await;
    wait_buffered(&p, 0).await;
}

#[tokio::test]
async fn an_answer_the_buffer_budget_cannot_hold_is_not_cached() {
    let content = "a".repeat(600 << 10);
    let answer = serde_json::json!({
        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    });
    let answer = serde_json::to_vec(&answer).unwrap();
    for (budget, calls) in [("", 1), ("max_buffered_body_bytes = 524288", 2)] {
        let (up, count) = large_answer_upstream("application/json", answer.clone()).await;
        let p = proxy(&format!(
            "max_body_bytes = 65536\n{budget}\n{}\n[cache]\nbackend = \"memory\"\n",
            one_upstream(&format!("http://{up}"), "")
        ))
        .await;
        let url = p.url("/v1/chat/completions");
        for _ in 0..2 {
            let a = post_json(&url, &chat("m", false)).await;
            assert_eq!(a.status, 200);
            assert_eq!(a.body.len(), answer.len(), "whole, stored or not");
        }
        assert_eq!(
            count.load(std::sync::atomic::Ordering::SeqCst),
            calls,
            "budget {budget:?}"
        );
        wait_answers(&p, 0).await;
        wait_buffered(&p, 0).await;
    }
}

#[tokio::test]
async fn an_upstream_framing_by_both_chunks_and_length_reaches_the_client_whole() {
    // Chunked, with a content-length that disagrees (smaller, then larger):
    // the chunks decide; the stale length must not reach the client.
    for stale in ["3", "100000"] {
        let addr = raw_upstream(move |mut conn| async move {
            let mut buf = vec![0u8; 8192];
            if !read_request_head(&mut conn).await {
                return;
            }
            let body = r#"{"id":"x","object":"chat.completion","choices":[]}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {stale}\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
            let _ = conn.read(&mut buf).await;
        })
        .await;
        let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
        let answer = tokio::time::timeout(
            HANG,
            post_json(&p.url("/v1/chat/completions"), &chat("m", false)),
        )
        .await
        .expect("answered");
        assert_eq!(answer.status, 200, "content-length {stale}");
        assert_eq!(
            answer.json()["object"],
            "chat.completion",
            "content-length {stale}: {}",
            answer.text()
        );
    }
}

/// An upstream repeating its `content-length` (two fields, or `n, n`)
/// gets one to the client: repeated, HTTP/2 clients (nghttp2, so curl)
/// refuse the answer as malformed, and RFC 9112 section 6.3 asks an
/// intermediary to pass on a single value.
#[tokio::test]
async fn a_repeated_content_length_reaches_the_client_once() {
    for repeated in [
        "content-length: 2\r\ncontent-length: 2",
        "content-length: 2, 2",
    ] {
        let addr = raw_upstream(move |mut conn| async move {
            while read_request(&mut conn).await.is_some() {
                let answer = format!("HTTP/1.1 200 OK\r\n{repeated}\r\n\r\nok");
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        })
        .await;
        let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
        let (mut sender, _conn) = h2c(p.addr).await;
        let req = http::Request::get(p.url("/v1/files"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(HANG, sender.send_request(req))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(resp.status(), 200, "{repeated}");
        let lengths: Vec<_> = resp.headers().get_all("content-length").iter().collect();
        assert_eq!(lengths, ["2"], "{repeated}");
    }
}

#[tokio::test]
async fn an_idle_h2c_connection_is_closed_and_a_busy_one_is_not() {
    let up = paced_mock("slow", 20.0).await;
    // Idle for 300 ms: closed (as an idle HTTP/1 connection would be).
    let p = proxy(&format!(
        "header_read_timeout_ms = 300\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let (mut sender, mut conn) = h2c(p.addr).await;
    // A stream of 20 tokens at 20 per second outlasts the idle timeout
    // three times over, and is not cut.
    let body = chat("m", true);
    let req = http::Request::post(format!("http://{}/v1/chat/completions", p.addr))
        .header("content-type", "application/json")
        .header("x-mock-tokens", "20")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    let (streamed, broken) = read_stream(resp).await;
    assert!(!broken, "the stream ran to its end");
    assert!(
        String::from_utf8_lossy(&streamed).contains("data: [DONE]"),
        "{}",
        String::from_utf8_lossy(&streamed)
    );
    assert!(!conn.is_finished(), "open while it carried a stream");
    // Then nothing: the proxy closes the connection (GOAWAY).
    tokio::time::timeout(HANG, &mut conn)
        .await
        .expect("the idle connection was closed")
        .expect("the connection task")
        .expect("a clean close");
}

/// An upstream whose last event lacks its blank line, then ends its body.
/// Nothing may complete that event for the client (a line break would:
/// `data: [DONE]` would read as a clean end, cut JSON as garbage): the
/// stream fails, with no error event, and the client drops the unfinished
/// event with the connection, as SSE has it.
#[tokio::test]
async fn a_stream_cut_mid_event_fails_without_completing_the_event() {
    for event in [
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n",
        "data: [DONE]\n",
        "data: {\"choices\":[{\"index\":0,\"del",
    ] {
        let addr = raw_upstream(move |mut conn| async move {
            let mut buf = vec![0u8; 8192];
            if !read_request_head(&mut conn).await {
                return;
            }
            let out = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
                 {:x}\r\n{event}\r\n0\r\n\r\n",
                event.len()
            );
            let _ = conn.write_all(out.as_bytes()).await;
            let _ = conn.read(&mut buf).await;
        })
        .await;
        let (body, broke) = stream_through(addr).await;
        assert!(broke, "{event:?}: the stream fails");
        assert_eq!(&body[..], event.as_bytes(), "nothing after the cut event");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_the_upstream_cancelled() {
    // The mock streams as fast as it is read, far more than socket buffers
    // hold.
    let up = mock_named("m").await;
    let p = send_timeout_proxy(&up).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(p.addr).await.unwrap();
    start_raw_stream(&mut conn, 1_000_000).await;
    // Now the client reads nothing more, and keeps its connection open.
    eventually("the upstream stream is cancelled", || {
        up.stats.cancelled() == 1
    })
    .await;
    drop(conn);
}

/// The send timeout is its own knob: a client that takes none of its
/// answer for longer than `header_read_timeout_ms`, but less than
/// `send_timeout_ms`, gets its whole stream. (HTTP/2, so that the pause
/// shows at once: the stream's window fills, and its body waits.)
#[tokio::test]
async fn a_reader_that_pauses_within_the_send_timeout_is_not_cut() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 100\nsend_timeout_ms = 20000\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/v1/chat/completions", p.addr))
        .header("content-type", "application/json")
        .header("x-mock-tokens", "2000")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(
            "m", true,
        ))))
        .unwrap();
    let answer = sender.send_request(req).await.expect("a head");
    assert_eq!(answer.status(), 200);
    // Five header timeouts without taking a byte.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (body, broken) = read_stream(answer).await;
    assert!(!broken, "cut after {} bytes", body.len());
    assert!(String::from_utf8_lossy(&body).contains("data: [DONE]"));
    assert_eq!(up.stats.cancelled(), 0);
}

#[tokio::test]
async fn one_unread_h2c_stream_does_not_take_a_waiting_one_down() {
    let up = mock_named("m").await;
    let p = send_timeout_proxy(&up).await;
    let sender = h2c_small_window(p.addr).await;
    let post = |headers: &[(&str, &str)]| streamed_chat_h2(p.addr, headers);
    // B: its upstream takes several timeouts to answer; nothing is wrong.
    // It is in flight before A stalls, however long the machine takes: a
    // connection whose every stream stalled is closed (B sent only after A
    // stalled would find it gone).
    let waiting = tokio::spawn(
        sender
            .clone()
            .send_request(post(&[("x-mock-latency-ms", "4000")])),
    );
    eventually("B reached the upstream", || up.stats.in_flight() == 1).await;
    // A: a long stream the client does not read yet (its window fills).
    let unread = sender
        .clone()
        .send_request(post(&[("x-mock-tokens", "1000000")]))
        .await
        .expect("A's head");
    assert_eq!(unread.status(), 200);
    // A alone is cancelled upstream, while B waits; A's stream is left to
    // the client.
    eventually("A's upstream request cancelled", || {
        up.stats.cancelled() == 1
    })
    .await;
    assert!(!waiting.is_finished(), "B still waits");
    let waiting = waiting.await.unwrap().expect("B answered");
    assert_eq!(waiting.status(), 200);
    let (body, broken) = read_stream(waiting).await;
    assert!(!broken, "B ran to its end");
    assert!(String::from_utf8_lossy(&body).contains("data: [DONE]"));
    // A's stream fails once read, after what it had queued, reset with
    // CANCEL (the answer is no longer wanted; not INTERNAL_ERROR).
    let mut body = unread.into_body();
    let mut queued = 0;
    let error = loop {
        match tokio::time::timeout(HANG, body.frame())
            .await
            .expect("no hang")
        {
            Some(Ok(frame)) => queued += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(error)) => break error,
            None => panic!("the unread stream ended cleanly"),
        }
    };
    assert!(queued > 0, "after what it had queued");
    let reason = std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .find_map(|e| e.downcast_ref::<h2::Error>())
    .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::CANCEL), "{error:?}");
}

#[tokio::test]
async fn unread_h2c_streams_beside_a_waiting_one_are_cancelled_one_by_one() {
    let up = mock_named("m").await;
    let p = send_timeout_proxy(&up).await;
    let sender = h2c_small_window(p.addr).await;
    let post = |headers: &[(&str, &str)]| streamed_chat_h2(p.addr, headers);
    // Eight long streams the client never reads, beside one whose upstream
    // has not answered (it hangs, within the first-byte timeout): the eight
    // are cancelled, each, and the connection goes on. The waiting stream
    // keeps the connection from being one whose every stream stalled
    // (closed after the send timeout, as it would be with nothing but the
    // unread streams left), however long the machine takes.
    let waiting = tokio::spawn(
        sender
            .clone()
            .send_request(post(&[("x-mock-fail", "hang")])),
    );
    eventually("the waiting stream reached the upstream", || {
        up.stats.in_flight() == 1
    })
    .await;
    let mut unread = Vec::new();
    for _ in 0..8 {
        let req = post(&[("x-mock-tokens", "1000000")]);
        let resp = sender.clone().send_request(req).await.expect("a head");
        assert_eq!(resp.status(), 200);
        unread.push(resp);
    }
    eventually("the unread streams' upstream requests cancelled", || {
        up.stats.cancelled() == 8 && up.stats.in_flight() == 1
    })
    .await;
    let answer = sender
        .clone()
        .send_request(post(&[]))
        .await
        .expect("the connection still serves");
    let (body, broken) = read_stream(answer).await;
    assert!(!broken && String::from_utf8_lossy(&body).contains("data: [DONE]"));
    assert!(!waiting.is_finished(), "the waiting stream still waits");
    waiting.abort();
    drop(unread);
}

/// A client that reads one stream and leaves the others unread cannot keep
/// their upstream requests: reading one stream does not cover the others.
#[tokio::test]
async fn reading_one_h2c_stream_does_not_keep_unread_ones() {
    let up = paced_mock("m", 1000.0).await;
    let p = send_timeout_proxy(&up).await;
    let sender = h2c_small_window(p.addr).await;
    let post = |headers: &[(&str, &str)]| streamed_chat_h2(p.addr, headers);
    let long = [("x-mock-tokens", "1000000")];
    let read = sender
        .clone()
        .send_request(post(&long))
        .await
        .expect("a head");
    let mut read = read.into_body();
    let mut unread = Vec::new();
    for _ in 0..7 {
        let resp = sender
            .clone()
            .send_request(post(&long))
            .await
            .expect("a head");
        assert_eq!(resp.status(), 200);
        unread.push(resp);
    }
    let mut next_frame = async || {
        tokio::time::timeout(HANG, read.frame())
            .await
            .expect("the read stream goes on")
            .expect("not at its end")
            .expect("not broken")
    };
    let started = std::time::Instant::now();
    while up.stats.cancelled() < 7 {
        assert!(started.elapsed() < HANG, "the unread streams are cancelled");
        next_frame().await;
    }
    // The read stream goes on, for more than a send timeout.
    let more = std::time::Instant::now();
    while more.elapsed() < Duration::from_millis(600) {
        next_frame().await;
    }
    assert_eq!(up.stats.cancelled(), 7);
    drop(read);
    drop(unread);
}

#[tokio::test]
async fn a_body_that_parses_into_far_more_than_its_bytes_is_counted_as_such() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 65536\nmax_buffered_body_bytes = 1048576\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let url = p.url("/v1/chat/completions");
    // 60 KiB of `{"":0}` objects: ~6 MiB once parsed (a B-tree leaf each),
    // past the whole 1 MiB budget though the bytes are well within
    // `max_body_bytes`: 413, never to fit (not a 503 to retry).
    let mut heavy = String::from(r#"{"model":"m","messages":[],"x":["#);
    while heavy.len() < 60 << 10 {
        heavy.push_str(r#"{"":0},"#);
    }
    heavy.push_str("0]}");
    let refused = post_json(&url, &heavy).await;
    refused.assert_error(413, "invalid_request_error", "request_too_large");
    assert_eq!(up.stats.requests(), 0);
    wait_buffered(&p, 0).await;
    // The same bytes of chat text parse into about themselves.
    assert_eq!(post_json(&url, &chat_of_len(60 << 10)).await.status, 200);
    wait_buffered(&p, 0).await;
}

#[tokio::test]
async fn a_slow_but_steady_upload_is_not_a_first_byte_timeout() {
    // The upstream reads the whole chunked body, then answers at once.
    let addr = raw_upstream(|mut conn| async move {
        let (mut buf, mut seen) = (vec![0u8; 8192], Vec::new());
        while !seen.ends_with(b"0\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = conn
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = conn.read(&mut buf).await;
    })
    .await;
    let p = proxy(&one_upstream(
        &format!("http://{addr}/v1"),
        "first_byte_timeout_ms = 600",
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
          transfer-encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    // 1.5 s of upload, a chunk every 250 ms: longer than the first-byte
    // timeout, never silent for long.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        conn.write_all(b"4\r\nxxxx\r\n").await.unwrap();
    }
    conn.write_all(b"0\r\n\r\n").await.unwrap();
    let (mut answer, mut buf) = (Vec::new(), vec![0u8; 4096]);
    let _ = tokio::time::timeout(HANG, async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn an_upstream_that_stops_reading_an_upload_is_a_first_byte_timeout() {
    // It reads the head, then neither reads the body nor answers: the
    // upload blocks, which is the upstream's time, not the client's.
    let addr = raw_upstream(|mut conn| async move {
        if read_request_head(&mut conn).await {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    })
    .await;
    // A body limit far past what the sockets' buffers can take (a
    // kernel's autotuned receive buffer may hold tens of MiB), so that the
    // upload blocks before it is too large.
    let p = proxy(&format!(
        "max_body_bytes = 1073741824\n{}",
        one_upstream(&format!("http://{addr}/v1"), "first_byte_timeout_ms = 600")
    ))
    .await;
    let conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut read, mut write) = conn.into_split();
    let writer = tokio::spawn(async move {
        let head = "POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
        // As fast as it is taken, until the proxy stops taking it.
        while write.write_all(chunk.as_bytes()).await.is_ok() {}
    });
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(HANG, async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 504"), "{text:?}");
}

#[tokio::test]
async fn a_tls_upstream_that_never_speaks_is_a_first_byte_timeout() {
    // TCP connects; the TLS handshake never completes.
    let addr = raw_upstream(|conn| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(conn);
    })
    .await;
    let p = proxy(&one_upstream(
        &format!("https://{addr}/v1"),
        "first_byte_timeout_ms = 600",
    ))
    .await;
    let answer = tokio::time::timeout(
        HANG,
        post_json(&p.url("/v1/chat/completions"), &chat("m", false)),
    )
    .await
    .expect("answered within the bound");
    answer.assert_error(504, "timeout_error", "upstream_timeout");
}

/// A body that fails in the very read that brought the head (a bad chunk
/// size right after the first chunk): the client still gets the head, then
/// a broken body, not a connection closed with no answer at all.
#[tokio::test]
async fn a_body_failing_with_its_head_still_sends_the_head() {
    let addr = raw_upstream(|mut conn| async move {
        let mut buf = vec![0u8; 8192];
        if !read_request_head(&mut conn).await {
            return;
        }
        let out = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
                   5\r\n{\"a\":\r\nzz\r\n";
        let _ = conn.write_all(out.as_bytes()).await;
        let _ = conn.read(&mut buf).await;
    })
    .await;
    let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
    for _ in 0..3 {
        let resp = chat_through(&p, false).await;
        assert_eq!(resp.status(), 200);
        let (_, broke) = read_stream(resp).await;
        assert!(broke);
    }
}

/// An upstream answering `head` to the request (then holding its end).
async fn answering(head: &'static str) -> std::net::SocketAddr {
    raw_upstream(move |mut conn| async move {
        let mut buf = vec![0u8; 8192];
        if !read_request_head(&mut conn).await {
            return;
        }
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.read(&mut buf).await;
    })
    .await
}

#[tokio::test]
async fn an_unasked_for_101_is_a_502() {
    let addr = answering(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
    post_json(&p.url("/v1/chat/completions"), &chat("m", false))
        .await
        .assert_error(502, "upstream_error", "bad_gateway");
}

#[tokio::test]
async fn the_clients_http_version_is_the_proxys_not_the_upstreams() {
    let addr =
        answering("HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"ok\":true}").await;
    let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
    let resp = chat_through(&p, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_11);
}

/// `Text/Event-Stream` is an event stream: a cut one ends with the error
/// event as `text/event-stream` does.
#[tokio::test]
async fn media_types_are_read_in_any_case() {
    let addr = answering(
        "HTTP/1.1 200 OK\r\ncontent-type: Text/Event-Stream\r\ncontent-length: 58\r\n\r\n\
         data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n",
    )
    .await;
    let (body, _) = stream_through(addr).await;
    let events = sse_data(&body);
    assert!(
        events
            .last()
            .is_some_and(|e| e.contains("stream_interrupted")),
        "{events:?}"
    );
}

/// An upstream that compresses though asked for `identity`: the layers
/// could read nothing of it (usage, ids, the cache's checks) and a
/// coalesced follower would get bytes it cannot decode — a 502. A
/// transfer coding other than chunked is one everywhere: its header does
/// not reach the client, which could not undo it.
#[tokio::test]
async fn an_answer_the_proxy_cannot_read_is_a_502() {
    for head in [
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: 4\r\n\r\nxxxx",
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\nxxxx\r\n0\r\n\r\n",
    ] {
        let addr = answering(head).await;
        let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
        post_json(&p.url("/v1/chat/completions"), &chat("m", false))
            .await
            .assert_error(502, "upstream_error", "bad_gateway");
    }
    // A passthrough download keeps its content coding.
    let addr = answering(
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-encoding: gzip\r\ncontent-length: 4\r\n\r\nxxxx",
    )
    .await;
    let p = proxy(&one_upstream(&format!("http://{addr}/v1"), "")).await;
    let file = send(request(
        Method::GET,
        &p.url("/v1/files/f1/content"),
        &[],
        "",
    ))
    .await;
    assert_eq!(file.status, 200);
    assert_eq!(file.header("content-encoding"), Some("gzip"));
}

/// An HTTP/2 client that settles the connection, sends no request, and
/// never answers the proxy's frames (not the GOAWAY's ping either) is
/// closed about two timeouts in, not at hyper's keep-alive (30 s): it would
/// hold one of `max_connections` for that long.
#[tokio::test]
async fn an_idle_h2_client_that_ignores_goaway_is_closed() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 300\nmax_connections = 1\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let mut idle = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    // The preface and an empty SETTINGS frame; then nothing, ever.
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    // (Within `HANG`, 10 s: hyper alone would wait 30 s for its ping.)
    assert!(closed_by_proxy(&mut idle).await, "closed");
    let req = request(Method::GET, &p.url("/healthz"), &[], String::new());
    let health = tokio::time::timeout(HANG, send(req)).await.expect("served");
    assert_eq!(health.status, 200);
}

/// A request head over 64 KiB is refused (431), not held and sent on.
#[tokio::test]
async fn a_huge_request_head_is_refused() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let big = "x".repeat(100 << 10);
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-big", &big)],
        chat("m", false),
    ))
    .await;
    assert_eq!(answer.status, 431);
    assert_eq!(up.stats.requests(), 0);
}

/// A request an HTTP/2 client sent just after the proxy's GOAWAY for an
/// idle connection (before it could see it) is taken, and answered whole:
/// the connection is dropped for ignoring the GOAWAY only once it is idle.
#[tokio::test]
async fn a_request_sent_as_an_idle_h2_connection_is_told_to_go_is_answered() {
    let p = proxy(
        "header_read_timeout_ms = 300\n[[upstream]]\nname = \"m\"\nmock = { tokens_per_second = 10 }\n",
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    conn.write_all(&hello).await.unwrap();
    // The next frame's type, flags and stream (None: the connection closed).
    let mut buf = Vec::new();
    let mut next_frame = async |conn: &mut tokio::net::TcpStream| -> Option<(u8, u8, u32)> {
        loop {
            if buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() >= 9 + len {
                    let head = (
                        buf[3],
                        buf[4],
                        u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                    );
                    buf.drain(..9 + len);
                    return Some(head);
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(HANG, conn.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    };
    // Idle: the proxy tells the connection to go.
    while next_frame(&mut conn).await.expect("a GOAWAY").0 != 7 {}
    // A request, as a pooled client sends one before it sees that.
    let literal = |name: &str, value: &str| {
        let mut h = vec![0u8, name.len() as u8];
        h.extend(name.as_bytes());
        h.push(value.len() as u8);
        h.extend(value.as_bytes());
        h
    };
    let body = chat("m", true);
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/v1/chat/completions"),
        (":authority", "x"),
        ("content-type", "application/json"),
        ("x-mock-tokens", "10"),
    ] {
        block.extend(literal(name, value));
    }
    let mut request = frame(1, 0x4, 1, &block);
    request.extend(frame(0, 0x1, 1, body.as_bytes()));
    conn.write_all(&request).await.unwrap();
    // Its answer streams for about a second, past the next timeout, and
    // ends whole.
    loop {
        match next_frame(&mut conn).await {
            Some((0, flags, 1)) if flags & 0x1 != 0 => break,
            Some((3, _, 1)) => panic!("the stream was reset"),
            Some(_) => {}
            None => panic!("the connection was closed before the answer ended"),
        }
    }
}

/// A client that reads a stream slowly but steadily, slower than its
/// upstream writes, is reading: it is not cut, however far the upstream
/// runs ahead (the watch hands hyper the answer in pieces it can see
/// taken).
// Two workers: the unpaced mock streaming flat out into the proxy does not
// hold up the client's reads (as on one thread, on a loaded machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_h2c_reader_is_not_cut() {
    let up = mock_named("m").await;
    // A send timeout with room for a loaded machine's hiccups: the first
    // window (16 KiB) goes out at once, and the proxy is asked for more
    // only once the client has read half of it, two reads and their
    // sleeps later; on a loaded machine those come late (1 s was seen to
    // be too little).
    let p = proxy(&format!(
        "send_timeout_ms = 2000\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16_384)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let post = |headers: &[(&str, &str)]| streamed_chat_h2(p.addr, headers);
    let slow = sender
        .clone()
        .send_request(post(&[("x-mock-tokens", "1000000")]))
        .await
        .expect("a head");
    assert_eq!(slow.status(), 200);
    let mut slow = slow.into_body();
    // Let the upstream run far ahead, then read a frame every 150 ms for
    // several send timeouts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let mut read = 0;
    while started.elapsed() < Duration::from_millis(6000) {
        let frame = tokio::time::timeout(HANG, slow.frame())
            .await
            .expect("a frame in time")
            .expect("not at its end")
            .unwrap_or_else(|e| panic!("cut after {read} bytes: {e}"));
        read += frame.data_ref().map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(up.stats.cancelled(), 0);
    drop(slow);
}

/// A proxy in front of `up` that cuts a client after 300 ms of not reading.
async fn send_timeout_proxy(up: &MockServer) -> TestProxy {
    proxy(&format!(
        "send_timeout_ms = 300\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await
}

/// A cached answer's frames are counted against the answers' budget as long
/// as a coalesced request still holds them, not only until the answer ended:
/// a follower that never reads must not pin answers outside the budget.
#[tokio::test]
async fn frames_a_follower_still_holds_stay_counted_in_the_budget() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "send_timeout_ms = 1500\n{}\n[cache]\nenabled = true\nbackend = \"memory\"\n",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    // A stream of many frames: the follower's client takes a few of them,
    // and the flight keeps them all (for the store, and for requests that
    // join late).
    let body = chat("m", true);
    let headers = [
        ("content-type", "application/json"),
        ("x-mock-tokens", "20000"),
        ("x-mock-latency-ms", "400"),
    ];
    let leader = tokio::spawn(send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &headers,
        body.clone(),
    )));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The follower: its client never reads, and the answer is far larger
    // than what the sockets hold.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut follower = socket.connect(p.addr).await.unwrap();
    let mut req = String::from("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    follower.write_all(req.as_bytes()).await.unwrap();
    let leader = leader.await.unwrap();
    assert_eq!(leader.status, 200);
    assert_eq!(leader.header("x-llm-proxy-cache"), Some("miss"));
    assert!(leader.body.len() > 200_000, "{}", leader.body.len());
    // The leader's answer ended; the follower still holds its frames.
    assert!(gauge(&p, "llm_proxy_buffered_answer_bytes").await > 200_000);
    // Cut by the send timeout, it lets them go.
    wait_answers(&p, 0).await;
    drop(follower);
}

/// A refused event whose pieces came in one read (two chunks of the
/// upstream's, gathered into one frame) is withheld too, with the events
/// before it in the same frame going on.
#[tokio::test]
async fn a_refused_event_in_pieces_read_together_is_withheld() {
    let addr = raw_upstream(|mut conn| async move {
        use tokio::io::AsyncWriteExt;
        if read_request(&mut conn).await.is_none() {
            return;
        }
        let first = "data: {\"choices\":[]}\n\ndata: {not";
        let second = " json\n\n";
        // One write: both chunks reach the proxy in one read.
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{second}\r\n",
            first.len(),
            second.len()
        );
        let _ = conn.write_all(answer.as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let (body, broke) = stream_through(addr).await;
    let body = String::from_utf8_lossy(&body);
    assert_interrupted(&body, broke);
    assert!(body.starts_with("data: {\"choices\":[]}\n\n"), "{body}");
    assert!(!body.contains("{not"), "{body}");
}
