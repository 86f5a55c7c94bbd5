//! Responses and Anthropic Messages through the proxy: routing by API,
//! stateful Responses following their upstream, Anthropic conventions and
//! error shapes, dialect stream failures, token counting.

use http::Method;
use tests::redis_server::RedisServer;
use tests::*;

const ALL_APIS: &str =
    "apis = [\"chat_completions\", \"completions\", \"embeddings\", \"responses\", \"messages\"]";

fn responses_body(stream: bool, previous: Option<&str>) -> String {
    let mut v = serde_json::json!({"model": "m", "input": "Tell me something.", "stream": stream});
    if let Some(p) = previous {
        v["previous_response_id"] = p.into();
    }
    v.to_string()
}

fn messages_body(stream: bool) -> String {
    serde_json::json!({"model": "m", "max_tokens": 64, "stream": stream,
        "messages": [{"role": "user", "content": "Hello there"}]})
    .to_string()
}

async fn post_with(url: &str, body: String, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(request(Method::POST, url, &all, body)).await
}

async fn messages(p: &TestProxy, stream: bool, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("anthropic-version", "2023-06-01")];
    all.extend_from_slice(headers);
    post_with(&p.url("/v1/messages"), messages_body(stream), &all).await
}

#[tokio::test]
async fn responses_and_messages_pass_through_streamed_and_not() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), ALL_APIS)).await;

    let r = post_with(&p.url("/v1/responses"), responses_body(false, None), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["object"], "response");
    let r = post_with(&p.url("/v1/responses"), responses_body(true, None), &[]).await;
    let events = sse_data(&r.body);
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["type"], "response.completed");

    let m = messages(&p, false, &[]).await;
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(m.json()["type"], "message");
    // Anthropic's SDKs read `request-id`: the proxy's, when the upstream
    // sent none; not on the other dialects' answers.
    assert!(m.header("request-id").is_some());
    assert_eq!(m.header("request-id"), m.header("x-request-id"));
    assert!(r.header("request-id").is_none());
    let m = messages(&p, true, &[]).await;
    let events = sse_data(&m.body);
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["type"], "message_stop");

    let metrics = p.metrics().await;
    for route in ["responses", "messages"] {
        assert!(
            metrics.contains(&format!(
                r#"llm_proxy_requests_total{{route="{route}",status="200",upstream="up"}} 2"#
            )),
            "{metrics}"
        );
    }
}

#[tokio::test]
async fn anthropic_headers_and_key_reach_the_upstream() {
    let up = mock_named("claude").await;
    let p = proxy(&one_upstream(
        &up.base_url(),
        "protocol = \"anthropic\"\napi_key = \"sk-ant-upstream\"",
    ))
    .await;
    let m = messages(
        &p,
        false,
        &[
            ("anthropic-beta", "tools-2024-04-04"),
            ("x-api-key", "sk-client"),
        ],
    )
    .await;
    assert_eq!(m.status, 200, "{}", m.text());
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    assert_eq!(seen["anthropic-beta"], "tools-2024-04-04");
    assert_eq!(seen["x-api-key"], "sk-ant-upstream");
    assert!(seen.get("authorization").is_none());
    // protocol = "anthropic" serves only Messages natively (chat completions
    // reach it by translation); embeddings have no way there.
    let emb = post_json(&p.url("/v1/embeddings"), r#"{"model":"m","input":"x"}"#).await;
    emb.assert_error(404, "not_found_error", "api_not_served");
}

#[tokio::test]
async fn the_proxys_own_requests_to_an_anthropic_upstream_name_the_api_version() {
    // Health checks are the proxy's own requests: Anthropic refuses any
    // request without `anthropic-version`, which would mark it down for good.
    let up = mock_named("claude").await;
    let p = proxy(&format!(
        "{}\n[balance]\nhealth_check_secs = 0.1\n",
        one_upstream(&up.base_url(), "protocol = \"anthropic\"")
    ))
    .await;
    eventually("a health check reached the upstream", || {
        up.stats.requests_for("/v1/models") >= 1
    })
    .await;
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["anthropic-version"], "2023-06-01");
    drop(p);
}

