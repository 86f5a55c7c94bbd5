//! The balancer's decision: `Picker::pick` for every strategy at 2, 16 and
//! 256 backends (target: well under 1 µs at 16), the prefix key of a chat
//! request with a long system prompt, and one whole request through
//! `Balance` with a no-op upstream.
//!
//! Run: `cargo bench -p llm-proxy-balance --bench pick -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_main};
use http_body_util::BodyExt;
use llm_proxy_balance::{
    Backend, Balance, BalanceConfig, Load, Picker, PickerMember, PrefixConfig, PromptPrefix,
    Strategy,
};
use llm_proxy_core::{Body, Endpoint, Error, RequestMeta};
use tower::Service;

fn strategies() -> Vec<Strategy> {
    vec![
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::LeastRequests,
        Strategy::P2cEwma,
        Strategy::PrefixAffinity(PrefixConfig::default()),
    ]
}

/// A cheap xorshift so the bench loop measures the pick, not the RNG.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for strategy in strategies() {
        for n in [2usize, 16, 256] {
            let names: Vec<String> = (0..n).map(|i| format!("backend-{i}")).collect();
            let members: Vec<PickerMember<'_>> = names
                .iter()
                .enumerate()
                .map(|(i, name)| PickerMember {
                    name,
                    weight: 1 + (i % 3) as u32,
                })
                .collect();
            let picker = Picker::new(&strategy, &members);
            let loads: Vec<Load> = (0..n)
                .map(|i| Load {
                    available: i % 11 != 5,
                    in_flight: (i % 7) as u32,
                    cost: 0.05 * (1 + i % 5) as f64,
                })
                .collect();
            let mut rng = 0x2545_f491_4f6c_dd1d_u64;
            group.bench_with_input(BenchmarkId::new(strategy.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    let r = next(&mut rng);
                    black_box(picker.pick(&loads[..], Some(r), r))
                })
            });
        }
    }
    group.finish();
}

fn chat_json(system_words: usize) -> (Bytes, serde_json::Map<String, serde_json::Value>) {
    let system = "You are a careful assistant. ".repeat(system_words / 5);
    let json = serde_json::json!({
        "model": "m",
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "What is the capital of France?"},
        ],
    });
    let bytes = Bytes::from(json.to_string());
    match json {
        serde_json::Value::Object(map) => (bytes, map),
        _ => (bytes, serde_json::Map::new()),
    }
}

fn prefix_key(c: &mut Criterion) {
    let cfg = PrefixConfig::default();
    let (_, json) = chat_json(6000);
    c.bench_function("prefix_key/chat_6000_word_system_prompt", |b| {
        b.iter(|| black_box(PromptPrefix::from_json(black_box(&json), &cfg)))
    });
}

type NoopFuture = std::future::Ready<Result<http::Response<Body>, Error>>;

fn noop(_req: http::Request<Body>) -> NoopFuture {
    std::future::ready(Ok(http::Response::new(llm_proxy_core::empty())))
}

fn whole_request(c: &mut Criterion) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let (bytes, json) = chat_json(200);
    let meta = RequestMeta::parsed(Endpoint::ChatCompletions, bytes, json);
    let mut group = c.benchmark_group("request");
    for strategy in [
        Strategy::P2cEwma,
        Strategy::PrefixAffinity(PrefixConfig::default()),
    ] {
        let _guard = rt.enter();
        let backends = (0..16).map(|i| {
            Backend::new(
                format!("backend-{i}"),
                tower::service_fn(noop as fn(http::Request<Body>) -> NoopFuture),
            )
        });
        let mut balance = Balance::new(
            backends,
            BalanceConfig {
                strategy: strategy.clone(),
                ..BalanceConfig::default()
            },
        );
        group.bench_function(BenchmarkId::new(strategy.as_str(), 16), |b| {
            b.iter(|| {
                let mut req =
                    http::Request::post("/v1/chat/completions").body(llm_proxy_core::empty());
                if let Ok(req) = req.as_mut() {
                    req.extensions_mut().insert(meta.clone());
                }
                let Ok(req) = req else { return };
                let resp = rt.block_on(balance.call(req));
                if let Ok(resp) = resp {
                    black_box(rt.block_on(resp.into_body().collect()).is_ok());
                }
            })
        });
    }
    group.finish();
}

fn benches() {
    let mut c = Criterion::default().configure_from_args();
    pick(&mut c);
    prefix_key(&mut c);
    whole_request(&mut c);
}

criterion_main!(benches);
