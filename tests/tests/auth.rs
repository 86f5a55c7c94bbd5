//! The auth layer over real sockets: keys, allowlists, limits, usage.

use http::Method;
use tests::*;

/// SHA-256 of "sk-hashed", as an operator would put it in the config.
const HASHED: &str = "sk-hashed";

fn sha256_hex(s: &str) -> String {
    llm_proxy_auth::sha256(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn setup(keys: &str) -> (MockServer, TestProxy) {
    let up = mock_named("m").await;
    let toml = format!(
        "{}\n[auth]\n{keys}",
        one_upstream(
            &up.base_url(),
            "models = [\"small\", \"large\"]\napi_key = \"sk-upstream\""
        )
    );
    (up, proxy(&toml).await)
}

fn keys() -> String {
    format!(
        "[[auth.keys]]\nname = \"team-a\"\nkey = \"sk-team-a\"\n\
         [[auth.keys]]\nname = \"hashed\"\nkey_sha256 = \"{}\"\nmodels = [\"small\"]\n\
         [[auth.keys]]\nname = \"ops\"\nkey = \"sk-ops\"\npassthrough = true\n",
        sha256_hex(HASHED)
    )
}

async fn chat_with(p: &TestProxy, headers: &[(&'static str, &[u8])], model: &str) -> Answer {
    let mut req = request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        chat(model, false),
    );
    for (k, v) in headers {
        req.headers_mut()
            .append(*k, http::HeaderValue::from_bytes(v).unwrap());
    }
    send(req).await
}

/// Request headers as name and raw bytes (some are not UTF-8 on purpose).
type Headers<'a> = &'a [(&'static str, &'a [u8])];

#[tokio::test]
async fn credentials_table() {
    let (up, p) = setup(&keys()).await;
    let long = format!("Bearer {}", "k".repeat(8 * 1024));
    let cases: &[(&str, Headers, u16)] = &[
        ("no header", &[], 401),
        ("Bearer without key", &[("authorization", b"Bearer")], 401),
        (
            "Bearer and spaces",
            &[("authorization", b"Bearer    ")],
            401,
        ),
        (
            "lower-case bearer",
            &[("authorization", b"bearer sk-team-a")],
            200,
        ),
        (
            "padded",
            &[("authorization", b"  Bearer   sk-team-a  ")],
            200,
        ),
        (
            "key with spaces",
            &[("authorization", b"Bearer sk team-a")],
            401,
        ),
        ("8 KiB header", &[("authorization", long.as_bytes())], 401),
        (
            "non-UTF-8",
            &[("authorization", b"Bearer sk-\xff\xfe")],
            401,
        ),
        ("unknown key", &[("authorization", b"Bearer sk-nope")], 401),
        (
            "Basic scheme",
            &[("authorization", b"Basic sk-team-a")],
            401,
        ),
        ("hashed key", &[("authorization", b"Bearer sk-hashed")], 200),
        ("x-api-key", &[("x-api-key", b"sk-team-a")], 200),
        ("empty x-api-key", &[("x-api-key", b"")], 401),
        ("Azure api-key", &[("api-key", b"sk-team-a")], 200),
        ("unknown api-key", &[("api-key", b"sk-nope")], 401),
        (
            "two Authorization headers",
            &[
                ("authorization", b"Bearer sk-team-a"),
                ("authorization", b"Bearer sk-nope"),
            ],
            401,
        ),
        (
            "two x-api-key headers",
            &[("x-api-key", b"sk-team-a"), ("x-api-key", b"sk-team-a")],
            401,
        ),
    ];
    let mut first_401: Option<bytes::Bytes> = None;
    for (name, headers, status) in cases {
        let answer = chat_with(&p, headers, "small").await;
        assert_eq!(answer.status.as_u16(), *status, "{name}: {}", answer.text());
        if *status == 401 {
            answer.assert_error(401, "authentication_error", "invalid_api_key");
            // One body, whatever was wrong.
            let first = first_401.get_or_insert_with(|| answer.body.clone());
            assert_eq!(&answer.body, first, "{name}");
        }
    }
    // The upstream never saw a client key.
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
    assert!(seen.get("x-api-key").is_none());
    assert!(seen.get("api-key").is_none());
}

#[tokio::test]
async fn model_allowlist_and_models_listing() {
    let (_up, p) = setup(&keys()).await;
    let denied = chat_with(&p, &[("authorization", b"Bearer sk-hashed")], "large").await;
    denied.assert_error(403, "permission_error", "model_not_allowed");
    let list = |key: &'static str| {
        let url = p.url("/v1/models");
        async move { send(request(Method::GET, &url, &[("authorization", key)], "")).await }
    };
    let ids = |a: &Answer| -> Vec<String> {
        a.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&list("Bearer sk-hashed").await), ["small"]);
    assert_eq!(ids(&list("Bearer sk-team-a").await), ["small", "large"]);
    // One model: only one the key may use; another's is not found, as
    // OpenAI answers for another account's model.
    let one = |key: &'static str, id: &str| {
        let url = p.url(&format!("/v1/models/{id}"));
        async move { send(request(Method::GET, &url, &[("authorization", key)], "")).await }
    };
    let small = one("Bearer sk-hashed", "small").await;
    assert_eq!(small.status, 200);
    assert_eq!(small.json()["id"], "small");
    one("Bearer sk-hashed", "large")
        .await
        .assert_error(404, "not_found_error", "model_not_found");
    assert_eq!(one("Bearer sk-team-a", "large").await.status, 200);
    one("Bearer sk-nope", "small").await.assert_error(
        401,
        "authentication_error",
        "invalid_api_key",
    );
    list("Bearer sk-nope")
        .await
        .assert_error(401, "authentication_error", "invalid_api_key");
}