#[tokio::test]
async fn an_api_no_upstream_serves_is_404_in_the_clients_dialect() {
    let up = mock_named("m").await;
    // An embeddings-only server can serve neither dialect, even by translation.
    let p = proxy(&one_upstream(&up.base_url(), "apis = [\"embeddings\"]")).await;
    let m = messages(&p, false, &[]).await;
    assert_eq!(m.status, 404);
    let v = m.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`messages` API"),
        "{v}"
    );
    let r = post_with(&p.url("/v1/responses"), responses_body(false, None), &[]).await;
    r.assert_error(404, "not_found_error", "api_not_served");
    assert_eq!(up.stats.requests(), 0);
}

#[tokio::test]
async fn bad_input_gets_the_dialects_error() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), ALL_APIS)).await;
    let m = send(request(
        Method::POST,
        &p.url("/v1/messages"),
        &[
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ],
        "{\"model\": ",
    ))
    .await;
    assert_eq!(m.status, 400);
    assert_eq!(m.json()["error"]["type"], "invalid_request_error");
    assert_eq!(m.json()["type"], "error");
    // The proxy's own errors too: what a Claude Code error report quotes.
    assert_eq!(m.header("request-id"), m.header("x-request-id"));
    let m = send(request(
        Method::POST,
        &p.url("/v1/messages"),
        &[("content-type", "application/json")],
        "{\"max_tokens\": 5}",
    ))
    .await;
    assert_eq!(
        (m.status.as_u16(), m.json()["type"].as_str()),
        (400, Some("error"))
    );
    post_with(&p.url("/v1/responses"), "{".into(), &[])
        .await
        .assert_error(400, "invalid_request_error", "invalid_json");
    let unknown = send(request(
        Method::GET,
        &p.url("/v1/responses/resp_nope"),
        &[],
        "",
    ))
    .await;
    unknown.assert_error(404, "not_found_error", "response_not_found");
    let unknown = post_with(
        &p.url("/v1/responses"),
        responses_body(false, Some("resp_nope")),
        &[],
    )
    .await;
    unknown.assert_error(404, "not_found_error", "response_not_found");
    // A WebSocket upgrade is refused like a plain GET, so clients fall back to HTTP.
    let ws = send(request(
        Method::GET,
        &p.url("/v1/responses"),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ],
        "",
    ))
    .await;
    ws.assert_error(405, "invalid_request_error", "method_not_allowed");
    assert_eq!(ws.header("allow"), Some("POST"));
    assert_eq!(up.stats.requests(), 0);
}

async fn three_upstreams() -> (Vec<MockServer>, String) {
    let mut ups = Vec::new();
    let mut toml = String::new();
    for name in ["a", "b", "c"] {
        let up = mock_named(name).await;
        toml.push_str(&format!(
            "[[upstream]]\nname = \"{name}\"\nurl = \"{}\"\n{ALL_APIS}\n",
            up.base_url()
        ));
        ups.push(up);
    }
    toml.push_str("[balance]\nstrategy = \"round_robin\"\n");
    (ups, toml)
}

