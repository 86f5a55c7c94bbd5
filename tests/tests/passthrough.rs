//! The proxy in front of one mock upstream: every endpoint passes through,
//! streams stream, credentials are swapped, ids and metrics are there.

use std::time::Duration;

use http::Method;
use http_body_util::BodyExt;
use tests::*;

#[tokio::test]
async fn chat_completions_embeddings_pass_through() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;

    let direct = post_json(
        &format!("{}/chat/completions", up.base_url()),
        &chat("m", false),
    )
    .await;
    let via = post_json(&proxy.url("/v1/chat/completions"), &chat("m", false)).await;
    assert_eq!(via.status, 200);
    assert_eq!(
        via.json(),
        direct.json(),
        "the proxy passes the answer through unchanged"
    );
    assert_eq!(via.header("x-llm-proxy-upstream"), Some("up"));
    assert!(via.header("x-request-id").is_some_and(|id| !id.is_empty()));

    let completion = post_json(
        &proxy.url("/v1/completions"),
        r#"{"model":"m","prompt":"Once upon a time"}"#,
    )
    .await;
    assert_eq!(completion.status, 200);
    assert_eq!(completion.json()["object"], "text_completion");

    let emb = post_json(
        &proxy.url("/v1/embeddings"),
        r#"{"model":"m","input":["a","b"]}"#,
    )
    .await;
    assert_eq!(emb.status, 200);
    assert_eq!(emb.json()["data"].as_array().map(Vec::len), Some(2));

    assert_eq!(up.stats.requests_for("/v1/chat/completions"), 2);
    assert_eq!(up.stats.requests_for("/v1/completions"), 1);
    assert_eq!(up.stats.requests_for("/v1/embeddings"), 1);
}

#[tokio::test]
async fn a_route_with_a_trailing_slash_goes_upstream_without_it() {
    // The proxy reads `/v1/chat/completions/` as chat completions (and may
    // answer it from the cache): the upstream gets the route's own path,
    // which it knows, so the answer does not depend on the slash.
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let via = post_json(&proxy.url("/v1/chat/completions/"), &chat("m", false)).await;
    assert_eq!(via.status, 200, "{}", via.text());
    assert_eq!(via.json()["object"], "chat.completion");
    assert_eq!(up.stats.requests_for("/v1/chat/completions"), 1);
}

#[tokio::test]
async fn unchanged_body_reaches_the_upstream_byte_for_byte() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let body = "{ \"model\" : \"m\",\n  \"messages\": [ {\"role\":\"user\",\"content\":\"x\"} ] }";
    let via = post_json(&proxy.url("/v1/chat/completions"), body).await;
    assert_eq!(via.status, 200);
    assert_eq!(
        up.stats.last_request_body().as_deref(),
        Some(body.as_bytes())
    );
}

#[tokio::test]
async fn credentials_are_swapped() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "api_key = \"sk-upstream\"")).await;
    let req = request(
        Method::POST,
        &proxy.url("/v1/chat/completions?trace=1"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-client-secret"),
            ("x-api-key", "sk-client-secret"),
            ("x-custom", "kept"),
            ("accept-encoding", "gzip, deflate"),
        ],
        chat("m", false),
    );
    let answer = send(req).await;
    assert_eq!(answer.status, 200);
    let seen = up
        .stats
        .last_request_headers()
        .expect("upstream saw a request");
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
    // The layers read the answer, so it must come uncompressed.
    assert_eq!(seen["accept-encoding"], "identity");
    assert!(seen.get("x-api-key").is_none());
    assert_eq!(seen["x-custom"], "kept");
    assert!(
        seen.get("x-request-id").is_some(),
        "the request id goes upstream too"
    );
    for (name, value) in &seen {
        assert!(
            !value.as_bytes().windows(9).any(|w| w == b"sk-client"),
            "client key leaked upstream in {name}"
        );
    }
    assert_eq!(
        up.stats.last_path().as_deref(),
        Some("/v1/chat/completions?trace=1")
    );
}