/// Behind an upstream that serves every model, a model the config does
/// not name is described by the upstream: to a key that may use it,
/// whether or not it has `passthrough` (it could send it requests anyway),
/// and not found for a key whose allowlist lacks it (the upstream's name
/// behind an alias, or its list, is not that key's to read). Deleting one
/// stays a passthrough action.
#[tokio::test]
async fn a_model_the_config_does_not_name_is_described_by_the_keys_allowlist() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}[auth]\n\
         [[auth.keys]]\nname = \"narrow\"\nkey = \"sk-narrow\"\nmodels = [\"m1\"]\npassthrough = true\n\
         [[auth.keys]]\nname = \"open\"\nkey = \"sk-open\"\n",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let get = |key: &'static str, id: &'static str, method: Method| {
        let url = p.url(&format!("/v1/models/{id}"));
        async move { send(request(method, &url, &[("authorization", key)], "")).await }
    };
    get("Bearer sk-narrow", "other", Method::GET)
        .await
        .assert_error(404, "not_found_error", "model_not_found");
    assert_eq!(up.stats.requests_for("/v1/models/other"), 0);
    let mine = get("Bearer sk-narrow", "m1", Method::GET).await;
    assert_eq!(up.stats.requests_for("/v1/models/m1"), 1, "{}", mine.text());
    // No `passthrough`, no allowlist: described, not refused.
    let open = get("Bearer sk-open", "anything", Method::GET).await;
    assert_eq!(
        up.stats.requests_for("/v1/models/anything"),
        1,
        "{}",
        open.text()
    );
    get("Bearer sk-open", "anything", Method::DELETE)
        .await
        .assert_error(403, "permission_error", "route_not_allowed");
}

/// A limited key refused for what its body asks (a model off its
/// allowlist) hears its limits on the 403 too, and the refusal counts:
/// one that keeps asking is limited like any other (DESIGN.md: headers on
/// every response to a limited key).
#[tokio::test]
async fn a_limited_keys_refusal_carries_its_limits_and_counts() {
    let (up, p) = setup(
        "[[auth.keys]]\nname = \"lim\"\nkey = \"sk-lim\"\nmodels = [\"small\"]\nrequests_per_minute = 3\n",
    )
    .await;
    let key: &[u8] = b"Bearer sk-lim";
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let denied = chat_with(&p, &[("authorization", key)], "large").await;
        denied.assert_error(403, "permission_error", "model_not_allowed");
        assert_eq!(denied.header("x-ratelimit-limit-requests"), Some("3"));
        remaining.push(
            denied
                .header("x-ratelimit-remaining-requests")
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    // The fourth is over the limit, whatever it asks.
    let limited = chat_with(&p, &[("authorization", key)], "small").await;
    limited.assert_error(429, "rate_limit_error", "rate_limit_exceeded");
    assert!(limited.header("retry-after").is_some());
    assert_eq!(up.stats.requests_for("/chat/completions"), 0);
    // In the Anthropic dialect on its route.
    let messages = send(request(
        Method::POST,
        &p.url("/v1/messages"),
        &[
            ("content-type", "application/json"),
            ("x-api-key", "sk-lim"),
        ],
        r#"{"model":"large","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
    ))
    .await;
    assert_eq!(messages.status, 429, "{}", messages.text());
    assert_eq!(messages.json()["type"], "error");
}

/// A cap or count the estimate cannot read (`"n": 100.0`, which a lax
/// server takes as 100 completions) reserves all the key's tokens, not the
/// one completion of 256 it would otherwise assume.
#[tokio::test]
async fn an_unreadable_count_reserves_the_whole_token_limit() {
    let (_up, p) =
        setup("[[auth.keys]]\nname = \"tok\"\nkey = \"sk-tok\"\ntokens_per_minute = 1000\n").await;
    let ask = |extra: &'static str| {
        let url = p.url("/v1/chat/completions");
        async move {
            let body = format!(
                r#"{{"model":"small","max_tokens":10,{extra}"messages":[{{"role":"user","content":"hi"}}]}}"#
            );
            send(request(
                Method::POST,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", "Bearer sk-tok"),
                ],
                body,
            ))
            .await
        }
    };
    // On a full bucket it passes, holding all of it while it runs (its
    // usage settles after). Read, the same count reserves about 30.
    let unreadable = ask(r#""n":100.0,"#).await;
    assert_eq!(unreadable.status, 200, "{}", unreadable.text());
    assert_eq!(
        unreadable.header("x-ratelimit-remaining-tokens"),
        Some("0"),
        "the whole limit is reserved"
    );
    let readable = ask(r#""n":1,"#).await;
    let left: u64 = readable
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 900, "a readable count reserves little: {left}");
}

