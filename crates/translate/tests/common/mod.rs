//! Shared helpers of the translation's integration tests: run one request
//! through parse -> translate -> a fake upstream that records what it got
//! and answers with given frames; read the answer back.
#![allow(dead_code, clippy::unwrap_used)] // each test file uses a part

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, BoxError, Error, ParseLayer, ParseLimits, RequestMeta, full, sse};
use llm_proxy_translate::{TranslateConfig, TranslateLayer};
use serde_json::Value;
use tower::{ServiceBuilder, ServiceExt, service_fn};

/// What the fake upstream answers.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub frames: Vec<Result<Bytes, String>>,
}

impl Answer {
    /// A JSON answer in one frame.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Answer {
            status,
            content_type: "application/json",
            frames: vec![Ok(body.into())],
        }
    }

    /// An SSE answer, one frame per event (as LLM servers send them).
    pub fn sse(text: &str) -> Self {
        let frames = text
            .split_inclusive("\n\n")
            .map(|f| Ok(Bytes::from(f.to_owned())))
            .collect();
        Answer {
            status: 200,
            content_type: "text/event-stream",
            frames,
        }
    }

    /// The same SSE bytes cut into frames of `size` bytes.
    pub fn resplit(mut self, size: usize) -> Self {
        let all: Vec<u8> = self
            .frames
            .iter()
            .flat_map(|f| f.clone().unwrap().to_vec())
            .collect();
        self.frames = all
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        self
    }
}

/// What the fake upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub json: Value,
}

/// What the client got.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body ended with an error (the connection would be closed).
    pub broke: bool,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {:?}", self.body))
    }

    /// `(event name, data)` of an SSE body; `[DONE]` as the string.
    pub fn events(&self) -> Vec<(Option<String>, Value)> {
        sse_events(&self.body)
    }
}

/// Parse an SSE byte stream into `(event name, data JSON)`.
pub fn sse_events(bytes: &[u8]) -> Vec<(Option<String>, Value)> {
    let mut parser = sse::Parser::new();
    parser.push(bytes).unwrap();
    std::iter::from_fn(|| parser.next_event())
        .map(|e| {
            let data = if e.is_done() {
                Value::String(e.data.clone())
            } else {
                serde_json::from_str(&e.data).unwrap()
            };
            (e.event, data)
        })
        .collect()
}

/// A body that yields the given frames, one per poll.
pub struct Frames(pub VecDeque<Result<Bytes, String>>);

impl HttpBody for Frames {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(
            self.0
                .pop_front()
                .map(|f| f.map(Frame::data).map_err(BoxError::from)),
        )
    }
}

/// Send `request` to `path` through parse -> translate(config) -> the fake
/// upstream answering `answer`.
pub async fn call(
    config: TranslateConfig,
    path: &str,
    request: &Value,
    answer: Answer,
) -> (Option<Seen>, Result<Got, Error>) {
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let upstream = service_fn(move |req: Request<Body>| {
        let answer = answer.clone();
        let record = record.clone();
        async move {
            let meta = req.extensions().get::<RequestMeta>().unwrap();
            let json = serde_json::from_slice(&meta.body_for_upstream().unwrap()).unwrap();
            *record.lock().unwrap() = Some(Seen {
                path: req.uri().to_string(),
                headers: req.headers().clone(),
                json,
            });
            let body = Frames(answer.frames.into()).boxed_unsync();
            let mut resp = Response::new(body);
            *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap();
            resp.headers_mut()
                .insert("content-type", answer.content_type.parse().unwrap());
            Ok::<_, Error>(resp)
        }
    });
    let svc = ServiceBuilder::new()
        .layer(ParseLayer::new(ParseLimits::default()))
        .layer(TranslateLayer::new(config))
        .service(upstream);
    let req = Request::post(path)
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip")
        .body(full(request.to_string()))
        .unwrap();
    let got = match svc.oneshot(req).await {
        Err(e) => Err(e),
        Ok(resp) => Ok(read(resp).await),
    };
    let seen = seen.lock().unwrap().clone();
    (seen, got)
}

pub async fn read(resp: Response<Body>) -> Got {
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    let mut broke = false;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => data.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    Got {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(data),
        broke,
    }
}

/// Compare JSON field by field; the string `"<any>"` in `expected` matches
/// anything. Panics naming the first differing path.
pub fn assert_json(expected: &Value, actual: &Value, path: &str) {
    match (expected, actual) {
        (Value::String(s), _) if s == "<any>" => {}
        (Value::Object(e), Value::Object(a)) => {
            let (mut ek, mut ak): (Vec<_>, Vec<_>) = (e.keys().collect(), a.keys().collect());
            ek.sort();
            ak.sort();
            assert_eq!(ek, ak, "keys of {path}");
            for (k, v) in e {
                assert_json(v, &a[k], &format!("{path}.{k}"));
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            assert_eq!(
                e.len(),
                a.len(),
                "length of {path}: expected {expected}, got {actual}"
            );
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                assert_json(ev, av, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(expected, actual, "at {path}"),
    }
}
