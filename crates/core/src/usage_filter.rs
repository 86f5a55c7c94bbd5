//! [`UsageFilter`]: strips the usage-only chunk from an SSE stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::sse::{self, Outlines, SseError};
use crate::usage::is_usage_only_chunk;
use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};

pin_project_lite::pin_project! {
    /// A body that removes the usage-only chunk from an OpenAI-style SSE
    /// stream.
    ///
    /// A layer that asks the upstream for `stream_options.include_usage` on the
    /// client's behalf (the cache, to store a stream with its usage; the auth
    /// layer, to count tokens) must not hand the extra chunk to a client that did
    /// not ask for it. [`UsageFilter`] wraps the response body and re-emits every
    /// event except the usage-only chunk: a `data:` JSON object whose `choices`
    /// is an empty array and whose `usage` is an object.
    ///
    /// Frame boundaries: a frame that ends on an event boundary and holds no
    /// usage-only chunk passes through unchanged, byte for byte and without
    /// delay (OpenAI-compatible servers send one event per frame, so their
    /// streams keep their boundaries exactly). Of a frame that ends mid-event,
    /// the events it completes go out at once and the unfinished one is held
    /// until it completes: a filter cannot hand on an event before it knows
    /// what the event is. From the frame that completes the usage-only
    /// chunk, the chunk's bytes are cut (with the comments and blank lines
    /// between it and the event before it, not yet sent); every other byte
    /// goes out as it came, never re-encoded. If the stream
    /// is not valid SSE (an event over the reader's limit, or one kept open
    /// past that limit by lines that add nothing to it), the filter stops
    /// filtering and passes the rest through unchanged, after what it held.
    ///
    /// ```
    /// use http_body_util::{BodyExt, Full};
    /// use llm_proxy_core::UsageFilter;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let delta = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
    /// let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
    /// let done = "data: [DONE]\n\n";
    /// let body = Full::new(bytes::Bytes::from(format!("{delta}{usage}{done}")));
    /// let out = UsageFilter::new(body).collect().await.unwrap().to_bytes();
    /// assert_eq!(out, format!("{delta}{done}"));
    /// # }
    /// ```
    pub struct UsageFilter<B: HttpBody> {
        #[pin]
        inner: B,
        // `None` once the stream proved not to be SSE: pass through from then on.
        outlines: Option<Outlines>,
        // What came and has not gone out yet.
        held: Held,
        // Trailers or an error of the inner body, returned after `held` went out.
        trailers: Option<Frame<Bytes>>,
        failed: Option<B::Error>,
    }
}

impl<B: HttpBody> UsageFilter<B> {
    /// Filter `inner`, an SSE response body.
    pub fn new(inner: B) -> Self {
        UsageFilter {
            inner,
            outlines: Some(Outlines::new()),
            held: Held::default(),
            trailers: None,
            failed: None,
        }
    }

    /// Count the event held while it is read in `budget` (see
    /// [`Outlines::counted_in`]). The filter also holds that event's raw
    /// bytes, as many again, until it knows whether to send them as they
    /// came: that copy is not counted.
    pub fn counted_in(mut self, budget: Option<&crate::BodyBudget>) -> Self {
        self.outlines = self.outlines.map(|outlines| outlines.counted_in(budget));
        self
    }
}

/// What to do with one data frame.
enum Step {
    Send(Bytes),
    Wait,
}

/// The filter's state between frames.
#[derive(Default)]
struct Held {
    /// The bytes of the stream from `start` on, not yet sent: the start of
    /// an event whose end has not come.
    raw: BytesMut,
    /// Where `raw` starts in the stream: everything before it was sent, or
    /// cut.
    start: u64,
}

impl Held {
    /// What is held, to send as it is at the end of the stream (or before
    /// an error or trailers); `None` when nothing is.
    fn take_rest(&mut self) -> Option<Bytes> {
        self.start += self.raw.len() as u64;
        (!self.raw.is_empty()).then(|| self.raw.split().freeze())
    }
}

