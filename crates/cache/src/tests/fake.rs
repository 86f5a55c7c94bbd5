//! A fake upstream: counts its calls, numbers its answers, streams chunks
//! with delays and fails on request.
//!
//! Behaviour per call: the request header `x-fake` if set, else the next
//! scripted one ([`Fake::script`]), else a normal answer. `x-fake-head-ms`
//! delays the response head, `x-fake-frame-ms` each streamed frame;
//! `x-fake-fallback: <model>` marks the answer as the balancer marks one
//! from a fallback model.
//!
//! `/v1/responses` and `/v1/messages` are answered in their own dialect: a
//! Responses `response` or its events, an Anthropic `message` or its events
//! (with `event:` lines, some frames holding two events or half of one).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use llm_proxy_core::fallback::ServedByFallback;
use llm_proxy_core::{Body, BoxError, Endpoint, Error, RequestMeta, full};
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
    /// Responses: ends with `response.failed` (streamed) or has
    /// `"status": "failed"`.
    Failed,
    /// Responses: ends with `response.incomplete` (streamed) or has
    /// `"status": "incomplete"`.
    Incomplete,
    /// Responses and Messages streams: an `error` event instead of the last
    /// one, as an upstream that fails mid-way sends.
    ErrorEvent,
    /// A JSON answer of known length, whole in one frame, as hyper gives a
    /// body with a `content-length`: it says it is at its end after it.
    Whole,
}

#[derive(Clone, Default)]
pub struct Fake {
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    calls: AtomicUsize,
    cancelled: AtomicUsize,
    /// Answer bodies not dropped yet.
    live: Arc<AtomicUsize>,
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

