//! Slow, stalled and vanishing peers on either side of the proxy: every one
//! ends in its status, or a clean close, within its timeout, and none makes
//! the proxy hold more than a bounded amount of anything.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::Method;
use tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Read from `conn` until the proxy closes it (EOF or reset) or `within`
/// passes: what came, and whether it was closed.
async fn read_to_close(
    conn: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> (Vec<u8>, bool) {
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (answer, closed)
}

/// Read from `conn` until the proxy closes it (EOF or reset); `false` if it
/// is still open after [`HANG`].
async fn closed_within_hang(conn: &mut tokio::net::tcp::OwnedReadHalf) -> bool {
    read_to_close(conn, HANG).await.1
}

/// Clients that trickle a request head a byte at a time on new connections,
/// as many as `max_connections`: hyper's header timeout is one deadline for
/// the whole head, not a silence between bytes, so each is cut off, and its
/// permit is back for the next client.
#[tokio::test]
async fn trickled_heads_are_cut_off_and_free_their_permits() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 300\nmax_connections = 2\n{}",
        one_upstream(&up.base_url(), "models = [\"m\"]")
    ))
    .await;
    let mut tricklers = Vec::new();
    for _ in 0..2 {
        let conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let (mut read, mut write) = conn.into_split();
        // One byte every 20 ms, far faster than the 300 ms timeout, for
        // ever: a head that never ends.
        let writer = tokio::spawn(async move {
            let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ";
            for byte in head.iter().chain(std::iter::repeat(&b'a')) {
                if write.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tricklers.push(tokio::spawn(async move {
            let closed = closed_within_hang(&mut read).await;
            writer.abort();
            closed
        }));
    }
    for trickler in tricklers {
        assert!(trickler.await.unwrap(), "a trickled head was not cut off");
    }
    let health = send(request(Method::GET, &p.url("/healthz"), &[], "")).await;
    assert_eq!(health.status, 200);
    assert_eq!(up.stats.requests(), 0);
}

/// An upstream that answers every request with `head` (written at once),
/// then keeps the connection open, silent, until the proxy closes it.
async fn answering_then_silent(head: Vec<u8>) -> std::net::SocketAddr {
    let head = Arc::new(head);
    raw_upstream(move |mut conn| {
        let head = head.clone();
        async move {
            if !read_request_head(&mut conn).await {
                return;
            }
            let _ = conn.write_all(&head).await;
            let mut buf = [0u8; 1024];
            while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
        }
    })
    .await
}

async fn chat_via(addr: std::net::SocketAddr, upstream_keys: &str, stream: bool) -> Answer {
    let p = proxy(&one_upstream(
        &format!("http://{addr}/v1"),
        &format!("{upstream_keys}\n[balance]\nmax_retries = 0"),
    ))
    .await;
    post_json(&p.url("/v1/chat/completions"), &chat("m", stream)).await
}

/// A response head the upstream trickles a line at a time, never ending it,
/// is bounded by `first_byte_timeout` as a whole (504); one that is too
/// large or has too many fields is a broken answer (502).
#[tokio::test]
async fn an_endless_or_huge_upstream_head_is_504_or_502() {
    let trickling = raw_upstream(|mut conn| async move {
        if !read_request_head(&mut conn).await {
            return;
        }
        if conn.write_all(b"HTTP/1.1 200 OK\r\n").await.is_err() {
            return;
        }
        // A header line every 50 ms, each well within any idle bound.
        for i in 0u64.. {
            let line = format!("x-trickle-{i}: a\r\n");
            if conn.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let answer = chat_via(
        trickling,
        "first_byte_timeout_ms = 500\nidle_timeout_ms = 200",
        false,
    )
    .await;
    answer.assert_error(504, "timeout_error", "upstream_timeout");

    let mut huge = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n".to_vec();
    while huge.len() < 2 << 20 {
        huge.extend_from_slice(
            format!("x-big-{}: {}\r\n", huge.len(), "a".repeat(1000)).as_bytes(),
        );
    }
    let answer = chat_via(
        answering_then_silent(huge).await,
        "first_byte_timeout_ms = 5000",
        false,
    )
    .await;
    answer.assert_error(502, "upstream_error", "bad_gateway");

    let mut many = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n".to_vec();
    for i in 0..500 {
        many.extend_from_slice(format!("x-h-{i}: a\r\n").as_bytes());
    }
    many.extend_from_slice(b"content-length: 2\r\n\r\n{}");
    let answer = chat_via(
        answering_then_silent(many).await,
        "first_byte_timeout_ms = 5000",
        false,
    )
    .await;
    answer.assert_error(502, "upstream_error", "bad_gateway");
}

/// A non-streamed answer whose head came and whose body then stalls: the
/// client has the head already, so the body fails (a closed connection)
/// after `idle_timeout`, rather than hanging or looking whole.
#[tokio::test]
async fn a_json_body_that_stalls_after_its_head_fails_after_the_idle_timeout() {
    let up = answering_then_silent(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":"
            .to_vec(),
    )
    .await;
    let p = proxy(&one_upstream(
        &format!("http://{up}/v1"),
        "idle_timeout_ms = 200",
    ))
    .await;
    let resp = chat_through(&p, false).await;
    assert_eq!(resp.status(), 200);
    let (body, broke) = read_stream(resp).await;
    assert!(broke, "a cut body must not look whole: {body:?}");
    assert!(body.len() < 100);
}

/// An upstream that writes an endless event stream as fast as it can, and
/// counts the bytes its socket took.
async fn firehose(written: Arc<AtomicU64>, cap: u64) -> std::net::SocketAddr {
    raw_upstream(move |mut conn| {
        let written = written.clone();
        async move {
            if !read_request_head(&mut conn).await {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            if conn.write_all(head).await.is_err() {
                return;
            }
            let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"xxxxxxxxxxxxxxxx\"}}]}\n\n";
            let chunk = format!("{:x}\r\n{event}\r\n", event.len()).repeat(64);
            while written.load(Ordering::Relaxed) < cap {
                if conn.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    })
    .await
}

/// Wait until `written` has not grown for a while (the writer is blocked);
/// its value then. Panics if it reaches `cap` (nothing held it back).
async fn settled(written: &AtomicU64, cap: u64) -> u64 {
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Ordering::Relaxed);
        assert!(now < cap, "the upstream wrote {now} bytes unhindered");
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A client that stops reading a fast stream (well within `send_timeout`):
/// the proxy stops reading the upstream once a bounded amount is queued,
/// over HTTP/1.1 and HTTP/2, rather than buffering the stream in memory.
#[tokio::test]
async fn a_client_that_stops_reading_holds_the_upstream_back() {
    // Kernel socket buffers on loopback take a few MiB each way; an
    // unbounded proxy would take all 256 MiB within the wait.
    const CAP: u64 = 256 << 20;
    const BOUND: u64 = 48 << 20;
    let written = Arc::new(AtomicU64::new(0));
    let up = firehose(written.clone(), CAP).await;
    let p = proxy(&format!(
        "send_timeout_ms = 60000\n{}",
        one_upstream(&format!("http://{up}/v1"), "")
    ))
    .await;

    // HTTP/1.1: read the head, then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(p.addr).await.unwrap();
    let req = raw_chat_post(&chat("m", true));
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(HANG, conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let held = settled(&written, CAP).await;
    assert!(
        held < BOUND,
        "HTTP/1.1: {held} bytes taken from the upstream"
    );
    drop(conn);

    // HTTP/2: the stream's window fills, and nothing is read after it.
    written.store(0, Ordering::Relaxed);
    let (mut sender, _conn) = h2c(p.addr).await;
    let req = http::Request::post(format!("http://{}/v1/chat/completions", p.addr))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(
            "m", true,
        ))))
        .unwrap();
    let unread = tokio::time::timeout(HANG, sender.send_request(req))
        .await
        .unwrap()
        .expect("a head");
    assert_eq!(unread.status(), 200);
    let held = settled(&written, CAP).await;
    assert!(held < BOUND, "HTTP/2: {held} bytes taken from the upstream");
    drop(unread);
}

/// An HTTP/2 client that resets its stream (drops the response) cancels
/// the upstream request, before the head as after it, and the connection
/// goes on serving.
#[tokio::test]
async fn an_h2_stream_reset_cancels_its_upstream_request() {
    let up = paced_mock("slow", 10.0).await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let (mut sender, conn) = h2c(p.addr).await;
    let post = |headers: &[(&str, &str)]| streamed_chat_h2(p.addr, headers);
    // After the head: a 100 s stream, reset after its first frame.
    let resp = sender
        .send_request(post(&[("x-mock-tokens", "1000")]))
        .await
        .expect("a head");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    use http_body_util::BodyExt;
    tokio::time::timeout(HANG, body.frame())
        .await
        .expect("a first frame")
        .expect("a frame")
        .expect("data");
    drop(body);
    eventually("the reset stream's upstream is cancelled", || {
        up.stats.cancelled() == 1 && up.stats.in_flight() == 0
    })
    .await;
    // Before the head: an upstream that takes 100 s to answer.
    let waiting = tokio::spawn({
        let mut sender = sender.clone();
        let req = post(&[("x-mock-latency-ms", "100000")]);
        async move { sender.send_request(req).await }
    });
    eventually("the slow request is upstream", || up.stats.in_flight() == 1).await;
    waiting.abort();
    eventually("the reset request's upstream is dropped", || {
        up.stats.in_flight() == 0
    })
    .await;
    // The connection carries on.
    let again = sender
        .send_request(post(&[("x-mock-tokens", "2")]))
        .await
        .expect("served after the resets");
    let (body, broken) = read_stream(again).await;
    assert!(!broken);
    assert!(String::from_utf8_lossy(&body).contains("data: [DONE]"));
    assert!(!conn.is_finished());
}

/// A connection to `addr` that has had one request (`GET /healthz`)
/// answered, kept alive for the next.
async fn kept_alive(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    conn
}

/// A stream of 1000 tokens at 10 a second (100 s) under way through a proxy
/// with `drain_timeout_secs = drain`: the mock, the proxy and the answer
/// whose body is still coming.
async fn long_stream_with_drain_timeout(
    drain: &str,
) -> (
    MockServer,
    TestProxy,
    hyper::Response<hyper::body::Incoming>,
) {
    let up = paced_mock("slow", 10.0).await;
    let p = proxy(&format!(
        "drain_timeout_secs = {drain}\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let resp = client()
        .request(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-tokens", "1000"),
            ],
            chat("m", true),
        ))
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    (up, p, resp)
}

/// A stream that outlasts the drain timeout is cut when `serve` returns:
/// the client's connection closes and the upstream request is cancelled,
/// rather than both living on after the server said it was done.
#[tokio::test]
async fn a_stream_past_the_drain_timeout_is_closed_when_serve_returns() {
    let (up, mut p, resp) = long_stream_with_drain_timeout("0.3").await;
    p.begin_shutdown();
    p.stop().await.expect("serve returns Ok");
    let (_, broke) = read_stream(resp).await;
    assert!(broke, "a stream cut by the drain must not look whole");
    eventually("the upstream stream is cancelled", || {
        up.stats.cancelled() == 1
    })
    .await;
}

/// A connection in the middle of sending its head when the drain begins is
/// still bounded by the header timeout: the drain ends long before its
/// `drain_timeout`; an idle keep-alive connection is closed at once, while
/// the other still waits.
#[tokio::test]
async fn a_drain_does_not_wait_for_a_half_sent_head_or_an_idle_connection() {
    let up = mock_named("m").await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 60\nheader_read_timeout_ms = 2000\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let idle = kept_alive(p.addr).await;
    let mut buf = vec![0u8; 4096];
    let half = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut half_read, mut half_write) = half.into_split();
    half_write
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.begin_shutdown();
    let (idle_read, _idle_write) = idle.into_split();
    let mut idle_read = idle_read;
    assert!(
        closed_within_hang(&mut idle_read).await,
        "idle connection left open"
    );
    let still_open = half_read.try_read(&mut buf);
    assert!(
        matches!(&still_open, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the idle connection closes first: {still_open:?}"
    );
    assert!(
        closed_within_hang(&mut half_read).await,
        "half-sent head left open"
    );
    p.stop().await.expect("serve returns Ok");
}

/// A client that stops sending a body already streaming to the upstream (a
/// passthrough upload) gets 408, and the upstream request is dropped (its
/// connection closed), not left waiting for the rest.
#[tokio::test]
async fn a_stalled_streamed_upload_is_408_and_its_upstream_request_dropped() {
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let addr = raw_upstream(move |mut conn| {
        let seen = seen_tx.clone();
        async move {
            if !read_request_head(&mut conn).await {
                return;
            }
            let _ = seen.send("head");
            let mut buf = vec![0u8; 8192];
            while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
            let _ = seen.send("closed");
        }
    })
    .await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 300\n{}",
        one_upstream(
            &format!("http://{addr}/v1"),
            "first_byte_timeout_ms = 20000\n[balance]\neject_after_failures = 1"
        )
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let seen = tokio::time::timeout(HANG, seen_rx.recv()).await.unwrap();
    assert_eq!(seen, Some("head"));
    let answer = tokio::time::timeout(HANG, async {
        let (mut answer, mut buf) = (Vec::new(), vec![0u8; 4096]);
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        answer
    })
    .await
    .expect("answered within the bound");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "the 408 says the connection closes: {text}"
    );
    let seen = tokio::time::timeout(HANG, seen_rx.recv()).await.unwrap();
    assert_eq!(seen, Some("closed"), "the upstream request is dropped");
    let readyz = send(request(Method::GET, &p.url("/readyz"), &[], "")).await;
    assert_eq!(
        readyz.status, 200,
        "the client's stall ejected the upstream"
    );
}

/// A body the proxy buffers, sent a byte at a time, steadily enough for
/// the per-read bound, is 408 once it has not come whole within
/// `request_body_timeout_ms`; a passthrough upload at the same pace,
/// streamed on to its upstream, has no such bound.
#[tokio::test]
async fn a_trickled_buffered_body_is_408_at_its_deadline_and_an_upload_is_not() {
    let addr = raw_upstream(|mut conn| async move {
        if let Some((_, body)) = read_request(&mut conn).await {
            let answer = format!("{{\"received\":{}}}", body.len());
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 1000\nrequest_body_timeout_ms = 1500\n{}",
        one_upstream(
            &format!("http://{addr}/v1"),
            "first_byte_timeout_ms = 20000"
        )
    ))
    .await;
    // 30 bytes, one every 200 ms: 6 s in all, never 1 s without a byte.
    let trickle = |head: String, body: &'static [u8]| {
        let addr = p.addr;
        async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(head.as_bytes()).await.unwrap();
            let started = std::time::Instant::now();
            let (mut answer, mut buf) = (Vec::new(), vec![0u8; 4096]);
            let mut pos = 0usize;
            let result = tokio::time::timeout(HANG, async {
                loop {
                    tokio::select! {
                        read = conn.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                answer.extend_from_slice(&buf[..n]);
                                if answer.windows(4).any(|w| w == b"\r\n\r\n")
                                    && answer.ends_with(b"}")
                                {
                                    break;
                                }
                            }
                        },
                        _ = tokio::time::sleep(Duration::from_millis(200)), if pos < body.len() => {
                            if conn.write_all(&body[pos..=pos]).await.is_err() {
                                break;
                            }
                            pos += 1;
                        }
                    }
                }
            })
            .await;
            assert!(result.is_ok(), "answered within the bound");
            (
                String::from_utf8_lossy(&answer).into_owned(),
                started.elapsed(),
            )
        }
    };
    const CHAT: &[u8] = br#"{"model":"m","messages":[]}   "#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        CHAT.len()
    );
    let (text, took) = trickle(head, CHAT).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert!(text.contains("did not come whole within 1500 ms"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "the 408 says the connection closes: {text}"
    );
    assert!(
        took < Duration::from_secs(5),
        "cut at its deadline: {took:?}"
    );

    const FILE: &[u8] = b"0123456789abcdefghijklmnopqrst";
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\n\
         content-length: {}\r\n\r\n",
        FILE.len()
    );
    let (text, took) = trickle(head, FILE).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("{\"received\":30}"), "{text}");
    assert!(took > Duration::from_secs(5), "{took:?}");
}