/// An upstream's `headers` go with every request, in place of the
/// client's of the same name; the client's OpenAI organization and
/// project, which would pick what the operator's key bills, do not go.
#[tokio::test]
async fn an_upstreams_headers_replace_the_clients_and_its_org_is_the_operators() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(
        &up.base_url(),
        "api_key = \"sk-upstream\"\n\
         headers = { \"OpenAI-Organization\" = \"org-operator\", \"X-Team\" = \"platform\" }",
    ))
    .await;
    let req = request(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("openai-organization", "org-client"),
            ("openai-project", "proj-client"),
            ("x-team", "mallory"),
            ("anthropic-beta", "kept"),
        ],
        chat("m", false),
    );
    assert_eq!(send(req).await.status, 200);
    let seen = up
        .stats
        .last_request_headers()
        .expect("upstream saw a request");
    let all = |name: &str| seen.get_all(name).iter().cloned().collect::<Vec<_>>();
    assert_eq!(all("openai-organization"), ["org-operator"]);
    assert_eq!(all("x-team"), ["platform"]);
    assert!(seen.get("openai-project").is_none());
    assert_eq!(seen["anthropic-beta"], "kept");
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
}

/// Azure OpenAI's SDK sends its key as `api-key`: a credential the client
/// meant for the proxy, which must not reach the model provider (nor
/// stand beside the upstream's own key, for a server that reads it first).
#[tokio::test]
async fn an_azure_style_api_key_does_not_go_upstream() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "api_key = \"sk-upstream\"")).await;
    let req = request(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("api-key", "sk-client-secret"),
        ],
        chat("m", false),
    );
    assert_eq!(send(req).await.status, 200);
    let seen = up
        .stats
        .last_request_headers()
        .expect("upstream saw a request");
    assert!(seen.get("api-key").is_none(), "{seen:?}");
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
}

/// The request id the proxy sends is its own header, whatever the client's
/// `connection` names; WebSocket handshake headers on a request that is no
/// upgrade stay behind.
#[tokio::test]
async fn the_request_id_goes_upstream_and_stray_handshake_headers_do_not() {
    use tokio::io::AsyncWriteExt;
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let body = chat("m", false);
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         connection: x-request-id, x-other, upgrade, close\r\nx-request-id: client-id-1\r\n\
         x-other: 1\r\nupgrade: websocket\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         sec-websocket-version: 13\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = answer_text(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = up.stats.last_request_headers().expect("upstream saw it");
    assert_eq!(seen["x-request-id"], "client-id-1", "{seen:?}");
    for gone in [
        "x-other",
        "upgrade",
        "sec-websocket-key",
        "sec-websocket-version",
    ] {
        assert!(seen.get(gone).is_none(), "{gone}: {seen:?}");
    }
}

/// Two content types: the proxy cannot tell which the upstream would read.
#[tokio::test]
async fn a_model_body_with_two_content_types_or_another_charset_is_415() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    for types in [
        &["application/json", "text/plain"][..],
        &["application/json; charset=utf-16"],
    ] {
        let mut req = request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[],
            chat("m", false),
        );
        for t in types {
            req.headers_mut()
                .append(http::header::CONTENT_TYPE, t.parse().unwrap());
        }
        send(req)
            .await
            .assert_error(415, "invalid_request_error", "unsupported_media_type");
    }
    assert_eq!(up.stats.requests(), 0);
}

#[tokio::test]
async fn first_streamed_chunk_arrives_before_the_upstream_finishes() {
    let up = paced_mock("slow", 20.0).await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let resp = client()
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-tokens", "20"),
            ],
            chat("m", true),
        ))
        .await
        .expect("response head");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(HANG, body.frame())
        .await
        .expect("first chunk in time")
        .expect("a frame")
        .expect("no error");
    let first = first.into_data().expect("data frame");
    assert!(first.starts_with(b"data: "), "{first:?}");
    // The upstream is still producing (20 tokens at 20/s) when the client
    // already holds the first chunk: nothing buffered the stream.
    assert_eq!(up.stats.in_flight(), 1, "upstream still streaming");
    let rest = body.collect().await.expect("rest of the stream").to_bytes();
    let all = [first.as_ref(), rest.as_ref()].concat();
    let events = sse_data(&all);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<serde_json::Value>(e).expect("chunk is JSON"))
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(!text.is_empty());
}

#[tokio::test]
async fn streamed_usage_passes_through_when_asked() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let answer = post_json(&proxy.url("/v1/chat/completions"), body).await;
    let events = sse_data(&answer.body);
    let usage_chunk = &events[events.len() - 2];
    let v: serde_json::Value = serde_json::from_str(usage_chunk).unwrap();
    assert!(
        v["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0),
        "{v}"
    );
}

