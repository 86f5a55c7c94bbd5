//! Answers from the cache: stored entries and coalesced flights, as
//! responses with `x-llm-proxy-cache` and `age`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use llm_proxy_core::sse::{Outlines, SequenceNumbers, SseError};
use llm_proxy_core::{Body, BoxError, Error, FlushBeforeError, StreamKind, UsageFilter, full};

use crate::flight::{Dropped, Follower, Head};
use crate::{Entry, EntryBody, UsageChunk};

/// The response header that says how the cache treated a request.
pub const CACHE_HEADER: http::HeaderName = http::HeaderName::from_static("x-llm-proxy-cache");

/// How the cache treated a request: the value of [`CACHE_HEADER`], also put
/// into the response's extensions for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheStatus {
    /// Answered from a stored entry, or by an identical request in flight.
    Hit,
    /// Looked up, not found: answered by the upstream (or, for
    /// `only-if-cached`, with a 504).
    Miss,
    /// Not looked up: `no-cache` (or `pragma: no-cache`), `no-store`, or a
    /// request the cache does not serve.
    Bypass,
}

impl CacheStatus {
    /// `hit`, `miss` or `bypass`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// Mark `response` with `status` (header and extension).
pub(crate) fn mark(response: &mut Response<Body>, status: CacheStatus) {
    response
        .headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static(status.as_str()));
    response.extensions_mut().insert(status);
}

/// A hit: `200`, the stored content type, `age`, and the stored body (a
/// stream replayed frame by frame, without its usage chunk unless
/// `keep_usage`: only chat and completions streams have one to leave out).
pub(crate) fn from_entry(entry: &Entry, keep_usage: bool, age_secs: u64) -> Response<Body> {
    let body = match &entry.body {
        EntryBody::Json(bytes) => full(bytes.clone()),
        EntryBody::Stream { frames, usage } => match (usage, keep_usage) {
            (UsageChunk::Frame(index), false) => {
                Replay::new(frames.clone(), Some(*index as usize)).boxed_unsync()
            }
            (UsageChunk::Inside, false) => {
                UsageFilter::new(Replay::new(frames.clone(), None)).boxed_unsync()
            }
            _ => Replay::new(frames.clone(), None).boxed_unsync(),
        },
    };
    hit(body, Some(content_type(entry)), age_secs)
}

/// The content type an entry is served with: the stored one, else the
/// usual one of its kind (an upstream may have sent none).
pub(crate) fn content_type(entry: &Entry) -> HeaderValue {
    entry
        .content_type
        .clone()
        .and_then(|ct| HeaderValue::from_maybe_shared(ct).ok())
        .unwrap_or_else(|| {
            HeaderValue::from_static(match entry.body {
                EntryBody::Json(_) => "application/json",
                EntryBody::Stream { .. } => "text/event-stream",
            })
        })
}

/// A coalesced request's stream (of `kind`): the leader's frames as they
/// arrive.
pub(crate) fn from_flight(
    follower: Follower,
    head: &Head,
    kind: StreamKind,
    filter_usage: bool,
    age_secs: u64,
) -> Response<Body> {
    let body = FlightBody {
        follower,
        next: 0,
        ended: false,
        flush: FlushBeforeError::default(),
        sse: Some((kind, Outlines::new(), SequenceNumbers::default())),
        told: false,
    };
    let body = if filter_usage {
        UsageFilter::new(body).boxed_unsync()
    } else {
        body.boxed_unsync()
    };
    hit(body, head.content_type.clone(), age_secs)
}

/// A coalesced request's JSON answer, read whole from its flight
/// ([`Follower::poll_whole`]).
pub(crate) fn whole_from_flight(head: &Head, frames: Vec<Bytes>, age_secs: u64) -> Response<Body> {
    let body = match <[Bytes; 1]>::try_from(frames) {
        Ok([one]) => one,
        Err(frames) => Bytes::from(frames.concat()),
    };
    hit(full(body), head.content_type.clone(), age_secs)
}

