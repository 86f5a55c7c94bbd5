//! Stateful Responses: a response lives on the upstream that created it, so
//! `previous_response_id` and `GET`/`DELETE`/`cancel`/`input_items` of a
//! response id must go there.
//!
//! The layer remembers `response id -> upstream name` from every `200`
//! answer to `POST /v1/responses` (the `id` of a JSON answer, or of the
//! `response.created` event of a stream), and pins later requests naming
//! that id to that upstream with [`PinnedUpstream`] — the balancer never
//! reroutes a pinned request. An id it does not know (never seen, expired,
//! or created through a proxy that does not share this one's Redis) is a
//! 404 `response_not_found`, never a silent guess that the upstream could
//! not honour.
//!
//! An id belongs to the key that created it: with auth on, the map keeps the
//! creating key's name beside the upstream, and a request by any other key
//! naming that id is told `response_not_found`, as if the id did not exist
//! (the upstream holds every tenant's responses under one upstream key, so
//! without this any key that learnt an id could read, continue, cancel or
//! delete another tenant's response). Without auth there is one tenant.
//!
//! The map is an LRU in memory (100 000 ids, 7 days), and, when the cache or
//! auth backend is Redis, also Redis (`<prefix>resp:<id>`, same TTL), so that
//! every proxy on that Redis finds every id. An id is recorded before the
//! last byte of the answer that carries it is passed on, so a client's
//! follow-up can never outrun it on this proxy; through Redis the write is
//! in flight for a moment after.

use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use llm_proxy_core::sse::Parser;
use llm_proxy_core::{Body, BoxError, Endpoint, Error, PinnedUpstream, RequestMeta, UpstreamName};
use tower_layer::Layer;
use tower_service::Service;

use crate::redis_ids::RedisIds;

/// How long an id is remembered.
const TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many ids are kept in memory.
const CAPACITY: usize = 100_000;
/// JSON answers larger than this are not searched for their id.
const MAX_JSON: usize = 4 << 20;

/// Response id -> where it lives, and when it was recorded.
type IdMap = lru::LruCache<Box<str>, (Home, Instant)>;

/// The upstream holding a response, and the auth key that created it
/// (`None` without auth).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Home {
    upstream: Arc<str>,
    owner: Option<Arc<str>>,
}

/// Separates the upstream from the owner in the Redis value (a control
/// character: in neither an upstream's nor a key's name in practice; a name
/// that holds one only makes its own ids unfindable).
const OWNER_SEPARATOR: char = '\u{1f}';

impl Home {
    fn encode(&self) -> String {
        match &self.owner {
            Some(owner) => format!("{}{OWNER_SEPARATOR}{owner}", self.upstream),
            None => self.upstream.to_string(),
        }
    }

    fn decode(value: &str) -> Home {
        match value.split_once(OWNER_SEPARATOR) {
            Some((upstream, owner)) => Home {
                upstream: upstream.into(),
                owner: Some(owner.into()),
            },
            None => Home {
                upstream: value.into(),
                owner: None,
            },
        }
    }
}

/// Where response ids are remembered.
pub struct ResponseIds {
    memory: Mutex<IdMap>,
    redis: Option<RedisIds>,
}

impl std::fmt::Debug for ResponseIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseIds")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl ResponseIds {
    /// A map in memory, and in Redis when `redis` is given.
    pub fn new(redis: Option<RedisIds>) -> Arc<Self> {
        let capacity = NonZeroUsize::new(CAPACITY).expect("a non-zero constant");
        Arc::new(ResponseIds {
            memory: Mutex::new(lru::LruCache::new(capacity)),
            redis,
        })
    }

    fn record(&self, id: &str, home: &Home) {
        self.memory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(id.into(), (home.clone(), Instant::now()));
        if let Some(redis) = &self.redis {
            redis.set(id, &home.encode(), TTL);
        }
    }

    /// The upstream holding `id`, if `owner` (the asking key, `None` without
    /// auth) created it.
    async fn lookup(&self, id: &str, owner: Option<&str>) -> Option<Arc<str>> {
        let local = {
            let mut memory = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
            match memory.get(id) {
                Some((home, at)) if at.elapsed() < TTL => Some(home.clone()),
                Some(_) => {
                    memory.pop(id);
                    None
                }
                None => None,
            }
        };
        let home = match (local, &self.redis) {
            (Some(home), _) => home,
            (None, Some(redis)) => Home::decode(&redis.get(id).await?),
            (None, None) => return None,
        };
        (home.owner.as_deref() == owner).then_some(home.upstream)
    }
}