#[tokio::test]
async fn models_lists_configured_models() {
    let a = mock_named("a").await;
    let b = mock_named("b").await;
    let toml = format!(
        "[[upstream]]\nname = \"a\"\nurl = \"{}\"\nmodels = [\"x\", \"y\"]\n\
         [[upstream]]\nname = \"b\"\nurl = \"{}\"\nmodels = [\"y\", \"z\", \"org/m\"]\n\
         [balance]\nstrategy = \"round_robin\"\n",
        a.base_url(),
        b.base_url()
    );
    let proxy = proxy(&toml).await;
    let answer = send(request(Method::GET, &proxy.url("/v1/models"), &[], "")).await;
    assert_eq!(answer.status, 200);
    let json = answer.json();
    assert_eq!(json["object"], "list");
    let ids: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["x", "y", "z", "org/m"]);
    assert!(
        json["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );

    // One model, as OpenAI's "retrieve model" asks for it: from the
    // config, never an upstream (neither serves every model); an id may
    // hold slashes.
    for (path, status, id) in [
        ("/v1/models/y", 200, Some("y")),
        ("/v1/models/z/", 200, Some("z")),
        ("/v1/models/org/m", 200, Some("org/m")),
        ("/v1/models/org%2Fm", 200, Some("org/m")),
        ("/v1/models/nope", 404, None),
        ("/v1/models/org/nope", 404, None),
    ] {
        let answer = send(request(Method::GET, &proxy.url(path), &[], "")).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text());
        match id {
            Some(id) => {
                let json = answer.json();
                assert_eq!(
                    (json["id"].as_str(), json["object"].as_str()),
                    (Some(id), Some("model"))
                );
            }
            None => answer.assert_error(404, "not_found_error", "model_not_found"),
        }
    }
    assert_eq!(a.stats.requests_for("/v1/models/y"), 0);
    assert_eq!(b.stats.requests_for("/v1/models/y"), 0);

    // Routing by model: z only on b, x only on a, y on both (round robin).
    let z = post_json(&proxy.url("/v1/chat/completions"), &chat("z", false)).await;
    assert_eq!(z.header("x-llm-proxy-upstream"), Some("b"));
    let x = post_json(&proxy.url("/v1/chat/completions"), &chat("x", false)).await;
    assert_eq!(x.header("x-llm-proxy-upstream"), Some("a"));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let y = post_json(&proxy.url("/v1/chat/completions"), &chat("y", false)).await;
        seen.insert(y.header("x-llm-proxy-upstream").unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "round robin over both upstreams of y");
}

#[tokio::test]
async fn metrics_count_requests_and_health_endpoints_answer() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    assert_eq!(
        post_json(&proxy.url("/v1/chat/completions"), &chat("m", false))
            .await
            .status,
        200
    );
    assert_eq!(
        post_json(&proxy.url("/v1/chat/completions"), "{")
            .await
            .status,
        400
    );
    let healthz = send(request(Method::GET, &proxy.url("/healthz"), &[], "")).await;
    assert_eq!(healthz.status, 200);
    let readyz = send(request(Method::GET, &proxy.url("/readyz"), &[], "")).await;
    assert_eq!(readyz.status, 200);
    let metrics = send(request(Method::GET, &proxy.url("/metrics"), &[], "")).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    for needle in [
        r#"llm_proxy_requests_total{route="chat_completions",status="200",upstream="up"} 1"#,
        r#"llm_proxy_requests_total{route="chat_completions",status="400",upstream=""} 1"#,
        r#"llm_proxy_request_duration_seconds_count{route="chat_completions"} 2"#,
        r#"llm_proxy_time_to_first_byte_seconds_count{route="chat_completions"}"#,
        r#"llm_proxy_in_flight{upstream="up"} 0"#,
        r#"llm_proxy_upstream_healthy{upstream="up"} 1"#,
    ] {
        assert!(text.contains(needle), "metrics lack `{needle}`:\n{text}");
    }
}

#[tokio::test]
async fn client_request_id_is_kept_and_upstream_header_can_be_off() {
    let up = mock_named("m1").await;
    let proxy = proxy(&format!(
        "upstream_header = false\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let answer = send(request(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "my-id-42"),
        ],
        chat("m", false),
    ))
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-request-id"), Some("my-id-42"));
    assert_eq!(answer.header("x-llm-proxy-upstream"), None);
    assert_eq!(
        up.stats.last_request_headers().unwrap()["x-request-id"],
        "my-id-42"
    );
    // Only visible ASCII is kept (a tab or a space is a value of `to_str`).
    for odd in ["my\tid", "my id"] {
        let answer = send(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[("content-type", "application/json"), ("x-request-id", odd)],
            chat("m", false),
        ))
        .await;
        let id = answer.header("x-request-id").unwrap();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id:?}"
        );
    }
}