#[tokio::test]
async fn passthrough_routes_need_the_passthrough_flag() {
    let (up, p) = setup(&keys()).await;
    let denied = send(request(
        Method::GET,
        &p.url("/v1/files"),
        &[("authorization", "Bearer sk-team-a")],
        "",
    ))
    .await;
    denied.assert_error(403, "permission_error", "route_not_allowed");
    assert_eq!(up.stats.requests(), 0);
    let allowed = send(request(
        Method::GET,
        &p.url("/v1/files"),
        &[("authorization", "Bearer sk-ops")],
        "",
    ))
    .await;
    assert_eq!(allowed.status, 404, "forwarded; the mock has no /files");
    assert_eq!(up.stats.requests(), 1);
}

/// Every error the proxy gives on the Messages API's paths is Anthropic's
/// shape, also on those it passes through (the Message Batches API,
/// `/v1/messages/batches…`) or does not route: Anthropic's SDKs read no
/// other.
#[tokio::test]
async fn errors_under_v1_messages_are_anthropic_shaped_on_every_path() {
    let (up, p) = setup(&keys()).await;
    let anthropic = |answer: &Answer, status: u16, kind: &str| {
        assert_eq!(answer.status.as_u16(), status, "{}", answer.text());
        let json = answer.json();
        assert_eq!(json["type"], "error", "{json}");
        assert_eq!(json["error"]["type"], kind, "{json}");
    };
    let batches = p.url("/v1/messages/batches");
    let ask = |method: Method, url: &str, key: &str| {
        let auth = format!("Bearer {key}");
        let req = request(method, url, &[("authorization", &auth)], "");
        send(req)
    };
    anthropic(
        &ask(Method::GET, &batches, "sk-wrong").await,
        401,
        "authentication_error",
    );
    anthropic(
        &ask(Method::POST, &batches, "sk-team-a").await,
        403,
        "permission_error",
    );
    anthropic(
        &ask(Method::TRACE, &batches, "sk-ops").await,
        405,
        "invalid_request_error",
    );
    anthropic(
        &ask(Method::POST, &p.url("/v1/messages//count_tokens"), "sk-ops").await,
        404,
        "not_found_error",
    );
    assert_eq!(up.stats.requests(), 0);
    // Beside them, the OpenAI routes keep OpenAI's shape.
    ask(Method::GET, &p.url("/v1/files"), "sk-wrong")
        .await
        .assert_error(401, "authentication_error", "invalid_api_key");
}

#[tokio::test]
async fn a_responses_conversation_needs_the_passthrough_flag() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}\n[auth]\n{}",
        one_upstream(&up.base_url(), "apis = [\"responses\"]"),
        keys()
    ))
    .await;
    let made = send(request(
        Method::POST,
        &p.url("/v1/conversations"),
        &[
            ("authorization", "Bearer sk-ops"),
            ("content-type", "application/json"),
        ],
        "{}",
    ))
    .await;
    let id = made.json()["id"].as_str().unwrap().to_owned();
    let body = format!(r#"{{"model": "small", "input": "x", "conversation": "{id}"}}"#);
    let post = |key: &'static str| {
        request(
            Method::POST,
            &p.url("/v1/responses"),
            &[("authorization", key), ("content-type", "application/json")],
            body.clone(),
        )
    };
    // No way to make a conversation of its own: none of anyone else's.
    send(post("Bearer sk-team-a"))
        .await
        .assert_error(403, "permission_error", "route_not_allowed");
    assert_eq!(up.stats.requests(), 1);
    let allowed = send(post("Bearer sk-ops")).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(up.stats.requests(), 2);
    // `conversation: null` names none.
    let none = send(request(
        Method::POST,
        &p.url("/v1/responses"),
        &[
            ("authorization", "Bearer sk-team-a"),
            ("content-type", "application/json"),
        ],
        r#"{"model": "small", "input": "x", "conversation": null}"#,
    ))
    .await;
    assert_eq!(none.status, 200, "{}", none.text());
}

#[tokio::test]
async fn a_passthrough_request_without_a_body_reserves_no_tokens() {
    let (_up, p) = setup(
        "[[auth.keys]]\nname = \"ops\"\nkey = \"sk-ops\"\npassthrough = true\ntokens_per_minute = 300\n",
    )
    .await;
    // Each would have kept a 256-token reservation (no usage comes back):
    // the second would have been refused.
    for _ in 0..3 {
        let listed = send(request(
            Method::GET,
            &p.url("/v1/files"),
            &[("authorization", "Bearer sk-ops")],
            "",
        ))
        .await;
        assert_eq!(listed.status, 404, "forwarded; the mock has no /files");
        assert_eq!(listed.header("x-ratelimit-remaining-tokens"), Some("300"));
    }
    // A body that is not JSON (an upload that may run a model) still
    // reserves the default estimate.
    let upload = send(request(
        Method::POST,
        &p.url("/v1/audio/transcriptions"),
        &[
            ("authorization", "Bearer sk-ops"),
            ("content-type", "multipart/form-data; boundary=x"),
        ],
        "--x\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--x--\r\n",
    ))
    .await;
    assert_eq!(upload.header("x-ratelimit-remaining-tokens"), Some("44"));
}

