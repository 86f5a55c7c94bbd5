//! Benchmarks of the hot paths in `llm-proxy-core`: parsing a streamed chat
//! completion as the proxy observes it, canonicalising chat requests for
//! cache keys, and parsing request bodies.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_main};
use llm_proxy_core::{canonical, sse, usage};
use serde_json::{Value, json};

/// A 64-chunk chat completion stream, as an OpenAI upstream sends it with
/// `stream_options.include_usage`: role chunk, content deltas, finish chunk,
/// usage chunk, `[DONE]`.
fn chat_stream() -> Vec<u8> {
    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": "chatcmpl-9f8e7d6c5b4a3928171605f4e3d2c1b0",
            "object": "chat.completion.chunk",
            "created": 1_726_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_0123456789",
            "choices": choices,
            "usage": usage,
        })
        .to_string()
    };
    let mut stream = Vec::new();
    let mut push = |data: &str| stream.extend_from_slice(&sse::encode_data(data));
    push(&chunk(
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
        Value::Null,
    ));
    for i in 0..60 {
        push(&chunk(
            json!([{"index": 0, "delta": {"content": format!(" token{i}")}, "finish_reason": null}]),
            Value::Null,
        ));
    }
    push(&chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        Value::Null,
    ));
    push(&chunk(
        json!([]),
        json!({"prompt_tokens": 120, "completion_tokens": 60, "total_tokens": 180}),
    ));
    push(sse::DONE);
    stream
}

/// A chat request whose serialised size is close to `target` bytes.
fn chat_request(target: usize) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    let mut request = json!({
        "model": "gpt-4o-mini",
        "temperature": 0.7,
        "stream": true,
        "stream_options": {"include_usage": true},
        "user": "user-1234",
        "messages": [],
    });
    let mut i = 0;
    while request.to_string().len() < target {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({
            "role": role,
            "content": format!("Message {i}: the quick brown fox jumps over the lazy dog. \u{e9}\n"),
        }));
        request["messages"] = Value::Array(messages.clone());
        i += 1;
    }
    request
}

fn parse_stream(c: &mut Criterion) {
    let stream = chat_stream();
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("parse_64_chunk_stream_in_1KiB_pieces", |b| {
        b.iter(|| {
            let mut parser = sse::Parser::new();
            let mut found = None;
            for piece in black_box(&stream).chunks(1024) {
                if parser.push(piece).is_err() {
                    break;
                }
                while let Some(event) = parser.next_event() {
                    if let Some(usage) = usage::from_sse_data(&event.data) {
                        found = Some(usage);
                    }
                    black_box(&event);
                }
            }
            found
        });
    });
    group.finish();
}

fn canonicalise(c: &mut Criterion) {
    let mut group = c.benchmark_group("canonical");
    for (name, size) in [
        ("chat_request_1KiB", 1024),
        ("chat_request_64KiB", 64 * 1024),
    ] {
        let request = chat_request(size);
        let Value::Object(map) = &request else {
            continue;
        };
        group.throughput(Throughput::Bytes(request.to_string().len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| canonical::to_canonical(black_box(&request)))
        });
        let mut out = Vec::new();
        group.bench_function(format!("{name}_without_user"), |b| {
            b.iter(|| {
                out.clear();
                canonical::write_canonical_map_without(
                    black_box(map),
                    &["user", "stream_options"],
                    &mut out,
                );
                out.len()
            })
        });
    }
    group.finish();
}

/// The request body parse: `parse_object` (no key repeated in any object)
/// against serde_json's own `Value`, which it replaced.
fn parse_body(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_body");
    for (name, size) in [
        ("chat_request_1KiB", 1024),
        ("chat_request_64KiB", 64 * 1024),
    ] {
        let body = chat_request(size).to_string().into_bytes();
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(format!("{name}_parse_object"), |b| {
            b.iter(|| llm_proxy_core::parse_object(black_box(&body)).map(|m| m.len()))
        });
        group.bench_function(format!("{name}_serde_json_value"), |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).map(|v| v.is_object()))
        });
    }
    group.finish();
}

/// `criterion_group!` makes an undocumented `pub fn`; a private module keeps
/// it out of `missing_docs`.
mod group {
    criterion::criterion_group!(
        benches,
        super::parse_stream,
        super::canonicalise,
        super::parse_body
    );
}
criterion_main!(group::benches);
