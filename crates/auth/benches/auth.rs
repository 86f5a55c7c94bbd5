//! Auth + limit check per request: key hash and lookup, allowlist, GCRA on
//! both limits, rate-limit headers — the whole `Auth` service around an inner
//! service that answers at once.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use llm_proxy_auth::{AuthLayer, KeySpec};
use llm_proxy_core::{Body, Endpoint, Error, RequestMeta, full};
use tower::{Layer, ServiceExt, service_fn};

fn request(meta: &RequestMeta) -> http::Request<Body> {
    let mut req = http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-bench-key-0123456789abcdef")
        .body(llm_proxy_core::empty())
        .expect("valid request");
    req.extensions_mut().insert(meta.clone());
    req
}

fn bench(c: &mut Criterion) {
    let mut keys: Vec<KeySpec> = (0..1000)
        .map(|i| KeySpec::from_key(format!("k{i}"), &format!("sk-other-{i}")))
        .collect();
    let mut key = KeySpec::from_key("bench", "sk-bench-key-0123456789abcdef");
    key.models = Some(vec!["m".into(), "n".into()]);
    // Limits high enough never to deny during the bench.
    key.requests_per_minute = Some(u32::MAX);
    key.tokens_per_minute = Some(u32::MAX);
    keys.push(key);
    let layer = AuthLayer::new(keys);
    let svc = layer.layer(service_fn(|_req: http::Request<Body>| async {
        Ok::<_, Error>(http::Response::new(full("")))
    }));
    let body = r#"{"model":"m","max_tokens":64,"messages":[{"role":"user","content":"hello"}]}"#;
    let meta = RequestMeta::parsed(
        Endpoint::ChatCompletions,
        bytes::Bytes::from(body),
        serde_json::from_str(body).expect("valid JSON"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("auth/allowed_request_with_rpm_and_tpm", |b| {
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            let req = request(&meta);
            async move { svc.oneshot(req).await.expect("allowed") }
        })
    });
    c.bench_function("auth/authenticate_only", |b| {
        let req = request(&meta);
        b.iter(|| layer.authenticate(req.headers()).expect("known key"))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