#[tokio::test]
async fn an_h2_upload_without_content_length_keeps_its_reservation() {
    // HTTP/2 carries a body in DATA frames: no content-length, no
    // transfer-encoding, a body all the same.
    let (_up, p) = setup(
        "[[auth.keys]]\nname = \"ops\"\nkey = \"sk-ops\"\npassthrough = true\ntokens_per_minute = 300\n",
    )
    .await;
    type Chunks = futures_util::stream::Iter<
        std::vec::IntoIter<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>,
    >;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::StreamBody<Chunks>>();
    let chunks = vec![
        Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"--x\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\n",
        ))),
        Ok(http_body::Frame::data(bytes::Bytes::from_static(
            b"whisper\r\n--x--\r\n",
        ))),
    ];
    let req = http::Request::post(p.url("/v1/audio/transcriptions"))
        .header("authorization", "Bearer sk-ops")
        .header("content-type", "multipart/form-data; boundary=x")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-ratelimit-remaining-tokens"], "44");
}

#[tokio::test]
async fn requests_per_minute_gives_exact_429_and_headers() {
    let (_up, p) =
        setup("[[auth.keys]]\nname = \"slow\"\nkey = \"sk-slow\"\nrequests_per_minute = 3\n").await;
    for remaining in ["2", "1", "0"] {
        let ok = chat_with(&p, &[("authorization", b"Bearer sk-slow")], "small").await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(ok.header("x-ratelimit-remaining-requests"), Some(remaining));
        assert!(ok.header("x-ratelimit-reset-requests").is_some());
        assert_eq!(
            ok.header("x-ratelimit-limit-tokens"),
            None,
            "no token limit, no token headers"
        );
    }
    let limited = chat_with(&p, &[("authorization", b"Bearer sk-slow")], "small").await;
    limited.assert_error(429, "rate_limit_error", "rate_limit_exceeded");
    // rpm 3 with burst 3: the next slot opens in 20 s.
    assert_eq!(limited.header("retry-after"), Some("20"));
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(limited.header("x-ratelimit-reset-requests"), Some("1m0s"));
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_rate_limited_total{key="slow"} 1"#),
        "{metrics}"
    );
}

/// The upstream's own `x-ratelimit-*` headers (the operator's account with
/// the provider) do not reach clients: a key limited in requests only does
/// not read the upstream's token figures as its own, an unlimited key gets
/// none. Nor do Anthropic's rate-limit headers or the account's ids.
#[tokio::test]
async fn the_upstreams_rate_limit_headers_do_not_reach_clients() {
    use tokio::io::AsyncWriteExt;
    let addr = raw_upstream(|mut conn| async move {
        while read_request(&mut conn).await.is_some() {
            let body = r#"{"id":"c","object":"chat.completion","created":1,"model":"small","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
            let answer = json_answer(
                "200 OK",
                "x-ratelimit-limit-tokens: 30000000\r\nx-ratelimit-remaining-tokens: 29999000\r\n\
                 x-ratelimit-limit-requests: 10000\r\nx-ratelimit-reset-requests: 6ms\r\n\
                 anthropic-ratelimit-tokens-remaining: 12345\r\n\
                 anthropic-organization-id: org-uuid\r\nopenai-organization: org-op\r\n\
                 openai-project: proj_op\r\nopenai-processing-ms: 7\r\n",
                body,
            );
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let p = proxy(&format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"rpm\"\nkey = \"sk-rpm\"\nrequests_per_minute = 100\n\
         [[auth.keys]]\nname = \"free\"\nkey = \"sk-free\"\n",
        one_upstream(&format!("http://{addr}/v1"), "")
    ))
    .await;
    let limited = chat_with(&p, &[("authorization", b"Bearer sk-rpm")], "small").await;
    assert_eq!(limited.status, 200, "{}", limited.text());
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("100"));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("99"));
    assert_ne!(limited.header("x-ratelimit-reset-requests"), Some("6ms"));
    assert_eq!(limited.header("x-ratelimit-limit-tokens"), None);
    assert_eq!(limited.header("x-ratelimit-remaining-tokens"), None);
    let free = chat_with(&p, &[("authorization", b"Bearer sk-free")], "small").await;
    assert_eq!(free.status, 200, "{}", free.text());
    for name in [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-limit-requests",
        "x-ratelimit-reset-requests",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-organization-id",
        "openai-organization",
        "openai-project",
    ] {
        assert_eq!(free.header(name), None, "{name}");
        assert_eq!(
            limited.header(name).is_some(),
            name.contains("requests"),
            "{name}"
        );
    }
    // What is not about the account passes.
    assert_eq!(free.header("openai-processing-ms"), Some("7"));
}

/// Listing models is a request like any other: it counts against the
/// key's request limit and carries its headers.
#[tokio::test]
async fn listing_models_counts_against_the_request_limit() {
    let (_up, p) =
        setup("[[auth.keys]]\nname = \"slow\"\nkey = \"sk-slow\"\nrequests_per_minute = 3\n").await;
    let list = || {
        send(request(
            Method::GET,
            &p.url("/v1/models"),
            &[("authorization", "Bearer sk-slow")],
            "",
        ))
    };
    for remaining in ["2", "1"] {
        let ok = list().await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-ratelimit-remaining-requests"), Some(remaining));
    }
    let ok = chat_with(&p, &[("authorization", b"Bearer sk-slow")], "small").await;
    assert_eq!(ok.header("x-ratelimit-remaining-requests"), Some("0"));
    let limited = list().await;
    limited.assert_error(429, "rate_limit_error", "rate_limit_exceeded");
    assert_eq!(limited.header("retry-after"), Some("20"));
}