/// An HTTP/2 request whose body stops coming (no `END_STREAM`) is 408 as
/// on HTTP/1.1, and the connection's other streams are unaffected.
#[tokio::test]
async fn an_h2_body_that_stops_coming_is_408() {
    use http_body_util::BodyExt;
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 300\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let (mut sender, _conn) = h2c(p.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(1);
    let body = http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|frame| (frame, rx))
    }));
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"{\"model\":",
    ))))
    .await
    .unwrap();
    let req = http::Request::post(format!("http://{}/v1/chat/completions", p.addr))
        .header("content-type", "application/json")
        .body(body.boxed())
        .unwrap();
    let resp = tokio::time::timeout(HANG, sender.send_request(req))
        .await
        .expect("answered within the bound")
        .expect("a head");
    assert_eq!(resp.status(), 408);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("\"code\":\"request_timeout\""),
        "{body:?}"
    );
    assert_eq!(up.stats.requests(), 0);
    drop(tx);
}

/// An upstream whose accept queue is full (the SYN goes unanswered) is a
/// connect timeout: 504.
#[tokio::test]
async fn an_upstream_that_never_accepts_is_a_connect_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connect hangs.
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(conn) => fillers.push(conn.unwrap()),
            Err(_elapsed) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    let answer = chat_via(addr, "connect_timeout_ms = 200", false).await;
    answer.assert_error(504, "timeout_error", "upstream_timeout");
    drop((fillers, listener));
}