fn filter_frame(outlines: &mut Option<Outlines>, held: &mut Held, data: Bytes) -> Step {
    let Some(p) = outlines.as_mut() else {
        return Step::Send(data);
    };
    // The usage-only chunks this frame completes, each with the comments
    // before it: cut, from what has not been sent.
    let mut cuts: smallvec::SmallVec<[std::ops::Range<u64>; 1]> = smallvec::SmallVec::new();
    let unsent = held.start;
    let pushed = p.push_spanned(&data, |event, span| {
        if is_usage_only_chunk(event.data) {
            cuts.push(span.start.max(unsent)..span.end);
        }
        Ok::<_, SseError>(())
    });
    if pushed.is_err() {
        return stop_filtering(outlines, held, &data);
    }
    // Where this frame starts and ends in the stream.
    let first = held.start + held.raw.len() as u64;
    let last = first + data.len() as u64;
    // What may go: up to the end of the last event this frame completed,
    // or all of it when it ends between events; the unfinished event
    // waits for its end.
    let until = match (p.has_partial(), p.last_event_end()) {
        (false, _) => last,
        (true, Some(end)) => first + end as u64,
        (true, None) => {
            // Lines that add nothing to the reader's event (comments, `id`,
            // `event`) would keep an event open without bound: past the
            // reader's own limit, stop filtering.
            if held.raw.len() + data.len() > sse::DEFAULT_MAX_EVENT_BYTES {
                return stop_filtering(outlines, held, &data);
            }
            held.raw.extend_from_slice(&data);
            return Step::Wait;
        }
    };
    if cuts.is_empty() && held.raw.is_empty() {
        // The events that ended in this frame go out now, as they came
        // (the frame itself when it ends between events).
        let sent = (until - first) as usize;
        held.raw.extend_from_slice(&data[sent..]);
        held.start = until;
        return Step::Send(if sent == data.len() {
            data
        } else {
            data.slice(..sent)
        });
    }
    // The held bytes and the frame's, from `held.start` up to `until`, less
    // the cuts.
    held.raw.extend_from_slice(&data);
    let all = held.raw.split().freeze();
    let at = |offset: u64| (offset - held.start) as usize;
    let mut out = BytesMut::with_capacity(all.len());
    let mut from = held.start;
    for cut in cuts.iter().filter(|cut| cut.start < cut.end) {
        out.extend_from_slice(&all[at(from)..at(cut.start.max(from))]);
        from = from.max(cut.end);
    }
    out.extend_from_slice(&all[at(from)..at(until)]);
    held.raw.extend_from_slice(&all[at(until)..]);
    held.start = until;
    if out.is_empty() {
        Step::Wait
    } else {
        Step::Send(out.freeze())
    }
}

/// Not an event stream the filter can follow: pass the rest through
/// unchanged, after what it holds, losing nothing.
fn stop_filtering(outlines: &mut Option<Outlines>, held: &mut Held, data: &[u8]) -> Step {
    *outlines = None;
    let mut out = BytesMut::with_capacity(held.raw.len() + data.len());
    out.extend_from_slice(&held.raw);
    held.raw.clear();
    out.extend_from_slice(data);
    Step::Send(out.freeze())
}

