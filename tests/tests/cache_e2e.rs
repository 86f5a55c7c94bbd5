//! The response cache in the proxy binary's stack, over real sockets with the
//! mock upstream counting its calls: `[cache]` with the memory and the Redis
//! backend.

use std::time::Duration;

use http::Method;
use tests::redis_server::RedisServer;
use tests::*;

const CHAT_PATH: &str = "/v1/chat/completions";

fn config(upstream: &str, cache: &str) -> String {
    format!(
        "{}\n[cache]\nenabled = true\n{cache}\n",
        one_upstream(upstream, "")
    )
}

fn memory(upstream: &str) -> String {
    config(
        upstream,
        "backend = \"memory\"\nmax_entries = 1000\nmax_bytes = 1048576\nttl_secs = 60\n",
    )
}

fn redis(upstream: &str, url: &str) -> String {
    config(
        upstream,
        &format!(
            "backend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"e2e:\"\nttl_secs = 60\n"
        ),
    )
}

/// POST JSON with extra headers.
async fn post(url: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(request(Method::POST, url, &all, body.to_owned())).await
}

fn upstream_calls(up: &MockServer) -> u64 {
    up.stats.requests_for(CHAT_PATH)
}

#[tokio::test]
async fn identical_requests_hit_after_a_miss() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let first = post_json(&p.url(CHAT_PATH), &chat("m", false)).await;
    assert_eq!(
        (first.status.as_u16(), first.header("x-llm-proxy-cache")),
        (200, Some("miss"))
    );
    let reordered = r#"{ "messages": [{"content": "Say something deterministic.", "role": "user"}],
        "stream": false, "model": "m" }"#;
    let second = post_json(&p.url(CHAT_PATH), reordered).await;
    assert_eq!(second.header("x-llm-proxy-cache"), Some("hit"));
    assert_eq!(second.header("age"), Some("0"));
    assert_eq!(second.body, first.body, "the same answer, usage included");
    let changed = chat("m", false).replace("deterministic", "else");
    assert_eq!(
        post_json(&p.url(CHAT_PATH), &changed)
            .await
            .header("x-llm-proxy-cache"),
        Some("miss")
    );
    assert_eq!(upstream_calls(&up), 2);
}

#[tokio::test]
async fn a_streamed_hit_replays_the_chunks() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let first = post_json(&p.url(CHAT_PATH), &chat("m", true)).await;
    let second = post_json(&p.url(CHAT_PATH), &chat("m", true)).await;
    assert_eq!(
        (
            first.header("x-llm-proxy-cache"),
            second.header("x-llm-proxy-cache")
        ),
        (Some("miss"), Some("hit"))
    );
    assert_eq!(sse_data(&second.body), sse_data(&first.body));
    assert_eq!(
        sse_data(&first.body).last().map(String::as_str),
        Some("[DONE]")
    );
    // The client did not ask for usage: no usage chunk, though one is stored.
    assert!(!first.text().contains("\"usage\":{"), "{}", first.text());
    let with_usage = chat("m", true).replace(
        "\"stream\":true",
        "\"stream\":true,\"stream_options\":{\"include_usage\":true}",
    );
    let asked = post_json(&p.url(CHAT_PATH), &with_usage).await;
    assert_eq!(asked.header("x-llm-proxy-cache"), Some("hit"));
    assert!(
        sse_data(&asked.body)
            .iter()
            .any(|d| d.contains("\"choices\":[]") && d.contains("\"usage\""))
    );
    assert_eq!(upstream_calls(&up), 1);
}

#[tokio::test]
async fn eight_concurrent_identical_requests_reach_the_upstream_once() {
    let up = mock(MockConfig {
        latency: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await;
    let p = proxy(&memory(&up.base_url())).await;
    for stream in [false, true] {
        let url = p.url(CHAT_PATH);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { post_json(&url, &chat("m", stream)).await })
            })
            .collect();
        let mut bodies = Vec::new();
        for task in tasks {
            let answer = task.await.expect("request task");
            assert_eq!(answer.status, 200);
            bodies.push(answer.body);
        }
        assert!(bodies.iter().all(|b| b == &bodies[0]), "identical answers");
    }
    assert_eq!(upstream_calls(&up), 2, "one call streamed, one not");
}

