//! Every layer at once: where one layer's output is another's input (auth
//! with limits, the cache, the balancer, translation).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Method;
use tests::*;

/// A streamed chat request by a key with a token limit, with the cache on,
/// to an upstream that refuses `stream_options`: the auth layer and the
/// cache both ask for the usage chunk, and the upstream must get the
/// client's own request once more (as each layer alone does), not twice.
#[tokio::test]
async fn a_refused_usage_request_is_sent_once_more_with_auth_and_cache_on() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let addr = sse_upstream(move |body| {
        counted.fetch_add(1, Ordering::SeqCst);
        if String::from_utf8_lossy(body).contains("stream_options") {
            let error = r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error"}}"#;
            return (400, error.to_owned());
        }
        let delta = r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
        (200, format!("data: {delta}\n\ndata: [DONE]\n\n"))
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{addr}/v1\"\n\
         [auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 100000\n\
         [cache]\n"
    ))
    .await;
    let ask = || {
        send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &[
                ("authorization", "Bearer sk-k"),
                ("content-type", "application/json"),
            ],
            chat("m", true),
        ))
    };
    let first = ask().await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-llm-proxy-cache"), Some("miss"));
    assert!(first.text().contains("\"hi\""), "{}", first.text());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the refused request, then the client's own once"
    );
    let second = ask().await;
    assert_eq!(second.header("x-llm-proxy-cache"), Some("hit"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An embedder who stacks the cache above auth (with the shared scope, a
/// hit would go to anyone: no key checked, no limit counted) gets a clear
/// misconfiguration, not a cache that serves past the keys.
#[tokio::test]
async fn the_cache_stacked_above_auth_is_refused_as_misconfigured() {
    use llm_proxy_auth::{AuthLayer, KeySpec};
    use llm_proxy_cache::{CacheConfig, CacheLayer, MemoryStore};
    use llm_proxy_core::{Body, Error, ParseLayer, ParseLimits, full};
    use tower::{ServiceBuilder, ServiceExt, service_fn};
    let svc = ServiceBuilder::new()
        .layer(ParseLayer::new(ParseLimits::default()))
        .layer(CacheLayer::new(
            CacheConfig::default(),
            MemoryStore::new(100, 1 << 20),
        ))
        .layer(AuthLayer::new(vec![KeySpec::from_key("k", "sk-k")]))
        .service(service_fn(|_req: http::Request<Body>| async {
            Ok::<_, Error>(http::Response::new(full(r#"{"id":"1","choices":[]}"#)))
        }));
    let req = http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-k")
        .body(full(chat("m", false)))
        .unwrap();
    let err = match svc.oneshot(req).await {
        Err(e) => e,
        Ok(resp) => resp
            .extensions()
            .get::<Error>()
            .cloned()
            .expect("an error answer"),
    };
    assert!(matches!(err, Error::Misconfigured(_)), "{err}");
}

/// An upstream that answers `x-should-retry: false` (as Anthropic and
/// OpenAI do of a request that failed by itself) gets the request once,
/// whatever `max_retries` allows, and the client gets its answer with the
/// header; without it, the failure is tried again as configured.
#[tokio::test]
async fn an_upstream_that_says_do_not_retry_gets_the_request_once() {
    use tokio::io::AsyncWriteExt;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let addr = raw_upstream(move |mut conn| {
        let counted = counted.clone();
        async move {
            while let Some((head, _)) = read_request(&mut conn).await {
                counted.fetch_add(1, Ordering::SeqCst);
                let hint = match head_value(&head, "x-test-hint") {
                    Some(hint) => format!("x-should-retry: {hint}\r\n"),
                    None => String::new(),
                };
                let body = r#"{"error":{"message":"boom","type":"api_error"}}"#;
                let answer = json_answer("500 Internal Server Error", &hint, body);
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"http://{addr}/v1\"\n\
         [balance]\nmax_retries = 2\neject_after_failures = 100\n"
    ))
    .await;
    let ask = |hint: Option<&'static str>| {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(hint.map(|h| ("x-test-hint", h)));
        send(request(
            Method::POST,
            &p.url("/v1/chat/completions"),
            &headers,
            chat("m", false),
        ))
    };
    for (hint, sent) in [
        (Some("false"), 1),
        (Some("FALSE"), 1),
        (Some("true"), 3),
        (None, 3),
    ] {
        calls.store(0, Ordering::SeqCst);
        let answer = ask(hint).await;
        assert_eq!(answer.status, 500, "{}", answer.text());
        assert_eq!(answer.header("x-should-retry"), hint, "{hint:?}");
        assert_eq!(calls.load(Ordering::SeqCst), sent, "{hint:?}");
    }
}

/// `x-should-retry: false` on a 429 speaks of that upstream's account or
/// load, not of the request: the balancer tries another upstream (here a
/// second name for the same server, which answers the second call).
#[tokio::test]
async fn a_throttled_answer_that_says_do_not_retry_still_fails_over() {
    use tokio::io::AsyncWriteExt;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let addr = raw_upstream(move |mut conn| {
        let counted = counted.clone();
        async move {
            while read_request(&mut conn).await.is_some() {
                let answer = if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                    json_answer(
                        "429 Too Many Requests",
                        "x-should-retry: false\r\nretry-after: 30\r\n",
                        r#"{"error":{"message":"slow down","type":"rate_limit_error"}}"#,
                    )
                } else {
                    json_answer(
                        "200 OK",
                        "",
                        r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#,
                    )
                };
                if conn.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"a\"\nurl = \"http://{addr}/v1\"\n\
         [[upstream]]\nname = \"b\"\nurl = \"http://{addr}/v1\"\n\
         [balance]\nmax_retries = 2\n"
    ))
    .await;
    let answer = send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[("content-type", "application/json")],
        chat("m", false),
    ))
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Two upstreams that serve one model under their own names
/// (`served_names`): each gets the body with its name — a chat request, a
/// Messages request translated to chat, a passthrough JSON body naming the
/// model — while the client, its key's allowlist and the model list know
/// only the model's own name.
#[tokio::test]
async fn each_upstream_is_asked_for_the_model_under_its_served_name() {
    let serving = |served: &'static str| {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
        let log = seen.clone();
        let answer = move |raw: &[u8]| {
            let body: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
            let model = body["model"].as_str().unwrap_or_default().to_owned();
            let raw = String::from_utf8_lossy(raw).into_owned();
            log.lock().unwrap().push((model.clone(), raw));
            if model != served {
                let error = format!(
                    r#"{{"error":{{"message":"The model `{model}` does not exist.","type":"NotFoundError","code":404}}}}"#
                );
                return (404, error);
            }
            let answer = serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            });
            (200, answer.to_string())
        };
        (seen, answer)
    };
    let (seen_a, answer_a) = serving("meta-llama/Llama-3.1-8B-Instruct");
    let (seen_b, answer_b) = serving("llama3.1:8b");
    let a = sse_upstream(answer_a).await;
    let b = sse_upstream(answer_b).await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"vllm\"\nurl = \"http://{a}/v1\"\nmodels = [\"llama\"]\n\
         served_names = {{ llama = \"meta-llama/Llama-3.1-8B-Instruct\" }}\n\
         [[upstream]]\nname = \"ollama\"\nurl = \"http://{b}/v1\"\nmodels = [\"llama\"]\n\
         served_names = {{ llama = \"llama3.1:8b\" }}\n\
         [balance]\nstrategy = \"round_robin\"\nmax_retries = 0\n\
         [auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\nmodels = [\"llama\"]\n\
         passthrough = true\n"
    ))
    .await;
    let ask = |path: &'static str, body: &'static str| {
        send(request(
            Method::POST,
            &p.url(path),
            &[
                ("authorization", "Bearer sk-k"),
                ("content-type", "application/json"),
                ("anthropic-version", "2023-06-01"),
            ],
            body,
        ))
    };
    let chat = r#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#;
    let messages =
        r#"{"model":"llama","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..2 {
        let answer = ask("/v1/chat/completions", chat).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let answer = ask("/v1/messages", messages).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert_eq!(answer.json()["content"][0]["text"], "hi");
    }
    let answer = ask(
        "/v1/images/generations",
        r#"{"model":"llama","prompt":"x"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    {
        let (seen_a, seen_b) = (seen_a.lock().unwrap(), seen_b.lock().unwrap());
        assert_eq!(seen_a.len() + seen_b.len(), 5);
        assert!(
            seen_a.len() >= 2 && seen_b.len() >= 2,
            "{seen_a:?} {seen_b:?}"
        );
        let served_a = "meta-llama/Llama-3.1-8B-Instruct";
        assert!(seen_a.iter().all(|(m, _)| m == served_a));
        assert!(seen_b.iter().all(|(m, _)| m == "llama3.1:8b"));
        // A chat body, unedited, goes as sent but for its model's name.
        let as_sent = |served: &str| chat.replace("\"llama\"", &format!("\"{served}\""));
        let chats = seen_a
            .iter()
            .filter(|(_, raw)| *raw == as_sent(served_a))
            .count()
            + seen_b
                .iter()
                .filter(|(_, raw)| *raw == as_sent("llama3.1:8b"))
                .count();
        assert_eq!(chats, 2, "{seen_a:?} {seen_b:?}");
    }
    // The key may use `llama`; the list names it, not the served names.
    let models = send(request(
        Method::GET,
        &p.url("/v1/models"),
        &[("authorization", "Bearer sk-k")],
        "",
    ))
    .await;
    let ids: Vec<_> = models.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["llama"]);
}

