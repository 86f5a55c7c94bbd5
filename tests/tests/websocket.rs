//! WebSocket on `/v1/responses` (Codex's transport) through the proxy, over
//! real sockets: the tunnel, which upstream and which keys, limits, refusals,
//! the idle timeout, hang-ups and the drain.

use futures_util::{SinkExt, StreamExt};
use http::Method;
use llm_proxy_mock::MockApi;
use tests::ws::{connect, ends, next_event, turn};
use tests::*;
use tokio_tungstenite::tungstenite::Message;

fn ws_upstream(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\napis = [\"responses\"]\nwebsocket = true\n{extra}\n"
    )
}

async fn metrics(p: &TestProxy) -> String {
    p.metrics().await
}

#[tokio::test]
async fn a_websocket_tunnel_carries_turns_to_the_upstream_with_its_own_key() {
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream(
        "up",
        &up.base_url(),
        "api_key = \"sk-upstream\"",
    ))
    .await;

    let (mut socket, head) = connect(
        p.addr,
        &[
            ("authorization", "Bearer sk-client"),
            ("openai-beta", "responses_websockets=2026-02-04"),
            ("sec-websocket-extensions", "permessage-deflate"),
        ],
    )
    .await
    .expect("switched");
    assert_eq!(head.status(), 101);
    assert_eq!(head.headers()["x-llm-proxy-upstream"], "up");
    assert!(head.headers().contains_key("x-request-id"));
    // The switch tells the proxy's overhead, the upstream's handshake left
    // out.
    assert!(head.headers().contains_key("x-llm-proxy-overhead-ms"));
    // The upstream saw its own key, not the client's; other headers as sent.
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
    assert_eq!(seen["openai-beta"], "responses_websockets=2026-02-04");
    // No extension is negotiated: the proxy reads the messages.
    assert!(!seen.contains_key("sec-websocket-extensions"));
    assert_eq!(up.stats.last_path().as_deref(), Some("/v1/responses"));

    let first = turn(
        &mut socket,
        serde_json::json!({"model": "m", "input": "Hi"}),
    )
    .await;
    let kinds: Vec<&str> = first.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
    assert!(kinds.contains(&"response.output_text.delta"), "{kinds:?}");
    // The next turn builds on the first, on the same upstream.
    let id = first.last().unwrap()["response"]["id"].as_str().unwrap();
    let second = turn(
        &mut socket,
        serde_json::json!({"model": "m", "input": "More", "previous_response_id": id}),
    )
    .await;
    assert_eq!(second.last().unwrap()["type"], "response.completed");
    let body = up.stats.last_request_body().unwrap();
    assert!(
        String::from_utf8_lossy(&body).contains(id),
        "the second turn reached the upstream unchanged"
    );

    let m = metrics(&p).await;
    assert!(m.contains("llm_proxy_websockets_open 1"), "{m}");
    assert!(
        m.contains(r#"llm_proxy_requests_total{route="responses",status="101",upstream="up"} 1"#),
        "{m}"
    );
    // The switch is in neither latency histogram (its session is timed
    // apart): the route's requests' quantiles are not pulled down by it.
    assert!(
        m.contains(r#"llm_proxy_request_duration_seconds_count{route="responses"} 0"#)
            && m.contains(r#"llm_proxy_time_to_first_byte_seconds_count{route="responses"} 0"#),
        "{m}"
    );
    // A close from the client ends the upstream's session too.
    socket.close(None).await.unwrap();
    assert!(ends(&mut socket).await);
    eventually("the upstream session ends", || up.stats.in_flight() == 0).await;
    drop(socket);
    sessions_closed(&p).await;
}

#[tokio::test]
async fn an_upgrade_goes_to_the_first_healthy_upstream_the_key_may_use() {
    let (a, b, c) = (
        mock_named("a").await,
        mock_named("b").await,
        mock_named("c").await,
    );
    let toml = format!(
        "[balance]\neject_after_failures = 1\neject_secs = 600\n\
         [[upstream]]\nname = \"a\"\nurl = \"{}\"\napis = [\"responses\"]\nmodels = [\"ma\"]\n\
         {}{}\
         [auth]\n\
         [[auth.keys]]\nname = \"open\"\nkey = \"sk-open\"\n\
         [[auth.keys]]\nname = \"mc\"\nkey = \"sk-mc\"\nmodels = [\"mc\"]\n\
         [[auth.keys]]\nname = \"other\"\nkey = \"sk-other\"\nmodels = [\"ma\"]\n\
         [[auth.keys]]\nname = \"metered\"\nkey = \"sk-metered\"\ntokens_per_minute = 100000\n\
         [[auth.keys]]\nname = \"slow\"\nkey = \"sk-slow\"\nrequests_per_minute = 1\n",
        a.base_url(),
        ws_upstream("b", &b.base_url(), "models = [\"mb\"]"),
        ws_upstream("c", &c.base_url(), "models = [\"mc\"]"),
    );
    let p = proxy(&toml).await;
    let upstream_of = |head: &http::Response<Option<Vec<u8>>>| {
        head.headers()["x-llm-proxy-upstream"]
            .to_str()
            .unwrap()
            .to_owned()
    };

    // `a` takes no upgrades; `b` is first in config order.
    let (_s, head) = connect(p.addr, &[("authorization", "Bearer sk-open")])
        .await
        .unwrap();
    assert_eq!(upstream_of(&head), "b");
    // A key limited to `mc` may not use `b` (it serves `mb`) over a tunnel.
    let (_s, head) = connect(p.addr, &[("x-api-key", "sk-mc")]).await.unwrap();
    assert_eq!(upstream_of(&head), "c");
    // No WebSocket upstream serves a model the key may use: refused as a
    // plain GET is, so HTTP is used.
    let (status, body) = connect(p.addr, &[("authorization", "Bearer sk-other")])
        .await
        .unwrap_err();
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"), "{body}");
    // A token limit is kept per turn (see below): no reason to refuse.
    let (_s, head) = connect(p.addr, &[("authorization", "Bearer sk-metered")])
        .await
        .unwrap();
    assert_eq!(upstream_of(&head), "b");
    // No key, or an unknown one.
    let (status, body) = connect(p.addr, &[]).await.unwrap_err();
    assert_eq!(status, 401, "{body}");
    let (status, _) = connect(p.addr, &[("authorization", "Bearer sk-nope")])
        .await
        .unwrap_err();
    assert_eq!(status, 401);
    // One request per upgrade against the request limit.
    let (_s, head) = connect(p.addr, &[("authorization", "Bearer sk-slow")])
        .await
        .unwrap();
    assert_eq!(head.headers()["x-ratelimit-remaining-requests"], "0");
    let (status, body) = connect(p.addr, &[("authorization", "Bearer sk-slow")])
        .await
        .unwrap_err();
    assert_eq!(status, 429, "{body}");

    // `b` fails a request and rests: the next upgrade goes to `c`.
    let failed = send(request(
        Method::POST,
        &p.url("/v1/responses"),
        &[
            ("authorization", "Bearer sk-open"),
            ("content-type", "application/json"),
            ("x-mock-fail", "500"),
        ],
        r#"{"model": "mb", "input": "x"}"#,
    ))
    .await;
    assert_eq!(failed.status, 500, "{}", failed.text());
    let (_s, head) = connect(p.addr, &[("authorization", "Bearer sk-open")])
        .await
        .unwrap();
    assert_eq!(upstream_of(&head), "c");
    assert_eq!(a.stats.requests(), 0);
}

async fn post_response(p: &TestProxy, key: &str, body: serde_json::Value) -> Answer {
    send(request(
        Method::POST,
        &p.url("/v1/responses"),
        &[("authorization", key), ("content-type", "application/json")],
        body.to_string(),
    ))
    .await
}

async fn get_response(p: &TestProxy, key: &str, id: &str) -> Answer {
    send(request(
        Method::GET,
        &p.url(&format!("/v1/responses/{id}")),
        &[("authorization", key)],
        "",
    ))
    .await
}

/// The one event of a refused turn.
fn refusal(events: &[serde_json::Value]) -> (u64, String) {
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "error", "{e}");
    (
        e["status"].as_u64().unwrap(),
        e["error"]["code"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn each_turn_is_held_to_what_a_request_is_held_to() {
    let up = mock_named("m").await;
    let toml = format!(
        "{}[auth]\n\
         [[auth.keys]]\nname = \"alice\"\nkey = \"sk-alice\"\n\
         [[auth.keys]]\nname = \"bob\"\nkey = \"sk-bob\"\nmodels = [\"m\"]\ntokens_per_minute = 100000\n\
         [[auth.keys]]\nname = \"slow\"\nkey = \"sk-slow\"\nrequests_per_minute = 2\n\
         [[auth.keys]]\nname = \"picky\"\nkey = \"sk-picky\"\nrequests_per_minute = 3\nmodels = [\"m\"]\n",
        ws_upstream("up", &up.base_url(), "models = [\"m\", \"m2\"]"),
    );
    let p = proxy(&toml).await;
    let alice_id = post_response(
        &p,
        "Bearer sk-alice",
        serde_json::json!({"model": "m", "input": "secret"}),
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut bob, _) = connect(p.addr, &[("authorization", "Bearer sk-bob")])
        .await
        .unwrap();

    // Another key's response does not exist for bob, as over HTTP.
    let events = turn(
        &mut bob,
        serde_json::json!({"model": "m", "input": "x", "previous_response_id": alice_id}),
    )
    .await;
    assert_eq!(refusal(&events), (404, "response_not_found".into()));
    // A model off bob's list, though the upstream serves it.
    let events = turn(&mut bob, serde_json::json!({"model": "m2", "input": "x"})).await;
    assert_eq!(refusal(&events), (403, "model_not_allowed".into()));
    // And one the upstream does not serve: the same refusal, as over HTTP,
    // so that a key cannot tell which of the models it may not use are
    // served here.
    let events = turn(
        &mut bob,
        serde_json::json!({"model": "elsewhere", "input": "x"}),
    )
    .await;
    assert_eq!(refusal(&events), (403, "model_not_allowed".into()));
    // Only turns go on (an upstream may be laxer about `type` than this
    // proxy), and a repeated key is refused (an upstream may read the
    // other one).
    for raw in [
        r#"{"type": "Response.Create", "model": "m", "input": "x"}"#,
        r#"{"type": "response.create", "model": "m2", "model": "m", "input": "x"}"#,
    ] {
        bob.send(Message::text(raw)).await.unwrap();
        let event = next_event(&mut bob).await;
        assert_eq!(event["type"], "error", "{raw}: {event}");
    }
    // Codex's acknowledgement names a response: bob's own goes on (not
    // answered), alice's is refused.
    bob.send(Message::text(
        serde_json::json!({"type": "response.processed", "response_id": alice_id}).to_string(),
    ))
    .await
    .unwrap();
    let event = next_event(&mut bob).await;
    assert_eq!(event["error"]["code"], "response_not_found", "{event}");
    // A conversation, without `passthrough`, as over HTTP.
    let events = turn(
        &mut bob,
        serde_json::json!({"model": "m", "input": "x", "conversation": "conv_1"}),
    )
    .await;
    assert_eq!(refusal(&events), (403, "route_not_allowed".into()));
    // Refused messages never reached the upstream.
    assert!(
        up.stats
            .last_request_body()
            .is_none_or(|b| !String::from_utf8_lossy(&b).contains("m2"))
    );

    // A turn of his own: its id is remembered as bob's, so HTTP finds it
    // for him (a fallback mid-conversation) and not for alice.
    let events = turn(&mut bob, serde_json::json!({"model": "m", "input": "mine"})).await;
    let done = events.last().unwrap();
    assert_eq!(done["type"], "response.completed", "{events:?}");
    let bob_id = done["response"]["id"].as_str().unwrap().to_owned();
    assert_eq!(get_response(&p, "Bearer sk-bob", &bob_id).await.status, 200);
    let processed =
        serde_json::json!({"type": "response.processed", "response_id": bob_id}).to_string();
    bob.send(Message::text(processed.clone())).await.unwrap();
    eventually("the acknowledgement reaches the upstream", || {
        up.stats
            .last_request_body()
            .is_some_and(|b| b == processed.as_bytes())
    })
    .await;
    assert_eq!(
        get_response(&p, "Bearer sk-alice", &bob_id).await.status,
        404
    );
    let events = turn(
        &mut bob,
        serde_json::json!({"model": "m", "input": "more", "previous_response_id": bob_id}),
    )
    .await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    // His tokens are counted from the turns' usage.
    let usage = &events.last().unwrap()["response"]["usage"];
    let metrics = p.metrics().await;
    let output = done["response"]["usage"]["output_tokens"].as_u64().unwrap()
        + usage["output_tokens"].as_u64().unwrap();
    assert!(
        metrics.contains(&format!(
            r#"llm_proxy_tokens_total{{key="bob",model="m",kind="output"}} {output}"#
        )),
        "{metrics}"
    );

    // A model this upstream does not serve cannot be sent to it.
    let (mut alice, _) = connect(p.addr, &[("authorization", "Bearer sk-alice")])
        .await
        .unwrap();
    let events = turn(
        &mut alice,
        serde_json::json!({"model": "elsewhere", "input": "x"}),
    )
    .await;
    assert_eq!(refusal(&events), (404, "api_not_served".into()));
    // Not JSON, and binary: refused, and the session goes on.
    alice.send(Message::text("not json")).await.unwrap();
    alice.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    for code in ["invalid_json", "unsupported_parameter"] {
        let event = next_event(&mut alice).await;
        assert_eq!(event["error"]["code"], code, "{event}");
    }
    let events = turn(&mut alice, serde_json::json!({"model": "m2", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");

    // Each turn is a request against the key's request limit (the upgrade
    // was the first of two).
    let (mut slow, _) = connect(p.addr, &[("authorization", "Bearer sk-slow")])
        .await
        .unwrap();
    let events = turn(&mut slow, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let events = turn(&mut slow, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(refusal(&events), (429, "rate_limit_exceeded".into()));
    // More input may start a response: it counts as a turn too.
    slow.send(Message::text(
        serde_json::json!({"type": "response.append", "input": "more"}).to_string(),
    ))
    .await
    .unwrap();
    let event = next_event(&mut slow).await;
    assert_eq!(event["error"]["code"], "rate_limit_exceeded", "{event}");

    // A refused turn counts as a refused request does over HTTP: the
    // upgrade and two refusals spend a limit of three.
    let (mut picky, _) = connect(p.addr, &[("authorization", "Bearer sk-picky")])
        .await
        .unwrap();
    for _ in 0..2 {
        let events = turn(&mut picky, serde_json::json!({"model": "m2", "input": "x"})).await;
        assert_eq!(refusal(&events), (403, "model_not_allowed".into()));
    }
    let events = turn(&mut picky, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(refusal(&events), (429, "rate_limit_exceeded".into()));

    let metrics = p.metrics().await;
    assert!(
        metrics.contains("llm_proxy_websocket_turns_total 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("llm_proxy_websocket_refused_total 15"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_upstream_that_refuses_or_cannot_be_reached_is_answered_plainly() {
    // A server without the Responses API answers the upgrade with its 404.
    let chat_only = mock(llm_proxy_mock::MockConfig {
        apis: Some(vec![MockApi::ChatCompletions]),
        ..Default::default()
    })
    .await;
    let p = proxy(&ws_upstream("up", &chat_only.base_url(), "")).await;
    let (status, body) = connect(p.addr, &[]).await.unwrap_err();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("Invalid URL"), "{body}");
    // A 404 says nothing of the upstream's health.
    assert!(
        p.metrics()
            .await
            .contains(r#"llm_proxy_upstream_healthy{upstream="up"} 1"#)
    );

    // A 429 to an upgrade (which names no model: a connection limit, or
    // one tenant's) is counted and rests nothing; a 503 with `retry-after`
    // (the server shedding load) rests the upstream, as a request's does.
    for (head, refused, rests) in [
        (
            &b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 60\r\ncontent-length: 0\r\n\r\n"[..],
            429,
            false,
        ),
        (
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 60\r\ncontent-length: 0\r\n\r\n",
            503,
            true,
        ),
    ] {
        let limited = raw_upstream(move |mut conn| async move {
            use tokio::io::AsyncWriteExt;
            if read_request_head(&mut conn).await {
                let _ = conn.write_all(head).await;
            }
        })
        .await;
        let p = proxy(&ws_upstream("up", &format!("http://{limited}/v1"), "")).await;
        let (status, _) = connect(p.addr, &[]).await.unwrap_err();
        assert_eq!(status, refused);
        let metrics = p.metrics().await;
        let healthy = format!(
            r#"llm_proxy_upstream_healthy{{upstream="up"}} {}"#,
            u8::from(!rests)
        );
        assert!(metrics.contains(&healthy), "{healthy} in {metrics}");
        assert!(
            metrics.contains(r#"llm_proxy_upstream_throttled_total{upstream="up"} 1"#),
            "{metrics}"
        );
    }

    // Nothing listening: 502.
    let port = free_port();
    let p = proxy(&ws_upstream(
        "gone",
        &format!("http://127.0.0.1:{port}/v1"),
        "",
    ))
    .await;
    let (status, body) = connect(p.addr, &[]).await.unwrap_err();
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("could not connect"), "{body}");

    // The next upstream is tried, as far as the balancer's retries go.
    let up = mock_named("m").await;
    let gone = format!("http://127.0.0.1:{port}/v1");
    let two = format!(
        "{}{}",
        ws_upstream("gone", &gone, ""),
        ws_upstream("up", &up.base_url(), "")
    );
    let retried = proxy(&format!("[balance]\neject_after_failures = 2\n{two}")).await;
    let (_socket, head) = connect(retried.addr, &[]).await.unwrap();
    assert_eq!(head.headers()["x-llm-proxy-upstream"], "up");
    // The failures count towards `gone`'s ejection, as failed requests do.
    let (_socket, _) = connect(retried.addr, &[]).await.unwrap();
    let metrics = retried.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_ejections_total{upstream="gone"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"llm_proxy_upstream_healthy{upstream="gone"} 0"#),
        "{metrics}"
    );
    let once = proxy(&format!("[balance]\nmax_retries = 0\n{two}")).await;
    let (status, _) = connect(once.addr, &[]).await.unwrap_err();
    assert_eq!(status, 502);

    // A 101 that is not a plain WebSocket (no `upgrade: websocket`, an
    // extension nobody offered it, or an accept not derived from the key
    // sent) is the upstream's failure: 502.
    for head in [
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-accept: AAAA\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-extensions: permessage-deflate\r\n\r\n",
    ] {
        let addr = raw_upstream(move |mut conn| async move {
            if read_request_head(&mut conn).await {
                let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, head.as_bytes()).await;
                tokio::time::sleep(HANG).await;
            }
        })
        .await;
        let odd = proxy(&ws_upstream("odd", &format!("http://{addr}/v1"), "")).await;
        let (status, body) = connect(odd.addr, &[]).await.unwrap_err();
        assert_eq!(status, 502, "{body}");
    }

    // A WebSocket version other than 13 is 426, naming 13 (RFC 6455).
    let old = send(request(
        Method::GET,
        &p.url("/v1/responses"),
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "8"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    ))
    .await;
    assert_eq!(old.status, 426, "{}", old.text());
    assert_eq!(old.header("sec-websocket-version"), Some("13"));

    // A plain GET (no upgrade) is still 405.
    let plain = send(request(Method::GET, &p.url("/v1/responses"), &[], "")).await;
    plain.assert_error(405, "invalid_request_error", "method_not_allowed");
}

#[tokio::test]
async fn a_silent_session_is_closed_with_1001_at_both_ends() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let up = mock_named("m").await;
    // Between turns (a person reading, typing): websocket_idle_timeout_ms.
    let p = proxy(&ws_upstream(
        "up",
        &up.base_url(),
        "idle_timeout_ms = 60000\nwebsocket_idle_timeout_ms = 300",
    ))
    .await;
    let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
    // Traffic keeps it open past the bound...
    for _ in 0..3 {
        let events = turn(&mut socket, serde_json::json!({"model": "m", "input": "x"})).await;
        assert_eq!(events.last().unwrap()["type"], "response.completed");
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    // ...silence closes it, and the client is told (so it reconnects
    // before sending its next turn), as is the upstream.
    match tokio::time::timeout(HANG, socket.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    eventually("the upstream session ends", || up.stats.in_flight() == 0).await;

    // Within a turn (the upstream owes an answer): idle_timeout_ms.
    let mute = scripted(|| |_: &serde_json::Value| Vec::new()).await;
    let p = proxy(&ws_upstream(
        "up",
        &format!("http://{mute}/v1"),
        "idle_timeout_ms = 300\nwebsocket_idle_timeout_ms = 600000",
    ))
    .await;
    let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut socket).await;
    // The turn the upstream left unanswered is an error first, as a stream
    // that stalls ends with one.
    match tokio::time::timeout(HANG, socket.next()).await.unwrap() {
        Some(Ok(Message::Text(text))) => {
            let error: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(error["error"]["code"], "stream_interrupted", "{error}");
        }
        other => panic!("expected the turn's error, got {other:?}"),
    }
    match tokio::time::timeout(HANG, socket.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
}

/// An upstream that pings on its own (uvicorn and Python's `websockets` do,
/// every 20 s) still has its silences timed: pings prove it is up, not
/// that a turn moves or that anyone is there.
#[tokio::test]
async fn an_upstream_that_pings_is_still_timed_out_when_silent() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    // Pings every 50 ms; a create gets `response.created` and nothing more.
    let pinging = raw_upstream(|conn| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(conn).await else {
            return;
        };
        let (mut tx, mut rx) = ws.split();
        let mut every = tokio::time::interval(std::time::Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = every.tick() => {
                    if tx.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return;
                    }
                }
                message = rx.next() => match message {
                    Some(Ok(Message::Text(_))) => {
                        if tx.send(Message::text(created("resp_ping"))).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    _ => return,
                },
            }
        }
    })
    .await;
    let p = proxy(&ws_upstream(
        "up",
        &format!("http://{pinging}/v1"),
        "idle_timeout_ms = 300\nwebsocket_idle_timeout_ms = 400",
    ))
    .await;
    // Between turns: closed at websocket_idle_timeout_ms, pings or not.
    let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
    let close = tokio::time::timeout(HANG, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        }
    })
    .await
    .expect("an idle session is closed though its upstream pings");
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    // Within a turn: the turn's error at idle_timeout_ms, then the close.
    let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut socket).await;
    let mut texts = Vec::new();
    let close = tokio::time::timeout(HANG, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => texts.push(text.to_string()),
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close, got {other:?}"),
            }
        }
    })
    .await
    .expect("a stuck turn is cut though its upstream pings");
    assert_eq!(close.map(|f| f.code), Some(CloseCode::Away));
    assert!(
        texts
            .last()
            .is_some_and(|t| t.contains("stream_interrupted")),
        "{texts:?}"
    );
}

#[tokio::test]
async fn a_client_that_vanishes_closes_the_upstream_side() {
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream("up", &up.base_url(), "")).await;
    let (socket, _) = connect(p.addr, &[]).await.unwrap();
    eventually("the upstream session opens", || up.stats.in_flight() == 1).await;
    // No close frame: the TCP connection just goes.
    drop(socket);
    eventually("the upstream session ends", || up.stats.in_flight() == 0).await;
}

/// A drain lets the turn under way end, then closes the session with 1001
/// (Codex reconnects for its next turn), and closes an idle one at once:
/// neither holds the shutdown for `drain_timeout`.
#[tokio::test]
async fn a_drain_ends_sessions_once_their_turn_is_done() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let up = paced_mock("m", 50.0).await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 60\n{}",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    let (mut idle, _) = connect(p.addr, &[]).await.unwrap();
    let (mut busy, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut busy).await;
    // The turn has begun.
    let first = tokio::time::timeout(HANG, busy.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(Message::Text(_)))), "{first:?}");
    let started = tokio::time::Instant::now();
    p.begin_shutdown();
    let away = |frame: Option<Result<Message, _>>| match frame {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Away);
            assert_eq!(frame.reason.as_str(), "shutting down");
        }
        other => panic!("expected a 1001 close, got {other:?}"),
    };
    away(tokio::time::timeout(HANG, idle.next()).await.unwrap());
    // The busy session gets the rest of its turn, then the close.
    let mut last = None;
    loop {
        match tokio::time::timeout(HANG, busy.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                last = Some(serde_json::from_str::<serde_json::Value>(&text).unwrap());
            }
            close => {
                away(close);
                break;
            }
        }
    }
    assert_eq!(last.unwrap()["type"], "response.completed");
    drop((idle, busy));
    p.stop().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test]