/// The requests coalesced on a JSON answer announce its length, as the
/// leader's answer and a stored hit do (not a chunked body of unknown
/// length).
#[tokio::test]
async fn coalesced_json_answers_carry_their_length() {
    let up = mock(MockConfig {
        latency: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await;
    let p = proxy(&memory(&up.base_url())).await;
    let url = p.url(CHAT_PATH);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post_json(&url, &chat("m", false)).await })
        })
        .collect();
    let mut hits = 0;
    for task in tasks {
        let answer = task.await.expect("request task");
        assert_eq!(answer.status, 200);
        hits += usize::from(answer.header("x-llm-proxy-cache") == Some("hit"));
        let length = answer.header("content-length").map(str::to_owned);
        assert_eq!(length, Some(answer.body.len().to_string()), "{answer:?}");
    }
    assert_eq!((hits, upstream_calls(&up)), (2, 1));
}

#[tokio::test]
async fn failures_are_not_stored() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let failed = post(
        &p.url(CHAT_PATH),
        &chat("m", false),
        &[("x-mock-fail", "500")],
    )
    .await;
    assert_eq!(failed.status, 500);
    let broken = client()
        .request(request(
            Method::POST,
            &p.url(CHAT_PATH),
            &[
                ("content-type", "application/json"),
                ("x-mock-fail", "drop"),
            ],
            chat("m", true),
        ))
        .await
        .expect("response head");
    let (broken, cut) = read_stream(broken).await;
    assert!(cut, "the broken stream closes the connection");
    assert!(!String::from_utf8_lossy(&broken).contains("[DONE]"));
    // (The 500 was retried by the balancer; what matters is that nothing was
    // stored: both requests below go upstream.)
    let before = upstream_calls(&up);
    assert_eq!(
        post_json(&p.url(CHAT_PATH), &chat("m", false))
            .await
            .header("x-llm-proxy-cache"),
        Some("miss")
    );
    assert_eq!(
        post_json(&p.url(CHAT_PATH), &chat("m", true))
            .await
            .header("x-llm-proxy-cache"),
        Some("miss")
    );
    assert_eq!(upstream_calls(&up), before + 2);
}