/// A client that leaves during the drain ends its stream there: the drain
/// does not wait out `drain_timeout` for it, and its upstream request is
/// cancelled.
#[tokio::test]
async fn a_client_that_leaves_during_the_drain_ends_it() {
    let (up, mut p, resp) = long_stream_with_drain_timeout("60").await;
    p.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(p.is_serving(), "the drain waits for the stream");
    drop(resp);
    p.stop().await.expect("serve returns Ok");
    eventually("the upstream stream is cancelled", || {
        up.stats.cancelled() == 1
    })
    .await;
}

/// A kept-alive HTTP/1.1 connection that has sent part of its next request
/// when the drain begins is not idle: the request is read to its end and
/// answered (`connection: close`), then the connection closes, as nginx
/// does. Closed at once, the client would lose a request it had started to
/// send, which it may not retry (a `POST`).
#[tokio::test]
async fn a_request_half_sent_on_a_kept_alive_connection_at_the_drain_is_answered() {
    let up = mock_named("m").await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 10\nheader_read_timeout_ms = 5000\n{}",
        one_upstream(&up.base_url(), "models = [\"m\"]")
    ))
    .await;
    let mut conn = kept_alive(p.addr).await;
    let body = chat("m", false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (first, rest) = req.split_at(30);
    conn.write_all(first.as_bytes()).await.unwrap();
    // The proxy has read the first bytes; then the drain begins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = conn.write_all(rest.as_bytes()).await;
    let (mut read, _write) = conn.into_split();
    let (answer, _) = read_to_close(&mut read, HANG).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.contains("connection: close"), "{text}");
    p.stop().await.expect("serve returns Ok");
}