/// Pins requests that name a response id to the upstream holding it.
#[derive(Clone, Debug)]
pub struct ResponseAffinityLayer {
    ids: Arc<ResponseIds>,
}

impl ResponseAffinityLayer {
    /// A layer over this id map.
    pub fn new(ids: Arc<ResponseIds>) -> Self {
        ResponseAffinityLayer { ids }
    }
}

impl<S> Layer<S> for ResponseAffinityLayer {
    type Service = ResponseAffinity<S>;

    fn layer(&self, inner: S) -> ResponseAffinity<S> {
        ResponseAffinity {
            inner,
            ids: self.ids.clone(),
        }
    }
}

/// The service of [`ResponseAffinityLayer`].
#[derive(Clone, Debug)]
pub struct ResponseAffinity<S> {
    inner: S,
    ids: Arc<ResponseIds>,
}

use llm_proxy_core::BoxFuture;

impl<S> Service<Request<Body>> for ResponseAffinity<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> BoxFuture {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let ids = self.ids.clone();
        Box::pin(async move {
            let meta = req.extensions().get::<RequestMeta>();
            let endpoint = meta.map_or(Endpoint::Passthrough, RequestMeta::endpoint);
            let owner = meta
                .and_then(RequestMeta::identity)
                .map(|identity| identity.name.clone());
            if let Some((id, param)) = named_id(&req, endpoint) {
                let upstream = ids.lookup(&id, owner.as_deref()).await.ok_or_else(|| {
                    Error::ResponseNotFound(format!(
                        "{param} `{id}` is not known to this proxy (never seen, expired, or created through a proxy that does not share its Redis)"
                    ))
                })?;
                req.extensions_mut().insert(PinnedUpstream(upstream));
            }
            let resp = inner.call(req).await?;
            if endpoint != Endpoint::Responses || !resp.status().is_success() {
                return Ok(resp);
            }
            let Some(UpstreamName(upstream)) = resp.extensions().get::<UpstreamName>().cloned()
            else {
                return Ok(resp);
            };
            let sse = resp
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("text/event-stream"));
            let home = Home { upstream, owner };
            Ok(resp.map(|body| IdTap::new(body, sse, ids, home).boxed_unsync()))
        })
    }
}

/// The response id a request names, and the name of what named it.
fn named_id(req: &Request<Body>, endpoint: Endpoint) -> Option<(String, &'static str)> {
    match endpoint {
        Endpoint::ResponseById => {
            llm_proxy_core::response_id(req.uri().path()).map(|id| (id.to_owned(), "response id"))
        }
        Endpoint::Responses | Endpoint::ResponsesCompact | Endpoint::ResponsesInputTokens => {
            let json = req.extensions().get::<RequestMeta>()?.json()?;
            let id = json.get("previous_response_id")?.as_str()?;
            Some((id.to_owned(), "previous_response_id"))
        }
        _ => None,
    }
}

enum Tap {
    Json(Vec<u8>),
    Sse(Box<Parser>),
    Done,
}

pin_project_lite::pin_project! {
    /// An answer to `POST /v1/responses` on its way out, read for its id.
    pub struct IdTap {
        #[pin]
        inner: Body,
        tap: Tap,
        ids: Arc<ResponseIds>,
        home: Home,
    }
}

impl IdTap {
    fn new(inner: Body, sse: bool, ids: Arc<ResponseIds>, home: Home) -> Self {
        let tap = if sse {
            Tap::Sse(Box::new(Parser::new()))
        } else {
            Tap::Json(Vec::new())
        };
        IdTap {
            inner,
            tap,
            ids,
            home,
        }
    }
}

/// A response object, or anything with an `id`: just the id.
#[derive(serde::Deserialize)]
struct WithId<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// A `response.created` event: just its response's id.
#[derive(serde::Deserialize)]
struct Created<'a> {
    #[serde(borrow)]
    response: Option<WithId<'a>>,
}