fn remaining_tokens(a: &Answer) -> i64 {
    a.header("x-ratelimit-remaining-tokens")
        .expect("token headers")
        .parse()
        .unwrap()
}

async fn tpm_reconciles(stream: bool) {
    let (_up, p) =
        setup("[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 100000\n").await;
    let body = |max: u32| {
        serde_json::json!({"model": "small", "stream": stream, "max_tokens": max,
            "messages": [{"role": "user", "content": "count my tokens"}]})
        .to_string()
    };
    let big = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-t"),
        ],
        body(50_000),
    ))
    .await;
    assert_eq!(big.status, 200);
    // Reserved up front: prompt bytes / 4 + max_tokens.
    let after_reserve = remaining_tokens(&big);
    assert!(after_reserve <= 50_000, "{after_reserve}");
    if stream {
        let events = sse_data(&big.body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert!(
            !events
                .iter()
                .any(llm_proxy_core::usage::is_usage_only_chunk),
            "the client did not ask for usage: the chunk the proxy requested is stripped"
        );
    }
    // Reconciled with the real usage (8 completion tokens): the next request
    // sees nearly the whole budget again.
    let next = eventually_answer(&p, &body(10), |a| remaining_tokens(a) > 99_000).await;
    assert_eq!(next.status, 200);
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"llm_proxy_tokens_total{key="t",model="small",kind="output"} "#),
        "{metrics}"
    );
}

/// Repeat a request until `cond` holds (the reconciliation runs when the
/// previous body ends, just after the client has read it).
async fn eventually_answer(p: &TestProxy, body: &str, cond: impl Fn(&Answer) -> bool) -> Answer {
    for _ in 0..50 {
        let a = send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer sk-t"),
            ],
            body.to_owned(),
        ))
        .await;
        if cond(&a) {
            return a;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("condition never held");
}

#[tokio::test]
async fn tokens_per_minute_reconciles_with_real_usage() {
    tpm_reconciles(false).await;
}

#[tokio::test]
async fn tokens_per_minute_reconciles_streamed_usage() {
    tpm_reconciles(true).await;
}

#[tokio::test]
async fn stream_usage_is_kept_when_the_client_asked() {
    let (_up, p) =
        setup("[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 100000\n").await;
    let body = r#"{"model":"small","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let a = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-t"),
        ],
        body,
    ))
    .await;
    let events = sse_data(&a.body);
    assert!(
        events
            .iter()
            .any(llm_proxy_core::usage::is_usage_only_chunk)
    );
}

/// A limited key's stream is asked for its usage chunk on the client's
/// behalf: the field is added to the client's bytes, which otherwise reach
/// the upstream as they came; `stream_options` that are not an object are
/// the upstream's to judge, and left as sent.
#[tokio::test]
async fn the_usage_option_is_added_to_a_limited_keys_bytes() {
    let (up, p) =
        setup("[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 100000\n").await;
    let chat = |body: &str| {
        send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("authorization", "Bearer sk-t"),
            ],
            body.to_owned(),
        ))
    };
    let body = "{ \"model\" : \"small\", \"stream\": true, \"temperature\": 1e0,\n  \"messages\": [{\"content\": \"hi\", \"role\": \"user\"}] }\n";
    let a = chat(body).await;
    assert_eq!(a.status, 200);
    let sent = up.stats.last_request_body().unwrap();
    let want = body.replace("}] }", "}] ,\"stream_options\":{\"include_usage\":true}}");
    assert_eq!(std::str::from_utf8(&sent).unwrap(), want);
    assert!(
        !sse_data(&a.body)
            .iter()
            .any(llm_proxy_core::usage::is_usage_only_chunk),
        "not asked for, not sent"
    );
    let body = r#"{"model":"small","stream":true,"stream_options":"x","messages":[]}"#;
    chat(body).await;
    assert_eq!(&up.stats.last_request_body().unwrap()[..], body.as_bytes());
}

#[tokio::test]
async fn tokens_per_minute_exhausted_is_429() {
    let (_up, p) =
        setup("[[auth.keys]]\nname = \"t\"\nkey = \"sk-t\"\ntokens_per_minute = 300\n").await;
    let body = serde_json::json!({"model": "small", "max_tokens": 250, "messages": [{"role": "user", "content": "x"}]}).to_string();
    let hdrs = [
        ("content-type", "application/json"),
        ("authorization", "Bearer sk-t"),
    ];
    let first = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &hdrs,
        body.clone(),
    ))
    .await;
    assert_eq!(first.status, 200);
    // A second reservation of ~270 does not fit before the first is settled
    // or refilled; once settled (~30 used), it fits.
    let second = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &hdrs,
        body.clone(),
    ))
    .await;
    if second.status == 429 {
        second.assert_error(429, "rate_limit_error", "rate_limit_exceeded");
        assert!(
            second
                .header("retry-after")
                .is_some_and(|s| s.parse::<u64>().unwrap() >= 1)
        );
        assert_eq!(second.header("x-ratelimit-limit-tokens"), Some("300"));
    }
    // Three more reservations of ~270 cannot all fit in 300/min.
    let mut limited = false;
    for _ in 0..3 {
        let a = send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &hdrs,
            body.clone(),
        ))
        .await;
        limited |= a.status == 429;
    }
    assert!(limited, "the token budget ran out");
}

