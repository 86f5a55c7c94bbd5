//! Service-level tests with an in-memory fleet of fake upstreams and paused
//! tokio time.

mod apis;
mod distribution;
mod failure;
mod runtime;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, Endpoint, Error, RequestMeta, UpstreamName};
use tower_service::Service;

use crate::{Backend, Balance, BalanceConfig, BalanceHandle};

/// How a fake upstream answers.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    /// 200 with the backend's name as body, after this delay.
    Ok(Duration),
    /// This status (with `retry-after` when given).
    Status(u16, Option<&'static str>),
    /// A connection failure.
    Refused,
    /// Not taken: an HTTP/2 stream refused, or past a `GOAWAY`.
    Unprocessed,
    /// No head within the first-byte timeout.
    TimedOut,
    /// No head within a first-byte timeout of this long: the timeout
    /// after it (a server that hangs).
    Hangs(Duration),
    /// 200 with an empty body (over at its head).
    Empty,
    /// 200, one body frame, then a broken stream.
    Broken,
    /// 200, one body frame, then an error that is the proxy's own (a
    /// translation that cannot carry on).
    BrokenByProxy,
    /// 200 with a body that never ends: 64 KiB frames, as fast as they are
    /// read, each counted here.
    Endless(Arc<std::sync::atomic::AtomicU64>),
    /// Requests answered 200 at once; health probes (`/v1/models`) only
    /// after this delay (a server too busy for its model list).
    SlowProbes(Duration),
    /// 200 after this delay, then a body that never comes.
    Stalled(Duration),
}

/// What one fake call saw.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) backend: String,
    pub(crate) model: Option<String>,
    pub(crate) body_model: Option<String>,
    pub(crate) path: String,
    /// The last message's text.
    pub(crate) text: String,
    /// Whether the body's value had been built when the request came.
    pub(crate) built: bool,
    /// How many extensions the request carried.
    pub(crate) extensions: usize,
}

#[derive(Default)]
struct FleetState {
    modes: HashMap<String, Mode>,
    seen: Vec<Seen>,
}

/// A set of fake upstreams sharing one log.
#[derive(Clone, Default)]
pub(crate) struct Fleet(Arc<Mutex<FleetState>>);

impl Fleet {
    pub(crate) fn set(&self, name: &str, mode: Mode) {
        self.0.lock().unwrap().modes.insert(name.to_owned(), mode);
    }

    pub(crate) fn fake(&self, name: &str) -> Fake {
        Fake {
            name: name.into(),
            fleet: self.clone(),
        }
    }

    pub(crate) fn backend(&self, name: &str) -> Backend<Fake> {
        Backend::new(name, self.fake(name))
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().seen.clone()
    }

    /// Calls per backend, model requests only (health probes excluded).
    pub(crate) fn calls(&self, name: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.backend == name && s.path != "/v1/models")
            .count()
    }

    pub(crate) fn probes(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path == "/v1/models")
            .count()
    }

    pub(crate) fn total(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.path != "/v1/models")
            .count()
    }
}

/// One fake upstream.
#[derive(Clone)]
pub(crate) struct Fake {
    name: Arc<str>,
    fleet: Fleet,
}