impl<B> HttpBody for UsageFilter<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(frame) = this.trailers.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = this.failed.take() {
            return Poll::Ready(Some(Err(err)));
        }
        loop {
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    // An unterminated event at the end: hand on what came.
                    let rest = this.held.take_rest();
                    return Poll::Ready(rest.map(|rest| Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Err(err))) => {
                    let Some(rest) = this.held.take_rest() else {
                        return Poll::Ready(Some(Err(err)));
                    };
                    *this.failed = Some(err);
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let frame = match frame.into_data() {
                Ok(data) => data,
                Err(other) => {
                    // Trailers: send what is held first.
                    let Some(rest) = this.held.take_rest() else {
                        return Poll::Ready(Some(Ok(other)));
                    };
                    *this.trailers = Some(other);
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
            };
            match filter_frame(this.outlines, this.held, frame) {
                Step::Send(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                Step::Wait => continue,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.raw.is_empty()
            && self.trailers.is_none()
            && self.failed.is_none()
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::collections::VecDeque;

    const DELTA: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
    const FINISH: &str =
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    type Item = Result<Frame<Bytes>, std::io::Error>;

    /// A body that yields the given frames, one per poll.
    struct Frames(VecDeque<Item>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Item>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    async fn run(frames: Vec<Item>) -> (Vec<Bytes>, Option<String>) {
        let body = Frames(frames.into());
        let mut filter = std::pin::pin!(UsageFilter::new(body));
        let mut out = Vec::new();
        let mut error = None;
        while let Some(frame) = filter.as_mut().frame().await {
            match frame {
                Ok(frame) => out.push(frame.into_data().unwrap()),
                Err(e) => error = Some(e.to_string()),
            }
        }
        (out, error)
    }

    fn data(frames: &[&str]) -> Vec<Item> {
        frames
            .iter()
            .map(|f| Ok(Frame::data(Bytes::from(f.to_string()))))
            .collect()
    }

    #[tokio::test]
    async fn drops_only_the_usage_frame_and_keeps_boundaries() {
        let (out, error) = run(data(&[DELTA, DELTA, FINISH, USAGE, DONE])).await;
        assert_eq!(out, [DELTA, DELTA, FINISH, DONE].map(Bytes::from));
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn usage_sharing_a_frame_is_cut_out() {
        let joined = format!("{FINISH}{USAGE}{DONE}");
        let (out, _) = run(data(&[DELTA, &joined])).await;
        assert_eq!(out.concat(), format!("{DELTA}{FINISH}{DONE}").as_bytes());
    }

    #[tokio::test]
    async fn only_the_usage_chunks_bytes_are_cut() {
        // Comments, other fields and line endings beside it go out as they
        // came, not re-encoded; the comment right before it goes with it.
        let rest = "event: x\r\nid: 7\r\ndata:y\r\n\r\n";
        let joined = format!(": ping\n\n{FINISH}: gone\n{USAGE}{rest}{DONE}");
        let (out, _) = run(data(&[DELTA, &joined])).await;
        assert_eq!(
            out.concat(),
            format!("{DELTA}: ping\n\n{FINISH}{rest}{DONE}").as_bytes()
        );
    }

    #[tokio::test]
    async fn split_events_are_held_until_complete() {
        let (a, b) = DELTA.split_at(10);
        let (u1, u2) = USAGE.split_at(20);
        let (out, _) = run(data(&[a, b, FINISH, u1, u2, DONE])).await;
        assert_eq!(out, [DELTA, FINISH, DONE].map(Bytes::from));
    }

    #[tokio::test]
    async fn event_started_beside_the_usage_chunk_is_not_lost() {
        let (d1, d2) = DONE.split_at(4);
        let first = format!("{USAGE}{d1}");
        let (out, _) = run(data(&[DELTA, &first, d2])).await;
        assert_eq!(out.concat(), format!("{DELTA}{DONE}").as_bytes());
    }

    #[tokio::test]
    async fn events_held_with_a_split_usage_chunk_are_not_lost() {
        // The finish chunk waits with the first half of the usage chunk; the
        // frame with the second half must not drop it.
        let (u1, u2) = USAGE.split_at(20);
        let second = format!("{FINISH}{u1}");
        let third = format!("{u2}{DONE}");
        let (out, _) = run(data(&[DELTA, &second, &third])).await;
        assert_eq!(out.concat(), format!("{DELTA}{FINISH}{DONE}").as_bytes());
        // Also when the held event came in a frame of its own, cut.
        let (f1, f2) = FINISH.split_at(12);
        let second = format!("{f2}{u1}");
        let (out, _) = run(data(&[DELTA, f1, &second, &third])).await;
        assert_eq!(out.concat(), format!("{DELTA}{FINISH}{DONE}").as_bytes());
    }

    #[tokio::test]
    async fn an_event_kept_open_without_end_turns_the_filter_off() {
        // `event:` lines add nothing to the reader's buffers, so its limit
        // never trips; the filter's own bound must.
        let mut frames = vec![DELTA.to_string(), "data: {}\n".to_string()];
        let filler = "event: x\n".repeat(4096 / 9);
        let count = crate::sse::DEFAULT_MAX_EVENT_BYTES / filler.len() + 2;
        frames.extend(std::iter::repeat_n(filler.clone(), count));
        frames.push(USAGE.to_string());
        let refs: Vec<&str> = frames.iter().map(String::as_str).collect();
        let (out, _) = run(data(&refs)).await;
        // Nothing lost, the usage chunk passes (no longer filtered), and no
        // more than the bound was ever held back.
        assert_eq!(out.concat(), frames.concat().as_bytes());
        assert!(
            out.iter()
                .all(|f| f.len() <= crate::sse::DEFAULT_MAX_EVENT_BYTES + filler.len())
        );
    }

    #[tokio::test]
    async fn a_stream_without_usage_is_unchanged() {
        let frames = [DELTA, ": keep-alive\n\n", FINISH, DONE];
        let (out, _) = run(data(&frames)).await;
        assert_eq!(out, frames.map(Bytes::from));
    }

    #[tokio::test]
    async fn held_bytes_go_out_before_an_error() {
        let mut frames = data(&[DELTA, "data: {\"cho"]);
        frames.push(Err(std::io::Error::other("reset")));
        let (out, error) = run(frames).await;
        assert_eq!(out.concat(), format!("{DELTA}data: {{\"cho").as_bytes());
        assert_eq!(error.as_deref(), Some("reset"));
    }

    #[tokio::test]
    async fn events_go_out_when_every_frame_ends_mid_event() {
        // An upstream (or a relay before it) whose writes never line up with
        // events: each frame ends a delta and starts the next. The client
        // must get every delta as its frame comes, not the whole answer at
        // the end of the stream.
        let (head, tail) = DELTA.split_at(DELTA.len() - 10);
        let mut frames = vec![head.to_string()];
        frames.extend(std::iter::repeat_n(format!("{tail}{head}"), 50));
        let frames: VecDeque<Item> = frames
            .into_iter()
            .map(|f| Ok(Frame::data(Bytes::from(f))))
            .collect();
        // The upstream goes quiet after them, the stream still open.
        let body = http_body_util::StreamBody::new(futures_util::StreamExt::chain(
            futures_util::stream::iter(frames),
            futures_util::stream::pending(),
        ));
        let mut filter = std::pin::pin!(UsageFilter::new(body));
        let mut out = Vec::new();
        while let Some(Some(frame)) = futures_util::FutureExt::now_or_never(filter.as_mut().frame())
        {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(String::from_utf8(out).unwrap(), DELTA.repeat(50));
    }

    #[tokio::test]
    async fn oversized_events_turn_the_filter_off() {
        let big = format!(
            "data: {}",
            "x".repeat(crate::sse::DEFAULT_MAX_EVENT_BYTES + 1)
        );
        let (out, _) = run(data(&[DELTA, &big, "\n\n", USAGE])).await;
        assert_eq!(out.concat(), format!("{DELTA}{big}\n\n{USAGE}").as_bytes());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod props {
    use super::*;
    use crate::sse::{Event, Parser};
    use proptest::prelude::*;

    /// The events a parser reads in `bytes`.
    fn events(bytes: &[u8]) -> Vec<Event> {
        let mut parser = Parser::new();
        parser.push(bytes).unwrap();
        std::iter::from_fn(|| parser.next_event()).collect()
    }

    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z\u{e9}\u{1F600}]{0,6}".prop_map(|t| format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n"
            )),
            Just(
                "data:{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\n"
                    .to_owned()
            ),
            Just(": keep-alive\n\n".to_owned()),
            Just("event: x\nid: 3\nretry: 10\ndata: a\ndata: b\n\n".to_owned()),
            Just("event: lonely\n\n".to_owned()),
            Just("data: [DONE]\n\n".to_owned()),
        ]
    }

    proptest! {
        /// However the stream is cut and whatever its line endings, the
        /// client reads the same events less the usage-only chunk, and each
        /// event as soon as the frame that completes it came.
        #[test]
        fn any_cuts_any_line_endings(
            pieces in proptest::collection::vec(piece(), 0..10),
            ending in prop_oneof![Just("\n"), Just("\r"), Just("\r\n")],
            bom in any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let mut stream = pieces.concat().replace('\n', ending);
            if bom {
                stream.insert(0, '\u{FEFF}');
            }
            let bytes = stream.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut outlines = Some(Outlines::new());
            let mut held = Held::default();
            let mut sent = Vec::new();
            let mut start = 0;
            for &cut in &cuts {
                let frame = Bytes::copy_from_slice(&bytes[start..cut]);
                start = cut;
                if let Step::Send(out) = filter_frame(&mut outlines, &mut held, frame) {
                    sent.extend_from_slice(&out);
                }
                let want: Vec<Event> = events(&bytes[..cut])
                    .into_iter()
                    .filter(|e| !is_usage_only_chunk(&e.data))
                    .collect();
                prop_assert_eq!(events(&sent), want, "after {} of {:?}", cut, stream);
            }
        }
    }
}