/// Key order reaches the upstream as the client wrote it, where a layer
/// edits the body (the cache and a token-limited key ask a streamed chat
/// for its usage chunk) and where the translation layer writes a new one
/// (Messages over chat): a model generates a `json_schema`'s properties,
/// and a tool's arguments, in the schema's order (`reasoning` before
/// `answer` is the point of such a schema).
#[tokio::test]
async fn edited_and_translated_bodies_keep_the_clients_key_order() {
    for tail in [
        "[cache]\nbackend = \"memory\"\n",
        "[auth]\n[[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\ntokens_per_minute = 100000\n",
    ] {
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = seen.clone();
        let addr = sse_upstream(move |raw| {
            let raw = String::from_utf8_lossy(raw).into_owned();
            let stream = raw.contains(r#""stream":true"#);
            log.lock().unwrap().push(raw);
            if stream {
                let delta = r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#;
                let usage = r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
                return (200, format!("data: {delta}\n\ndata: {usage}\n\ndata: [DONE]\n\n"));
            }
            let answer = serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            });
            (200, answer.to_string())
        })
        .await;
        let p = proxy(&format!(
            "[[upstream]]\nname = \"up\"\nurl = \"http://{addr}/v1\"\n{tail}"
        ))
        .await;
        let ask = |path: &'static str, body: &'static str| {
            send(request(
                Method::POST,
                &p.url(path),
                &[
                    ("authorization", "Bearer sk-k"),
                    ("content-type", "application/json"),
                    ("anthropic-version", "2023-06-01"),
                ],
                body,
            ))
        };
        let chat = r#"{"stream":true,"model":"m","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"a","schema":{"type":"object","properties":{"reasoning":{"type":"string"},"answer":{"type":"string"}},"required":["reasoning","answer"]}}}}"#;
        let answer = ask("/v1/chat/completions", chat).await;
        assert_eq!(answer.status, 200, "{tail}: {}", answer.text());
        let messages = r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}],"tools":[{"name":"t","input_schema":{"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":"string"}}}}]}"#;
        let answer = ask("/v1/messages", messages).await;
        assert_eq!(answer.status, 200, "{tail}: {}", answer.text());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{tail}: {seen:?}");
        let before = |raw: &str, a: &str, b: &str| {
            let at = |key: &str| {
                raw.find(&format!("\"{key}\""))
                    .unwrap_or_else(|| panic!("{key} in {raw}"))
            };
            at(a) < at(b)
        };
        // The edit happened (the layer asked for usage), and kept the order.
        assert!(seen[0].contains("include_usage"), "{tail}: {}", seen[0]);
        assert!(before(&seen[0], "stream", "model"), "{tail}: {}", seen[0]);
        assert!(
            before(&seen[0], "reasoning", "answer"),
            "{tail}: {}",
            seen[0]
        );
        assert!(before(&seen[0], "name", "schema"), "{tail}: {}", seen[0]);
        assert!(before(&seen[1], "zeta", "alpha"), "{tail}: {}", seen[1]);
    }
}