#[tokio::test]
async fn other_v1_paths_pass_through() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let answer = send(request(
        Method::GET,
        &proxy.url("/v1/files?limit=2"),
        &[],
        "",
    ))
    .await;
    // The mock has no /files: its own 404 comes back as it came.
    assert_eq!(answer.status, 404);
    assert_eq!(up.stats.last_path().as_deref(), Some("/v1/files?limit=2"));
    // An upstream that serves every model (no `models` list) may know a
    // model the config does not name: asked for it, it answers.
    let answer = send(request(
        Method::GET,
        &proxy.url("/v1/models/some-model"),
        &[],
        "",
    ))
    .await;
    assert_eq!(
        up.stats.last_path().as_deref(),
        Some("/v1/models/some-model")
    );
    assert!(
        answer.header("x-llm-proxy-upstream").is_some(),
        "{}",
        answer.text()
    );
    // And a fine-tuned model is deleted there.
    send(request(
        Method::DELETE,
        &proxy.url("/v1/models/ft:m:x"),
        &[],
        "",
    ))
    .await;
    assert_eq!(up.stats.last_path().as_deref(), Some("/v1/models/ft:m:x"));
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let up = mock_named("m1").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(request(
            Method::POST,
            &proxy.url("/v1/chat/completions"),
            &[("content-type", "application/json")],
            chat("m", true),
        ))
        .await
        .expect("h2c response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn a_failed_passthrough_write_is_not_retried_elsewhere_nor_its_model_rewritten() {
    let a = mock(MockConfig {
        name: "a".into(),
        failure: Some(llm_proxy_mock::Failure::Status(500)),
        ..MockConfig::default()
    })
    .await;
    let b = mock_named("b").await;
    let toml = format!(
        "[[upstream]]\nname = \"a\"\nurl = \"{}\"\n[[upstream]]\nname = \"b\"\nurl = \"{}\"\n",
        a.base_url(),
        b.base_url()
    );
    let p = proxy(&toml).await;
    // A batch names a file that lives on one upstream: a 500 from it must
    // not become a second batch elsewhere.
    let batch =
        r#"{"input_file_id":"file-a","endpoint":"/v1/chat/completions","completion_window":"24h"}"#;
    let answer = post_json(&p.url("/v1/batches"), batch).await;
    assert_eq!(answer.status, 500);
    assert_eq!(a.stats.requests_for("/v1/batches"), 1);
    assert_eq!(
        b.stats.requests_for("/v1/batches"),
        0,
        "not retried elsewhere"
    );

    // A fine-tune's base model has a fallback for the model APIs: the
    // passthrough body goes to its own model's upstream, unchanged.
    let toml = format!(
        "[[upstream]]\nname = \"a\"\nurl = \"{}\"\nmodels = [\"m1\"]\n\
         [[upstream]]\nname = \"b\"\nurl = \"{}\"\nmodels = [\"m2\"]\n\
         [balance]\nfallbacks = {{ m1 = [\"m2\"] }}\n",
        a.base_url(),
        b.base_url()
    );
    let p = proxy(&toml).await;
    let job = r#"{"model":"m1","training_file":"file-a"}"#;
    let answer = post_json(&p.url("/v1/fine_tuning/jobs"), job).await;
    assert_eq!(answer.status, 500);
    assert_eq!(
        b.stats.requests_for("/v1/fine_tuning/jobs"),
        0,
        "no fallback"
    );
    assert_eq!(
        a.stats.last_request_body().as_deref(),
        Some(job.as_bytes()),
        "the model is not rewritten"
    );
}