fn hit(body: Body, content_type: Option<HeaderValue>, age_secs: u64) -> Response<Body> {
    let mut response = Response::new(body);
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(age_secs));
    mark(&mut response, CacheStatus::Hit);
    response
}

/// Stored frames, one per poll, with their original boundaries.
struct Replay {
    frames: Arc<[Bytes]>,
    next: usize,
    skip: Option<usize>,
}

impl Replay {
    fn new(frames: Arc<[Bytes]>, skip: Option<usize>) -> Self {
        Replay {
            frames,
            next: 0,
            skip,
        }
    }
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.skip == Some(self.next) {
            self.next += 1;
        }
        let frame = self.frames.get(self.next).cloned();
        self.next += 1;
        Poll::Ready(frame.map(|frame| Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        let skip_last = self.skip == Some(self.next);
        self.next + usize::from(skip_last) >= self.frames.len()
    }
}

/// A flight's frames, read live as the leader appends them.
struct FlightBody {
    follower: Follower,
    next: usize,
    ended: bool,
    /// The flight broke: paused once before failing, so that hyper writes
    /// out the frames it holds (the leader's error event among them)
    /// instead of dropping them with the connection.
    flush: FlushBeforeError,
    /// For a stream, its kind and where the client is in it (`None` once
    /// it proved not to be SSE): a follower cut because the flight dropped
    /// its frames ends with its dialect's error event, when the client
    /// holds no unfinished event (a Responses event numbered after the
    /// stream's).
    sse: Option<(StreamKind, Outlines, SequenceNumbers)>,
    /// Whether that event was considered already.
    told: bool,
}

/// Why a follower of an answer that outgrew what is kept for it is cut.
const CUT: &str =
    "the answer of the identical request this one was coalesced with grew too large to share";

/// Why a follower is cut when the proxy's memory for the answers it holds
/// ran out while it shared one.
const CUT_BUDGET: &str = "the proxy's memory for the answers it holds is full: \
     the answer of the identical request this one was coalesced with could not be shared";

impl HttpBody for FlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.follower.poll_frame(self.next, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                self.next += 1;
                if let Some((kind, outlines, numbers)) = &mut self.sse {
                    let read = outlines.push(&frame, |event| {
                        if *kind == StreamKind::Responses {
                            numbers.observe(event.data);
                        }
                        Ok::<_, SseError>(())
                    });
                    if read.is_err() {
                        self.sse = None;
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(frame))))
            }
            Poll::Ready(Some(Err(_))) => {
                if !self.told
                    && let Some(why) = self.follower.frames_dropped()
                {
                    // The frames this follower lost may have held the
                    // leader's error event: it gets one of its own, unless
                    // it holds the start of an event (which the event would
                    // complete).
                    self.told = true;
                    if let Some((kind, outlines, numbers)) = &self.sse
                        && !outlines.has_partial()
                    {
                        let reason = match why {
                            Dropped::TooLarge => CUT,
                            Dropped::BudgetFull => CUT_BUDGET,
                        };
                        let event = Error::stream_interrupted_event_for(*kind, reason, numbers);
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                }
                if self.flush.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.ended = true;
                Poll::Ready(Some(Err(
                    "the answer of the identical request this one was coalesced with broke off"
                        .into(),
                )))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use crate::CacheKey;
    use crate::flight::{Flights, Joined};
    use http_body_util::BodyExt;

    /// A flight's leader, and a request that follows it.
    fn lead_and_follow() -> (crate::flight::Leader, crate::flight::Follower) {
        let flights = Arc::new(Flights::new());
        let key = CacheKey::from_bytes([5; 32]);
        let Joined::Lead(leader) = flights.join(key) else {
            panic!("first leads")
        };
        let Joined::Follow(follower) = flights.join(key) else {
            panic!("second follows")
        };
        (leader, follower)
    }

    /// What a follower's client gets when the flight drops its frames after
    /// `sent` went out: the frames (the event it ends with, if any, last)
    /// before its stream fails.
    async fn cut_after(sent: &'static [u8], why: Dropped, kind: StreamKind) -> Vec<Bytes> {
        let (mut leader, follower) = lead_and_follow();
        let head = Head {
            content_type: None,
            stored_at_ms: None,
            usage_refused: false,
        };
        leader.start(head.clone());
        leader.push(&Bytes::from_static(sent));
        let mut body = from_flight(follower, &head, kind, false, 0).into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let cap = if why == Dropped::TooLarge { 200 } else { 0 };
        assert!(leader.too_large(300, cap, why), "past the cap");
        let mut frames = vec![first];
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => frames.push(frame.into_data().unwrap()),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "a cut follower's stream fails: {frames:?}");
        frames
    }

    #[tokio::test]
    async fn a_follower_cut_between_events_gets_the_error_event_and_mid_event_none() {
        for (why, says) in [
            (Dropped::TooLarge, "grew too large to share"),
            (
                Dropped::BudgetFull,
                "memory for the answers it holds is full",
            ),
        ] {
            let frames = cut_after(b"data: {\"a\":1}\n\n", why, StreamKind::Chat).await;
            assert_eq!(frames.len(), 2, "{frames:?}");
            let event = std::str::from_utf8(&frames[1]).unwrap();
            assert!(
                event.contains("\"code\":\"stream_interrupted\"") && event.contains(says),
                "{event}"
            );
            // Holding the start of an event, the client gets no event: its
            // first line break would complete the cut one.
            let frames = cut_after(b"data: {\"a\":1}\n\ndata: {\"b\"", why, StreamKind::Chat).await;
            assert_eq!(frames.len(), 1, "{frames:?}");
        }
    }

    #[tokio::test]
    async fn a_json_follower_gets_the_whole_answer_or_starts_over() {
        let head = Head {
            content_type: Some(HeaderValue::from_static("application/json")),
            stored_at_ms: None,
            usage_refused: false,
        };
        // The answer in two frames: one body of its length.
        let (mut leader, follower) = lead_and_follow();
        leader.start(head.clone());
        leader.push(&Bytes::from_static(b"{\"a\""));
        let whole = tokio::spawn(async move {
            let mut frames = Vec::new();
            std::future::poll_fn(|cx| follower.poll_whole(&mut frames, cx))
                .await
                .map(|()| frames)
        });
        tokio::task::yield_now().await;
        leader.push(&Bytes::from_static(b":1}"));
        assert!(leader.complete().is_some());
        let frames = whole.await.unwrap().unwrap();
        let response = whole_from_flight(&head, frames, 0);
        assert_eq!(response.headers()[CACHE_HEADER], "hit");
        let body = response.into_body();
        assert_eq!(body.size_hint().exact(), Some(7));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{\"a\":1}");
        // Failed after its head (or judged no answer to share): nothing
        // for the client yet, and the follower starts over.
        let (mut leader, follower) = lead_and_follow();
        leader.start(head);
        leader.push(&Bytes::from_static(b"{\"error\""));
        leader.fail();
        let mut frames = Vec::new();
        let whole = std::future::poll_fn(|cx| follower.poll_whole(&mut frames, cx)).await;
        assert!(whole.is_err());
    }

    #[tokio::test]
    async fn a_cut_responses_follower_gets_an_error_event_numbered_after_the_stream() {
        let sent = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"sequence_number\":0}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":1}\n\n",
        );
        let frames = cut_after(sent.as_bytes(), Dropped::TooLarge, StreamKind::Responses).await;
        assert_eq!(frames.len(), 2, "{frames:?}");
        let event = std::str::from_utf8(&frames[1]).unwrap();
        let data: serde_json::Value =
            serde_json::from_str(event.split_once("data: ").unwrap().1.trim()).unwrap();
        assert_eq!(data["code"], "stream_interrupted", "{event}");
        assert_eq!(data["sequence_number"], 2, "{event}");
    }
}