/// The head of a request whose body never comes: only its first bytes are
/// sent, and the connection is left open.
async fn head_only(p: &TestProxy, path: &str, key: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let auth = key.map_or(String::new(), |k| format!("authorization: Bearer {k}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}\
         content-length: 1000000\r\n\r\n{{\"model\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(HANG, conn.read(&mut answer))
        .await
        .expect("an answer before the body is complete")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test]
async fn a_wrong_key_is_refused_before_the_body_is_read() {
    // The body read timeout is far beyond HANG: only an answer from the
    // head alone can arrive in time.
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "header_read_timeout_ms = 60000\n{}\n[auth]\n{}",
        one_upstream(&up.base_url(), ""),
        keys()
    ))
    .await;
    for key in [None, Some("sk-wrong")] {
        let answer = head_only(&p, "/v1/chat/completions", key).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("invalid_api_key"), "{answer}");
    }
    // A route the key may not use: 403, also from the head.
    let answer = head_only(&p, "/v1/files", Some("sk-team-a")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("route_not_allowed"), "{answer}");
    assert_eq!(up.stats.requests(), 0);
}

#[tokio::test]
async fn a_background_response_under_a_token_limit_must_bound_itself() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "{}\n[auth]\n\
         [[auth.keys]]\nname = \"tpm\"\nkey = \"sk-tpm\"\ntokens_per_minute = 1000\n\
         [[auth.keys]]\nname = \"free\"\nkey = \"sk-free\"\n",
        one_upstream(&up.base_url(), "apis = [\"responses\"]")
    ))
    .await;
    let post = |key: &'static str, body: serde_json::Value| {
        send(request(
            Method::POST,
            &p.url("/v1/responses"),
            &[("authorization", key), ("content-type", "application/json")],
            body.to_string(),
        ))
    };
    let background = |cap: Option<u64>| {
        let mut body = serde_json::json!({"model": "m", "input": "x", "background": true});
        if let Some(cap) = cap {
            body["max_output_tokens"] = cap.into();
        }
        body
    };
    // Unbounded, or bounded beyond what one reservation can charge.
    for cap in [None, Some(5000)] {
        let refused = post("Bearer sk-tpm", background(cap)).await;
        refused.assert_error(400, "invalid_request_error", "unsupported_parameter");
        assert_eq!(refused.json()["error"]["param"], "max_output_tokens");
    }
    // A small `max_tokens` beside it does not shrink the estimate.
    let mut both = background(Some(5000));
    both["max_tokens"] = 1.into();
    post("Bearer sk-tpm", both).await.assert_error(
        400,
        "invalid_request_error",
        "unsupported_parameter",
    );
    // Context kept upstream is input the estimate cannot see.
    // (A `conversation` is refused the same way; this key may name none.)
    let mut body = background(Some(100));
    body["previous_response_id"] = "resp_1".into();
    let refused = post("Bearer sk-tpm", body).await;
    refused.assert_error(400, "invalid_request_error", "unsupported_parameter");
    assert_eq!(refused.json()["error"]["param"], "previous_response_id");
    // So is what the upstream fetches or runs itself.
    for (field, value, param) in [
        ("prompt", serde_json::json!({"id": "pmpt_1"}), "prompt"),
        (
            "tools",
            serde_json::json!([{"type": "web_search"}]),
            "tools",
        ),
        (
            "input",
            serde_json::json!([{"role": "user", "content": [
                {"type": "input_file", "file_url": "https://example.com/a.pdf"}]}]),
            "input",
        ),
        (
            "input",
            serde_json::json!([{"role": "user", "content": [
                {"type": "input_image", "file_id": "file_1"}]}]),
            "input",
        ),
        (
            "input",
            serde_json::json!([{"type": "item_reference", "id": "msg_1"}]),
            "input",
        ),
        (
            "input",
            serde_json::json!([{"type": "function_call_output", "call_id": "c1", "output": [
                {"type": "input_file", "file_id": "file_2"}]}]),
            "input",
        ),
    ] {
        let mut body = background(Some(100));
        body[field] = value;
        let refused = post("Bearer sk-tpm", body).await;
        refused.assert_error(400, "invalid_request_error", "unsupported_parameter");
        assert_eq!(refused.json()["error"]["param"], param, "{field}");
    }
    // What the body holds itself is counted: an image as a `data:` URL, a
    // function tool, function tools in a namespace.
    let mut inline = background(Some(100));
    inline["input"] = serde_json::json!([{"role": "user", "content": [
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]);
    inline["tools"] = serde_json::json!([{"type": "function", "name": "f", "parameters": {}},
        {"type": "namespace", "name": "n", "description": "N", "tools": [
            {"type": "function", "name": "g", "parameters": {}}]}]);
    let inline = post("Bearer sk-tpm", inline).await;
    assert_eq!(inline.status, 200, "{}", inline.text());
    // A `background` a lax server reads as true is held to the same checks.
    for lax in [serde_json::json!("true"), 1.into(), "yes".into()] {
        let mut body = background(None);
        body["background"] = lax.clone();
        post("Bearer sk-tpm", body).await.assert_error(
            400,
            "invalid_request_error",
            "unsupported_parameter",
        );
    }
    assert_eq!(up.stats.requests(), 1, "the inline one");
    // Bounded within the limit; and a key without a token limit as it likes.
    let bounded = post("Bearer sk-tpm", background(Some(100))).await;
    assert_eq!(bounded.status, 200, "{}", bounded.text());
    let free = post("Bearer sk-free", background(None)).await;
    assert_eq!(free.status, 200, "{}", free.text());
    // Not in the background: settled from its usage, as ever.
    let plain = post(
        "Bearer sk-tpm",
        serde_json::json!({"model": "m", "input": "x"}),
    )
    .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    assert_eq!(up.stats.requests(), 4);
}

/// A key allowed only `small` is not served `secret` when `small`'s
/// upstreams fail and `fallbacks` names `secret`: fallbacks stay within the
/// key's allowlist.
#[tokio::test]
async fn a_fallback_does_not_bypass_the_model_allowlist() {
    let secret = mock_named("secret").await;
    let dead = dead_port().await;
    let toml = format!(
        "[[upstream]]\nname = \"small-up\"\nurl = \"http://127.0.0.1:{dead}/v1\"\nmodels = [\"small\"]\n\
         [[upstream]]\nname = \"secret-up\"\nurl = \"{}\"\nmodels = [\"secret\"]\n\
         [balance]\nfallbacks = {{ \"small\" = [\"secret\"] }}\n\
         [auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\nmodels = [\"small\"]\n",
        secret.base_url()
    );
    let p = proxy(&toml).await;
    // The key may not ask for `secret` itself.
    let direct = chat_with(&p, &[("authorization", b"Bearer sk-k")], "secret").await;
    assert_eq!(direct.status, 403);
    let a = chat_with(&p, &[("authorization", b"Bearer sk-k")], "small").await;
    assert_eq!(
        secret.stats.requests(),
        0,
        "served by a model outside the key's allowlist: {} {}",
        a.status,
        a.header("x-llm-proxy-upstream").unwrap_or("")
    );
}

/// DESIGN pins rate-limit headers "on every response to a limited key":
/// an upstream failure answered by the proxy itself (502) has them too
/// (the request counted).
#[tokio::test]
async fn a_502_to_a_limited_key_carries_the_rate_limit_headers() {
    let dead = dead_port().await;
    let toml = format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\nrequests_per_minute = 10\n",
        one_upstream(&format!("http://127.0.0.1:{dead}/v1"), "")
    );
    let p = proxy(&toml).await;
    let a = chat_with(&p, &[("authorization", b"Bearer sk-k")], "m").await;
    assert_eq!(a.status, 502, "{}", a.text());
    let b = chat_with(&p, &[("authorization", b"Bearer sk-k")], "m").await;
    assert_eq!(
        b.header("x-ratelimit-remaining-requests"),
        Some("8"),
        "two requests counted; headers: {:?}",
        b.headers
    );
}