/// A coalesced stream whose leader's client stays but stops reading: the
/// follower reads the upstream itself and gets the whole answer at once,
/// not a stall for as long as the leader's client stays (here far longer
/// than the test: `send_timeout_ms` at its default); and the leader's
/// client, when it reads again, gets the whole answer too, what the
/// follower read for it included. (Threads of their own for the clients:
/// on one thread shared with a mock streaming at full speed, the
/// follower's client would itself read slowly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_a_leader_that_stops_reading_get_the_whole_stream() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}\n[cache]\nenabled = true\nbackend = \"memory\"\n",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    // About 8 MB of events: past what the leader's socket and hyper's
    // write buffer take (4 MiB of send buffer at most here, and a 4 KiB
    // receive buffer), short of the 16 MiB the leader's queue holds.
    let tokens = "60000";
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut leader = socket.connect(p.addr).await.unwrap();
    let body = chat("m", true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-mock-tokens: {tokens}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    leader.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(HANG, leader.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The leader's client reads no more for now; let its socket fill.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let follower = client()
        .request(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-tokens", tokens),
            ],
            body,
        ))
        .await
        .expect("answered");
    assert_eq!(
        follower
            .headers()
            .get("x-llm-proxy-cache")
            .map(|v| v.as_bytes()),
        Some(&b"hit"[..])
    );
    // ~13 MB through the debug-built proxy: ~3 s idle, past 20 s on a
    // loaded 2-core machine; HANG (10 s) would cut a slow but steady read.
    let (streamed, broken) = read_stream_within(follower, 6 * HANG).await;
    assert!(!broken, "cut after {} bytes", streamed.len());
    assert!(streamed.len() > 6_000_000, "{} bytes", streamed.len());
    let events = sse_data(&streamed);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!((up.stats.requests(), up.stats.cancelled()), (1, 0));
    // The leader's client reads again: the whole answer, to its last chunk.
    let (mut leader_read, _leader_write) = leader.into_split();
    let (rest, _) = read_to_close_or_end(&mut leader_read, b"0\r\n\r\n").await;
    let mut all = buf[..n].to_vec();
    all.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&all);
    let head_end = text.find("\r\n\r\n").unwrap() + 4;
    let dechunked = dechunk(&all[head_end..]);
    assert_eq!(sse_data(&dechunked), events);
}