/// Look at one frame; `last` when no more will come.
fn observe(tap: &mut Tap, data: &[u8], last: bool) -> Option<String> {
    let id = match tap {
        Tap::Json(copy) => {
            if copy.len() + data.len() > MAX_JSON {
                *tap = Tap::Done;
                return None;
            }
            copy.extend_from_slice(data);
            if !last {
                return None;
            }
            serde_json::from_slice::<WithId<'_>>(copy)
                .ok()
                .and_then(|w| w.id)
                .map(std::borrow::Cow::into_owned)
        }
        Tap::Sse(parser) => {
            // A stream read in one go holds every event in one frame, and
            // `response.created` comes first: parse up to the end of the
            // first event that names it, and the rest only if that was not
            // the one.
            let (head, rest) = data.split_at(first_created_event_end(data));
            let mut found = created_id(parser, head);
            if found.is_none() && !rest.is_empty() {
                found = created_id(parser, rest);
            }
            match found {
                Some(Ok(id)) => Some(id),
                Some(Err(())) => {
                    *tap = Tap::Done;
                    return None;
                }
                None => None,
            }
        }
        Tap::Done => None,
    };
    if id.is_some() {
        *tap = Tap::Done;
    }
    id
}

/// Where the first event whose text has `response.created` ends in `data`
/// (after its blank line), or `data`'s length.
fn first_created_event_end(data: &[u8]) -> usize {
    let Some(at) = memchr::memmem::find(data, b"response.created") else {
        return data.len();
    };
    memchr::memmem::find(&data[at..], b"\n\n").map_or(data.len(), |end| at + end + 2)
}

/// Feed `chunk` to the stream's parser; `Some(Ok(id))` at the
/// `response.created` event's id, `Some(Err(()))` when the stream cannot be
/// read (the tap gives up), `None` while no id was seen.
fn created_id(parser: &mut Parser, chunk: &[u8]) -> Option<Result<String, ()>> {
    if parser.push(chunk).is_err() {
        return Some(Err(()));
    }
    while let Some(event) = parser.next_event_ref() {
        if !event.data.contains("response.created") {
            continue;
        }
        if let Ok(created) = serde_json::from_str::<Created<'_>>(&event.data)
            && let Some(id) = created.response.and_then(|r| r.id)
        {
            return Some(Ok(id.into_owned()));
        }
    }
    None
}

impl HttpBody for IdTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let last = this.inner.is_end_stream();
        let seen = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                frame.data_ref().and_then(|d| observe(this.tap, d, last))
            }
            Poll::Ready(None) => observe(this.tap, &[], true),
            _ => None,
        };
        if let Some(id) = seen {
            this.ids.record(&id, this.home);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;

    const CREATED: &str = "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"object\":\"response\",\"id\":\"resp_1\",\"status\":\"in_progress\"}}\n\n";
    const DELTA: &str = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"response.created is a name\"}\n\n";

    fn sse() -> Tap {
        Tap::Sse(Box::new(Parser::new()))
    }

    #[test]
    fn the_id_comes_from_the_created_event_however_the_stream_is_cut() {
        let stream = format!("{CREATED}{DELTA}{DELTA}");
        // Whole, in one frame.
        assert_eq!(
            observe(&mut sse(), stream.as_bytes(), true).as_deref(),
            Some("resp_1")
        );
        // Cut anywhere: the id once the event is complete.
        for cut in 1..stream.len() {
            let mut tap = sse();
            let first = observe(&mut tap, &stream.as_bytes()[..cut], false);
            let second = observe(&mut tap, &stream.as_bytes()[cut..], true);
            let id = first.or(second);
            assert_eq!(id.as_deref(), Some("resp_1"), "cut at {cut}");
        }
    }

    #[test]
    fn a_delta_naming_response_created_before_the_event_does_not_hide_it() {
        let stream = format!("{DELTA}{CREATED}");
        assert_eq!(
            observe(&mut sse(), stream.as_bytes(), true).as_deref(),
            Some("resp_1")
        );
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(
            observe(&mut sse(), crlf.as_bytes(), true).as_deref(),
            Some("resp_1")
        );
    }

    #[test]
    fn a_json_answer_gives_its_top_level_id() {
        let mut tap = Tap::Json(Vec::new());
        let body = br#"{"id":"resp_2","object":"response","output":[{"id":"msg_1"}]}"#;
        assert_eq!(observe(&mut tap, &body[..10], false), None);
        assert_eq!(
            observe(&mut tap, &body[10..], true).as_deref(),
            Some("resp_2")
        );
    }
}