    /// Streamed (and two-frame JSON) answer bodies not dropped yet.
    pub fn live(&self) -> usize {
        self.state.live.load(Ordering::SeqCst)
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
        Some("failed") => Behaviour::Failed,
        Some("incomplete") => Behaviour::Incomplete,
        Some("error-event") => Behaviour::ErrorEvent,
        Some("whole") => Behaviour::Whole,
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
        // Answered by this fallback model, as the balancer marks it.
        let fallback = req
            .headers()
            .get("x-fake-fallback")
            .and_then(|v| v.to_str().ok())
            .map(|model| ServedByFallback(model.into()));
        let fake = self.clone();
        let answered = Box::pin(async move {
            tokio::time::sleep(head_delay).await;
            let usage = sent["stream_options"]["include_usage"] == true;
            match behaviour {
                Behaviour::Error => Err(Error::BadGateway {
                    upstream: "fake".into(),
                    reason: "refused".into(),
                }),
                Behaviour::Status(status) => Ok(status_response(status)),
                Behaviour::RejectStreamOptions if sent.get("stream_options").is_some() => {
                    let mut response = status_response(400);
                    *response.body_mut() = full(
                        r#"{"error":{"message":"Unrecognized request argument supplied: stream_options"}}"#,
                    );
                    Ok(response)
                }
                Behaviour::InvalidJson => Ok(Response::new(full("{\"id\": not json"))),
                Behaviour::Whole => {
                    let answer = answer_json(n).to_string();
                    let length = answer.len();
                    let mut response = Response::new(full(answer));
                    let headers = response.headers_mut();
                    headers.insert("content-type", "application/json".parse().unwrap());
                    headers.insert("content-length", length.into());
                    Ok(response)
                }
                _ => {
                    let endpoint = meta.endpoint();
                    let (frames, content_type) = if meta.is_stream() {
                        let frames = match endpoint {
                            Endpoint::Responses => responses_frames(n, behaviour),
                            Endpoint::Messages => messages_frames(n, behaviour),
                            _ => stream_frames(n, usage),
                        };
                        (frames, "text/event-stream")
                    } else {
                        let answer = match endpoint {
                            Endpoint::Responses => responses_json(n, behaviour),
                            Endpoint::Messages => messages_json(n),
                            _ => answer_json(n),
                        };
                        let bytes = Bytes::from(answer.to_string());
                        // A JSON answer in two frames.
                        (
                            vec![bytes.slice(..10), bytes.slice(10..)],
                            "application/json",
                        )
                    };
                    Ok(answer(fake, frames, content_type, behaviour, frame_delay))
                }
            }
        });
        Box::pin(async move {
            let mut answered = answered.await;
            if let (Some(fallback), Ok(response)) = (fallback, &mut answered) {
                response.extensions_mut().insert(fallback);
            }
            answered
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

/// An answer of `frames`: a `Break` sends two (at most all but the last),
/// then a body error; a `NoDone` leaves out the last.
fn answer(
    fake: Fake,
    frames: Vec<Bytes>,
    content_type: &'static str,
    behaviour: Behaviour,
    delay: Duration,
) -> Response<Body> {
    let mut frames: Vec<Result<Bytes, BoxError>> = frames.into_iter().map(Ok).collect();
    match behaviour {
        Behaviour::Break => {
            frames.truncate(2.min(frames.len() - 1));
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
        .insert("content-type", content_type.parse().unwrap());
    response
}

/// One SSE event with an `event:` line.
fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// Responses `response` `n`, with `status`.
fn response_object(n: usize, status: &str) -> Value {
    json!({
        "id": format!("resp_{n}"), "object": "response", "status": status, "model": "m",
        "store": false,
        "output": [{"type": "message", "id": format!("msg_{n}"), "role": "assistant",
            "content": [{"type": "output_text", "text": format!("answer {n}")}]}],
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
    })
}

/// The non-streamed Responses answer `n`: `completed`, unless the behaviour
/// says `failed` or `incomplete`.
pub fn responses_json(n: usize, behaviour: Behaviour) -> Value {
    let status = match behaviour {
        Behaviour::Failed => "failed",
        Behaviour::Incomplete => "incomplete",
        _ => "completed",
    };
    response_object(n, status)
}

/// The frames of streamed Responses answer `n`: `response.created`, three
/// deltas (the second split over two frames), then `response.completed` —
/// or `response.failed`, `response.incomplete`, an `error` event.
pub fn responses_frames(n: usize, behaviour: Behaviour) -> Vec<Bytes> {
    let mut created = response_object(n, "in_progress");
    created["usage"] = Value::Null;
    let mut events = vec![event(
        "response.created",
        &json!({"type": "response.created", "sequence_number": 0, "response": created}),
    )];
    for (i, word) in ["one", "two", "three"].into_iter().enumerate() {
        events.push(event(
            "response.output_text.delta",
            &json!({"type": "response.output_text.delta", "sequence_number": i + 1,
                "item_id": format!("msg_{n}"), "output_index": 0, "content_index": 0,
                "delta": word}),
        ));
    }
    let last = match behaviour {
        Behaviour::Failed => "response.failed",
        Behaviour::Incomplete => "response.incomplete",
        _ => "response.completed",
    };
    let status = last.trim_start_matches("response.");
    let data = json!({"type": last, "sequence_number": 4, "response": response_object(n, status)});
    events.push(match behaviour {
        Behaviour::ErrorEvent => event(
            "error",
            &json!({"type": "error", "sequence_number": 4, "code": "server_error",
                "message": "overloaded", "param": null}),
        ),
        _ => event(last, &data),
    });
    let split = events[2].len() / 2;
    let second = events.remove(2);
    let mut frames: Vec<Bytes> = events.into_iter().map(Bytes::from).collect();
    frames.insert(2, Bytes::from(second[..split].to_owned()));
    frames.insert(3, Bytes::from(second[split..].to_owned()));
    frames
}

/// The non-streamed Messages answer `n`.
pub fn messages_json(n: usize) -> Value {
    json!({
        "id": format!("msg_{n}"), "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": format!("answer {n}")}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 3, "output_tokens": 2},
    })
}

/// The frames of streamed Messages answer `n`: `message_start`,
/// `content_block_start`, `ping`, three deltas, `content_block_stop`, then
/// `message_delta` and `message_stop` in one frame — or an `error` event
/// instead of the last two.
pub fn messages_frames(n: usize, behaviour: Behaviour) -> Vec<Bytes> {
    let mut message = messages_json(n);
    message["content"] = json!([]);
    message["stop_reason"] = Value::Null;
    message["usage"] = json!({"input_tokens": 3, "output_tokens": 1});
    let mut frames = vec![
        event(
            "message_start",
            &json!({"type": "message_start", "message": message}),
        ),
        event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", &json!({"type": "ping"})),
    ];
    for word in ["one", "two", "three"] {
        frames.push(event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": word}}),
        ));
    }
    frames.push(event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(match behaviour {
        Behaviour::ErrorEvent => event(
            "error",
            &json!({"type": "error",
                "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
        _ => {
            let delta = event(
                "message_delta",
                &json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": 3}}),
            );
            delta + &event("message_stop", &json!({"type": "message_stop"}))
        }
    });
    frames.into_iter().map(Bytes::from).collect()
}

/// A body fed by a task that sends `frames` with `delay` before each; the
/// task notices (and counts) a body dropped before the end.
fn channel_body(fake: Fake, frames: Vec<Result<Bytes, BoxError>>, delay: Duration) -> Body {
    let (tx, rx) = mpsc::channel(1);
    let live = fake.state.live.clone();
    live.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        for frame in frames {
            tokio::time::sleep(delay).await;
            if tx.send(frame).await.is_err() {
                fake.state.cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    });
    Body::new(ChannelBody {
        live,
        rx,
        error: None,
        flush: llm_proxy_core::FlushBeforeError::default(),
    })
}

/// The frames a task sends; an error comes after a flush pause, as the
/// upstream crate's bodies give theirs.
struct ChannelBody {
    live: Arc<AtomicUsize>,
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    error: Option<BoxError>,
    flush: llm_proxy_core::FlushBeforeError,
}

impl Drop for ChannelBody {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.error.is_none() {
            match std::task::ready!(this.rx.poll_recv(cx)) {
                Some(Err(error)) => this.error = Some(error),
                item => return Poll::Ready(item.map(|frame| frame.map(Frame::data))),
            }
        }
        std::task::ready!(this.flush.poll(cx));
        Poll::Ready(this.error.take().map(Err))
    }
}