/// What `read` gives until it closes or what came ends with `end` (each
/// read bounded by [`HANG`]).
async fn read_to_close_or_end(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    end: &[u8],
) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(HANG, read.read(&mut buf))
            .await
            .expect("the leader's answer goes on")
            .unwrap_or(0);
        if n == 0 {
            return (all, true);
        }
        all.extend_from_slice(&buf[..n]);
        if all.ends_with(end) {
            return (all, false);
        }
    }
}

/// The payload of an HTTP/1.1 chunked body.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line]).unwrap(), 16).unwrap();
        body = &body[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// A streamed chat request of `tokens` tokens over a new h2c connection
/// to `addr`: its answer (200) and the connection's future.
async fn h2c_stream(
    addr: std::net::SocketAddr,
    tokens: u32,
) -> (
    http::Response<hyper::body::Incoming>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let (mut sender, conn) = h2c(addr).await;
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-mock-tokens", tokens)
        .body(http_body_util::Full::new(bytes::Bytes::from(chat(
            "m", true,
        ))))
        .unwrap();
    let resp = sender.send_request(req).await.expect("a head");
    assert_eq!(resp.status(), 200);
    (resp, conn)
}

/// An HTTP/2 connection with a stream in flight when the drain begins: the
/// stream runs to its end, then the connection closes and `serve` returns.
#[tokio::test]
async fn a_drain_lets_an_h2_stream_finish_then_closes_its_connection() {
    let up = paced_mock("slow", 20.0).await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 10\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let (resp, conn) = h2c_stream(p.addr, 10).await;
    p.begin_shutdown();
    let (body, broken) = read_stream(resp).await;
    assert!(!broken, "the stream was cut by the drain");
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
    tokio::time::timeout(HANG, conn)
        .await
        .expect("the connection closed after its stream")
        .expect("the connection task")
        .expect("a clean close (GOAWAY)");
    p.stop().await.expect("serve returns Ok");
}

/// The same for the first request of a connection, whose first bytes the
/// proxy reads while still telling HTTP/1 from an HTTP/2 preface: answered,
/// then closed at once (the drain does not wait out `drain_timeout` for it).
#[tokio::test]
async fn a_first_request_half_sent_at_the_drain_is_answered_then_closed() {
    let up = mock_named("m").await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 30\nheader_read_timeout_ms = 5000\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // The proxy has read the first bytes; then the drain begins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = conn.write_all(b"host: x\r\n\r\n").await;
    let (answer, closed) = read_to_close(&mut conn, HANG).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(closed, "the connection is closed once answered");
    p.stop().await.expect("serve returns Ok");
}
/// A half-sent next request answered within one poll of its connection
/// (`/healthz`) is answered, and its connection then closed at once (with
/// no `connection: close`: hyper wrote the answer before it was told), not
/// left open until the drain's cut.
#[tokio::test]
async fn a_next_request_answered_at_once_at_the_drain_closes_its_connection() {
    let up = mock_named("m").await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 30\nheader_read_timeout_ms = 5000\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let mut conn = kept_alive(p.addr).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    // The proxy has read the first bytes; then the drain begins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = conn.write_all(b"host: x\r\n\r\n").await;
    let (answer, closed) = read_to_close(&mut conn, HANG).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(closed, "the connection is closed once answered");
    p.stop().await.expect("serve returns Ok");
}

/// The rest of a half-sent next request that comes in the same turn of the
/// runtime as the drain (the connection's task wakes for both at once) is
/// answered, and the connection then closed at once, whichever of the two
/// the task sees first: not kept alive until its header timeout. Many
/// connections, so that some take and answer the request in the turn that
/// tells them of the drain. The drain begins on a read from a socket, so
/// that the runtime learns of it and of the requests' rest in one poll of
/// its I/O driver.
#[tokio::test]
async fn next_requests_completed_as_the_drain_begins_close_their_connections() {
    let up = mock_named("m").await;
    let settings = llm_proxy::config::Settings::from_str(
        std::path::Path::new("test.toml"),
        &format!(
            "drain_timeout_secs = 30\nheader_read_timeout_ms = 5000\n{}",
            one_upstream(&up.base_url(), "")
        ),
    )
    .expect("test config is valid");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let side = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut bell = tokio::net::TcpStream::connect(side.local_addr().unwrap())
        .await
        .unwrap();
    let (mut ring, _) = side.accept().await.unwrap();
    let proxy = llm_proxy::Proxy::build(settings)
        .await
        .expect("proxy builds");
    let served = tokio::spawn(proxy.serve(listener, async move {
        let _ = ring.read(&mut [0u8; 1]).await;
    }));
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut conn = kept_alive(addr).await;
        conn.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        conns.push(conn);
    }
    // The proxy has read the first bytes; then the drain and the rest come.
    tokio::time::sleep(Duration::from_millis(100)).await;
    bell.write_all(b"!").await.unwrap();
    for conn in &mut conns {
        conn.write_all(b"host: x\r\n\r\n").await.unwrap();
    }
    let answers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            tokio::spawn(async move {
                // Well within the header timeout.
                let (answer, closed) = read_to_close(&mut conn, Duration::from_secs(2)).await;
                (String::from_utf8_lossy(&answer).into_owned(), closed)
            })
        })
        .collect();
    let mut left_open = 0;
    for answer in answers {
        let (text, closed) = answer.await.unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        left_open += usize::from(!closed);
    }
    assert_eq!(left_open, 0, "connections kept alive through the drain");
    tokio::time::timeout(HANG, served)
        .await
        .expect("serve returns")
        .unwrap()
        .expect("serve returns Ok");
}