/// One tenant's request that meets one model's limit on a shared upstream
/// (OpenAI's 429 "request too large for `big`", `retry-after: 300`) rests
/// that model there, not the upstream: another tenant's requests for
/// another model still reach it. Nor does a passthrough route's 429 (a
/// files limit) shut the upstream to the model APIs.
#[tokio::test]
async fn one_tenants_429_does_not_shut_the_upstream_to_other_models() {
    let addr = raw_upstream(|mut conn| async move {
        use tokio::io::AsyncWriteExt;
        let Some((head, body)) = read_request(&mut conn).await else {
            return;
        };
        let limited =
            head.starts_with("GET /v1/files") || String::from_utf8_lossy(&body).contains("\"big\"");
        let answer = if limited {
            json_answer(
                "429 Too Many Requests",
                "retry-after: 300\r\n",
                r#"{"error":{"message":"Request too large for big on tokens per min","type":"tokens","code":"rate_limit_exceeded"}}"#,
            )
        } else {
            json_answer(
                "200 OK",
                "",
                r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
            )
        };
        let _ = conn.write_all(answer.as_bytes()).await;
    })
    .await;
    let p = proxy(&format!(
        "[[upstream]]\nname = \"shared\"\nurl = \"http://{addr}/v1\"\nmodels = [\"m\", \"big\"]\n\
         [auth]\n[[auth.keys]]\nname = \"eve\"\nkey = \"sk-eve\"\nmodels = [\"big\"]\npassthrough = true\n\
         [[auth.keys]]\nname = \"bob\"\nkey = \"sk-bob\"\nmodels = [\"m\"]\n"
    ))
    .await;
    let chat_as = |key: &'static str, model: &'static str| {
        let auth = format!("Bearer {key}");
        let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"x"}}]}}"#);
        let url = p.url("/v1/chat/completions");
        async move {
            send(request(
                Method::POST,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &auth),
                ],
                body,
            ))
            .await
        }
    };
    let files = send(request(
        Method::GET,
        &p.url("/v1/files"),
        &[("authorization", "Bearer sk-eve")],
        "",
    ))
    .await;
    assert_eq!(files.status, 429, "{}", files.text());
    let bob = chat_as("sk-bob", "m").await;
    assert_eq!(bob.status, 200, "after a files 429: {}", bob.text());
    let eve = chat_as("sk-eve", "big").await;
    assert_eq!(eve.status, 429, "{}", eve.text());
    for _ in 0..3 {
        let bob = chat_as("sk-bob", "m").await;
        assert_eq!(bob.status, 200, "after `big`'s 429: {}", bob.text());
    }
    // `big` itself rests: the proxy answers for it, with the time left.
    let eve = chat_as("sk-eve", "big").await;
    eve.assert_error(503, "service_unavailable", "no_upstream_available");
    assert!(eve.header("retry-after").is_some());
}