async fn the_demo_config_serves_requests_and_websockets() {
    let demo = std::fs::read_to_string(workspace_root().join("examples/demo.toml")).unwrap();
    let p = proxy(&demo).await;
    let answer = post_json(&p.url("/v1/chat/completions"), &chat("demo-small", false)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let (mut socket, head) = connect(p.addr, &[]).await.unwrap();
    assert_eq!(head.headers()["x-llm-proxy-upstream"], "mock-a");
    let events = turn(
        &mut socket,
        serde_json::json!({"model": "demo-large", "input": "Hello"}),
    )
    .await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
}

/// A WebSocket upstream that answers each turn as OpenAI does, in two
/// messages: `response.created`, then `response.completed` with `output`
/// tokens of usage; both echo the turn's `metadata`.
async fn usage_upstream(output: u64) -> std::net::SocketAddr {
    scripted(move || {
        let mut n = 0;
        move |body: &serde_json::Value| {
            n += 1;
            let id = format!("resp_{n}");
            let created = serde_json::json!({"type": "response.created",
                "response": {"id": id, "status": "in_progress", "metadata": body["metadata"]}});
            let done = serde_json::json!({"type": "response.completed",
                "response": {"id": id, "status": "completed", "model": body["model"],
                    "metadata": body["metadata"],
                    "usage": {"input_tokens": 10, "output_tokens": output, "total_tokens": 10 + output}}});
            vec![created.to_string(), done.to_string()]
        }
    })
    .await
}

#[tokio::test]
async fn a_turn_is_charged_its_usage_whatever_its_messages_say() {
    let addr = usage_upstream(5000).await;
    let p = proxy(&format!(
        "{}[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 3000\n",
        ws_upstream("up", &format!("http://{addr}/v1"), "")
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    // The completed message mentions `response.created` (echoed metadata,
    // or a model's output): it is read by its type, and settles the turn.
    let marked =
        serde_json::json!({"model": "m", "input": "x", "metadata": {"x": "response.created"}});
    let events = turn(&mut s, marked.clone()).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    // 5000 tokens used of 3000 a minute: the next turn is refused.
    let events = turn(&mut s, marked).await;
    assert_eq!(refusal(&events), (429, "rate_limit_exceeded".into()));
}

#[tokio::test]
async fn an_upstream_error_ends_its_own_turn_and_no_other() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}[auth]\n[[auth.keys]]\nname = \"bob\"\nkey = \"sk-bob\"\ntokens_per_minute = 100000\n",
        ws_upstream("up", &up.base_url(), "models = [\"cheap\", \"dear\"]")
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-bob")])
        .await
        .unwrap();
    // The upstream refuses this turn (the mock wants `input` as a string
    // or a list).
    let events = turn(&mut s, serde_json::json!({"model": "cheap", "input": 1})).await;
    assert_eq!(events.last().unwrap()["type"], "error", "{events:?}");
    let events = turn(&mut s, serde_json::json!({"model": "dear", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let metrics = p.metrics().await;
    let tokens: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("tokens_total{"))
        .collect();
    assert!(
        tokens
            .iter()
            .any(|l| l.contains(r#"model="dear",kind="output""#))
            && !tokens.iter().any(|l| l.contains(r#"model="cheap""#)),
        "{tokens:?}"
    );
}

#[tokio::test]
async fn closes_are_answered_and_an_oversized_message_is_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 1024\n{}",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    let big =
        serde_json::json!({"type": "response.create", "model": "m", "input": "x".repeat(4096)});
    s.send(Message::text(big.to_string())).await.unwrap();
    match tokio::time::timeout(HANG, s.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a 1009 close, got {other:?}"),
    }

    // A client's close is answered with a close (RFC 6455 §5.5.1), even
    // when the upstream never answers its own.
    let deaf = raw_upstream(|conn| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(conn).await else {
            return;
        };
        tokio::time::sleep(HANG * 3).await;
        drop(ws);
    })
    .await;
    let p = proxy(&ws_upstream("up", &format!("http://{deaf}/v1"), "")).await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    s.close(None).await.unwrap();
    match tokio::time::timeout(HANG, s.next()).await.unwrap() {
        Some(Ok(Message::Close(_))) | None => {}
        other => panic!("expected the close answered, got {other:?}"),
    }
}

#[tokio::test]
async fn hostile_client_frames_end_the_session_cleanly() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 1024\n{}",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    /// A client frame, masked with a zero key (the payload as it is).
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }
    let ok = br#"{"type":"response.create","model":"m","input":"x"}"#;
    let mut fragmented = frame(0x01, &ok[..10]);
    fragmented.extend(frame(0x89, b"p"));
    fragmented.extend(frame(0x00, &ok[10..20]));
    fragmented.extend(frame(0x80, &ok[20..]));
    // With the close code the proxy answers a client's fault with (RFC 6455
    // §7.4.1: 1002 protocol, 1007 not UTF-8, 1009 too big), where it has one.
    let cases: Vec<(&str, Vec<u8>, Option<u16>)> = vec![
        ("invalid utf-8 text", frame(0x81, &[0xff, 0xfe]), Some(1007)),
        ("close 1005", frame(0x88, &[0x03, 0xed]), None),
        ("close of 1 byte", frame(0x88, &[0x03]), None),
        (
            "close with a bad reason",
            frame(0x88, &[0x03, 0xe8, 0xff, 0xfe]),
            None,
        ),
        ("continuation first", frame(0x80, b"a"), Some(1002)),
        (
            "huge length",
            vec![
                0x81, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
            ],
            Some(1009),
        ),
        ("long ping", frame(0x89, &[0u8; 200]), Some(1002)),
        ("rsv bits", frame(0xc1, b"{}"), Some(1002)),
        ("unmasked", vec![0x81, 0x02, b'{', b'}'], Some(1002)),
        ("reserved opcode", frame(0x83, b"x"), Some(1002)),
        ("fragmented control", frame(0x09, b"x"), Some(1002)),
        ("a fragmented turn with a ping inside", fragmented, None),
    ];
    for (what, bytes, code) in cases {
        let mut tcp = upgraded(tokio::net::TcpStream::connect(p.addr).await.unwrap()).await;
        tcp.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        let ended = tokio::time::timeout(HANG, async {
            let mut buf = [0u8; 4096];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                if what.starts_with("a fragmented turn")
                    && String::from_utf8_lossy(&got).contains("response.completed")
                {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "{what}: the session ends");
        if let Some(code) = code {
            // The first frame the client hears: a close with that code.
            assert!(
                got.len() >= 4 && got[0] == 0x88,
                "{what}: a close first, got {got:?}"
            );
            assert_eq!(u16::from_be_bytes([got[2], got[3]]), code, "{what}");
        }
    }
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    drop(s);
    sessions_closed(&p).await;
}

#[tokio::test]
async fn many_turns_sent_before_reading_do_not_deadlock() {
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream("up", &up.base_url(), "")).await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    let n = 50;
    for i in 0..n {
        let m = serde_json::json!({"type": "response.create", "model": "m",
            "input": format!("{i} {}", "y".repeat(100_000))});
        s.send(Message::text(m.to_string())).await.unwrap();
    }
    let mut done = 0;
    while done < n {
        let next = tokio::time::timeout(HANG, s.next())
            .await
            .expect("no deadlock")
            .unwrap()
            .unwrap();
        if next.to_text().unwrap().contains("\"response.completed\"") {
            done += 1;
        }
    }
}

// Upstreams scripted message by message, for how turns are settled.

/// A WebSocket upstream that answers each client text message with what
/// `script` (made afresh for each connection) returns for it, in order.
async fn scripted<F, S>(script: F) -> std::net::SocketAddr
where
    F: Fn() -> S + Send + Sync + 'static,
    S: FnMut(&serde_json::Value) -> Vec<String> + Send + 'static,
{
    let script = std::sync::Arc::new(script);
    raw_upstream(move |conn| {
        let mut answer = script();
        async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(conn).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(value) = serde_json::from_str(text.as_str()) else {
                    continue;
                };
                for reply in answer(&value) {
                    // Gone without a close, as a crashed server.
                    if reply == DROP {
                        return;
                    }
                    // A clean close (1000), mid-turn or not.
                    if reply == CLOSE {
                        let _ = ws.close(None).await;
                        while let Some(Ok(_)) = ws.next().await {}
                        return;
                    }
                    if ws.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await
}

/// The text messages `socket` receives (as JSON) until something else: the
/// close, or the end.
async fn texts_until_close(
    socket: &mut ws::Socket,
) -> (
    Vec<serde_json::Value>,
    Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) {
    let mut texts = Vec::new();
    loop {
        match tokio::time::timeout(HANG, socket.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                texts.push(serde_json::from_str::<serde_json::Value>(&text).unwrap());
            }
            other => return (texts, other),
        }
    }
}

/// Send a `response.create` turn for model `m`.
async fn send_create(socket: &mut ws::Socket) {
    socket
        .send(Message::text(
            r#"{"type":"response.create","model":"m","input":"x"}"#,
        ))
        .await
        .unwrap();
}

/// A scripted reply that drops the upstream's connection, unclosed.
const DROP: &str = "\0drop";
/// In a scripted upstream's replies: close the session (1000) there.
const CLOSE: &str = "\0close";

fn created(id: &str) -> String {
    serde_json::json!({"type": "response.created", "response": {"id": id, "status": "in_progress"}})
        .to_string()
}
fn completed(id: &str, output: u64) -> String {
    serde_json::json!({"type": "response.completed", "response": {"id": id, "status": "completed",
        "usage": {"input_tokens": 10, "output_tokens": output, "total_tokens": 10 + output}}})
    .to_string()
}
fn error() -> String {
    serde_json::json!({"type": "error", "status": 400,
        "error": {"type": "invalid_request_error", "message": "unsupported"}})
    .to_string()
}

/// Read until a `response.completed`; returns every event type seen.
async fn until_completed(s: &mut tests::ws::Socket) -> Vec<String> {
    let mut kinds = Vec::new();
    loop {
        let kind = next_event(s).await["type"].as_str().unwrap().to_owned();
        let done = kind == "response.completed";
        kinds.push(kind);
        if done {
            return kinds;
        }
    }
}

async fn proxy_with(addr: std::net::SocketAddr) -> TestProxy {
    proxy(&format!(
        "{}[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 3000\n",
        ws_upstream("up", &format!("http://{addr}/v1"), "")
    ))
    .await
}

/// An upstream that answers `response.processed` with an `error` (as one
/// that does not know that type would), in order with the next turn.
#[tokio::test]
async fn an_error_that_answers_no_turn_leaves_no_usage_uncounted() {
    let addr = scripted(|| {
        let (mut owe_error, mut n) = (false, 0);
        move |v: &serde_json::Value| match v["type"].as_str() {
            Some("response.processed") => {
                owe_error = true;
                vec![]
            }
            Some("response.create") => {
                let mut out = Vec::new();
                if std::mem::take(&mut owe_error) {
                    out.push(error());
                }
                n += 1;
                let id = format!("resp_{n}");
                out.push(created(&id));
                out.push(completed(&id, 5000));
                out
            }
            _ => vec![],
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    // An acknowledgement (no id needed), then a turn, back to back.
    s.send(Message::text(r#"{"type":"response.processed"}"#))
        .await
        .unwrap();
    send_create(&mut s).await;
    let kinds = until_completed(&mut s).await;
    assert_eq!(
        kinds.first().map(String::as_str),
        Some("error"),
        "{kinds:?}"
    );
    // 5010 tokens were generated against a 3000/min limit: the next turn
    // must be refused (as `a_turn_is_charged_its_usage_whatever_its_messages_say`).
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    let metrics = p.metrics().await;
    let tokens: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("tokens_total{"))
        .collect();
    assert_eq!(
        events.last().unwrap()["type"],
        "error",
        "the 5010-token turn is counted: {tokens:?}"
    );
}

/// An upstream that fails a started turn with an `error` (mid-stream) while
/// the client has already sent the next one.
#[tokio::test]
async fn a_midstream_error_leaves_the_next_turns_usage_counted() {
    let addr = scripted(|| {
        let mut n = 0;
        move |_: &serde_json::Value| {
            n += 1;
            let id = format!("resp_{n}");
            match n {
                // Started; ends when the next message comes.
                1 => vec![created(&id)],
                2 => vec![error(), created(&id), completed(&id, 5000)],
                _ => vec![created(&id), completed(&id, 10)],
            }
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    s.send(Message::text(
        r#"{"type":"response.create","model":"m","input":"a"}"#,
    ))
    .await
    .unwrap();
    // Wait for A's response.created before sending B.
    assert_eq!(next_event(&mut s).await["type"], "response.created");
    s.send(Message::text(
        r#"{"type":"response.create","model":"m","input":"b"}"#,
    ))
    .await
    .unwrap();
    until_completed(&mut s).await;
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(
        events.last().unwrap()["type"],
        "error",
        "B's 5010 tokens are counted"
    );
}

/// A `response.append` the mock (like an upstream that only appends) never
/// answers must not take the next turn's response, nor lose its tokens'
/// model.
#[tokio::test]
async fn an_unanswered_append_does_not_shift_settlement() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 1000000\n",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    s.send(Message::text(
        r#"{"type":"response.append","input":"more"}"#,
    ))
    .await
    .unwrap();
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_tokens_total{key="k",model="m",kind="output"}"#),
        "the completed turn's tokens are counted for model m: {:?}",
        metrics
            .lines()
            .filter(|l| l.contains("tokens_total"))
            .collect::<Vec<_>>()
    );
}

/// The client closes once it has the answer's text, before
/// `response.completed`: the upstream's last messages, usage included,
/// arrive within the grace the relay gives it, and are read.
#[tokio::test]
async fn usage_that_comes_after_the_client_left_is_charged() {
    let addr = raw_upstream(|conn| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(conn).await else {
            return;
        };
        let mut n = 0;
        while let Some(Ok(Message::Text(_))) = ws.next().await {
            n += 1;
            let id = format!("resp_{n}");
            ws.send(Message::text(created(&id))).await.unwrap();
            if n == 1 {
                ws.send(Message::text(
                    r#"{"type":"response.output_text.done","text":"answer"}"#,
                ))
                .await
                .unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                for m in [
                    r#"{"type":"response.content_part.done"}"#.to_owned(),
                    r#"{"type":"response.output_item.done"}"#.to_owned(),
                    completed(&id, 5000),
                ] {
                    let _ = ws.send(Message::text(m)).await;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                return;
            }
            ws.send(Message::text(completed(&id, 10))).await.unwrap();
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    send_create(&mut s).await;
    while next_event(&mut s).await["type"] != "response.output_text.done" {}
    s.close(None).await.unwrap();
    // The usage comes within the grace the upstream gets after a close.
    let charged = async {
        loop {
            let metrics = p.metrics().await;
            if metrics.lines().any(|l| {
                l.contains("tokens_total{") && l.contains("output") && l.ends_with(" 5000")
            }) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG, charged)
        .await
        .expect("the 5000 output tokens that came after the client left are charged");
}

/// Wait until no session is open (its turns are settled when it closes).
async fn sessions_closed(p: &TestProxy) {
    let closed = async {
        while !metrics(p).await.contains("llm_proxy_websockets_open 0") {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG, closed)
        .await
        .expect("every session closed");
}

/// Tokens left to `sk-k` (of 3000 a minute, refilling 50 a second), read
/// from a fresh upgrade's `101`, which reserves none.
async fn remaining_tokens(p: &TestProxy) -> u64 {
    sessions_closed(p).await;
    let (mut s, head) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    let _ = s.close(None).await;
    head.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn an_error_during_a_started_turn_does_not_count_its_usage_twice() {
    // The upstream answers an acknowledgement with an error while a turn
    // streams, then ends the turn with 110 tokens of usage.
    let addr = scripted(|| {
        |v: &serde_json::Value| match v["type"].as_str() {
            Some("response.create") => vec![created("resp_1")],
            Some("response.processed") => vec![error(), completed("resp_1", 100)],
            _ => vec![],
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let before = remaining_tokens(&p).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    send_create(&mut s).await;
    assert_eq!(next_event(&mut s).await["type"], "response.created");
    s.send(Message::text(r#"{"type":"response.processed"}"#))
        .await
        .unwrap();
    until_completed(&mut s).await;
    drop(s);
    let charged = before.saturating_sub(remaining_tokens(&p).await);
    // The 110 tokens used (less what refilled meanwhile), not 110 on top of
    // the ~260-token reservation.
    assert!(charged <= 110, "charged {charged}");
}

#[tokio::test]
async fn an_error_taken_for_the_wrong_turn_then_a_cut_keeps_the_reservation() {
    error_for_a_message_then_a_cut(r#"{"type":"response.processed"}"#).await;
}

/// In order: the upstream's error answers `first` (an acknowledgement or an
/// append), then the create's response begins and is still generating when
/// the client leaves: the create's ~2000-token reservation stands.
async fn error_for_a_message_then_a_cut(first: &'static str) {
    let first_type: String = serde_json::from_str::<serde_json::Value>(first).unwrap()["type"]
        .as_str()
        .unwrap()
        .to_owned();
    let addr = scripted(move || {
        let first_type = first_type.clone();
        let mut owe_error = false;
        move |v: &serde_json::Value| match v["type"].as_str() {
            Some(t) if t == first_type => {
                owe_error = true;
                vec![]
            }
            Some("response.create") if std::mem::take(&mut owe_error) => vec![
                error(),
                created("resp_1"),
                r#"{"type":"response.output_text.delta","delta":"a long answer"}"#.to_owned(),
            ],
            _ => vec![],
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let before = remaining_tokens(&p).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    s.send(Message::text(first)).await.unwrap();
    s.send(Message::text(
        r#"{"type":"response.create","model":"m","input":"x","max_output_tokens":2000}"#,
    ))
    .await
    .unwrap();
    while next_event(&mut s).await["type"] != "response.output_text.delta" {}
    drop(s);
    let charged = before.saturating_sub(remaining_tokens(&p).await);
    assert!(
        charged > 1500,
        "{first}: the create's ~2000-token reservation stands; charged {charged}"
    );
}

#[tokio::test]
async fn an_append_no_response_began_for_keeps_no_reservation() {
    let up = mock_named("m").await;
    let p = proxy_with(up.addr).await;
    let before = remaining_tokens(&p).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    let used = events.last().unwrap()["response"]["usage"]["total_tokens"]
        .as_u64()
        .unwrap();
    // The mock takes appends as more input for nothing: no response.
    let append = r#"{"type":"response.append","input":"more"}"#;
    s.send(Message::text(append)).await.unwrap();
    eventually("the append reaches the upstream", || {
        up.stats
            .last_request_body()
            .is_some_and(|b| b == append.as_bytes())
    })
    .await;
    drop(s);
    let charged = before.saturating_sub(remaining_tokens(&p).await);
    assert!(charged <= used, "charged {charged}, used {used}");
    // Only `type` and `response_id` in an acknowledgement.
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    s.send(Message::text(r#"{"type":"response.processed","bogus":1}"#))
        .await
        .unwrap();
    let event = next_event(&mut s).await;
    assert_eq!(event["error"]["param"], "bogus", "{event}");
}

#[tokio::test]
async fn an_append_holds_no_reservation_until_a_response_begins_for_it() {
    // An upstream that takes appends as more input for nothing.
    let up = mock_named("m").await;
    let p = proxy_with(up.addr).await;
    let before = remaining_tokens(&p).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    // Held, it would keep the whole bucket for as long as the session
    // lasts (and give it back at the end, refilled or not).
    let append = r#"{"type":"response.append","input":"x","max_output_tokens":3000}"#;
    s.send(Message::text(append)).await.unwrap();
    eventually("the append reaches the upstream", || {
        up.stats
            .last_request_body()
            .is_some_and(|b| b == append.as_bytes())
    })
    .await;
    let (mut other, head) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    let during: u64 = head.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        during + 100 >= before,
        "{during} left of {before} while the append is out"
    );
    let _ = other.close(None).await;
    drop(s);
}

#[tokio::test]
async fn an_error_for_an_append_then_a_cut_keeps_the_creates_reservation() {
    error_for_a_message_then_a_cut(r#"{"type":"response.append","input":"x"}"#).await;
}

#[tokio::test]
async fn a_completed_with_an_escaped_type_is_still_charged() {
    // `response.complete\u0064` is `response.completed` to any JSON reader.
    let addr = scripted(|| {
        let mut n = 0;
        move |_: &serde_json::Value| {
            n += 1;
            let id = format!("resp_{n}");
            let done =
                completed(&id, 5000).replace("response.completed", r"response.complete\u0064");
            vec![created(&id), done]
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(
        events.last().unwrap()["response"]["usage"]["total_tokens"],
        5010
    );
    // 5010 tokens reported against 3000 a minute: the next turn is refused.
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(refusal(&events), (429, "rate_limit_exceeded".into()));
}

#[tokio::test]
async fn a_null_id_is_no_id() {
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream("up", &up.base_url(), "")).await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    let events = turn(
        &mut s,
        serde_json::json!({"model": "m", "input": "x", "previous_response_id": null}),
    )
    .await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
}

#[tokio::test]
async fn a_client_that_only_pings_and_reads_nothing_is_closed() {
    // A turn whose answer floods the client, which reads none of it and
    // sends pings: the queue to it fills, the upstream is no longer read,
    // and pings alone do not keep the session alive.
    let flood = scripted(|| {
        |_: &serde_json::Value| {
            let delta = serde_json::json!({"type": "response.output_text.delta", "delta": "x".repeat(100_000)})
                .to_string();
            vec![delta; 200]
        }
    })
    .await;
    let p = proxy(&ws_upstream(
        "up",
        &format!("http://{flood}/v1"),
        "idle_timeout_ms = 300",
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut s).await;
    let open = async {
        while !metrics(&p).await.contains("llm_proxy_websockets_open 1") {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG, open)
        .await
        .expect("the session opens");
    let pinging = async {
        loop {
            if s.send(Message::Ping(vec![1].into())).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = pinging => {}
        () = sessions_closed(&p) => {}
    }
}

#[tokio::test]
async fn a_conversation_is_held_to_its_upstream_and_key() {
    // `plain` serves model `p` (no WebSocket), `ws` model `m`: a
    // passthrough body's model picks where a conversation is made.
    let plain = mock_named("plain").await;
    let ws = mock_named("ws").await;
    let upstreams = format!(
        "[[upstream]]\nname = \"plain\"\nurl = \"{}\"\napis = [\"responses\"]\nmodels = [\"p\"]\n{}",
        plain.base_url(),
        ws_upstream("ws", &ws.base_url(), "models = [\"m\"]"),
    );
    let p = proxy(&format!(
        "{upstreams}[auth]\n\
         [[auth.keys]]\nname = \"carol\"\nkey = \"sk-carol\"\npassthrough = true\n\
         [[auth.keys]]\nname = \"dave\"\nkey = \"sk-dave\"\npassthrough = true\n"
    ))
    .await;
    let make = |url: String, key: &'static str, body: &'static str| {
        send(request(
            Method::POST,
            &url,
            &[("authorization", key), ("content-type", "application/json")],
            body,
        ))
    };
    let made_on = |answer: Answer, home: &str| {
        assert_eq!(
            answer.header("x-llm-proxy-upstream"),
            Some(home),
            "{}",
            answer.text()
        );
        answer.json()["id"].as_str().unwrap().to_owned()
    };
    let url = p.url("/v1/conversations");
    let on_plain = made_on(
        make(url.clone(), "Bearer sk-carol", r#"{"model": "p"}"#).await,
        "plain",
    );
    let on_ws = made_on(
        make(url, "Bearer sk-carol", r#"{"model": "m"}"#).await,
        "ws",
    );
    // One the proxy never saw made, on the WebSocket's upstream.
    let direct = make(
        format!("{}/conversations", ws.base_url()),
        "Bearer x",
        r#"{"metadata": {"made": "directly"}}"#,
    )
    .await
    .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let in_conversation =
        |id: &str| serde_json::json!({"model": "m", "input": "x", "conversation": id});
    let refused_with = |events: &[serde_json::Value], words: &str| {
        assert_eq!(refusal(events), (404, "conversation_not_found".into()));
        let message = events[0]["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{message}");
    };

    let (mut carol, _) = connect(p.addr, &[("authorization", "Bearer sk-carol")])
        .await
        .unwrap();
    // Hers, on this upstream: goes on.
    let events = turn(&mut carol, in_conversation(&on_ws)).await;
    assert_eq!(
        events.last().unwrap()["type"],
        "response.completed",
        "{events:?}"
    );
    // Hers, but on the other upstream: refused before it reaches this one.
    refused_with(
        &turn(&mut carol, in_conversation(&on_plain)).await,
        "lives on upstream `plain`",
    );
    // One the proxy does not know: with auth, whose it is cannot be told.
    refused_with(
        &turn(&mut carol, in_conversation(&direct)).await,
        "not known to this proxy",
    );
    // Carol's does not exist for dave.
    let (mut dave, _) = connect(p.addr, &[("authorization", "Bearer sk-dave")])
        .await
        .unwrap();
    refused_with(
        &turn(&mut dave, in_conversation(&on_ws)).await,
        "not known to this proxy",
    );

    // Without auth (one tenant) one the proxy does not know goes on, and the
    // upstream holds it.
    let open = proxy(&upstreams).await;
    let (mut anyone, _) = connect(open.addr, &[]).await.unwrap();
    let events = turn(&mut anyone, in_conversation(&direct)).await;
    assert_eq!(
        events.last().unwrap()["type"],
        "response.completed",
        "{events:?}"
    );
}

#[tokio::test]
async fn a_response_that_ends_twice_is_charged_once() {
    let addr = scripted(|| {
        |v: &serde_json::Value| match v["type"].as_str() {
            Some("response.create") => vec![
                created("resp_1"),
                completed("resp_1", 1000),
                completed("resp_1", 1000),
            ],
            _ => vec![],
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let before = remaining_tokens(&p).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    // The repeat reaches the client too (the proxy relays, it does not
    // edit), once the proxy has read it.
    assert_eq!(next_event(&mut s).await["type"], "response.completed");
    drop(s);
    let charged = before.saturating_sub(remaining_tokens(&p).await);
    // 1010 tokens used (less what refilled meanwhile), not 2020.
    assert!((900..=1010).contains(&charged), "charged {charged}");
}

#[tokio::test]
async fn a_message_is_held_in_the_body_budget_while_it_is_checked() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 65536\nmax_buffered_body_bytes = 1048576\n{}",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    // 60 KiB of `{"":0}` objects: ~6 MiB once parsed, past the whole budget.
    let mut heavy =
        String::from(r#"{"type":"response.create","model":"m","input":"x","metadata":{"x":["#);
    while heavy.len() < 60 << 10 {
        heavy.push_str(r#"{"":0},"#);
    }
    heavy.push_str("0]}}");
    s.send(Message::text(heavy)).await.unwrap();
    let event = next_event(&mut s).await;
    assert_eq!(event["type"], "error", "{event}");
    assert_eq!(event["status"], 413, "{event}");
    assert_eq!(event["error"]["code"], "request_too_large", "{event}");
    // The session goes on, and the budget is whole again.
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
}

/// An upstream that breaks off mid-turn is no clean end: the client gets the
/// `stream_interrupted` error, then a 1011 close.
#[tokio::test]
async fn an_upstream_that_breaks_mid_turn_is_an_error_and_1011() {
    let p = a_turn_ended_by(DROP).await;
    // It counts against the upstream, as a stream it broke would: after
    // three in a row (a switched upgrade does not forget them) it rests,
    // and no upstream is left for an upgrade.
    for _ in 0..2 {
        let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
        send_create(&mut socket).await;
        while let Some(Ok(Message::Text(_))) =
            tokio::time::timeout(HANG, socket.next()).await.unwrap()
        {}
    }
    let resting = r#"llm_proxy_upstream_healthy{upstream="up"} 0"#;
    let deadline = tokio::time::Instant::now() + HANG;
    while !p.metrics().await.contains(resting) {
        assert!(tokio::time::Instant::now() < deadline, "never ejected");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An upstream that closes cleanly (1000) in the middle of a turn broke
/// it off all the same: the client gets `stream_interrupted`, then 1011,
/// not the upstream's 1000.
#[tokio::test]
async fn an_upstream_closing_mid_turn_is_an_error_and_1011() {
    a_turn_ended_by(CLOSE).await;
}

/// A proxy in front of an upstream that answers a turn with its
/// `response.created`, then `end` ([`DROP`], [`CLOSE`]); its first turn's
/// client gets that message, the `stream_interrupted` error, then a 1011
/// close.
async fn a_turn_ended_by(end: &'static str) -> TestProxy {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let first = serde_json::json!({"type": "response.created", "sequence_number": 3,
        "response": {"id": "resp_1", "status": "in_progress"}})
    .to_string();
    let upstream = scripted(move || {
        let first = first.clone();
        move |_: &serde_json::Value| vec![first.clone(), end.to_owned()]
    })
    .await;
    let p = proxy(&ws_upstream("up", &format!("http://{upstream}/v1"), "")).await;
    let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut socket).await;
    let (texts, close) = texts_until_close(&mut socket).await;
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert_eq!(texts[1]["type"], "error");
    assert_eq!(texts[1]["error"]["code"], "stream_interrupted");
    // Numbered after the upstream's messages.
    assert_eq!(texts[1]["sequence_number"], 4, "{texts:?}");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Error),
        other => panic!("expected a 1011 close, got {other:?}"),
    }
    p
}

/// An upgrade request that carries a body is refused: once switched, the
/// body would be read as the session's first frames.
#[tokio::test]
async fn an_upgrade_with_a_body_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream("up", &up.base_url(), "")).await;
    for framing in ["content-length: 5\r\n", "transfer-encoding: chunked\r\n"] {
        let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        let body = if framing.starts_with("content") {
            "hello"
        } else {
            "5\r\nhello\r\n0\r\n\r\n"
        };
        tcp.write_all(
            format!(
                "GET /v1/responses HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
                 sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{framing}\r\n{body}"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut got = vec![0u8; 1024];
        let n = tokio::time::timeout(HANG, tcp.read(&mut got))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&got[..n]);
        assert!(head.starts_with("HTTP/1.1 400"), "{framing}: {head}");
    }
}

/// An upstream `error` that answers a message which opened no turn (a
/// `response.processed`) does not close the turn under way: its silence is
/// still bounded by `idle_timeout_ms`, and the client hears
/// `stream_interrupted`.
#[tokio::test]
async fn an_error_for_an_acknowledgement_does_not_close_the_open_turn() {
    let addr = scripted(|| {
        |v: &serde_json::Value| match v["type"].as_str() {
            // The turn begins, then the upstream stalls.
            Some("response.create") => vec![created("resp_1")],
            Some("response.processed") => vec![error()],
            _ => vec![],
        }
    })
    .await;
    let p = proxy(&ws_upstream(
        "up",
        &format!("http://{addr}/v1"),
        "idle_timeout_ms = 300\nwebsocket_idle_timeout_ms = 600000",
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut s).await;
    assert_eq!(next_event(&mut s).await["type"], "response.created");
    s.send(Message::text(r#"{"type":"response.processed"}"#))
        .await
        .unwrap();
    assert_eq!(next_event(&mut s).await["type"], "error");
    let event = next_event(&mut s).await;
    assert_eq!(event["error"]["code"], "stream_interrupted", "{event}");
}

/// A drain lets a turn under way end, even after an `error` that answered
/// another message, and only then closes with 1001.
#[tokio::test]
async fn a_drain_does_not_cut_a_turn_after_an_acknowledgement_error() {
    let addr = raw_upstream(|conn| async move {
        let Ok(ws) = tokio_tungstenite::accept_async(conn).await else {
            return;
        };
        let (write, mut read) = ws.split();
        let write = std::sync::Arc::new(tokio::sync::Mutex::new(write));
        while let Some(Ok(Message::Text(text))) = read.next().await {
            let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            let write = write.clone();
            match v["type"].as_str() {
                // A turn that streams for a second.
                Some("response.create") => drop(tokio::spawn(async move {
                    let _ = write
                        .lock()
                        .await
                        .send(Message::text(created("resp_1")))
                        .await;
                    for _ in 0..10 {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        let delta = r#"{"type":"response.output_text.delta","delta":"x"}"#;
                        let _ = write.lock().await.send(Message::text(delta)).await;
                    }
                    let _ = write
                        .lock()
                        .await
                        .send(Message::text(completed("resp_1", 10)))
                        .await;
                })),
                // A type it does not know.
                _ => {
                    let _ = write.lock().await.send(Message::text(error())).await;
                }
            }
        }
    })
    .await;
    let mut p = proxy(&format!(
        "drain_timeout_secs = 60\n{}",
        ws_upstream("up", &format!("http://{addr}/v1"), "")
    ))
    .await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut s).await;
    assert_eq!(next_event(&mut s).await["type"], "response.created");
    s.send(Message::text(r#"{"type":"response.processed"}"#))
        .await
        .unwrap();
    while next_event(&mut s).await["type"] != "error" {}
    p.begin_shutdown();
    let mut last = None;
    let end = loop {
        match tokio::time::timeout(HANG, s.next()).await.unwrap() {
            Some(Ok(Message::Text(text))) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                last = Some(event["type"].as_str().unwrap().to_owned());
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => break other,
        }
    };
    assert_eq!(
        last.as_deref(),
        Some("response.completed"),
        "the drain cut the turn under way with {end:?}"
    );
}

/// The client's key in `sec-websocket-protocol` is stripped even when
/// another token of the header is not ASCII.
#[tokio::test]
async fn a_subprotocol_key_beside_a_non_ascii_token_is_still_stripped() {
    use tokio::io::AsyncWriteExt;
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream(
        "up",
        &up.base_url(),
        "api_key = \"sk-upstream\"",
    ))
    .await;
    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let mut head =
        b"GET /v1/responses HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
        sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        sec-websocket-protocol: openai-insecure-api-key.sk-client-secret, caf"
            .to_vec();
    head.extend_from_slice(b"\xe9\r\n\r\n");
    tcp.write_all(&head).await.unwrap();
    assert!(
        tokio::time::timeout(HANG, read_request_head(&mut tcp))
            .await
            .unwrap(),
        "an answer"
    );
    let seen = up
        .stats
        .last_request_headers()
        .expect("the upgrade reached the upstream");
    for value in seen.get_all("sec-websocket-protocol") {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains("sk-client-secret"),
            "the client's key reached the upstream: {value:?}"
        );
    }
}

/// A close for silence reaches the upstream as a 1001 even when the client
/// reads nothing (its queue full).
#[tokio::test]
async fn an_idle_close_reaches_the_upstream_when_the_client_reads_nothing() {
    let (addr, mut rx) = reporting_ws_upstream(|ws, tx| async move {
        let (mut write, mut read) = ws.split();
        // An answer the client never reads.
        tokio::spawn(async move {
            let delta = serde_json::json!({"type": "response.output_text.delta",
                "delta": "x".repeat(100_000)})
            .to_string();
            while write.send(Message::text(delta.clone())).await.is_ok() {}
        });
        while let Some(m) = read.next().await {
            let end = !matches!(
                m,
                Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))
            );
            let _ = tx.send(format!("{m:?}"));
            if end {
                return;
            }
        }
        let _ = tx.send("the end, without a close".into());
    })
    .await;
    let p = proxy(&ws_upstream(
        "up",
        &format!("http://{addr}/v1"),
        "idle_timeout_ms = 300\nwebsocket_idle_timeout_ms = 300",
    ))
    .await;
    let (_socket, _) = connect(p.addr, &[]).await.unwrap();
    let seen = tokio::time::timeout(HANG, rx.recv())
        .await
        .expect("the upstream's session ends")
        .unwrap();
    assert!(
        seen.starts_with("Ok(Close(Some(CloseFrame { code: Away"),
        "the upstream got no 1001: {seen}"
    );
}

/// The upstream's own close is answered (the close handshake completes),
/// and passed on to the client.
#[tokio::test]
async fn an_upstream_close_is_answered_upstream() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let (addr, mut rx) = reporting_ws_upstream(|mut ws, tx| async move {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        let answer = tokio::time::timeout(HANG, ws.next()).await;
        let _ = tx.send(format!("{answer:?}"));
    })
    .await;
    let p = proxy(&ws_upstream("up", &format!("http://{addr}/v1"), "")).await;
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    match tokio::time::timeout(HANG, s.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
            assert_eq!(frame.reason.as_str(), "bye");
        }
        other => panic!("expected the upstream's close, got {other:?}"),
    }
    let seen = tokio::time::timeout(HANG, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        seen.starts_with("Ok(Some(Ok(Close(") || seen == "Ok(None)",
        "the upstream's close was never answered: {seen}"
    );
}

/// A turn cut after its response streamed (the upstream gone without an
/// end) is charged at least one token a delta the client received, as an
/// HTTP stream cut before its usage is, not only its reservation.
#[tokio::test]
async fn a_turn_cut_mid_response_is_charged_what_it_delivered() {
    let addr = raw_upstream(|conn| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(conn).await else {
            return;
        };
        while let Some(Ok(message)) = ws.next().await {
            let Message::Text(_) = message else { continue };
            if ws.send(Message::text(created("resp_cut"))).await.is_err() {
                return;
            }
            for _ in 0..2000 {
                let delta = r#"{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"tok"}"#;
                if ws.send(Message::text(delta)).await.is_err() {
                    return;
                }
            }
            // Gone without a close, mid-response.
            return;
        }
    })
    .await;
    let p = proxy_with(addr).await;
    let before = remaining_tokens(&p).await;
    let (mut s, _) = connect(p.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    send_create(&mut s).await;
    let mut deltas = 0;
    let read_all = async {
        while let Some(Ok(m)) = s.next().await {
            if let Message::Text(t) = m
                && t.contains("output_text.delta")
            {
                deltas += 1;
            }
        }
    };
    let _ = tokio::time::timeout(HANG, read_all).await;
    assert_eq!(deltas, 2000, "the client received every delta");
    let charged = before.saturating_sub(remaining_tokens(&p).await);
    // (Allowing for a few seconds of refill at 50 a second.)
    assert!(
        charged >= 1800,
        "a turn that delivered 2000 deltas was charged {charged} tokens"
    );
}

/// A WebSocket upstream that hands each session to `serve`, with a
/// channel on which it reports what it saw.
async fn reporting_ws_upstream<F, Fut>(
    serve: F,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
)
where
    F: Fn(
            tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
            tokio::sync::mpsc::UnboundedSender<String>,
        ) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let addr = raw_upstream(move |conn| {
        let (tx, serve) = (tx.clone(), serve.clone());
        async move {
            if let Ok(ws) = tokio_tungstenite::accept_async(conn).await {
                serve(ws, tx).await;
            }
        }
    })
    .await;
    (addr, rx)
}

/// An upstream's own `x-ratelimit-*` headers (its provider account's) do
/// not reach a client through an upgrade either, switched or refused: with
/// auth on, these headers only ever speak of the key (as on HTTP, see
/// `the_upstreams_rate_limit_headers_do_not_reach_clients` in auth.rs).
#[tokio::test]
async fn the_upstreams_rate_limit_headers_do_not_reach_websocket_clients() {
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    const PROVIDER: &str = "x-ratelimit-limit-tokens: 30000000\r\n\
                            x-ratelimit-remaining-tokens: 29999000\r\n\
                            x-ratelimit-reset-requests: 6ms\r\n";
    let switching = raw_upstream(|mut conn| async move {
        let Some((head, _)) = read_request(&mut conn).await else {
            return;
        };
        let key = head_value(&head, "sec-websocket-key").unwrap_or_default();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-accept: {}\r\n{PROVIDER}\r\n",
            derive_accept_key(key.as_bytes())
        );
        if conn.write_all(answer.as_bytes()).await.is_ok() {
            tokio::time::sleep(HANG).await;
        }
    })
    .await;
    let refusing = raw_upstream(|mut conn| async move {
        if read_request_head(&mut conn).await {
            let answer = format!(
                "HTTP/1.1 429 Too Many Requests\r\nretry-after: 60\r\n{PROVIDER}content-length: 0\r\n\r\n"
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    let keys =
        "[auth]\n[[auth.keys]]\nname = \"rpm\"\nkey = \"sk-rpm\"\nrequests_per_minute = 100\n";
    let p = proxy(&format!(
        "{}{keys}",
        ws_upstream("up", &format!("http://{switching}/v1"), "")
    ))
    .await;
    let (_socket, head) = connect(p.addr, &[("authorization", "Bearer sk-rpm")])
        .await
        .unwrap();
    let h = head.headers();
    assert_eq!(h["x-ratelimit-remaining-requests"], "99");
    assert_ne!(h["x-ratelimit-reset-requests"], "6ms");
    assert!(!h.contains_key("x-ratelimit-limit-tokens"), "{h:?}");
    assert!(!h.contains_key("x-ratelimit-remaining-tokens"), "{h:?}");

    let p = proxy(&format!(
        "{}{keys}",
        ws_upstream("up", &format!("http://{refusing}/v1"), "")
    ))
    .await;
    let refused = send(request(
        Method::GET,
        &p.url("/v1/responses"),
        &[
            ("authorization", "Bearer sk-rpm"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    ))
    .await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    // The key's own headers, as on every answer to a limited key.
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("99"));
    assert_ne!(refused.header("x-ratelimit-reset-requests"), Some("6ms"));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), None);
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), None);
}

/// A response made on an upstream since removed from the config (its id
/// kept in a shared Redis) cannot be continued over HTTP either: a turn
/// naming it is told so, not sent to HTTP.
#[tokio::test]
async fn an_id_on_an_upstream_no_longer_configured_is_said_to_be_so() {
    let redis = tests::redis_server::RedisServer::start().await;
    let (a, b) = (mock_named("a").await, mock_named("b").await);
    let auth = format!(
        "[auth]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"gone:\"\n\
         [[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\n",
        redis.url()
    );
    let upstream = |name: &str, url: &str, models: &str| {
        ws_upstream(name, url, &format!("models = [{models}]"))
    };
    let before = proxy(&format!(
        "{}{}{auth}",
        upstream("up-a", &a.base_url(), "\"a\""),
        upstream("up-b", &b.base_url(), "\"b\"")
    ))
    .await;
    let made = send(request(
        Method::POST,
        &before.url("/v1/responses"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-k"),
        ],
        r#"{"model":"b","input":"hi"}"#,
    ))
    .await;
    assert_eq!(made.header("x-llm-proxy-upstream"), Some("up-b"));
    let id = made.json()["id"].as_str().unwrap().to_owned();
    // The config without up-b.
    let after = proxy(&format!(
        "{}{auth}",
        upstream("up-a", &a.base_url(), "\"a\", \"b\"")
    ))
    .await;
    let (mut socket, _) = connect(after.addr, &[("authorization", "Bearer sk-k")])
        .await
        .unwrap();
    let events = turn(
        &mut socket,
        serde_json::json!({"model": "a", "input": "x", "previous_response_id": id}),
    )
    .await;
    let message = events.last().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("not configured any more"), "{message}");
}

/// A client message counts against the request bodies' budget from its
/// first byte, not only once whole: sessions that each send most of a
/// large message and stop hold the budget, and one that would pass it is
/// closed (1013, try again later); and a message may take at most
/// `request_body_timeout_ms` to arrive (1008 past it).
#[tokio::test]
async fn a_message_under_way_is_counted_and_timed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "max_body_bytes = 1048576\nmax_buffered_body_bytes = 1572864\n\
         request_body_timeout_ms = 1500\n{}",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    // A text frame that announces 1 MiB (masked with a zero key), and 800
    // KiB of it.
    let mut partial = vec![0x81, 0x80 | 127];
    partial.extend_from_slice(&(1u64 << 20).to_be_bytes());
    partial.extend_from_slice(&[0, 0, 0, 0]);
    partial.extend(std::iter::repeat_n(b' ', 800 << 10));
    let open = || async { upgraded(tokio::net::TcpStream::connect(p.addr).await.unwrap()).await };
    /// The close code the client hears first (`None`: the connection
    /// ended without one).
    async fn close_code(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u16> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < 4 {
            match tokio::time::timeout(HANG, tcp.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
        (got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]))
    }
    let mut first = open().await;
    first.write_all(&partial).await.unwrap();
    gauge_until(&p, "llm_proxy_buffered_body_bytes", |held| {
        held >= 700 << 10
    })
    .await;
    // A second such message does not fit beside it.
    let mut second = open().await;
    let _ = second.write_all(&partial).await;
    assert_eq!(close_code(&mut second).await, Some(1013));
    // The first never ends: closed once it took too long.
    assert_eq!(close_code(&mut first).await, Some(1008));
    drop((first, second));
    sessions_closed(&p).await;
    // A ping in the middle of a fragmented message, or read together with
    // the start of one, neither frees what the message holds nor restarts
    // its clock.
    let mut fragment = vec![0x01, 0x80 | 127];
    fragment.extend_from_slice(&(800u64 << 10).to_be_bytes());
    fragment.extend_from_slice(&[0, 0, 0, 0]);
    fragment.extend(std::iter::repeat_n(b' ', 800 << 10));
    let ping = [0x89, 0x80, 0, 0, 0, 0];
    let mut then_ping = fragment.clone();
    then_ping.extend_from_slice(&ping);
    let mut ping_then = ping.to_vec();
    ping_then.extend_from_slice(&partial[..100 << 10]);
    for (what, bytes, held) in [
        ("a fragment, then a ping", then_ping, 700 << 10),
        ("a ping and the start of a message", ping_then, 90 << 10),
    ] {
        let mut tcp = open().await;
        tcp.write_all(&bytes).await.unwrap();
        gauge_until(&p, "llm_proxy_buffered_body_bytes", |now| now >= held).await;
        // (The ping's pong comes first.)
        let mut buf = [0u8; 2];
        tcp.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [0x8a, 0x00], "{what}: a pong");
        assert_eq!(close_code(&mut tcp).await, Some(1008), "{what}");
    }
    sessions_closed(&p).await;
    // Whole messages go on as ever.
    let (mut s, _) = connect(p.addr, &[]).await.unwrap();
    let events = turn(&mut s, serde_json::json!({"model": "m", "input": "x"})).await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
}

/// The mock answers a client's close with its own, as RFC 6455 §5.5.1 asks
/// (it ended the connection without one, and the proxy logged every clean
/// close as a reset).
#[tokio::test]
async fn the_mock_answers_a_close() {
    let up = mock_named("m").await;
    let (mut socket, _) = connect(up.addr, &[]).await.unwrap();
    socket.send(Message::Close(None)).await.unwrap();
    let answer = tokio::time::timeout(HANG, socket.next()).await.unwrap();
    assert!(matches!(answer, Some(Ok(Message::Close(_)))), "{answer:?}");
}

/// What an upstream sends counts in the answers' pool while it is read and
/// until it is written to the client: a client that reads nothing holds
/// it there, seen by the gauge, and gives it back when it goes.
#[tokio::test]
async fn upstream_messages_waiting_for_the_client_are_counted() {
    use tokio::io::AsyncWriteExt;
    let big = format!(
        r#"{{"type":"response.output_text.delta","delta":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    let upstream = scripted(move || {
        let big = big.clone();
        move |_: &serde_json::Value| vec![created("resp_1"), big.clone(), big.clone()]
    })
    .await;
    let p = proxy(&ws_upstream("up", &format!("http://{upstream}/v1"), "")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = upgraded(socket.connect(p.addr).await.unwrap()).await;
    // A turn (a text frame masked with a zero key), then nothing read.
    let create = br#"{"type":"response.create","model":"m","input":"x"}"#;
    let mut frame = vec![0x81, 0x80 | create.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(create);
    tcp.write_all(&frame).await.unwrap();
    gauge_until(&p, "llm_proxy_buffered_answer_bytes", |held| {
        held >= 3 << 20
    })
    .await;
    drop(tcp);
    gauge_until(&p, "llm_proxy_buffered_answer_bytes", |held| held == 0).await;
}

/// Wait until the gauge `name` of the proxy's metrics satisfies `wanted`.
async fn gauge_until(p: &TestProxy, name: &str, wanted: impl Fn(u64) -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        let value = p
            .metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
            .unwrap_or(0);
        if wanted(value) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stays {value}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `tcp` switched to WebSocket on `/v1/responses` by a hand-written
/// upgrade (answered 101), for a test that writes frames itself.
async fn upgraded(mut tcp: tokio::net::TcpStream) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    tcp.write_all(
        b"GET /v1/responses HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(read_request_head(&mut tcp).await, "a 101");
    tcp
}

/// A client frame, masked with a zero key (the payload as it is), of at
/// most 125 bytes.
fn small_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![b0, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// The code of the close frame the proxy sends on `tcp`, reading past
/// other frames (pongs); `None` if the connection ends first or no close
/// comes within `HANG`.
async fn close_code(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<u16> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG, async {
        loop {
            // Whole frames first (the proxy's are unmasked).
            while got.len() >= 2 {
                let len = usize::from(got[1] & 0x7f);
                let (head, len) = match len {
                    126 if got.len() >= 4 => (4, usize::from(u16::from_be_bytes([got[2], got[3]]))),
                    126 => break,
                    127 => return None,
                    len => (2, len),
                };
                if got.len() < head + len {
                    break;
                }
                if got[0] == 0x88 {
                    return (len >= 2).then(|| u16::from_be_bytes([got[head], got[head + 1]]));
                }
                got.drain(..head + len);
            }
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// A client that pings on while it reads nothing (each pong waits in the
/// proxy's write buffer) is closed, soon after its connection stops taking
/// writes: the pongs do not pile up without bound.
#[tokio::test]
async fn a_client_that_pings_on_and_reads_nothing_is_closed() {
    let up = mock_named("m").await;
    let p = proxy(&ws_upstream("up", &up.base_url(), "")).await;
    pings_on_reading_nothing(&p, false).await;
}

/// The same with an answer the client does not read queued before the
/// close: the session still ends soon after it (not at its silence).
#[tokio::test]
async fn a_client_that_pings_on_behind_an_unread_answer_is_closed() {
    let delta = serde_json::json!({"type": "response.output_text.delta",
        "delta": "x".repeat(64 << 10)})
    .to_string();
    let upstream = scripted(move || {
        let delta = delta.clone();
        move |_: &serde_json::Value| {
            let mut out = vec![created("resp_big")];
            out.extend(std::iter::repeat_n(delta.clone(), 200));
            out
        }
    })
    .await;
    let p = proxy(&ws_upstream("up", &format!("http://{upstream}/v1"), "")).await;
    pings_on_reading_nothing(&p, true).await;
}

/// A client of `p` that (after a turn, with `create`) pings on and reads
/// nothing, on a small receive buffer: the proxy closes its connection.
async fn pings_on_reading_nothing(p: &TestProxy, create: bool) {
    use tokio::io::AsyncWriteExt;
    const MOST_PINGS: usize = 200_000;
    // A small receive buffer: the proxy's writes stall soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = upgraded(socket.connect(p.addr).await.unwrap()).await;
    if create {
        let turn = br#"{"type":"response.create","model":"m","input":"x"}"#;
        tcp.write_all(&small_frame(0x81, turn)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let batch: Vec<u8> = (0..100)
        .flat_map(|_| small_frame(0x89, &[b'p'; 125]))
        .collect();
    let deadline = tokio::time::Instant::now() + 2 * HANG;
    let mut sent = 0;
    let closed = loop {
        if sent >= MOST_PINGS {
            break false;
        }
        match tokio::time::timeout_at(deadline, tcp.write_all(&batch)).await {
            Ok(Ok(())) => sent += 100,
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "still open after {sent} pings");
    assert!(sent < MOST_PINGS / 2, "{sent} pings taken");
}

/// A message under way must come whole within `request_body_timeout_ms` of
/// its first byte, pings in its middle or not: they do not restart its
/// clock. The session is closed with 1008.
#[tokio::test]
async fn pings_in_a_slow_message_do_not_restart_its_clock() {
    use tokio::io::AsyncWriteExt;
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "request_body_timeout_ms = 1000\n{}",
        ws_upstream("up", &up.base_url(), "")
    ))
    .await;
    // Pings or not; and a message that comes 2 bytes a frame, a ping after
    // each (frames as short as a ping's header must not pass for it).
    for (ping, trickle) in [(false, false), (true, false), (true, true)] {
        let mut tcp = upgraded(tokio::net::TcpStream::connect(p.addr).await.unwrap()).await;
        let (mut read, mut write) = tcp.split();
        // The first fragment of a text message whose rest never comes.
        let first: &[u8] = if trickle {
            b"{\""
        } else {
            br#"{"type":"response.create","#
        };
        let mut start = small_frame(0x01, first);
        if trickle {
            start.extend(small_frame(0x89, b"p"));
        }
        write.write_all(&start).await.unwrap();
        let pinging = async {
            for _ in 0..(HANG.as_millis() / 300) {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                let mut next = Vec::new();
                if trickle {
                    next.extend(small_frame(0x00, b"ty"));
                }
                if ping {
                    next.extend(small_frame(0x89, b"p"));
                }
                if write.write_all(&next).await.is_err() {
                    break;
                }
            }
        };
        let code = tokio::select! {
            code = close_code(&mut read) => code,
            () = pinging => None,
        };
        assert_eq!(code, Some(1008), "pings: {ping}, trickled: {trickle}");
    }
    drop(up);
}

/// Each response numbers its events from its own start: a second turn
/// broken off is told one past its own highest number, not the session's.
#[tokio::test]
async fn a_broken_off_turn_is_numbered_within_its_own_response() {
    let numbered = |kind: &str, id: &str, n: u64| {
        serde_json::json!({"type": kind, "sequence_number": n,
            "response": {"id": id, "status": "in_progress"}})
        .to_string()
    };
    let upstream = scripted(move || {
        let mut turn = 0;
        move |_: &serde_json::Value| {
            turn += 1;
            if turn == 1 {
                vec![
                    numbered("response.created", "resp_1", 0),
                    numbered("response.in_progress", "resp_1", 1),
                    serde_json::json!({"type": "response.completed", "sequence_number": 30,
                        "response": {"id": "resp_1", "status": "completed"}})
                    .to_string(),
                ]
            } else {
                vec![
                    numbered("response.created", "resp_2", 0),
                    numbered("response.in_progress", "resp_2", 1),
                    DROP.to_owned(),
                ]
            }
        }
    })
    .await;
    let p = proxy(&ws_upstream("up", &format!("http://{upstream}/v1"), "")).await;
    let (mut socket, _) = connect(p.addr, &[]).await.unwrap();
    send_create(&mut socket).await;
    until_completed(&mut socket).await;
    send_create(&mut socket).await;
    let (texts, _) = texts_until_close(&mut socket).await;
    let error = texts.last().expect("an error");
    assert_eq!(error["error"]["code"], "stream_interrupted", "{texts:?}");
    assert_eq!(error["sequence_number"], 2, "{texts:?}");
}
