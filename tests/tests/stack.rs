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