#[tokio::test]
async fn previous_response_id_follows_its_upstream() {
    let (_ups, toml) = three_upstreams().await;
    let p = proxy(&toml).await;
    for stream in [false, true] {
        let created = post_with(&p.url("/v1/responses"), responses_body(stream, None), &[]).await;
        assert_eq!(created.status, 200);
        let home = created.header("x-llm-proxy-upstream").unwrap().to_owned();
        let id = if stream {
            let first: serde_json::Value =
                serde_json::from_str(&sse_data(&created.body)[0]).unwrap();
            first["response"]["id"].as_str().unwrap().to_owned()
        } else {
            created.json()["id"].as_str().unwrap().to_owned()
        };
        for _ in 0..6 {
            let next = post_with(
                &p.url("/v1/responses"),
                responses_body(false, Some(&id)),
                &[],
            )
            .await;
            assert_eq!(next.status, 200, "{}", next.text());
            assert_eq!(next.header("x-llm-proxy-upstream"), Some(home.as_str()));
        }
        let got = send(request(
            Method::GET,
            &p.url(&format!("/v1/responses/{id}")),
            &[],
            "",
        ))
        .await;
        assert_eq!(
            (got.status.as_u16(), got.header("x-llm-proxy-upstream")),
            (200, Some(home.as_str()))
        );
        assert_eq!(got.json()["id"], id.as_str());
        let items = send(request(
            Method::GET,
            &p.url(&format!("/v1/responses/{id}/input_items")),
            &[],
            "",
        ))
        .await;
        assert_eq!(items.header("x-llm-proxy-upstream"), Some(home.as_str()));
        let cancel = post_with(
            &p.url(&format!("/v1/responses/{id}/cancel")),
            String::new(),
            &[],
        )
        .await;
        assert_eq!(cancel.header("x-llm-proxy-upstream"), Some(home.as_str()));
        let deleted = send(request(
            Method::DELETE,
            &p.url(&format!("/v1/responses/{id}")),
            &[],
            "",
        ))
        .await;
        assert_eq!(
            (
                deleted.status.as_u16(),
                deleted.header("x-llm-proxy-upstream")
            ),
            (200, Some(home.as_str()))
        );
    }
    // An id that is no string is refused, not sent to an upstream of the
    // proxy's choosing unchecked (as on a WebSocket); `null` is no id.
    for id in ["7", "[\"resp_1\"]", "{\"id\":\"resp_1\"}"] {
        let body = format!(r#"{{"model":"m","input":"hi","previous_response_id":{id}}}"#);
        post_with(&p.url("/v1/responses"), body, &[])
            .await
            .assert_error(400, "invalid_request_error", "unsupported_parameter");
    }
    let body = r#"{"model":"m","input":"hi","previous_response_id":null}"#.to_owned();
    assert_eq!(
        post_with(&p.url("/v1/responses"), body, &[]).await.status,
        200
    );
}

#[tokio::test]
async fn a_response_id_is_only_found_by_the_key_that_created_it() {
    let redis = RedisServer::start().await;
    let up = mock_named("m").await;
    let toml = format!(
        "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"owner:\"\n\
         [[auth.keys]]\nname = \"a\"\nkey = \"sk-a\"\n[[auth.keys]]\nname = \"b\"\nkey = \"sk-b\"\n",
        one_upstream(&up.base_url(), ALL_APIS),
        redis.url()
    );
    // The creating proxy, and one that knows the id only through Redis.
    let (first, second) = (proxy(&toml).await, proxy(&toml).await);
    let a = ("authorization", "Bearer sk-a");
    let b = ("authorization", "Bearer sk-b");
    let created = post_with(
        &first.url("/v1/responses"),
        responses_body(false, None),
        &[a],
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.text());
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let by_id = |p: &TestProxy, key: (&'static str, &'static str)| {
        send(request(
            Method::GET,
            &p.url(&format!("/v1/responses/{id}")),
            &[key],
            "",
        ))
    };
    // Its owner reads it, on this proxy and (once Redis has it) on the other.
    assert_eq!(by_id(&first, a).await.status, 200);
    let mut found = false;
    for _ in 0..100 {
        if by_id(&second, a).await.status == 200 {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(found, "the owner finds its id through Redis");
    // Another key is told the id does not exist, on either proxy, whatever
    // it tries.
    for p in [&first, &second] {
        by_id(p, b)
            .await
            .assert_error(404, "not_found_error", "response_not_found");
        let next = post_with(
            &p.url("/v1/responses"),
            responses_body(false, Some(&id)),
            &[b],
        )
        .await;
        next.assert_error(404, "not_found_error", "response_not_found");
        let deleted = send(request(
            Method::DELETE,
            &p.url(&format!("/v1/responses/{id}")),
            &[b],
            "",
        ))
        .await;
        deleted.assert_error(404, "not_found_error", "response_not_found");
        // Any path under the id names it, not only those the proxy knows.
        let other = send(request(
            Method::GET,
            &p.url(&format!("/v1/responses/{id}/tool_outputs")),
            &[b],
            "",
        ))
        .await;
        other.assert_error(404, "not_found_error", "response_not_found");
    }
    assert_eq!(
        by_id(&first, a).await.status,
        200,
        "still there for its owner"
    );
}

#[tokio::test]
async fn previous_response_id_follows_its_upstream_across_proxies_on_redis() {
    let redis = RedisServer::start().await;
    let (_ups, toml) = three_upstreams().await;
    let shared = format!(
        "{toml}[cache]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"dialects:\"\n",
        redis.url()
    );
    let first = proxy(&shared).await;
    let second = proxy(&shared).await;
    let created = post_with(
        &first.url("/v1/responses"),
        responses_body(false, None),
        &[],
    )
    .await;
    let home = created.header("x-llm-proxy-upstream").unwrap().to_owned();
    let id = created.json()["id"].as_str().unwrap().to_owned();
    // The id reaches Redis in the background: the other proxy finds it soon.
    let mut found = None;
    for _ in 0..100 {
        let next = post_with(
            &second.url("/v1/responses"),
            responses_body(false, Some(&id)),
            &[],
        )
        .await;
        if next.status == 200 {
            found = next.header("x-llm-proxy-upstream").map(str::to_owned);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(found.as_deref(), Some(home.as_str()));
}

#[tokio::test]
async fn dialect_streams_cut_midway_end_with_their_own_error_event() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), ALL_APIS)).await;
    let cut = |path: &str, body: String| {
        let url = p.url(path);
        async move {
            let resp = client()
                .request(request(
                    Method::POST,
                    &url,
                    &[
                        ("content-type", "application/json"),
                        ("anthropic-version", "2023-06-01"),
                        ("x-mock-fail", "drop"),
                        ("x-mock-drop-after", "3"),
                    ],
                    body,
                ))
                .await
                .expect("head");
            read_stream(resp).await
        }
    };
    let (body, broke) = cut("/v1/messages", messages_body(true)).await;
    assert!(broke);
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.ends_with("\n\n")
            && text.contains("event: error\ndata: {\"type\":\"error\",\"error\":{"),
        "{text}"
    );
    assert!(!text.contains("message_stop"));
    let (body, broke) = cut("/v1/responses", responses_body(true, None)).await;
    assert!(broke);
    let text = String::from_utf8_lossy(&body);
    let events: Vec<serde_json::Value> = sse_data(&body)
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let (last, before) = events.split_last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["code"].as_str()),
        (Some("error"), Some("stream_interrupted")),
        "{text}"
    );
    assert!(!text.contains("response.completed"));
    // Numbered after the upstream's events, as every Responses event is.
    let numbered = before.last().unwrap()["sequence_number"].as_u64().unwrap();
    assert_eq!(
        last["sequence_number"].as_u64(),
        Some(numbered + 1),
        "{text}"
    );
}

