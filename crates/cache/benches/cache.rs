//! Cache key computation for a 1 KiB and a 64 KiB chat request; the
//! canonical bytes of a request body made from its bytes, in one pass or by
//! parsing it first; and the memory store's get/put under 2 threads
//! (sharded against one shard).
//!
//! `cargo bench -p llm-proxy-cache --bench cache -- --warm-up-time 1 --measurement-time 2`
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::FutureExt;
use llm_proxy_cache::{CacheKey, Entry, EntryBody, KeyScope, MemoryStore, Store};
use llm_proxy_core::Endpoint;
use serde_json::{Map, Value, json};

/// A chat request of about `bytes` bytes: a system prompt and turns.
fn chat_request(bytes: usize) -> Map<String, Value> {
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    let mut size = 100;
    let mut turn = 0;
    while size < bytes {
        let content = format!("Turn {turn}: {}", "lorem ipsum dolor sit amet ".repeat(8));
        size += content.len() + 30;
        let role = if turn % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": content}));
        turn += 1;
    }
    let body = json!({"model": "llama-3.1-8b", "temperature": 0.2, "max_tokens": 256,
        "stream": true, "user": "u-1", "messages": messages});
    let Value::Object(map) = body else {
        unreachable!()
    };
    map
}

fn key(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let scope = KeyScope::Credential([7; 32]);
    for (name, bytes) in [("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let body = chat_request(bytes);
        let len = serde_json::to_vec(&body).unwrap().len();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(name, |b| {
            b.iter(|| CacheKey::new(Endpoint::ChatCompletions, &scope, black_box(&body)))
        });
    }
    group.finish();
}

/// The canonical bytes of a body (without `user`) from its bytes: parsed
/// into a value and written from it, or written in one pass. The small
/// body is the end-to-end bench's.
fn canonical(c: &mut Criterion) {
    use llm_proxy_core::canonical::{
        write_canonical_map_without, write_canonical_object_from_slice,
    };
    let mut group = c.benchmark_group("canonical");
    let small = br#"{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark. 1234-1-5678"}],"max_tokens":16}"#.to_vec();
    for (name, bytes) in [
        ("small", small),
        ("1KiB", serde_json::to_vec(&chat_request(1024)).unwrap()),
        (
            "64KiB",
            serde_json::to_vec(&chat_request(64 * 1024)).unwrap(),
        ),
    ] {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        let mut out = Vec::with_capacity(bytes.len() + 64);
        group.bench_function(BenchmarkId::new("parsed", name), |b| {
            b.iter(|| {
                out.clear();
                let body: Map<String, Value> = serde_json::from_slice(black_box(&bytes)).unwrap();
                write_canonical_map_without(&body, &["user"], &mut out);
                out.len()
            })
        });
        group.bench_function(BenchmarkId::new("one_pass", name), |b| {
            b.iter(|| {
                out.clear();
                write_canonical_object_from_slice(black_box(&bytes), &mut out, |key, _| {
                    key != "user"
                })
                .unwrap();
                out.len()
            })
        });
    }
    group.finish();
}

const KEYS: usize = 4096;

fn filled_store(shards: usize) -> (MemoryStore, Vec<CacheKey>) {
    let store = MemoryStore::with_shards(KEYS * 2, 1 << 30, shards);
    let keys: Vec<CacheKey> = (0..KEYS)
        .map(|i| CacheKey::from_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect();
    for key in &keys {
        store.put_now(*key, entry(), Duration::from_secs(3600));
    }
    (store, keys)
}

fn entry() -> Entry {
    Entry {
        stored_at_ms: 0,
        content_type: None,
        body: EntryBody::Json(Bytes::from_static(br#"{"id":"x","choices":[]}"#)),
    }
}

/// `iters` operations on each of 2 threads at once; the time of both.
fn two_threads(iters: u64, op: impl Fn(u64, usize) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for thread in 0..2 {
            let op = &op;
            s.spawn(move || {
                for i in 0..iters {
                    op(i, thread);
                }
            });
        }
    });
    start.elapsed()
}

fn memory_store_one_thread(c: &mut Criterion) {
    let (store, keys) = filled_store(16);
    c.bench_function("memory_store_1_thread/get/16_shards", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7) % KEYS;
            let got = store.get(keys[i]).now_or_never().unwrap().unwrap();
            black_box(got)
        })
    });
}

fn memory_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_store_2_threads");
    group.throughput(Throughput::Elements(2));
    for shards in [1, 16] {
        let (store, keys) = filled_store(shards);
        let pick = |i: u64, thread: usize| keys[(i as usize * 7 + thread * 1031) % KEYS];
        group.bench_function(BenchmarkId::new("get", format!("{shards}_shards")), |b| {
            b.iter_custom(|iters| {
                two_threads(iters, |i, t| {
                    let got = store.get(pick(i, t)).now_or_never().unwrap().unwrap();
                    black_box(got);
                })
            })
        });
        group.bench_function(BenchmarkId::new("put", format!("{shards}_shards")), |b| {
            b.iter_custom(|iters| {
                two_threads(iters, |i, t| {
                    let put = store.put(pick(i, t), entry(), Duration::from_secs(3600));
                    put.now_or_never().unwrap().unwrap();
                })
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    key,
    canonical,
    memory_store_one_thread,
    memory_store
);
criterion_main!(benches);