const SSE_DELTA: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n";
const SSE_USAGE: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n";

fn limited_key(addr: std::net::SocketAddr) -> String {
    format!(
        "{}\n[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 100000\n",
        one_upstream(&format!("http://{addr}/v1"), "")
    )
}

async fn stream_as_k(p: &TestProxy, body: String) -> Answer {
    send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("authorization", "Bearer sk-k"),
            ("content-type", "application/json"),
        ],
        body,
    ))
    .await
}

#[tokio::test]
async fn an_upstream_that_refuses_stream_options_still_serves_a_limited_key() {
    // Some servers (older Azure API versions) reject the field the proxy
    // adds to count a limited key's tokens: it is sent again without.
    let addr = sse_upstream(|body| {
        if String::from_utf8_lossy(body).contains("stream_options") {
            let error = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error"}}"#;
            (400, error.to_owned())
        } else {
            (200, format!("{SSE_DELTA}data: [DONE]\n\n"))
        }
    })
    .await;
    let p = proxy(&limited_key(addr)).await;
    let answer = stream_as_k(&p, chat("m", true)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.text().contains("\"hi\""), "{}", answer.text());
    // A request's own 400 is not sent twice, and comes back as it came.
    let own =
        sse_upstream(|_| (400, r#"{"error":{"message":"bad temperature"}}"#.to_owned())).await;
    let p = proxy(&limited_key(own)).await;
    let answer = stream_as_k(&p, chat("m", true)).await;
    assert_eq!(answer.status, 400);
    assert!(answer.text().contains("bad temperature"));
}

#[tokio::test]
async fn leaving_out_the_usage_chunk_keeps_everything_else() {
    // Keep-alive comments (OpenRouter's while the model thinks) reach a
    // limited key's client, whose usage chunk is left out.
    let addr = sse_upstream(|_| {
        (
            200,
            format!(": OPENROUTER PROCESSING\n\n{SSE_DELTA}{SSE_USAGE}data: [DONE]\n\n"),
        )
    })
    .await;
    let p = proxy(&limited_key(addr)).await;
    let text = stream_as_k(&p, chat("m", true)).await.text();
    assert!(text.starts_with(": OPENROUTER PROCESSING\n\n"), "{text}");
    assert!(
        text.contains("\"hi\"") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(!text.contains("\"usage\""), "{text}");
    // Asked for, the chunk stays.
    let mut asked: serde_json::Value = serde_json::from_str(&chat("m", true)).unwrap();
    asked["stream_options"] = serde_json::json!({"include_usage": true});
    let text = stream_as_k(&p, asked.to_string()).await.text();
    assert!(text.contains("\"usage\""), "{text}");
}

/// An unlimited key's stream carries no `usage` (the proxy asks for it
/// only under a token limit): it counts what it surely used, as a cut
/// stream does: the prompt's estimate as input, and the chunks that
/// carried output as output.
#[tokio::test]
async fn an_unlimited_keys_stream_counts_its_estimate_and_chunks() {
    let (_up, p) = setup(&keys()).await;
    let body = chat("small", true);
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-team-a"),
        ],
        body.clone(),
    ))
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        sse_data(&answer.body).last().map(String::as_str),
        Some("[DONE]")
    );
    let count = |metrics: &str, kind: &str| {
        let line =
            format!("llm_proxy_tokens_total{{key=\"team-a\",model=\"small\",kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .map(|n| n.parse::<u64>().unwrap())
    };
    // The count is taken when the body ends, just after the client read it.
    let mut metrics = String::new();
    for _ in 0..250 {
        metrics = p.metrics().await;
        if count(&metrics, "output").is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The mock's 8 tokens, one a chunk, and its role and finish chunks.
    assert_eq!(count(&metrics, "output"), Some(10), "{metrics}");
    assert_eq!(
        count(&metrics, "input"),
        Some(body.len() as u64 / 4),
        "{metrics}"
    );
}

/// `cors_allow_origins`: a browser app on a listed origin has its preflight
/// (sent without the key) answered, and may read every answer, refusals
/// included; an origin not listed gets what it would without the setting.
#[tokio::test]
async fn listed_browser_origins_may_call_and_others_may_not() {
    let up = mock_named("m").await;
    let p = proxy(&format!(
        "cors_allow_origins = [\"https://app.example\"]\n{}\n\
         [auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\n",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let url = p.url("/v1/chat/completions");
    let preflight = |origin| {
        send(request(
            Method::OPTIONS,
            &url,
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            "",
        ))
    };
    let allowed = preflight("https://app.example").await;
    assert_eq!(allowed.status, 204, "{}", allowed.text());
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(
        allowed.header("access-control-allow-headers"),
        Some("authorization, content-type")
    );
    assert!(
        allowed
            .header("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST"))
    );
    assert!(allowed.header("x-request-id").is_some());
    let other = preflight("https://elsewhere.example").await;
    other.assert_error(405, "invalid_request_error", "method_not_allowed");
    assert_eq!(other.header("access-control-allow-origin"), None);

    let ask = |origin: &'static str, key: Option<&'static str>| {
        let mut headers = vec![("origin", origin), ("content-type", "application/json")];
        headers.extend(key.map(|k| ("authorization", k)));
        send(request(Method::POST, &url, &headers, chat("m", false)))
    };
    let answer = ask("https://app.example", Some("Bearer sk-k")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(answer.header("access-control-expose-headers"), Some("*"));
    assert!(
        answer
            .headers
            .get_all("vary")
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"origin"))
    );
    let refused = ask("https://app.example", None).await;
    refused.assert_error(401, "authentication_error", "invalid_api_key");
    assert_eq!(
        refused.header("access-control-allow-origin"),
        Some("https://app.example"),
        "the app may read why"
    );
    let other = ask("https://elsewhere.example", Some("Bearer sk-k")).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("access-control-allow-origin"), None);
    assert_eq!(up.stats.requests(), 2, "no preflight reached the upstream");
}

