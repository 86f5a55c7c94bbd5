//! Token accounting over real sockets: what each request is charged, and
//! what is given back. A reservation above the limit is settled against what
//! it charged (the whole limit), never against the raw estimate; endpoints
//! that run no model are not charged tokens; an upstream error answer is
//! refunded.

use std::time::Duration;

use http::Method;
use tests::redis_server::RedisServer;
use tests::*;

const KEY: &str = "Bearer sk-t";

/// Every API served natively, so each request reaches the mock upstream.
const APIS: &str = "models = [\"small\"]\n\
    apis = [\"chat_completions\", \"completions\", \"embeddings\", \"responses\", \"messages\"]";

/// A mock upstream and a proxy whose key `sk-t` has `tpm` tokens per minute;
/// `auth_extra` goes into the `[auth]` section (e.g. a Redis backend).
async fn setup(tpm: u32, auth_extra: &str) -> (MockServer, TestProxy) {
    let up = mock_named("m").await;
    let toml = format!(
        "{}\n[auth]\n{auth_extra}\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = {tpm}\n",
        one_upstream(&up.base_url(), APIS)
    );
    (up, proxy(&toml).await)
}

/// POST `body` to `path` with the key, and `extra` headers.
async fn post(p: &TestProxy, path: &str, extra: &[(&str, &str)], body: String) -> Answer {
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", KEY),
        ("anthropic-version", "2023-06-01"),
    ];
    headers.extend_from_slice(extra);
    send(request(Method::POST, &p.url(path), &headers, body)).await
}