/// The same over HTTP/2: a stream past the drain timeout is cut when
/// `serve` returns, its connection closed and its upstream request
/// cancelled.
#[tokio::test]
async fn an_h2_stream_past_the_drain_timeout_is_closed_when_serve_returns() {
    let up = paced_mock("slow", 10.0).await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 0.3\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let (resp, conn) = h2c_stream(p.addr, 1000).await;
    p.begin_shutdown();
    p.stop().await.expect("serve returns Ok");
    let (_, broke) = read_stream(resp).await;
    assert!(broke, "a stream cut by the drain must not look whole");
    let _ = tokio::time::timeout(HANG, conn)
        .await
        .expect("the connection closed at the cut");
    eventually("the upstream stream is cancelled", || {
        up.stats.cancelled() == 1
    })
    .await;
}

/// `GET path` on a new connection from `from` (an address of the loopback
/// network): what came before the proxy closed it.
async fn get_from(from: &str, to: std::net::SocketAddr, path: &str) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut conn = socket.connect(to).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    // Refused, the connection may be closed before the write.
    let _ = conn.write_all(head.as_bytes()).await;
    let (answer, closed) = read_to_close(&mut conn, Duration::from_secs(5)).await;
    assert!(closed, "the proxy closed the connection: {answer:?}");
    answer
}