#[tokio::test]
async fn metrics_listen_serves_metrics_apart_over_http1_and_h2c() {
    let up = mock_named("m1").await;
    let port = free_port();
    let proxy = proxy(&format!(
        "metrics_listen = \"127.0.0.1:{port}\"\n{}",
        one_upstream(&up.base_url(), "")
    ))
    .await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    // Not on the main listener any more.
    let main = send(request(Method::GET, &proxy.url("/metrics"), &[], "")).await;
    assert_eq!(main.status, 404);
    let metrics = send(request(
        Method::GET,
        &format!("http://{addr}/metrics"),
        &[],
        "",
    ))
    .await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .text()
            .contains("llm_proxy_buffered_body_limit_bytes")
    );
    // Marked and counted as on the main listener.
    assert!(metrics.header("x-request-id").is_some());
    let kept = send(request(
        Method::GET,
        &format!("http://{addr}/healthz"),
        &[("x-request-id", "probe-1")],
        "",
    ))
    .await;
    assert_eq!(kept.header("x-request-id"), Some("probe-1"));
    let again = send(request(
        Method::GET,
        &format!("http://{addr}/metrics"),
        &[],
        "",
    ))
    .await;
    for line in [
        r#"llm_proxy_requests_total{route="metrics",status="200",upstream=""} 1"#,
        r#"llm_proxy_requests_total{route="healthz",status="200",upstream=""} 1"#,
    ] {
        assert!(again.text().contains(line), "{line}: {}", again.text());
    }
    let other = send(request(
        Method::GET,
        &format!("http://{addr}/v1/models"),
        &[],
        "",
    ))
    .await;
    assert_eq!(other.status, 404);
    for probe in ["/healthz", "/readyz"] {
        let answer = send(request(
            Method::GET,
            &format!("http://{addr}{probe}"),
            &[],
            "",
        ))
        .await;
        assert_eq!(answer.status, 200, "{probe}");
        // As on the main listener: read-only.
        let post = send(request(
            Method::POST,
            &format!("http://{addr}{probe}"),
            &[],
            "",
        ))
        .await;
        assert_eq!(post.header("allow"), Some("GET, HEAD"), "{probe}");
        post.assert_error(405, "invalid_request_error", "method_not_allowed");
    }
    // h2c too.
    let (mut sender, _conn) = h2c(addr).await;
    let req = http::Request::get(format!("http://{addr}/metrics"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("answered");
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("llm_proxy_requests_total"));
    let (status, length, body) = h2_head(&mut sender, &format!("http://{addr}/metrics")).await;
    assert_eq!(status, 200);
    assert!(length.is_some_and(|n| n > 0), "{length:?}");
    assert!(body.is_empty());
}

/// `HEAD` on h2c: the status, `content-length`, and the body (none, when
/// the server does right).
async fn h2_head(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    url: &str,
) -> (u16, Option<u64>, bytes::Bytes) {
    let req = http::Request::head(url)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("answered");
    let length = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_else(|e| bytes::Bytes::from(format!("body error: {e}")));
    (status, length, body)
}

/// hyper's HTTP/2 server sends a `HEAD` answer's body if it has one: the
/// proxy's own answers (probes, models, errors) must have none.
#[tokio::test]
async fn head_over_h2c_has_no_body() {
    let up = mock_named("m1").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let (mut sender, _conn) = h2c(p.addr).await;
    for (path, want) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/v1/models", 200),
        ("/nowhere", 404),
    ] {
        let (status, length, body) = h2_head(&mut sender, &p.url(path)).await;
        assert_eq!(status, want, "{path}");
        assert!(length.is_some_and(|n| n > 0), "{path}: {length:?}");
        assert!(body.is_empty(), "{path}: {body:?}");
    }
}

