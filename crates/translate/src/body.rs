//! [`TranslateBody`]: a streamed answer, translated event by event.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::sse::Parser;
use llm_proxy_core::{BoxError, FlushBeforeError, NotUpstreamFault, is_upstream_fault};

use crate::stream::{Step, StreamMap};

pin_project_lite::pin_project! {
    /// The body of a translated streamed answer.
    ///
    /// Reads the upstream's SSE stream incrementally and yields the client
    /// dialect's events as each upstream event arrives: every upstream frame
    /// becomes at most one frame of translated events, with no buffering of
    /// the answer (a frame that ends mid-event waits only for the rest of
    /// that event).
    ///
    /// A stream that breaks (a body error, an error event from the upstream
    /// or from the upstream client, an end before the dialect's last event,
    /// data that is not the expected dialect) ends with the client dialect's
    /// error event, and then the body fails, so the server closes the
    /// connection: never a fake clean end. Dropping the body drops the
    /// upstream's, which cancels the upstream request.
    pub struct TranslateBody<B> {
        #[pin]
        inner: B,
        parser: Parser,
        map: StreamMap,
        out: Vec<u8>,
        phase: Phase,
    }
}

#[derive(Debug)]
enum Phase {
    Streaming,
    /// The error event is queued; pause once so the server writes it out,
    /// then fail with `reason`.
    Failing {
        flush: FlushBeforeError,
        reason: Option<String>,
        /// The upstream broke the stream (see [`fail`]).
        upstream: bool,
    },
    Done,
}

impl<B> std::fmt::Debug for TranslateBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TranslateBody")
            .field("kind", &self.map.client_kind())
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl<B> TranslateBody<B> {
    pub(crate) fn new(inner: B, map: StreamMap) -> Self {
        TranslateBody {
            inner,
            parser: Parser::new(),
            map,
            out: Vec::new(),
            phase: Phase::Streaming,
        }
    }

    /// Count the upstream's event held while it is read against `budget`
    /// (see [`Parser::counted_in`]).
    pub(crate) fn counted_in(mut self, budget: Option<&llm_proxy_core::BodyBudget>) -> Self {
        self.parser = std::mem::take(&mut self.parser).counted_in(budget);
        self
    }

    /// Translate `start`, the upstream's first bytes, read already (to
    /// tell a stream sent under another media type), before the rest.
    pub(crate) fn started_with(mut self, start: &[u8]) -> Self {
        feed(
            &mut self.parser,
            &mut self.map,
            &mut self.out,
            &mut self.phase,
            start,
        );
        self
    }
}

/// Queue the client's error event and start failing; `upstream`: the
/// upstream broke the stream (its body failed or ended early, or is not
/// SSE), rather than the translation could not carry on or the upstream
/// reported an error in it.
fn fail(map: &mut StreamMap, out: &mut Vec<u8>, phase: &mut Phase, reason: String, upstream: bool) {
    tracing::debug!(reason = %reason, "translated stream interrupted");
    map.fail_event(&reason, out);
    *phase = Phase::Failing {
        flush: FlushBeforeError::default(),
        reason: Some(reason),
        upstream,
    };
}

/// Whether an event is the one the upstream client ends a stream the
/// upstream broke with: an error whose `code` (or its `error`'s) is
/// `stream_interrupted`, in any dialect.
fn is_interrupted_event(data: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Coded<'a> {
        #[serde(default, borrow)]
        code: Option<std::borrow::Cow<'a, str>>,
        #[serde(default, borrow)]
        error: Option<Box<Coded<'a>>>,
    }
    let interrupted = |c: &Coded<'_>| c.code.as_deref() == Some(llm_proxy_core::INTERRUPTED_CODE);
    data.contains(llm_proxy_core::INTERRUPTED_CODE)
        && llm_proxy_core::object_from_str::<Coded<'_>>(data)
            .is_ok_and(|c| interrupted(&c) || c.error.as_deref().is_some_and(interrupted))
}

/// Translate the events completed by one upstream frame.
fn feed(
    parser: &mut Parser,
    map: &mut StreamMap,
    out: &mut Vec<u8>,
    phase: &mut Phase,
    data: &[u8],
) {
    if let Err(e) = parser.push(data) {
        if !map.is_finished() {
            fail(
                map,
                out,
                phase,
                format!("the upstream stream is not valid SSE: {e}"),
                true,
            );
        }
        return;
    }
    while let Some(event) = parser.next_event_ref() {
        if map.is_finished() {
            continue;
        }
        if let Step::Fail(reason) = map.event(event, out) {
            // The upstream client's own event for a stream the upstream
            // broke (reset, stall, early end) comes before its body fails:
            // the upstream's fault. (It may follow, in this frame, an
            // event the translation failed on: look on. A stream cut
            // mid-event gets no such event; its body just fails.) What the
            // translation cannot carry on with, or an error the upstream
            // reported, is not held against its health.
            let mut broken = is_interrupted_event(&event.data);
            while !broken && let Some(next) = parser.next_event_ref() {
                broken = is_interrupted_event(&next.data);
            }
            fail(map, out, phase, reason, broken);
            return;
        }
    }
}

impl<B> HttpBody for TranslateBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            if !this.out.is_empty() {
                let data = Bytes::from(std::mem::take(this.out));
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::Failing {
                    flush,
                    reason,
                    upstream,
                } => {
                    // The client's error event goes out before the failure.
                    ready!(flush.poll(cx));
                    let reason = reason.take().unwrap_or_default();
                    let error: BoxError = if *upstream {
                        reason.into()
                    } else {
                        Box::new(NotUpstreamFault(reason))
                    };
                    *this.phase = Phase::Done;
                    return Poll::Ready(Some(Err(error)));
                }
                Phase::Streaming => {}
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers have no place in the client's stream.
                    if let Ok(data) = frame.into_data() {
                        feed(this.parser, this.map, this.out, this.phase, &data);
                    }
                }
                Some(Err(e)) if !this.map.is_finished() => {
                    let e: BoxError = e.into();
                    fail(
                        this.map,
                        this.out,
                        this.phase,
                        format!("the upstream stream failed: {e}"),
                        is_upstream_fault(&e),
                    );
                }
                // The client has its whole answer; what follows is no loss.
                Some(Err(_)) => *this.phase = Phase::Done,
                None if this.map.is_finished() => *this.phase = Phase::Done,
                None => {
                    let reason = "the upstream ended the stream before its last event".to_owned();
                    fail(this.map, this.out, this.phase, reason, true);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Done) && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