/// `max_connections_per_ip`: a client address past its limit has its new
/// connection closed as it is accepted, unread and unanswered (counted in
/// `/metrics`); another address is served meanwhile, and once one of the
/// address's connections ends, its next is served too.
#[tokio::test]
async fn an_address_past_its_connection_limit_is_closed_at_once() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_connections_per_ip = 2\n{}",
        one_upstream(&up.base_url(), "models = [\"m\"]")
    ))
    .await;
    // Two connections from 127.0.0.1 that send nothing: the header timeout
    // (10 s) would keep them open far longer than the 5 s the refused one
    // is given to be closed in.
    let first = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(get_from("127.0.0.1", p.addr, "/healthz").await, b"");
    // Another address of the loopback network is not held by 127.0.0.1's.
    let metrics = get_from("127.0.0.2", p.addr, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("llm_proxy_connections_refused_total{reason=\"per_ip_limit\"} 1\n"),
        "{metrics}"
    );
    // One of 127.0.0.1's ends: its next connection is served (once the
    // proxy has seen the end: a connection before that is refused).
    drop(first);
    let mut answer = Vec::new();
    for _ in 0..250 {
        answer = get_from("127.0.0.1", p.addr, "/healthz").await;
        if !answer.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

/// A client that goes while sending its body (its HTTP/1 connection
/// closed, its HTTP/2 stream reset) has abandoned the request: counted
/// 499, as one that goes while waiting for its answer is, not as a 400 for
/// a body that could not be read. Nothing went upstream.
#[tokio::test]
async fn a_client_gone_mid_body_is_counted_499() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "models = [\"m\"]")).await;
    let line = "llm_proxy_requests_total{route=\"chat_completions\",status=\"499\",upstream=\"\"} ";
    let abandoned = |metrics: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    let counted = async |n: u64| {
        for _ in 0..250 {
            if abandoned(&p.metrics().await) == n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    // HTTP/1.1: a third of the announced body, then the connection closes.
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 3000\r\n\r\n",
    )
    .await
    .unwrap();
    conn.write_all(&[b' '; 1000]).await.unwrap();
    drop(conn);
    assert!(counted(1).await, "{}", p.metrics().await);
    // HTTP/2: part of the body, then the stream is reset (the connection
    // stays).
    let tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::post("http://x/v1/chat/completions")
        .header("content-type", "application/json")
        .header("content-length", "3000")
        .body(())
        .unwrap();
    let (_answer, mut body) = client.send_request(req, false).unwrap();
    body.send_data(bytes::Bytes::from(vec![b' '; 1000]), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    body.send_reset(h2::Reason::CANCEL);
    assert!(counted(2).await, "{}", p.metrics().await);
    assert_eq!(up.stats.requests(), 0);
    driver.abort();
}

/// The proxy out of file descriptors when it must connect to an upstream:
/// the client gets 503 `server_overloaded` with `retry-after`, at once (no
/// retry: another upstream would fare no better), and the upstream is not
/// blamed — not ejected, `/readyz` still 200 — so the proxy serves as soon
/// as descriptors are free again. (Each test runs in its own process under
/// nextest: the limit lowered here is this test's alone.)
#[tokio::test]
async fn a_proxy_out_of_file_descriptors_answers_503_and_blames_no_upstream() {
    let up = mock_named("up").await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"{}\"\n\
         [balance]\neject_after_failures = 1\nmax_retries = 2\n",
        up.base_url()
    ))
    .await;
    out_of_descriptors_is_503_and_no_failure(&p).await;
}