#[tokio::test]
async fn a_request_abandoned_before_its_head_is_counted_as_499() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let slow = request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-mock-latency-ms", "2000"),
        ],
        chat("m", false),
    );
    // The client gives up before the upstream answers.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), send(slow))
            .await
            .is_err()
    );
    let line = r#"llm_proxy_requests_total{route="chat_completions",status="499",upstream=""} 1"#;
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        let metrics = p.metrics().await;
        if metrics.contains(line) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that closes its connection right after its request (before
/// the proxy first polls the request's future) is counted as 499 too, each
/// time: its request was read, and given an id.
#[tokio::test]
async fn a_request_whose_client_closes_at_once_is_counted_as_499() {
    use tokio::io::AsyncWriteExt;
    const CLIENTS: usize = 20;
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(&up.base_url(), "")).await;
    let body = chat("m", false);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         x-mock-latency-ms: 2000\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..CLIENTS {
        let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        conn.write_all(req.as_bytes()).await.unwrap();
    }
    let line = format!(
        r#"llm_proxy_requests_total{{route="chat_completions",status="499",upstream=""}} {CLIENTS}"#
    );
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        let metrics = p.metrics().await;
        if metrics.contains(&line) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An app that serves the proxy's service itself turns `/readyz` to 503
/// through [`llm_proxy::Proxy::readiness`].
#[tokio::test]
async fn an_embedding_app_can_mark_the_proxy_draining() {
    use tower::ServiceExt;
    let up = mock_named("m").await;
    let settings = llm_proxy::config::Settings::from_str(
        std::path::Path::new("<inline>"),
        &one_upstream(&up.base_url(), ""),
    )
    .unwrap();
    let proxy = llm_proxy::Proxy::build(settings).await.unwrap();
    let readyz = || {
        proxy.service().oneshot(
            http::Request::get("/readyz")
                .body(llm_proxy_core::empty())
                .unwrap(),
        )
    };
    assert_eq!(readyz().await.unwrap().status(), 200);
    proxy.readiness().start_draining();
    assert_eq!(readyz().await.unwrap().status(), 503);
}

/// `/readyz` answers 503 when every upstream is out for its health (here:
/// ejected after failures), but not while the only upstream rests after a
/// 429: a provider's rate limit, seen by every replica alike, must not pull
/// the proxies out of their load balancer.
#[tokio::test]
async fn readiness_follows_ejection_not_rate_limits() {
    let limited = mock(llm_proxy_mock::MockConfig {
        name: "m".into(),
        failure: Some(llm_proxy_mock::Failure::RateLimited {
            retry_after_secs: 60,
        }),
        ..llm_proxy_mock::MockConfig::default()
    })
    .await;
    let failing = mock(llm_proxy_mock::MockConfig {
        name: "m".into(),
        failure: Some(llm_proxy_mock::Failure::Status(500)),
        ..llm_proxy_mock::MockConfig::default()
    })
    .await;
    for (up, status, ready) in [(&limited, 429, 200), (&failing, 500, 503)] {
        let proxy = proxy(&one_upstream(
            &up.base_url(),
            "\n[balance]\nmax_retries = 0\neject_after_failures = 1\n",
        ))
        .await;
        let answer = post_json(&proxy.url("/v1/chat/completions"), &chat("m", false)).await;
        assert_eq!(answer.status, status);
        let readyz = send(request(Method::GET, &proxy.url("/readyz"), &[], "")).await;
        assert_eq!(readyz.status, ready, "after a {status}: {}", readyz.text());
        let (failures, throttled) = if status == 500 { (1, 0) } else { (0, 1) };
        let metrics = proxy.metrics().await;
        for line in [
            format!(r#"llm_proxy_upstream_failures_total{{upstream="up"}} {failures}"#),
            format!(r#"llm_proxy_upstream_throttled_total{{upstream="up"}} {throttled}"#),
        ] {
            assert!(metrics.contains(&line), "{line} in {metrics}");
        }
    }
}

/// An upstream that breaks every stream after its 200 head, ejected, is
/// not let back by the head of a request panic-routed to it (with other
/// upstreams failing, such requests come often): its rest runs on, and
/// its broken body does not eject it a second time.
#[tokio::test]
async fn a_panic_routed_stream_that_breaks_does_not_end_the_rest() {
    let breaking = mock(llm_proxy_mock::MockConfig {
        name: "m".into(),
        failure: Some(llm_proxy_mock::Failure::DropMidStream { after_chunks: 1 }),
        ..llm_proxy_mock::MockConfig::default()
    })
    .await;
    let proxy = proxy(&one_upstream(
        &breaking.base_url(),
        "\n[balance]\nmax_retries = 0\neject_after_failures = 1\n",
    ))
    .await;
    for _ in 0..2 {
        // The second is panic-routed: the only upstream rests.
        let resp = chat_through(&proxy, true).await;
        assert_eq!(resp.status(), 200);
        let (body, broke) = read_stream(resp).await;
        let body = String::from_utf8_lossy(&body);
        assert!(broke && body.contains("stream_interrupted"), "{body}");
        let readyz = send(request(Method::GET, &proxy.url("/readyz"), &[], "")).await;
        assert_eq!(readyz.status, 503, "{}", readyz.text());
    }
    let metrics = proxy.metrics().await;
    let line = r#"llm_proxy_ejections_total{upstream="up"} 1"#;
    assert!(metrics.contains(line), "{line} in {metrics}");
}

/// Every upstream of a model answered 429 with `retry-after`: until the
/// first of them is back, the proxy asks none of them (no panic routing to
/// a server that said when to come back) and answers 503
/// `no_upstream_available` with the soonest `retry-after`.
#[tokio::test]
async fn upstreams_that_asked_to_be_left_alone_are_not_asked() {
    let limited = || {
        mock(llm_proxy_mock::MockConfig {
            name: "m".into(),
            failure: Some(llm_proxy_mock::Failure::RateLimited {
                retry_after_secs: 30,
            }),
            ..llm_proxy_mock::MockConfig::default()
        })
    };
    let (a, b) = (limited().await, limited().await);
    let p = proxy(&format!(
        "[[upstream]]\nname = \"a\"\nurl = \"{}\"\n[[upstream]]\nname = \"b\"\nurl = \"{}\"\n",
        a.base_url(),
        b.base_url()
    ))
    .await;
    let url = p.url("/v1/chat/completions");
    let first = post_json(&url, &chat("m", false)).await;
    assert_eq!(first.status, 429, "the upstream's own answer");
    assert_eq!((a.stats.requests(), b.stats.requests()), (1, 1));
    for _ in 0..3 {
        let next = post_json(&url, &chat("m", false)).await;
        assert_eq!(next.status, 503, "{}", next.text());
        assert_eq!(next.json()["error"]["code"], "no_upstream_available");
        let after: u64 = next.header("retry-after").unwrap().parse().unwrap();
        assert!((29..=30).contains(&after), "{after}");
    }
    assert_eq!((a.stats.requests(), b.stats.requests()), (1, 1));
    // What each said is counted, though the client saw only the last.
    let metrics = p.metrics().await;
    for line in [
        r#"llm_proxy_upstream_throttled_total{upstream="a"} 1"#,
        r#"llm_proxy_upstream_throttled_total{upstream="b"} 1"#,
        r#"llm_proxy_upstream_failures_total{upstream="a"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

/// `GET /v1/messages/batches` through `p`, answered 200.
async fn list_batches(p: &TestProxy) -> Answer {
    let listed = send(request(
        Method::GET,
        &p.url("/v1/messages/batches"),
        &[("anthropic-version", "2023-06-01")],
        "",
    ))
    .await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    listed
}

/// A Message Batch's `results_url` names the proxy, as its client reached
/// it: the `anthropic` SDK fetches that URL as it is, with the client's
/// key, which must not go around the proxy to the upstream.
#[tokio::test]
async fn a_batch_results_url_points_at_the_proxy() {
    let up = sse_upstream(|_| {
        let batch = |id: &str| {
            serde_json::json!({"id": id, "type": "message_batch",
                "processing_status": "ended",
                "results_url": format!("https://api.anthropic.com/v1/messages/batches/{id}/results")})
        };
        let body = serde_json::json!({"data": [batch("msgbatch_1"), batch("msgbatch_2")],
            "has_more": false});
        (200, body.to_string())
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"claude\"\nurl = \"http://{up}/v1\"\nprotocol = \"anthropic\"\n"
    ))
    .await;
    let listed = list_batches(&p).await;
    let json = listed.json();
    for (i, id) in ["msgbatch_1", "msgbatch_2"].into_iter().enumerate() {
        assert_eq!(
            json["data"][i]["results_url"],
            format!("http://{}/v1/messages/batches/{id}/results", p.addr),
            "{json}"
        );
    }
    assert_eq!(
        listed.header("content-length"),
        Some(listed.body.len().to_string().as_str())
    );
    // Behind a TLS terminator that says so: https.
    let behind = send(request(
        Method::GET,
        &p.url("/v1/messages/batches"),
        &[
            ("x-forwarded-proto", "https"),
            ("host", "llm.example"),
            ("anthropic-version", "2023-06-01"),
        ],
        "",
    ))
    .await;
    assert_eq!(
        behind.json()["data"][0]["results_url"],
        "https://llm.example/v1/messages/batches/msgbatch_1/results"
    );
}

/// The Message Batches API belongs to Anthropic's Messages API: with a
/// mixed fleet, its paths go to an upstream that serves Messages, wherever
/// the config lists it (an OpenAI server has no such route).
#[tokio::test]
async fn message_batches_go_to_an_upstream_serving_messages() {
    let openai = sse_upstream(|_| (404, r#"{"error":{"message":"no route"}}"#.to_owned())).await;
    let claude = sse_upstream(|_| {
        (
            200,
            r#"{"data":[],"has_more":false,"first_id":null,"last_id":null}"#.to_owned(),
        )
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"openai\"\nurl = \"http://{openai}/v1\"\n\
         [[upstream]]\nname = \"claude\"\nurl = \"http://{claude}/v1\"\nprotocol = \"anthropic\"\n"
    ))
    .await;
    for _ in 0..3 {
        let listed = list_batches(&p).await;
        assert_eq!(listed.header("x-llm-proxy-upstream"), Some("claude"));
    }
    // Other passthrough still goes to the first healthy upstream.
    let files = send(request(Method::GET, &p.url("/v1/files"), &[], "")).await;
    assert_eq!(files.header("x-llm-proxy-upstream"), Some("openai"));
}

#[tokio::test]
async fn first_byte_is_timed_for_an_empty_body_and_not_for_a_failed_one() {
    // An upstream that sends an answer's head and then nothing.
    let addr = raw_upstream(|mut conn| async move {
        use tokio::io::AsyncWriteExt;
        if read_request(&mut conn).await.is_some() {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n";
            let _ = conn.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let proxy = proxy(&one_upstream(
        &format!("http://{addr}/v1"),
        "idle_timeout_ms = 200",
    ))
    .await;
    let resp = chat_through(&proxy, false).await;
    assert_eq!(resp.status(), 200);
    let (body, broke) = read_stream(resp).await;
    assert!(broke && body.is_empty(), "{body:?}");
    // A HEAD's empty body is not polled: timed at its head.
    let head = send(request(Method::HEAD, &proxy.url("/healthz"), &[], "")).await;
    assert_eq!(head.status, 200);
    let text = send(request(Method::GET, &proxy.url("/metrics"), &[], ""))
        .await
        .text();
    for needle in [
        r#"llm_proxy_request_duration_seconds_count{route="chat_completions"} 1"#,
        r#"llm_proxy_request_duration_seconds_count{route="healthz"} 1"#,
        r#"llm_proxy_time_to_first_byte_seconds_count{route="healthz"} 1"#,
        // A body that failed before its first byte has none.
        r#"llm_proxy_time_to_first_byte_seconds_count{route="chat_completions"} 0"#,
    ] {
        assert!(text.contains(needle), "metrics lack `{needle}`:\n{text}");
    }
}

/// An upstream's own `x-llm-proxy-*` headers (another proxy's, or forged)
/// do not reach the client: they would tell of a cache, an estimate or an
/// overhead this proxy does not have.
#[tokio::test]
async fn an_upstreams_x_llm_proxy_headers_are_not_passed_on() {
    let addr = raw_upstream(|mut conn| async move {
        use tokio::io::AsyncWriteExt;
        while read_request(&mut conn).await.is_some() {
            let body = r#"{"object":"list","data":[]}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 x-llm-proxy-cache: hit\r\nx-llm-proxy-estimate: true\r\n\
                 x-llm-proxy-overhead-ms: 999\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if conn.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let proxy = proxy(&format!(
        "overhead_header = false\n{}",
        one_upstream(&format!("http://{addr}/v1"), "")
    ))
    .await;
    let answer = send(request(Method::GET, &proxy.url("/v1/files"), &[], "")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    for name in [
        "x-llm-proxy-cache",
        "x-llm-proxy-estimate",
        "x-llm-proxy-overhead-ms",
    ] {
        assert!(
            answer.header(name).is_none(),
            "{name}: {:?}",
            answer.headers
        );
    }
    assert_eq!(answer.header("x-llm-proxy-upstream"), Some("up"));
}

/// A chunked body on a `GET` goes on (hyper's HTTP/1 client sends a body
/// of unknown length on a `GET` only when told its coding).
#[tokio::test]
async fn a_chunked_body_on_a_get_reaches_the_upstream() {
    use tokio::io::AsyncWriteExt;
    let up = mock_named("m").await;
    let proxy = proxy(&one_upstream(&up.base_url(), "")).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    conn.write_all(
        b"GET /v1/files/f1 HTTP/1.1\r\nhost: p\r\nconnection: close\r\ncontent-type: application/json\r\n\
          transfer-encoding: chunked\r\n\r\na\r\nhello-body\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let answer = answer_text(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    eventually("the upstream got the body", || {
        up.stats.last_request_body().as_deref() == Some(b"hello-body".as_slice())
    })
    .await;
}