/// With `cors_allow_origins`, the proxy's list decides who reads its
/// answers: an upstream's own CORS headers (vLLM and LiteLLM allow every
/// origin by default) reach no browser, and every answer varies by origin.
#[tokio::test]
async fn the_upstreams_cors_headers_do_not_widen_the_list() {
    use tokio::io::AsyncWriteExt;
    let addr = raw_upstream(|mut conn| async move {
        while read_request(&mut conn).await.is_some() {
            let answer = json_answer(
                "200 OK",
                "access-control-allow-origin: *\r\naccess-control-allow-credentials: true\r\n",
                r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
            );
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let p = proxy(&format!(
        "cors_allow_origins = [\"https://app.example\"]\n{}",
        one_upstream(&format!("http://{addr}/v1"), "")
    ))
    .await;
    let ask = |origin: Option<&'static str>| {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(origin.map(|o| ("origin", o)));
        send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &headers,
            chat("m", false),
        ))
    };
    for (origin, allowed) in [
        (Some("https://app.example"), Some("https://app.example")),
        (Some("https://elsewhere.example"), None),
        (None, None),
    ] {
        let answer = ask(origin).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(
            answer.header("access-control-allow-origin"),
            allowed,
            "{origin:?}"
        );
        assert_eq!(answer.header("access-control-allow-credentials"), None);
        assert!(
            answer
                .headers
                .get_all("vary")
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"origin")),
            "{origin:?}"
        );
    }
}
