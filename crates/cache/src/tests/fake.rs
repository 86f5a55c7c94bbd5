//! A fake upstream: counts its calls, numbers its answers, streams chunks
//! with delays and fails on request.
//!
//! Behaviour per call: the request header `x-fake` if set, else the next
//! scripted one ([`Fake::script`]), else a normal answer. `x-fake-head-ms`
//! delays the response head, `x-fake-frame-ms` each streamed frame.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use llm_proxy_core::{Body, BoxError, Error, RequestMeta, full};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    Status(u16),
    Error,
    /// Two frames, then a body error.
    Break,
    /// A stream that ends cleanly but without `[DONE]`.
    NoDone,
    InvalidJson,
    /// 400 when the body has `stream_options` (some servers do this).
    RejectStreamOptions,
}

#[derive(Clone, Default)]
pub struct Fake {
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    calls: AtomicUsize,
    cancelled: AtomicUsize,
    script: Mutex<VecDeque<(Behaviour, Duration)>>,
    bodies: Mutex<Vec<Value>>,
}

impl Fake {
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Streams whose body was dropped before the end.
    pub fn cancelled(&self) -> usize {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// Behaviours for the next calls, in order, each with the time its
    /// response head takes.
    pub fn script(&self, behaviours: &[(Behaviour, Duration)]) {
        self.state.script.lock().unwrap().extend(behaviours);
    }

    /// The bodies the fake was sent, as JSON.
    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().unwrap().clone()
    }
}

fn header_ms(req: &Request<Body>, name: &str) -> Duration {
    let ms = req
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0);
    Duration::from_millis(ms)
}

fn behaviour(req: &Request<Body>, fake: &Fake) -> (Behaviour, Duration) {
    let named = req.headers().get("x-fake").and_then(|v| v.to_str().ok());
    let delay = header_ms(req, "x-fake-head-ms");
    let behaviour = match named {
        Some("break") => Behaviour::Break,
        Some("no-done") => Behaviour::NoDone,
        Some("invalid-json") => Behaviour::InvalidJson,
        Some("error") => Behaviour::Error,
        Some("reject-stream-options") => Behaviour::RejectStreamOptions,
        Some(status) => Behaviour::Status(status.parse().unwrap()),
        None => {
            let scripted = fake.state.script.lock().unwrap().pop_front();
            return scripted.unwrap_or((Behaviour::Normal, delay));
        }
    };
    (behaviour, delay)
}

impl tower::Service<Request<Body>> for Fake {
    type Response = Response<Body>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let n = self.state.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let meta = req.extensions().get::<RequestMeta>().unwrap().clone();
        let sent: Value = serde_json::from_slice(&meta.body_for_upstream().unwrap()).unwrap();
        self.state.bodies.lock().unwrap().push(sent.clone());
        let (behaviour, head_delay) = behaviour(&req, self);
        let frame_delay = header_ms(&req, "x-fake-frame-ms");
        let fake = self.clone();
        Box::pin(async move {
            tokio::time::sleep(head_delay).await;
            let usage = sent["stream_options"]["include_usage"] == true;
            match behaviour {
                Behaviour::Error => Err(Error::BadGateway {
                    upstream: "fake".into(),
                    reason: "refused".into(),
                }),
                Behaviour::Status(status) => Ok(status_response(status)),
                Behaviour::RejectStreamOptions if sent.get("stream_options").is_some() => {
                    Ok(status_response(400))
                }
                Behaviour::InvalidJson => Ok(Response::new(full("{\"id\": not json"))),
                _ if meta.is_stream() => Ok(stream(fake, n, usage, behaviour, frame_delay)),
                _ => Ok(json_answer(fake, n, behaviour, frame_delay)),
            }
        })
    }
}

fn status_response(status: u16) -> Response<Body> {
    let mut response = Response::new(full(r#"{"error":{"message":"no"}}"#));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
}

pub fn answer_json(n: usize) -> Value {
    json!({
        "id": format!("cmpl-{n}"),
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("answer {n}")},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    })
}

fn chunk(n: usize, choices: Value) -> Bytes {
    let data =
        json!({"id": format!("c{n}"), "object": "chat.completion.chunk", "choices": choices});
    Bytes::from(format!("data: {data}\n\n"))
}

pub fn usage_frame(n: usize) -> Bytes {
    let data = json!({"id": format!("c{n}"), "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}});
    Bytes::from(format!("data: {data}\n\n"))
}

/// The frames of streamed answer `n`.
pub fn stream_frames(n: usize, usage: bool) -> Vec<Bytes> {
    let mut frames = vec![chunk(
        n,
        json!([{"index": 0, "delta": {"role": "assistant"}}]),
    )];
    for word in ["one", "two", "three"] {
        frames.push(chunk(n, json!([{"index": 0, "delta": {"content": word}}])));
    }
    frames.push(chunk(
        n,
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ));
    if usage {
        frames.push(usage_frame(n));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn stream(
    fake: Fake,
    n: usize,
    usage: bool,
    behaviour: Behaviour,
    delay: Duration,
) -> Response<Body> {
    let mut frames: Vec<Result<Bytes, BoxError>> =
        stream_frames(n, usage).into_iter().map(Ok).collect();
    match behaviour {
        Behaviour::Break => {
            frames.truncate(2);
            frames.push(Err("upstream reset".into()));
        }
        Behaviour::NoDone => {
            frames.pop();
        }
        _ => {}
    }
    let mut response = Response::new(channel_body(fake, frames, delay));
    response
        .headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    response
}

/// A JSON answer in two frames.
fn json_answer(fake: Fake, n: usize, behaviour: Behaviour, delay: Duration) -> Response<Body> {
    let bytes = Bytes::from(answer_json(n).to_string());
    let mut frames = vec![Ok(bytes.slice(..10)), Ok(bytes.slice(10..))];
    if behaviour == Behaviour::Break {
        frames[1] = Err("upstream reset".into());
    }
    let mut response = Response::new(channel_body(fake, frames, delay));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// A body fed by a task that sends `frames` with `delay` before each; the
/// task notices (and counts) a body dropped before the end.
fn channel_body(fake: Fake, frames: Vec<Result<Bytes, BoxError>>, delay: Duration) -> Body {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        for frame in frames {
            tokio::time::sleep(delay).await;
            if tx.send(frame).await.is_err() {
                fake.state.cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    });
    Body::new(ChannelBody(rx))
}

struct ChannelBody(mpsc::Receiver<Result<Bytes, BoxError>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|item| item.map(|frame| frame.map(Frame::data)))
    }
}