/// A chat request with about `prompt` tokens of prompt by the proxy's
/// estimator (bytes / 4).
fn chat_body(prompt: usize, max_tokens: u64) -> String {
    serde_json::json!({"model": "small", "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "x ".repeat(prompt * 2)}]})
    .to_string()
}

/// A Messages `count_tokens` request of about `prompt` tokens.
fn count_body(prompt: usize) -> String {
    serde_json::json!({"model": "small",
        "messages": [{"role": "user", "content": "x ".repeat(prompt * 2)}]})
    .to_string()
}

fn remaining_tokens(a: &Answer) -> u32 {
    a.header("x-ratelimit-remaining-tokens")
        .expect("token headers on a limited key")
        .parse()
        .expect("a number")
}

/// The key's remaining tokens, read from a tiny `count_tokens` request once
/// `cond` holds on it (a response is settled just after the client read it,
/// and on Redis in the background).
async fn remaining_once(p: &TestProxy, cond: impl Fn(u32) -> bool) -> u32 {
    let mut last = None;
    for _ in 0..100 {
        let a = post(p, "/v1/messages/count_tokens", &[], count_body(1)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let r = remaining_tokens(&a);
        if cond(r) {
            return r;
        }
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("remaining tokens never met the condition (last {last:?})");
}

/// `r`, read after `left` was read at `since`, is `left` plus at most what the
/// limit gave back meanwhile (one token every 60 ms at 1000 a minute): a
/// charge of the request in between would have dropped it.
fn nothing_charged(r: u32, left: u32, since: std::time::Instant, what: &str) {
    let refilled = u32::try_from(since.elapsed().as_millis() / 60).unwrap_or(u32::MAX) + 1;
    assert!(
        (left..=left.saturating_add(refilled)).contains(&r),
        "{what}: {r} left, {left} before"
    );
}

/// tpm 1000, ~600 prompt tokens and `max_tokens: 1000000`: the first request
/// is charged the whole limit and settled at its real usage (~610), so the
/// next ones, again charged the whole limit, are refused.
async fn oversized_reservations_cannot_refill_the_bucket(auth_extra: &str) {
    let (_up, p) = setup(1000, auth_extra).await;
    let body = chat_body(600, 1_000_000);
    let first = post(&p, "/v1/chat/completions", &[], body.clone()).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(remaining_tokens(&first), 0, "charged the whole limit");
    // Settled: the real usage (~610: the prompt and 8 completion tokens)
    // stays charged. Refunding against the uncharged estimate would leave a
    // full bucket.
    let left = remaining_once(&p, |r| r > 0).await;
    let since = std::time::Instant::now();
    assert!((300..=400).contains(&left), "{left} left after ~610 used");
    for _ in 0..3 {
        let next = post(&p, "/v1/chat/completions", &[], body.clone()).await;
        next.assert_error(429, "rate_limit_error", "rate_limit_exceeded");
        nothing_charged(remaining_tokens(&next), left, since, "a 429");
    }
}

#[tokio::test]
async fn oversized_max_tokens_is_settled_against_its_charge() {
    oversized_reservations_cannot_refill_the_bucket("").await;
}

#[tokio::test]
async fn oversized_max_tokens_is_settled_against_its_charge_on_redis() {
    let redis = RedisServer::start().await;
    let auth = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"acct:\"",
        redis.url()
    );
    oversized_reservations_cannot_refill_the_bucket(&auth).await;
}

#[tokio::test]
async fn counting_tokens_costs_no_tokens() {
    let (up, p) = setup(1000, "").await;
    // ~2 KB each: charged the estimate (~512 + 256) they would not fit twice.
    for path in ["/v1/messages/count_tokens", "/v1/responses/input_tokens"] {
        for _ in 0..3 {
            let body = serde_json::json!({"model": "small", "input": "x ".repeat(1024),
                "messages": [{"role": "user", "content": "x ".repeat(1024)}]})
            .to_string();
            let a = post(&p, path, &[], body).await;
            assert_eq!(a.status, 200, "{path}: {}", a.text());
            assert!(
                a.json()["input_tokens"].as_u64().is_some(),
                "{path}: answered by the upstream"
            );
            assert_eq!(remaining_tokens(&a), 1000, "{path}");
        }
    }
    assert_eq!(up.stats.requests(), 6);
}

#[tokio::test]
async fn reading_a_stored_response_does_not_charge_it_again() {
    let (_up, p) = setup(1000, "").await;
    let body =
        serde_json::json!({"model": "small", "input": "hi", "max_output_tokens": 50}).to_string();
    let created = post(&p, "/v1/responses", &[], body).await;
    assert_eq!(created.status, 200, "{}", created.text());
    let id = created.json()["id"]
        .as_str()
        .expect("a response id")
        .to_owned();
    let left = remaining_once(&p, |r| r > 950).await;
    let since = std::time::Instant::now();
    for _ in 0..3 {
        let read = send(request(
            Method::GET,
            &p.url(&format!("/v1/responses/{id}")),
            &[("authorization", KEY)],
            "",
        ))
        .await;
        assert_eq!(read.status, 200, "{}", read.text());
        assert!(
            read.json()["usage"].is_object(),
            "the stored usage comes back"
        );
        nothing_charged(remaining_tokens(&read), left, since, "a read");
    }
    nothing_charged(
        remaining_once(&p, |_| true).await,
        left,
        since,
        "after the reads",
    );
}

#[tokio::test]
async fn an_upstream_error_answer_gives_the_reservation_back() {
    for status in ["400", "500"] {
        let (_up, p) = setup(2000, "").await;
        let failed = post(
            &p,
            "/v1/chat/completions",
            &[("x-mock-fail", status)],
            chat_body(5, 1500),
        )
        .await;
        assert_eq!(failed.status.as_str(), status, "{}", failed.text());
        assert!(remaining_tokens(&failed) < 500, "reserved while in flight");
        // The upstream generated nothing: the whole reservation comes back.
        remaining_once(&p, |r| r == 2000).await;
        let ok = post(&p, "/v1/chat/completions", &[], chat_body(5, 1500)).await;
        assert_eq!(ok.status, 200, "after a {status}: {}", ok.text());
    }
}

/// Each of `n` completions is generated whole: the reservation is the cap
/// times `n`, so that concurrent `n > 1` requests cannot all run at once
/// under a limit one of them fills.
#[tokio::test]
async fn a_request_for_n_completions_reserves_n_caps() {
    let (_up, p) = setup(1000, "").await;
    let mut body: serde_json::Value = serde_json::from_str(&chat_body(5, 10)).unwrap();
    body["n"] = 50.into();
    let answer = post(&p, "/v1/chat/completions", &[], body.to_string()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let left = remaining_tokens(&answer);
    assert!(
        left <= 500,
        "50 completions of 10 reserved: {left} of 1000 left"
    );
}

/// Each prompt of a completions `prompt` array is generated for: the
/// reservation is the cap times the prompts, as for `n` (a list of 50
/// prompts was reserved as one).
#[tokio::test]
async fn a_completions_prompt_list_reserves_a_cap_per_prompt() {
    let (_up, p) = setup(1000, "").await;
    let prompts: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let body = serde_json::json!({"model": "small", "max_tokens": 10, "prompt": prompts});
    let answer = post(&p, "/v1/completions", &[], body.to_string()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let left = remaining_tokens(&answer);
    assert!(
        left <= 500,
        "50 prompts of 10 reserved: {left} of 1000 left"
    );
}

/// An embedding generates nothing: its reservation is its prompt alone,
/// not a completion's 256 tokens (three small embeddings at once were
/// refused under a 400-token limit).
#[tokio::test]
async fn an_embedding_reserves_its_prompt_alone() {
    let (_up, p) = setup(1000, "").await;
    let body = serde_json::json!({"model": "small", "input": "hello", "n": 4});
    let answer = post(&p, "/v1/embeddings", &[], body.to_string()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let left = remaining_tokens(&answer);
    assert!(
        left >= 980,
        "a prompt of ~12 tokens reserved: {left} of 1000 left"
    );
}

/// A Messages stream cut after `message_start` (input + 1 output token)
/// but before `message_delta` keeps its reservation, as a chat stream cut
/// before its usage does: `message_start`'s count is only a floor.
#[tokio::test]
async fn a_cut_messages_stream_keeps_its_reservation() {
    let (_up, p) = setup(2000, "").await;
    let body = serde_json::json!({"model": "small", "max_tokens": 1500, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let req = request(
        Method::POST,
        &p.url("/v1/messages"),
        &[
            ("content-type", "application/json"),
            ("authorization", KEY),
            ("anthropic-version", "2023-06-01"),
            ("x-mock-tokens", "1500"),
            ("x-mock-fail", "drop"),
            ("x-mock-drop-after", "1000"),
        ],
        body,
    );
    let resp = client().request(req).await.expect("sent");
    assert_eq!(resp.status(), 200);
    let (data, _broke) = read_stream(resp).await;
    let deltas = String::from_utf8_lossy(&data)
        .matches("event: content_block_delta")
        .count();
    assert!(deltas > 900, "the client got {deltas} tokens");
    // ~1500+ reserved; the client received ~1000 tokens.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left = remaining_once(&p, |_| true).await;
    assert!(
        left < 1100,
        "only {} charged for {deltas} tokens delivered",
        2000 - left
    );
}

/// Anthropic counts prompt read from (or written to) its prompt cache apart
/// from `input_tokens`: a token limit counts it too, streamed or not.
#[tokio::test]
async fn anthropic_prompt_cache_tokens_count_against_the_limit() {
    let addr = sse_upstream(|body| {
        let stream = String::from_utf8_lossy(body).contains("\"stream\":true");
        let usage = r#"{"input_tokens":3,"cache_read_input_tokens":4000,"cache_creation_input_tokens":1000,"output_tokens":5}"#;
        if stream {
            (200, format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"small\",\"content\":[],\"usage\":{usage}}}}}\n\n\
                 event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\"}},\"usage\":{{\"output_tokens\":5}}}}\n\n\
                 event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n"
            ))
        } else {
            (200, format!(
                "{{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"small\",\"content\":[{{\"type\":\"text\",\"text\":\"hi\"}}],\"stop_reason\":\"end_turn\",\"usage\":{usage}}}"
            ))
        }
    })
    .await;
    let toml = format!(
        "[[upstream]]\nname = \"claude\"\nurl = \"http://{addr}/v1\"\nmodels = [\"small\"]\napis = [\"messages\"]\n\
         [auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 20000\n"
    );
    let p = proxy(&toml).await;
    for stream in [true, false] {
        let before = remaining_once(&p, |_| true).await;
        let body = serde_json::json!({"model": "small", "max_tokens": 10, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
        let a = post(&p, "/v1/messages", &[], body).await;
        assert_eq!(a.status, 200, "{}", a.text());
        // 5003 input and 5 output: the reservation (~40) is settled at 5008
        // (less what the limit gave back meanwhile, 333 a second).
        let left = remaining_once(&p, |r| r + 4000 < before).await;
        let charged = before - left;
        assert!(
            (4900..=5010).contains(&charged),
            "stream {stream}: {charged} charged"
        );
    }
}

/// A non-streamed answer larger than the 1 MiB the auth layer keeps whole
/// is still charged its usage (read from its end), and a key overdrawn by it
/// may still count tokens (which costs none), on both backends.
async fn a_large_answer_is_charged_its_usage(auth_extra: &str) {
    let (_up, p) = setup(1000, auth_extra).await;
    let body = serde_json::json!({"model": "small",
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let a = post(
        &p,
        "/v1/chat/completions",
        &[("x-mock-tokens", "200000")],
        body,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.len() > 1 << 20, "{} bytes", a.body.len());
    assert_eq!(a.json()["usage"]["completion_tokens"], 200_000);
    // Reserved ~260; settled at 200k, far beyond the minute's 1000.
    let left = remaining_once(&p, |r| r == 0).await;
    assert_eq!(left, 0);
    let next = post(&p, "/v1/chat/completions", &[], chat_body(1, 5)).await;
    assert_eq!(next.status, 429, "{}", next.text());
}

#[tokio::test]
async fn a_large_answer_is_charged_its_usage_locally() {
    a_large_answer_is_charged_its_usage("").await;
}

#[tokio::test]
async fn a_large_answer_is_charged_its_usage_on_redis() {
    let redis = RedisServer::start().await;
    let auth = format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"big-answer:\"",
        redis.url()
    );
    a_large_answer_is_charged_its_usage(&auth).await;
}

/// A client that hangs up on a stream without `max_tokens` (reserved 256
/// output tokens) after receiving far more is charged what it received.
#[tokio::test]
async fn a_stream_the_client_leaves_is_charged_at_least_what_it_delivered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = paced_mock("m", 2000.0).await;
    let toml = format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 3000\n",
        one_upstream(&up.base_url(), APIS)
    );
    let p = proxy(&toml).await;
    for (path, body, delta) in [
        (
            "/v1/chat/completions",
            serde_json::json!({"model": "small", "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}),
            "\"content\"",
        ),
        (
            "/v1/responses",
            serde_json::json!({"model": "small", "stream": true, "input": "hi"}),
            "event: response.output_text.delta",
        ),
    ] {
        let before = remaining_once(&p, |_| true).await;
        let body = body.to_string();
        let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             authorization: {KEY}\r\nx-mock-tokens: 100000\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(format!("{head}{body}").as_bytes())
            .await
            .unwrap();
        let mut seen = 0;
        let mut buf = vec![0u8; 64 << 10];
        while seen < 800 {
            let n = tokio::time::timeout(HANG, conn.read(&mut buf))
                .await
                .expect("streaming")
                .unwrap();
            assert!(n > 0, "{path}: the stream ended");
            seen += String::from_utf8_lossy(&buf[..n]).matches(delta).count();
        }
        drop(conn);
        // Reserved ~270; 800+ delivered: the key is charged those (less the
        // 50 a second the limit gives back).
        let left = remaining_once(&p, |r| r + 600 < before).await;
        assert!(before - left >= 650, "{path}: {} charged", before - left);
    }
}

/// A proxy whose key `sk-t` has 10,000 tokens a minute, in front of an
/// upstream that answers every request with the JSON `body`.
async fn answering(body: &'static str) -> TestProxy {
    use tokio::io::AsyncWriteExt;
    let addr = raw_upstream(move |mut conn| async move {
        if read_request(&mut conn).await.is_none() {
            return;
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(body.as_bytes()).await;
    })
    .await;
    proxy(&format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 10000\n",
        one_upstream(&format!("http://{addr}/v1"), APIS)
    ))
    .await
}

/// A JSON answer is generated whole before its head, and its `usage` is at
/// its end: a client that reads its start and hangs up is charged that
/// usage (the proxy reads on for it), not only the reservation.
#[tokio::test]
async fn a_json_answer_the_client_leaves_is_charged_its_usage() {
    use tokio::io::AsyncReadExt;
    // Far past what socket buffers hold between the proxy and a client
    // that stopped reading.
    let filler = "x".repeat(16 << 20);
    let body: &'static str = format!(
        r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"{filler}"}}}}],"usage":{{"prompt_tokens":10,"completion_tokens":50000,"total_tokens":50010}}}}"#
    )
    .leak();
    let p = answering(body).await;
    let mut conn = raw_chat(
        &p,
        r#"{"model":"small","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    // The head and the start of the answer, then the client goes.
    let mut got = 0usize;
    let mut buf = vec![0u8; 16 << 10];
    tokio::time::timeout(HANG, async {
        while got < 256 << 10 {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the answer comes");
            got += n;
        }
    })
    .await
    .expect("the start of the answer");
    drop(conn);
    // 50,010 tokens generated against 10,000 a minute: nothing left.
    remaining_once(&p, |r| r == 0).await;
}

/// vLLM writes `prompt_logprobs` after `usage`, and they can run to
/// megabytes: the usage of a large answer is read wherever it stands, not
/// only in its last bytes.
#[tokio::test]
async fn a_large_answer_whose_usage_is_not_at_its_end_is_charged_it() {
    let logprobs: Vec<serde_json::Value> = (0..40_000)
        .map(|i| serde_json::json!({"1234": {"logprob": -1.5, "rank": i, "decoded_token": "tok"}}))
        .collect();
    // Written in vLLM's order (`json!` would sort the keys).
    let body: &'static str = format!(
        r#"{{"id":"c","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"hi"}}}}],"usage":{{"prompt_tokens":10,"completion_tokens":50000,"total_tokens":50010}},"prompt_logprobs":{}}}"#,
        serde_json::Value::from(logprobs)
    )
    .leak();
    assert!(body.len() > 2 << 20, "{} bytes", body.len());
    let p = answering(body).await;
    let answer = post(&p, "/v1/chat/completions", &[], chat_body(1, 5)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body.len(), body.len());
    remaining_once(&p, |r| r == 0).await;
}

/// The proxy asks for the usage chunk on the key's behalf and strips it:
/// an upstream whose writes never line up with its events (each ends one
/// delta and starts the next) still reaches the client delta by delta, not
/// only when the stream ends.
#[tokio::test]
async fn a_stream_whose_frames_never_end_on_an_event_streams_through_the_usage_filter() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DELTA: &str =
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"}}]}\n\n";
    let addr = raw_upstream(|mut conn| async move {
        if read_request(&mut conn).await.is_none() {
            return;
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        let _ = conn.write_all(head.as_bytes()).await;
        let (start, end) = DELTA.split_at(DELTA.len() - 7);
        let mut piece = start.to_owned();
        for _ in 0..20 {
            let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
            if conn.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            piece = format!("{end}{start}");
        }
        // Then the upstream goes quiet, the stream open.
        std::future::pending::<()>().await;
    })
    .await;
    let p = proxy(&format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 10000\n",
        one_upstream(&format!("http://{addr}/v1"), APIS)
    ))
    .await;
    let mut conn = raw_chat(
        &p,
        r#"{"model":"small","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    let mut seen = String::new();
    let mut buf = vec![0u8; 16 << 10];
    tokio::time::timeout(Duration::from_secs(5), async {
        while seen.matches("\"tok\"").count() < 19 {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the deltas did not come while the stream is open: {seen:?}"));
}

/// A chat completion `request` written on a raw connection to `p` with the
/// test key: the connection, for a test to read (or drop) as a client would.
async fn raw_chat(p: &TestProxy, request: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{request}",
        request.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn
}

/// What a hostile or broken upstream says of usage does not overcharge a
/// key: a count past any context window is no usage (the reservation is
/// charged), usage sent after a stream's last event is not counted, and a
/// Responses stream that ends `response.completed` but says it is
/// `incomplete` is not cached.
#[tokio::test]
async fn an_upstreams_implausible_or_late_usage_is_not_charged() {
    let up = sse_upstream(|body| {
        let body = String::from_utf8_lossy(body);
        let text = if body.contains("huge") {
            let max = u64::MAX;
            format!(
                r#"{{"id":"c1","object":"chat.completion","created":1,"model":"small","choices":[{{"index":0,"finish_reason":"stop","message":{{"role":"assistant","content":"hi"}}}}],"usage":{{"prompt_tokens":{max},"completion_tokens":{max},"total_tokens":{max}}}}}"#
            )
        } else if body.contains("late") {
            [
                r#"data: {"id":"c2","choices":[{"index":0,"delta":{"content":"hi"}}]}"#,
                r#"data: {"id":"c2","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                "data: [DONE]",
                r#"data: {"id":"c2","choices":[],"usage":{"prompt_tokens":30000,"completion_tokens":30000,"total_tokens":60000}}"#,
            ]
            .map(|e| format!("{e}\n\n"))
            .concat()
        } else {
            [
                r#"event: response.created
data: {"type":"response.created","response":{"id":"resp_i1","status":"in_progress","output":[]}}"#,
                r#"event: response.completed
data: {"type":"response.completed","response":{"id":"resp_i1","status":"incomplete","incomplete_details":{"reason":"max_output_tokens"},"output":[],"usage":{"input_tokens":1,"output_tokens":1}}}"#,
            ]
            .map(|e| format!("{e}\n\n"))
            .concat()
        };
        (200, text)
    })
    .await;
    let p = proxy(&format!(
        "{}\n[cache]\nbackend = \"memory\"\n[auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 20000\n",
        one_upstream(&format!("http://{up}/v1"), APIS)
    ))
    .await;
    let chat = |content: &str, stream: bool| {
        serde_json::json!({"model": "small", "max_tokens": 10, "stream": stream,
            "messages": [{"role": "user", "content": content}]})
        .to_string()
    };
    let huge = post(
        &p,
        "/v1/chat/completions",
        &[("cache-control", "no-store")],
        chat("huge", false),
    )
    .await;
    assert_eq!(huge.status, 200, "{}", huge.text());
    // Data after `[DONE]` breaks the stream for the client; the usage in
    // it is not counted.
    let late = client()
        .request(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("authorization", KEY),
                ("cache-control", "no-store"),
            ],
            chat("late", true),
        ))
        .await
        .unwrap();
    assert_eq!(late.status(), 200);
    let (_, broke) = read_stream(late).await;
    assert!(broke);
    // Charged two reservations (tens of tokens), not a year, nor 60,000.
    let left = remaining_once(&p, |r| r < 20000).await;
    assert!(left > 19000, "{left} left");
    let next = post(
        &p,
        "/v1/chat/completions",
        &[("cache-control", "no-store")],
        chat("huge", false),
    )
    .await;
    assert_eq!(next.status, 200, "{}", next.text());
    // Capped, and said so in its last event: never stored.
    let responses =
        serde_json::json!({"model": "small", "input": "capped", "stream": true, "store": false})
            .to_string();
    for _ in 0..2 {
        let a = post(&p, "/v1/responses", &[], responses.clone()).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-llm-proxy-cache"), Some("miss"));
    }
}