#[tokio::test]
async fn token_counting_is_estimated_when_no_upstream_counts() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let body = messages_body(false);
    let counted = post_with(
        &p.url("/v1/messages/count_tokens"),
        body.clone(),
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(counted.status, 200, "{}", counted.text());
    assert_eq!(counted.header("x-llm-proxy-estimate"), Some("true"));
    assert_eq!(counted.json()["input_tokens"], body.len() / 4);
    assert_eq!(up.stats.requests(), 0);
    // An upstream that serves Messages counts for real.
    let native = mock_named("n").await;
    let p = proxy(&one_upstream(&native.base_url(), "apis = [\"messages\"]")).await;
    let counted = post_with(
        &p.url("/v1/messages/count_tokens"),
        body,
        &[("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(counted.status, 200, "{}", counted.text());
    assert_eq!(counted.header("x-llm-proxy-estimate"), None);
    assert_eq!(native.stats.requests(), 1);
}

fn remaining_tokens(a: &Answer) -> i64 {
    a.header("x-ratelimit-remaining-tokens")
        .expect("token headers")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn token_limits_count_responses_and_messages_usage() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 100000\n",
        one_upstream(&up.base_url(), ALL_APIS)
    ))
    .await;
    let auth = ("authorization", "Bearer sk-t");
    for (path, stream) in [
        ("/v1/responses", false),
        ("/v1/responses", true),
        ("/v1/messages", false),
        ("/v1/messages", true),
    ] {
        let big = if path == "/v1/responses" {
            serde_json::json!({"model": "m", "input": "hi", "stream": stream, "max_output_tokens": 40000}).to_string()
        } else {
            serde_json::json!({"model": "m", "max_tokens": 40000, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
        };
        let first = post_with(
            &p.url(path),
            big,
            &[auth, ("anthropic-version", "2023-06-01")],
        )
        .await;
        assert_eq!(first.status, 200, "{path}: {}", first.text());
        let reserved_view = remaining_tokens(&first);
        assert!(
            reserved_view < 62_000,
            "{path} reserved its estimate: {reserved_view}"
        );
        // Settled with the real usage when the answer ended: the budget comes back.
        let mut settled = false;
        for _ in 0..50 {
            let probe = post_with(
                &p.url("/v1/messages/count_tokens"),
                messages_body(false),
                &[auth, ("anthropic-version", "2023-06-01")],
            )
            .await;
            if remaining_tokens(&probe) > 90_000 {
                settled = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            settled,
            "{path} (stream {stream}) was reconciled with its usage"
        );
        // Let the bucket refill between cases (nothing measured here).
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// `POST /v1/conversations` through `p`: the new conversation's id and the
/// upstream that made it.
async fn new_conversation(p: &TestProxy, headers: &[(&str, &str)]) -> (String, String) {
    let made = post_with(&p.url("/v1/conversations"), "{}".into(), headers).await;
    assert_eq!(made.status, 200, "{}", made.text());
    let home = made.header("x-llm-proxy-upstream").unwrap().to_owned();
    (made.json()["id"].as_str().unwrap().to_owned(), home)
}

fn in_conversation(conversation: serde_json::Value, stream: bool) -> String {
    serde_json::json!({"model": "m", "input": "And then?", "stream": stream,
        "conversation": conversation})
    .to_string()
}

/// A conversation's own paths, with the method each is read or ended by.
fn conversation_paths(id: &str) -> [(Method, String); 3] {
    [
        (Method::GET, format!("/v1/conversations/{id}")),
        (Method::GET, format!("/v1/conversations/{id}/items")),
        (Method::DELETE, format!("/v1/conversations/{id}")),
    ]
}

#[tokio::test]
async fn a_conversation_follows_its_upstream() {
    let (_ups, toml) = three_upstreams().await;
    let p = proxy(&toml).await;
    let (id, home) = new_conversation(&p, &[]).await;
    // Balanced round robin over three upstreams, each turn still goes to
    // the one holding the conversation, however the conversation is named.
    for (i, named) in [serde_json::json!(id), serde_json::json!({"id": id})]
        .into_iter()
        .cycle()
        .take(6)
        .enumerate()
    {
        let stream = i % 3 == 2;
        let next = post_with(&p.url("/v1/responses"), in_conversation(named, stream), &[]).await;
        assert_eq!(next.status, 200, "{}", next.text());
        assert_eq!(next.header("x-llm-proxy-upstream"), Some(home.as_str()));
    }
    for endpoint in ["/v1/responses/input_tokens", "/v1/responses/compact"] {
        let next = post_with(
            &p.url(endpoint),
            in_conversation(id.clone().into(), false),
            &[],
        )
        .await;
        assert_eq!(
            next.header("x-llm-proxy-upstream"),
            Some(home.as_str()),
            "{endpoint}"
        );
    }
    for (method, path) in conversation_paths(&id) {
        let got = send(request(method.clone(), &p.url(&path), &[], "")).await;
        assert_eq!(
            (got.status.as_u16(), got.header("x-llm-proxy-upstream")),
            (200, Some(home.as_str())),
            "{method} {path}: {}",
            got.text()
        );
    }
    // A conversation the proxy never saw made (before it ran, or made
    // elsewhere) is routed as the request would be without it: the
    // upstream answers.
    let unknown = post_with(
        &p.url("/v1/responses"),
        in_conversation("conv_never".into(), false),
        &[],
    )
    .await;
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    assert!(unknown.header("x-llm-proxy-upstream").is_some());
    assert_eq!(
        unknown.json()["error"]["message"],
        "Conversation with id 'conv_never' not found."
    );
}

#[tokio::test]
async fn conversations_follow_across_proxies_and_stay_with_their_key() {
    let redis = RedisServer::start().await;
    let (ups, toml) = three_upstreams().await;
    let keys = format!(
        "[auth]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"conv:\"\n\
         [[auth.keys]]\nname = \"a\"\nkey = \"sk-a\"\npassthrough = true\n\
         [[auth.keys]]\nname = \"b\"\nkey = \"sk-b\"\npassthrough = true\n",
        redis.url()
    );
    // The second proxy lists the upstreams the other way round, so a
    // passthrough request it does not pin goes elsewhere; the third no
    // longer has the first upstream.
    let block = |i: usize| {
        format!(
            "[[upstream]]\nname = \"{}\"\nurl = \"{}\"\n{ALL_APIS}\n",
            ["a", "b", "c"][i],
            ups[i].base_url()
        )
    };
    let forward = format!("{toml}{keys}");
    let reversed: String = (0..3).rev().map(block).collect();
    let without_a: String = (1..3).map(block).collect();
    let first = proxy(&forward).await;
    let second = proxy(&format!("{reversed}{keys}")).await;
    let third = proxy(&format!("{without_a}{keys}")).await;
    let a = ("authorization", "Bearer sk-a");
    let b = ("authorization", "Bearer sk-b");
    let (id, home) = new_conversation(&first, &[a]).await;
    assert_eq!(home, "a");
    // The id reaches Redis in the background: the other proxy finds it
    // soon, and sends the conversation's own paths to its upstream.
    let get = |p: &TestProxy, key: (&'static str, &'static str)| {
        send(request(
            Method::GET,
            &p.url(&format!("/v1/conversations/{id}")),
            &[key],
            "",
        ))
    };
    let mut found = None;
    for _ in 0..100 {
        let got = get(&second, a).await;
        if got.status == 200 {
            found = got.header("x-llm-proxy-upstream").map(str::to_owned);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(found.as_deref(), Some("a"));
    let next = post_with(
        &second.url("/v1/responses"),
        in_conversation(id.clone().into(), false),
        &[a],
    )
    .await;
    assert_eq!(
        (next.status.as_u16(), next.header("x-llm-proxy-upstream")),
        (200, Some("a")),
        "{}",
        next.text()
    );
    // Another key is told it does not exist, whatever it tries.
    for p in [&first, &second] {
        for (method, path) in conversation_paths(&id) {
            send(request(method, &p.url(&path), &[b], ""))
                .await
                .assert_error(404, "not_found_error", "conversation_not_found");
        }
        post_with(
            &p.url("/v1/responses"),
            in_conversation(serde_json::json!({"id": id}), true),
            &[b],
        )
        .await
        .assert_error(404, "not_found_error", "conversation_not_found");
    }
    // With auth, one the proxy never saw made cannot be told to be the
    // key's: refused before any upstream sees it, as a response id is.
    post_with(
        &first.url("/v1/responses"),
        in_conversation("conv_never".into(), false),
        &[a],
    )
    .await
    .assert_error(404, "not_found_error", "conversation_not_found");
    // A path an upstream might decode into the id is no route at all.
    let escaped = id.replacen('_', "%5F", 1);
    for p in [&first, &second] {
        for path in [
            format!("/v1/conversations/{escaped}"),
            format!("/v1//conversations/{id}"),
            format!("/v1/conversations/conv_x/../{id}"),
            // A router that ignores case reads it as the conversation.
            format!("/v1/Conversations/{id}"),
        ] {
            send(request(Method::GET, &p.url(&path), &[b], ""))
                .await
                .assert_error(404, "not_found_error", "route_not_found");
        }
    }
    // A proxy without its upstream says so, rather than guessing.
    let gone = get(&third, a).await;
    gone.assert_error(404, "not_found_error", "conversation_not_found");
    assert!(
        gone.text().contains("not configured any more"),
        "{}",
        gone.text()
    );
    // Its owner still has it.
    assert_eq!(get(&first, a).await.status, 200);
}

#[tokio::test]
async fn a_responses_event_of_megabytes_is_not_a_broken_stream() {
    // An image tool's result is base64 in `response.output_item.done`, and
    // again in `response.completed`: events of megabytes, in earnest.
    let image = "A".repeat(1_500_000);
    let addr = sse_upstream(move |_| {
        let event =
            |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
        let item =
            serde_json::json!({"type": "image_generation_call", "id": "ig_1", "result": image});
        let body = [
            event(
                "response.created",
                serde_json::json!({"type": "response.created",
                "response": {"id": "resp_big", "status": "in_progress"}}),
            ),
            event(
                "response.output_item.done",
                serde_json::json!({"type": "response.output_item.done",
                "output_index": 0, "item": item}),
            ),
            event(
                "response.completed",
                serde_json::json!({"type": "response.completed",
                "response": {"id": "resp_big", "status": "completed", "output": [item],
                    "usage": {"input_tokens": 10, "output_tokens": 1000, "total_tokens": 1010}}}),
            ),
        ]
        .concat();
        (200, body)
    })
    .await;
    let p = proxy(&format!(
        "{}[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 100000\n",
        one_upstream(&format!("http://{addr}/v1"), "apis = [\"responses\"]")
    ))
    .await;
    let answer = post_with(
        &p.url("/v1/responses"),
        responses_body(true, None),
        &[("authorization", "Bearer sk-k")],
    )
    .await;
    let text = answer.text();
    assert!(
        !text.contains("stream_interrupted"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(text.trim_end().ends_with('}') && text.contains("response.completed"));
    // Its usage, in the large `response.completed`, was read.
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_tokens_total{key="k",model="m",kind="output"} 1000"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("tokens_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Some servers end a Responses stream with chat's `data: [DONE]` after
/// its last event: the stream is whole (passed on, cached), and no fault of
/// the upstream's.
#[tokio::test]
async fn a_done_after_a_responses_streams_last_event_is_harmless() {
    let stream = [
        r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_d1","object":"response","status":"in_progress","output":[]}}"#,
        r#"event: response.output_text.delta
data: {"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
        r#"event: response.completed
data: {"type":"response.completed","sequence_number":2,"response":{"id":"resp_d1","object":"response","status":"completed","output":[],"usage":{"input_tokens":1,"output_tokens":1,"total_tokens":2}}}"#,
        "data: [DONE]",
    ]
    .map(|event| format!("{event}\n\n"))
    .concat();
    let up = sse_upstream(move |_| (200, stream.clone())).await;
    let p = proxy(&format!(
        "{}\n[cache]\nbackend = \"memory\"\n",
        one_upstream(&format!("http://{up}/v1"), "apis = [\"responses\"]")
    ))
    .await;
    let body = r#"{"model":"m","input":"hi","store":false,"stream":true}"#.to_owned();
    for cached in ["miss", "hit"] {
        let answer = post_with(&p.url("/v1/responses"), body.clone(), &[]).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-llm-proxy-cache"), Some(cached));
        let text = answer.text();
        assert!(text.contains("response.completed"), "{text}");
        assert!(!text.contains("stream_interrupted"), "{text}");
    }
}