/// The same, for an upstream named by a host name: the lookup, out of
/// descriptors, fails as a name not found, and is still no failure of the
/// upstream's.
#[tokio::test]
async fn out_of_descriptors_a_name_lookup_blames_no_upstream() {
    let up = mock_named("up").await;
    let url = up.base_url().replace("127.0.0.1", "localhost");
    let p = proxy(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"{url}\"\n\
         [balance]\neject_after_failures = 1\nmax_retries = 2\n"
    ))
    .await;
    out_of_descriptors_is_503_and_no_failure(&p).await;
}

/// Uploads over one HTTP/2 connection that an upstream is slow to read
/// (passthrough streams them) do not take the connection's whole receive
/// window: a chat request on the same connection still sends its body and
/// is answered (it got a 408 blaming the client when two stalled uploads
/// held the window, the connection's as large as one stream's).
#[tokio::test]
async fn stalled_uploads_do_not_starve_other_streams_of_the_window() {
    let stalled = raw_upstream(|mut conn| async move {
        // The head, then nothing read for longer than the test.
        let _ = read_request_head(&mut conn).await;
        tokio::time::sleep(HANG).await;
    })
    .await;
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "request_body_timeout_ms = 3000\nmax_body_bytes = 67108864\n\
         [[upstream]]\nname = \"files\"\nurl = \"http://{stalled}/v1\"\nmodels = [\"none\"]\n\
         [[upstream]]\nname = \"chat\"\nurl = \"{}\"\nmodels = [\"m\"]\n",
        up.base_url()
    ))
    .await;
    let (sender, _conn) = h2c(p.addr).await;
    let upload = |sender: &hyper::client::conn::http2::SendRequest<_>| {
        let mut sender = sender.clone();
        let req = http::Request::post(format!("http://{}/v1/files", p.addr))
            .header("content-type", "application/octet-stream")
            .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                b'x';
                16 << 20
            ])))
            .unwrap();
        tokio::spawn(async move { sender.send_request(req).await })
    };
    let uploads = [upload(&sender), upload(&sender)];
    // (Time for both to fill what they can.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sender = sender.clone();
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "y".repeat(30 << 10)
    );
    let req = http::Request::post(format!("http://{}/v1/chat/completions", p.addr))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let answer = tokio::time::timeout(HANG, sender.send_request(req))
        .await
        .expect("answered")
        .expect("a head");
    assert_eq!(answer.status(), 200);
    for upload in uploads {
        upload.abort();
    }
}