#[tokio::test]
async fn cache_control_and_scopes() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let url = p.url(CHAT_PATH);
    let body = chat("m", false);
    let alice = ("authorization", "Bearer alice");
    assert_eq!(
        post(&url, &body, &[alice, ("cache-control", "no-store")])
            .await
            .header("x-llm-proxy-cache"),
        Some("bypass")
    );
    assert_eq!(
        post(&url, &body, &[alice])
            .await
            .header("x-llm-proxy-cache"),
        Some("miss")
    );
    assert_eq!(
        post(&url, &body, &[alice])
            .await
            .header("x-llm-proxy-cache"),
        Some("hit")
    );
    assert_eq!(
        post(&url, &body, &[alice, ("cache-control", "no-cache")])
            .await
            .header("x-llm-proxy-cache"),
        Some("bypass")
    );
    // Once the no-cache answer is stored and has aged past 0 ms, max-age=0
    // refuses it. (While its flight is still open, a follower would get the
    // brand-new answer, which is of age 0 and so acceptable.)
    let stored = || {
        let url = p.url("/metrics");
        async move {
            let text = send(request(Method::GET, &url, &[], "")).await.text();
            text.contains(r#"llm_proxy_cache_events_total{event="store"} 2"#)
        }
    };
    for _ in 0..500 {
        if stored().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        post(&url, &body, &[alice, ("cache-control", "max-age=0")])
            .await
            .header("x-llm-proxy-cache"),
        Some("miss")
    );
    // per_key (the default): another caller has entries of its own.
    assert_eq!(
        post(&url, &body, &[("authorization", "Bearer bob")])
            .await
            .header("x-llm-proxy-cache"),
        Some("miss")
    );
    // One credential is one scope, whichever header carries it and however
    // `Bearer` is spelled; a credential of another scheme is another scope.
    for (same, label) in [
        (("x-api-key", "alice"), "hit"),
        (("authorization", "bearer  alice "), "hit"),
        (("authorization", "Basic alice"), "miss"),
    ] {
        assert_eq!(
            post(&url, &body, &[same]).await.header("x-llm-proxy-cache"),
            Some(label),
            "{same:?}"
        );
    }
    assert_eq!(upstream_calls(&up), 6);
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_cache_events_total{event="hit"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn shared_scope_and_ttl() {
    let up = mock_named("m").await;
    let p = proxy(&config(
        &up.base_url(),
        "scope = \"shared\"\nttl_secs = 0.3\n",
    ))
    .await;
    let url = p.url(CHAT_PATH);
    let body = chat("m", false);
    post(&url, &body, &[("authorization", "Bearer alice")]).await;
    let bob = post(&url, &body, &[("authorization", "Bearer bob")]).await;
    assert_eq!(bob.header("x-llm-proxy-cache"), Some("hit"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        post_json(&url, &body).await.header("x-llm-proxy-cache"),
        Some("miss")
    );
    assert_eq!(upstream_calls(&up), 2);
}

/// Wait (bounded) until `p` has written `n` answers to its store: the write
/// happens in the background after the answer.
async fn stored(p: &TestProxy, n: u64) {
    let url = p.url("/metrics");
    for _ in 0..200 {
        let metrics = send(request(Method::GET, &url, &[], "")).await.text();
        let count = metrics
            .lines()
            .find(|l| l.starts_with("llm_proxy_cache_events_total{event=\"store\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if count >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} answers never reached the store");
}

#[tokio::test]
async fn two_proxies_on_one_redis_share_hits() {
    let server = RedisServer::start().await;
    let up = mock_named("m").await;
    let a = proxy(&redis(&up.base_url(), &server.url())).await;
    let b = proxy(&redis(&up.base_url(), &server.url())).await;
    for stream in [false, true] {
        let first = post_json(&a.url(CHAT_PATH), &chat("m", stream)).await;
        stored(&a, if stream { 2 } else { 1 }).await;
        let second = post_json(&b.url(CHAT_PATH), &chat("m", stream)).await;
        assert_eq!(second.header("x-llm-proxy-cache"), Some("hit"));
        assert_eq!(second.body, first.body);
    }
    assert_eq!(upstream_calls(&up), 2);
}

#[tokio::test]
async fn redis_going_away_degrades_to_misses() {
    let mut server = RedisServer::start().await;
    let up = mock_named("m").await;
    let p = proxy(&redis(&up.base_url(), &server.url())).await;
    let url = p.url(CHAT_PATH);
    post_json(&url, &chat("m", false)).await;
    stored(&p, 1).await;
    assert_eq!(
        post_json(&url, &chat("m", false))
            .await
            .header("x-llm-proxy-cache"),
        Some("hit")
    );
    server.stop();
    for _ in 0..3 {
        let answer = post_json(&url, &chat("m", false)).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.header("x-llm-proxy-cache"), Some("miss"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = p.metrics().await;
    // The cache's store errors (whatever the label names it), not the auth's.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("llm_proxy_store_errors_total{")
                && !l.contains("auth")
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    // Then the breaker skips the store: counted too.
    let answer = post_json(&url, &chat("m", false)).await;
    assert_eq!(answer.header("x-llm-proxy-cache"), Some("miss"));
    let metrics = p.metrics().await;
    assert!(
        metrics.lines().any(|l| l
            .starts_with(r#"llm_proxy_cache_events_total{event="store_skipped"}"#)
            && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_query_string_is_part_of_the_key() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let at = |query: &str| p.url(&format!("{CHAT_PATH}{query}"));
    let body = chat("m", false);
    let cache_of = |a: Answer| a.header("x-llm-proxy-cache").map(str::to_owned);
    assert_eq!(
        cache_of(post_json(&at("?api-version=1"), &body).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        cache_of(post_json(&at("?api-version=2"), &body).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        cache_of(post_json(&at(""), &body).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        cache_of(post_json(&at("?api-version=2"), &body).await).as_deref(),
        Some("hit")
    );
    assert_eq!(up.stats.requests(), 3);
}

/// An upstream answering each request with the next of `answers`
/// (content type, body), then the last one again.
async fn answers_in_turn(answers: Vec<(&'static str, String)>) -> std::net::SocketAddr {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let answers = std::sync::Arc::new(answers);
    raw_upstream(move |mut conn| {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let answers = answers.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            if read_request_head(&mut conn).await {
                let (kind, body) = &answers[n.min(answers.len() - 1)];
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        }
    })
    .await
}

/// A `200` whose answer is an error, whatever its shape (OpenRouter's
/// `{"error"}`, vLLM's `{"object":"error"}`, a chat stream with an event
/// named `error`), is passed on and not stored.
#[tokio::test]
async fn an_error_answered_with_200_is_not_stored() {
    let good = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
    let chunk = r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    let cases = [
        (false, r#"{"error":{"message":"upstream overloaded","code":502}}"#.to_owned()),
        (false, r#"{"object":"error","message":"CUDA out of memory","type":"InternalServerError","code":500}"#.to_owned()),
        (true, format!(
            "data: {chunk}\n\nevent: error\ndata: {{\"message\":\"model overloaded\",\"code\":503}}\n\ndata: {chunk}\n\ndata: [DONE]\n\n"
        )),
    ];
    for (stream, bad) in cases {
        let (kind, again) = if stream {
            (
                "text/event-stream",
                format!("data: {chunk}\n\ndata: [DONE]\n\n"),
            )
        } else {
            ("application/json", good.to_owned())
        };
        let addr = answers_in_turn(vec![(kind, bad.clone()), (kind, again)]).await;
        let p = proxy(&memory(&format!("http://{addr}/v1"))).await;
        let first = post_json(&p.url(CHAT_PATH), &chat("m", stream)).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.text(), bad);
        // (Storing happens off the client's path: give it time to go wrong.)
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let second = post_json(&p.url(CHAT_PATH), &chat("m", stream)).await;
        assert_eq!(
            second.header("x-llm-proxy-cache"),
            Some("miss"),
            "{bad}: {}",
            second.text()
        );
        assert_ne!(second.text(), bad);
    }
}

/// The requests coalesced on a JSON answer that is an error sent with `200`
/// are not handed the error as a hit: each asks the upstream itself, as
/// without a cache (not one flight after another).
#[tokio::test]
async fn followers_of_an_error_answered_with_200_ask_the_upstream_themselves() {
    let good = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
    let bad = r#"{"error":{"message":"upstream overloaded","code":502}}"#;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let addr = raw_upstream(move |mut conn| {
        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            use tokio::io::AsyncWriteExt;
            if read_request_head(&mut conn).await {
                // The first answer late, so that the others coalesce on it.
                let body = if n == 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    bad
                } else {
                    good
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        }
    })
    .await;
    let p = proxy(&memory(&format!("http://{addr}/v1"))).await;
    let url = p.url(CHAT_PATH);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post_json(&url, &chat("m", false)).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        let answer = task.await.expect("request task");
        assert_eq!(answer.status, 200);
        answers.push((
            answer.text(),
            answer.header("x-llm-proxy-cache").map(str::to_owned),
        ));
    }
    answers.sort();
    let (errors, goods): (Vec<_>, Vec<_>) = answers.iter().partition(|(text, _)| text == bad);
    // The leader's client gets what the upstream said, as a miss; every
    // other request an answer of its own.
    assert_eq!(
        errors,
        [&(bad.to_owned(), Some("miss".to_owned()))],
        "{answers:?}"
    );
    assert_eq!(goods.len(), 4, "{answers:?}");
    assert!(
        goods
            .iter()
            .all(|(text, cache)| text == good && cache.as_deref() == Some("miss")),
        "{answers:?}"
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5);
}

/// An upstream that refuses `stream_options` (older Azure API versions,
/// TGI) streams without the usage chunk the cache asks for: a client that
/// asks for it itself is not served such a stream from the cache, in
/// either order, but gets the upstream's own answer to its request (the
/// refusal), as without a cache; one that does not ask is served it.
#[tokio::test]
async fn a_stream_without_the_refused_usage_chunk_answers_no_client_that_asked() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let addr = sse_upstream(move |body| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if String::from_utf8_lossy(body).contains("stream_options") {
            let error = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error"}}"#;
            return (400, error.to_owned());
        }
        let delta = r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#;
        (200, format!("data: {delta}\n\ndata: [DONE]\n\n"))
    })
    .await;
    let calls = move || calls.load(std::sync::atomic::Ordering::SeqCst);
    let p = proxy(&memory(&format!("http://{addr}/v1"))).await;
    let plain = chat("m", true);
    let mut asking: serde_json::Value = serde_json::from_str(&plain).unwrap();
    asking["stream_options"] = serde_json::json!({"include_usage": true});
    let asking = asking.to_string();
    let ask = async |body: &str| post_json(&p.url(CHAT_PATH), body).await;

    // Stored by a client that did not ask: the refused ask, then its own.
    let first = ask(&plain).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-llm-proxy-cache"), Some("miss"));
    assert_eq!(calls(), 2);
    // One that asks gets what the upstream says to its request.
    let refused = ask(&asking).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.header("x-llm-proxy-cache"), Some("miss"));
    assert_eq!(calls(), 3);
    // The stored stream still serves those that do not ask.
    let hit = ask(&plain).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-llm-proxy-cache"), Some("hit"));
    assert_eq!(hit.text(), first.text());
    assert_eq!(calls(), 3);
}

/// A request coalesced on a stream that breaks gets what the leader's client
/// got: the chunks, then the `stream_interrupted` event, over real sockets
/// (hyper drops the frames a body holds when it fails without a pause).
#[tokio::test]
async fn a_follower_of_a_broken_stream_gets_the_error_event() {
    let up = paced_mock("m", 50.0).await;
    let p = proxy(&memory(&up.base_url())).await;
    let headers = [
        ("x-mock-fail", "drop"),
        ("x-mock-drop-after", "6"),
        ("x-mock-tokens", "50"),
    ];
    // The body as far as it came, and the cache's verdict.
    let read = || async {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(&headers);
        let req = request(Method::POST, &p.url(CHAT_PATH), &all, chat("m", true));
        let resp = client().request(req).await.expect("answered");
        let cache = resp.headers().get("x-llm-proxy-cache").cloned();
        let (body, broke) = read_stream(resp).await;
        (body, broke, cache)
    };
    let follower = async {
        tokio::time::sleep(Duration::from_millis(40)).await;
        read().await
    };
    let (leader, follower) = tokio::join!(read(), follower);
    assert_eq!(follower.2.as_ref().map(|v| v.as_bytes()), Some(&b"hit"[..]));
    assert_eq!(upstream_calls(&up), 1);
    for (body, broke, _) in [&leader, &follower] {
        assert!(broke, "the connection is closed after the event");
        let data = sse_data(body);
        assert!(
            data.last()
                .is_some_and(|d| d.contains("stream_interrupted")),
            "{data:?}"
        );
    }
    assert_eq!(leader.0, follower.0);
}

/// The upstreams' failures pass through the cache like their answers do:
/// marked with its verdict (DESIGN: the header is absent only where no
/// cache layer runs), in the client's dialect.
#[tokio::test]
async fn upstream_failures_carry_the_cache_header() {
    let dead = dead_port().await;
    let p = proxy(&memory(&format!("http://127.0.0.1:{dead}/v1"))).await;
    let miss = post_json(&p.url(CHAT_PATH), &chat("m", false)).await;
    miss.assert_error(502, "upstream_error", "bad_gateway");
    assert_eq!(miss.header("x-llm-proxy-cache"), Some("miss"));
    let bypass = post(
        &p.url(CHAT_PATH),
        &chat("m", false),
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(bypass.status, 502);
    assert_eq!(bypass.header("x-llm-proxy-cache"), Some("bypass"));
    let messages = post(
        &p.url("/v1/messages"),
        r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(messages.status, 502);
    assert_eq!(messages.json()["type"], "error", "{}", messages.text());
    assert_eq!(messages.header("x-llm-proxy-cache"), Some("miss"));
}

#[tokio::test]
async fn integers_beyond_64_bits_never_share_an_answer() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let seeded = |seed: &str| chat("m", false).replacen('{', &format!(r#"{{"seed":{seed},"#), 1);
    // serde_json reads both as the f64 2^64; an upstream that reads integers
    // exactly sees two requests.
    for seed in ["18446744073709551616", "18446744073709551617"] {
        let answer = post_json(&p.url(CHAT_PATH), &seeded(seed)).await;
        assert_eq!(
            (answer.status.as_u16(), answer.header("x-llm-proxy-cache")),
            (200, Some("bypass")),
            "{seed}: {}",
            answer.text()
        );
    }
    assert_eq!(upstream_calls(&up), 2);
}

#[tokio::test]
async fn only_if_cached_and_pragma_no_cache() {
    let up = mock_named("m").await;
    let p = proxy(&memory(&up.base_url())).await;
    let url = p.url(CHAT_PATH);
    let body = chat("m", false);
    let only = ("cache-control", "only-if-cached");
    // Nothing stored: a 504 without asking the upstream.
    let miss = post(&url, &body, &[only]).await;
    assert_eq!(
        (miss.status.as_u16(), miss.header("x-llm-proxy-cache")),
        (504, Some("miss"))
    );
    let error = &miss.json()["error"];
    assert_eq!(
        (&error["type"], &error["code"], &error["param"]),
        (
            &"timeout_error".into(),
            &"not_cached".into(),
            &serde_json::Value::Null
        ),
        "{}",
        miss.text()
    );
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(upstream_calls(&up), 0);
    let first = post(&url, &body, &[]).await;
    let hit = post(&url, &body, &[only]).await;
    assert_eq!(
        (hit.status.as_u16(), hit.header("x-llm-proxy-cache")),
        (200, Some("hit"))
    );
    assert_eq!(hit.body, first.body);
    // `pragma: no-cache` without `cache-control` is `no-cache`.
    let fresh = post(&url, &body, &[("pragma", "no-cache")]).await;
    assert_eq!(
        (fresh.status.as_u16(), fresh.header("x-llm-proxy-cache")),
        (200, Some("bypass"))
    );
    assert_eq!(upstream_calls(&up), 2);
}

/// Headers the upstream answers differently to are not in the key unless
/// `key_headers` names them: without, a request with the mock's
/// `x-mock-tokens: 1` plants a one-token answer that an identical body
/// without the header is then served (in the shared scope, another
/// tenant's request); with it, the two have entries of their own.
#[tokio::test]
async fn key_headers_keep_answers_to_different_headers_apart() {
    let up = mock_named("m").await;
    for (listed, second) in [("", "hit"), ("key_headers = [\"X-Mock-Tokens\"]\n", "miss")] {
        let p = proxy(&config(
            &up.base_url(),
            &format!("backend = \"memory\"\nscope = \"shared\"\n{listed}"),
        ))
        .await;
        let body = chat("m", false);
        let short = post(&p.url(CHAT_PATH), &body, &[("x-mock-tokens", "1")]).await;
        assert_eq!(short.header("x-llm-proxy-cache"), Some("miss"));
        let plain = post(&p.url(CHAT_PATH), &body, &[]).await;
        assert_eq!(plain.header("x-llm-proxy-cache"), Some(second), "{listed}");
        assert_eq!(plain.text() == short.text(), second == "hit", "{listed}");
        let again = post(&p.url(CHAT_PATH), &body, &[("x-mock-tokens", "1")]).await;
        assert_eq!(again.header("x-llm-proxy-cache"), Some("hit"));
        assert_eq!(again.text(), short.text());
    }
}
