//! Translation cost per streamed event (target: under 5 µs), and the cost
//! added before the first event of a translated stream.
//!
//! Each run sends one request through parse -> translate -> an in-process
//! upstream whose body holds `EVENTS` token events, one per frame (as LLM
//! servers send them), and reads the translated body to its end. The fixed
//! per-request cost is spread over the events; `first_event` measures it
//! on its own, translated against native.
//!
//! `cargo bench -p llm-proxy-translate --bench stream`
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main,
};
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use llm_proxy_core::{Api, Body, BoxError, Error, ParseLayer, ParseLimits, full};
use llm_proxy_translate::{Protocol, TranslateConfig, TranslateLayer};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt, service_fn};

const EVENTS: usize = 1000;

struct Frames(VecDeque<Bytes>);

impl HttpBody for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// A chat stream: role chunk, `EVENTS` token chunks, finish, usage, [DONE].
fn chat_stream() -> Vec<Bytes> {
    let chunk = |delta: &str, finish: &str| {
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1731000000,\"model\":\"llama-3.1-8b\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        ))
    };
    let mut frames = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
    frames.extend((0..EVENTS).map(|i| chunk(&format!(r#"{{"content":" word{i}"}}"#), "null")));
    frames.push(chunk("{}", "\"stop\""));
    frames.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-bench\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":1000,\"total_tokens\":1020}}\n\n"));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// An Anthropic stream with `EVENTS` text deltas.
fn anthropic_stream() -> Vec<Bytes> {
    let event = |name: &str, data: String| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut frames = vec![
        event("message_start", r#"{"type":"message_start","message":{"id":"msg_bench","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":20,"output_tokens":1}}}"#.into()),
        event("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#.into()),
    ];
    frames.extend((0..EVENTS).map(|i| {
        event("content_block_delta", format!(r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":" word{i}"}}}}"#))
    }));
    frames.push(event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#.into(),
    ));
    frames.push(event("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":1000}}"#.into()));
    frames.push(event("message_stop", r#"{"type":"message_stop"}"#.into()));
    frames
}

type Svc = BoxCloneService<Request<Body>, Response<Body>, Error>;

fn stack(config: TranslateConfig, frames: Vec<Bytes>) -> Svc {
    let upstream = service_fn(move |_req: Request<Body>| {
        let body = Frames(frames.clone().into()).boxed_unsync();
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", "text/event-stream".parse().unwrap());
        std::future::ready(Ok::<_, Error>(resp))
    });
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(ParseLayer::new(ParseLimits::default()))
            .layer(TranslateLayer::new(config))
            .service(upstream),
    )
}

const MESSAGES: &str = r#"{"model":"m","max_tokens":2000,"stream":true,"messages":[{"role":"user","content":"Tell me a story."}]}"#;
const CHAT: &str = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me a story."}]}"#;
const RESPONSES: &str = r#"{"model":"m","stream":true,"input":"Tell me a story."}"#;

/// One measured stream: a stack and the request sent through it.
struct Case {
    name: &'static str,
    svc: Svc,
    path: &'static str,
    body: &'static str,
}

impl Case {
    fn request(&self) -> Request<Body> {
        Request::post(self.path).body(full(self.body)).unwrap()
    }
}

fn cases() -> [Case; 4] {
    let chat_only = || TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions]);
    let anthropic = TranslateConfig::new(Protocol::Anthropic, []);
    [
        Case {
            name: "chat_to_anthropic",
            svc: stack(chat_only(), chat_stream()),
            path: "/v1/messages",
            body: MESSAGES,
        },
        Case {
            name: "anthropic_to_chat",
            svc: stack(anthropic, anthropic_stream()),
            path: "/v1/chat/completions",
            body: CHAT,
        },
        Case {
            name: "chat_to_responses",
            svc: stack(chat_only(), chat_stream()),
            path: "/v1/responses",
            body: RESPONSES,
        },
        Case {
            name: "native_chat_baseline",
            svc: stack(chat_only(), chat_stream()),
            path: "/v1/chat/completions",
            body: CHAT,
        },
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// The whole stream, divided by its `EVENTS` token events.
fn per_event(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("per_event");
    group.throughput(Throughput::Elements(EVENTS as u64));
    for case in cases() {
        group.bench_function(case.name, |b| {
            b.to_async(&rt).iter_batched(
                || case.request(),
                |req| async {
                    let resp = case.svc.clone().oneshot(req).await.unwrap();
                    resp.into_body().collect().await.unwrap().to_bytes()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// A request the size a coding agent sends (Claude Code, Codex): a long
/// system prompt, 20 tools with JSON schemas, 41 turns of text, tool calls
/// and their results (code, with its escapes); about 85 KiB.
fn agent_messages_body() -> String {
    let prose = "Read the file, then change the function so that it handles the empty case; \
                 keep the tests green and explain what changed. "
        .repeat(8);
    let code = "fn main() {\n    let x = \"quoted\";\n    println!(\"{x}\");\n}\n".repeat(20);
    let tools: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            serde_json::json!({
                "name": format!("tool_{i}"),
                "description": prose,
                "input_schema": {"type": "object", "properties": {
                    "path": {"type": "string", "description": "The file to act on."},
                    "line": {"type": "integer", "minimum": 0},
                    "options": {"type": "object", "properties": {
                        "recursive": {"type": "boolean"}, "pattern": {"type": "string"}}}},
                    "required": ["path"]},
            })
        })
        .collect();
    let mut messages = vec![serde_json::json!({"role": "user", "content": prose})];
    for i in 0..20 {
        let id = format!("toolu_{i:04}");
        messages.push(serde_json::json!({"role": "assistant", "content": [
            {"type": "text", "text": prose},
            {"type": "tool_use", "id": id, "name": format!("tool_{}", i % 20),
                "input": {"path": "src/main.rs", "line": i}}]}));
        messages.push(serde_json::json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": id, "content": code}]}));
    }
    serde_json::json!({
        "model": "m", "max_tokens": 8192, "stream": true,
        "system": [{"type": "text", "text": prose.repeat(10)}],
        "tools": tools, "messages": messages,
    })
    .to_string()
}

/// From an agent-sized request to the first frame of the answer: the
/// request's translation (read, rebuilt as chat, written) against the
/// same body sent on as it came.
fn agent_request(c: &mut Criterion) {
    let rt = runtime();
    let body: &'static str = Box::leak(agent_messages_body().into_boxed_str());
    let chat_only = TranslateConfig::new(Protocol::OpenAi, [Api::ChatCompletions]);
    let native = TranslateConfig::new(Protocol::Anthropic, []);
    let cases = [
        Case {
            name: "agent_messages_to_chat",
            svc: stack(chat_only, chat_stream()),
            path: "/v1/messages",
            body,
        },
        Case {
            name: "agent_messages_native",
            svc: stack(native, anthropic_stream()),
            path: "/v1/messages",
            body,
        },
    ];
    let mut group = c.benchmark_group("agent_request");
    group.throughput(Throughput::Bytes(body.len() as u64));
    to_first_frame(&rt, &mut group, cases);
    group.finish();
}

/// From the request to the first frame of the answer.
fn first_event(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("first_event");
    to_first_frame(&rt, &mut group, cases());
    group.finish();
}

/// Each case's time from the request to the first frame of its answer.
fn to_first_frame(
    rt: &tokio::runtime::Runtime,
    group: &mut BenchmarkGroup<'_, WallTime>,
    cases: impl IntoIterator<Item = Case>,
) {
    for case in cases {
        group.bench_function(case.name, |b| {
            b.to_async(rt).iter_batched(
                || case.request(),
                |req| async {
                    let resp = case.svc.clone().oneshot(req).await.unwrap();
                    let mut body = resp.into_body();
                    body.frame().await.unwrap().unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(30);
    targets = per_event, first_event, agent_request
}
criterion_main!(benches);