impl Service<Request<Body>> for Fake {
    type Response = Response<Body>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let meta = req.extensions().get::<RequestMeta>();
        let built = meta.is_some_and(RequestMeta::is_built);
        let body_model = meta
            .and_then(RequestMeta::body_for_upstream)
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["model"].as_str().map(str::to_owned));
        let text = meta
            .and_then(RequestMeta::json)
            .and_then(|j| {
                j.get("messages")?
                    .as_array()?
                    .last()?
                    .get("content")?
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let mode = {
            let mut fleet = self.fleet.0.lock().unwrap();
            fleet.seen.push(Seen {
                backend: self.name.to_string(),
                model: meta.and_then(RequestMeta::model).map(str::to_owned),
                body_model,
                path: req.uri().path().to_owned(),
                text,
                built,
                extensions: req.extensions().len(),
            });
            fleet
                .modes
                .get(&*self.name)
                .cloned()
                .unwrap_or(Mode::Ok(Duration::ZERO))
        };
        let name = self.name.clone();
        let mode = match mode {
            Mode::SlowProbes(delay) if req.uri().path() == "/v1/models" => Mode::Ok(delay),
            Mode::SlowProbes(_) => Mode::Ok(Duration::ZERO),
            mode => mode,
        };
        Box::pin(async move {
            match mode {
                Mode::Ok(delay) => {
                    tokio::time::sleep(delay).await;
                    let mut resp = Response::new(llm_proxy_core::full(name.to_string()));
                    resp.extensions_mut().insert(UpstreamName(name));
                    Ok(resp)
                }
                Mode::Status(code, retry_after) => {
                    let mut resp = Response::new(llm_proxy_core::full("error"));
                    *resp.status_mut() = StatusCode::from_u16(code).expect("a valid status");
                    if let Some(ra) = retry_after {
                        resp.headers_mut()
                            .insert("retry-after", ra.parse().expect("a header value"));
                    }
                    Ok(resp)
                }
                Mode::Broken | Mode::BrokenByProxy => {
                    let error: llm_proxy_core::BoxError = if matches!(mode, Mode::Broken) {
                        "reset".into()
                    } else {
                        Box::new(llm_proxy_core::NotUpstreamFault("cannot translate".into()))
                    };
                    let frames: Vec<Result<http_body::Frame<Bytes>, llm_proxy_core::BoxError>> = vec![
                        Ok(http_body::Frame::data(Bytes::from("partial"))),
                        Err(error),
                    ];
                    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                    Ok(Response::new(body.boxed_unsync()))
                }
                Mode::Endless(served) => {
                    const FRAME: &[u8] = &[b'x'; 64 * 1024];
                    let frames = futures_util::stream::unfold(served, |served| async move {
                        // Pending between frames, as a socket's body is.
                        tokio::task::yield_now().await;
                        served.fetch_add(FRAME.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        let frame = http_body::Frame::data(Bytes::from_static(FRAME));
                        Some((Ok::<_, llm_proxy_core::BoxError>(frame), served))
                    });
                    let body = http_body_util::StreamBody::new(frames);
                    Ok(Response::new(body.boxed_unsync()))
                }
                Mode::Empty => Ok(Response::new(llm_proxy_core::empty())),
                Mode::Stalled(delay) => {
                    tokio::time::sleep(delay).await;
                    let never = futures_util::stream::pending::<
                        Result<http_body::Frame<Bytes>, llm_proxy_core::BoxError>,
                    >();
                    Ok(Response::new(
                        http_body_util::StreamBody::new(never).boxed_unsync(),
                    ))
                }
                Mode::SlowProbes(_) => unreachable!("mapped above"),
                Mode::TimedOut => Err(Error::UpstreamTimeout {
                    upstream: name,
                    phase: Error::WAITING_FOR_HEAD,
                }),
                Mode::Hangs(timeout) => {
                    tokio::time::sleep(timeout).await;
                    Err(Error::UpstreamTimeout {
                        upstream: name,
                        phase: Error::WAITING_FOR_HEAD,
                    })
                }
                Mode::Refused => Err(Error::BadGateway {
                    upstream: name,
                    reason: "could not connect: connection refused".into(),
                }),
                Mode::Unprocessed => Err(Error::UpstreamRefused {
                    upstream: name,
                    reason: "its HTTP/2 stream was refused (REFUSED_STREAM)".into(),
                }),
            }
        })
    }
}

/// A buffered chat request for `model` whose user message is `text`, as
/// the parse layer hands it on (checked, its body not built).
pub(crate) fn chat(model: &str, text: &str) -> Request<Body> {
    let json = serde_json::json!({
        "model": model,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}],
    });
    let bytes = Bytes::from(json.to_string());
    let mut req = Request::post("/v1/chat/completions")
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    req.extensions_mut().insert(RequestMeta::checked(
        Endpoint::ChatCompletions,
        bytes,
        Some(model.into()),
        false,
        false,
        llm_proxy_core::GenerationCaps::default(),
    ));
    req
}

pub(crate) fn balance(fleet: &Fleet, names: &[&str], cfg: BalanceConfig) -> Balance<Fake> {
    Balance::new(names.iter().map(|n| fleet.backend(n)), cfg)
}

/// Send and read the whole body: (status, body text).
pub(crate) async fn send(
    b: &Balance<Fake>,
    req: Request<Body>,
) -> Result<(StatusCode, String), Error> {
    // Not `oneshot`: its future names `Request<Body>` generically, which
    // trips the compiler's higher-ranked `Send` check inside `tokio::spawn`.
    let mut svc = b.clone();
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
    let resp = tokio::time::timeout(Duration::from_secs(3600), svc.call(req))
        .await
        .expect("no hang")?;
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The in-flight count and health of `name`.
pub(crate) fn stats(h: &BalanceHandle<Fake>, name: &str) -> crate::BackendStats {
    h.snapshot()
        .into_iter()
        .find(|s| &*s.name == name)
        .expect("backend present")
}

/// Whole-seconds duration.
pub(crate) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
