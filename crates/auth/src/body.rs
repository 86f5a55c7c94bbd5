//! Watching a response for its token usage, to reconcile the reservation.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use llm_proxy_core::StreamKind;
use llm_proxy_core::sse::{Outlines, SseError};
use llm_proxy_core::usage::{self, StreamUsage, Usage};
use llm_proxy_core::{Body, BoxError, UsageFilter};

use crate::keys::KeyEntry;
use crate::limit::Decision;
use crate::service::Shared;

/// Non-streamed bodies up to this size are kept whole and parsed for their
/// usage at the end.
const MAX_JSON_TEE: usize = 1 << 20;

/// Of a larger one, at least the last this many bytes are kept, where its
/// `usage` stands ([`usage::from_json_tail`]): `n > 1` or `logprobs` take an
/// ordinary answer past 1 MiB, and its tokens must still be counted.
const JSON_TAIL: usize = 64 << 10;

/// Settles a request's token account once its response is over: the real
/// usage replaces the reservation; without usage, a success (a stream cut
/// before its usage chunk) keeps the reservation, while an error answer (the
/// upstream generated nothing) gives it back.
pub(crate) struct Reconcile {
    shared: Arc<Shared>,
    key: Arc<KeyEntry>,
    model: Option<Arc<str>>,
    /// What the reservation charged ([`Limits::token_charge`]): every
    /// settlement and refund is against this, never the raw estimate.
    ///
    /// [`Limits::token_charge`]: crate::limit::Limits::token_charge
    reserved: u64,
    /// The prompt's estimate (bytes / 4), for the floor of a stream cut
    /// before its usage.
    prompt: u64,
    /// The reservation was taken from this process's limits while the
    /// shared store failed: settle it here.
    held_locally: bool,
    /// The answer's status was not a success.
    failed: bool,
}

impl Reconcile {
    pub(crate) fn new(
        shared: Arc<Shared>,
        key: Arc<KeyEntry>,
        model: Option<Arc<str>>,
        reserved: u64,
    ) -> Self {
        Reconcile {
            shared,
            key,
            model,
            reserved,
            prompt: 0,
            held_locally: false,
            failed: false,
        }
    }

    /// Where the reservation was taken: settle it there.
    pub(crate) fn held_by(mut self, decision: Option<&Decision>) -> Self {
        self.held_locally = decision.is_some_and(|d| d.held_locally);
        self
    }

    fn adjust(&self, delta: i64) {
        self.shared
            .backend
            .adjust(&self.key, delta, self.held_locally);
    }

    /// The prompt's estimate in tokens: a stream cut before its usage is
    /// charged at least that and one token an event it delivered.
    pub(crate) fn with_prompt(mut self, prompt: u64) -> Self {
        self.prompt = prompt;
        self
    }

    /// The model to count the tokens under, when the request named none.
    pub(crate) fn default_model(&mut self, model: &str) {
        if self.model.is_none() {
            self.model = Some(Arc::from(model));
        }
    }

    /// Record the answer's status: an error answer without usage is refunded.
    pub(crate) fn answered(mut self, status: StatusCode) -> Self {
        self.failed = !status.is_success();
        self
    }

    /// Give the whole reservation back: nothing was generated.
    pub(crate) fn refund(&self) {
        self.adjust(-self.reserved());
    }

    /// Give the reservation back and hold none from now on (a later
    /// settlement charges the whole usage); the amount given back.
    pub(crate) fn give_back(&mut self) -> u64 {
        self.refund();
        std::mem::take(&mut self.reserved)
    }

    /// Charge `amount` again as the reservation (after [`give_back`]).
    ///
    /// [`give_back`]: Reconcile::give_back
    pub(crate) fn reserve(&mut self, amount: u64) {
        self.reserved = amount;
        self.adjust(self.reserved());
    }

    fn reserved(&self) -> i64 {
        i64::try_from(self.reserved).unwrap_or(i64::MAX)
    }

    /// Settle a stream cut before its final count: what it `reported` (a
    /// Messages stream's `message_start`) and the `delivered` token events
    /// are floors of what was generated; it is charged the reservation, or
    /// the floor when that is more. (A client that hangs up on a stream
    /// without `max_tokens` stops it, but what it received was generated.)
    pub(crate) fn settle_cut(&self, reported: Option<Usage>, delivered: u64) {
        let floor = match reported {
            Some(u) => Usage {
                output_tokens: u.output_tokens.max(delivered),
                ..u
            },
            None => Usage {
                input_tokens: self.prompt,
                output_tokens: delivered,
            },
        };
        if let Some(model) = &self.model
            && (reported.is_some() || delivered > 0)
        {
            self.key
                .stats
                .add_tokens(model, floor.input_tokens, floor.output_tokens);
        }
        let used = i64::try_from(floor.total()).unwrap_or(i64::MAX);
        let more = used.saturating_sub(self.reserved());
        if more > 0 {
            self.adjust(more);
        }
    }

    pub(crate) fn settle(&self, usage: Option<Usage>) {
        let Some(u) = usage else {
            if self.failed {
                self.refund();
            }
            return;
        };
        if let Some(model) = &self.model {
            self.key
                .stats
                .add_tokens(model, u.input_tokens, u.output_tokens);
        }
        // Counts come from the upstream: one beyond i64 is a charge, not a
        // negative number that credits the limit.
        let used = i64::try_from(u.total()).unwrap_or(i64::MAX);
        self.adjust(used.saturating_sub(self.reserved()));
    }
}

enum Watch {
    /// An SSE stream, parsed as it passes.
    Sse {
        outlines: Box<Outlines>,
        stream: StreamUsage,
    },
    /// A JSON body, copied up to `MAX_JSON_TEE`.
    Json(Vec<u8>),
    /// A larger JSON body: its last `JSON_TAIL` to `2 * JSON_TAIL` bytes,
    /// and the last `usage` read in what was dropped before them.
    Tail(Vec<u8>, Option<Usage>),
    /// An SSE stream that stopped being readable (an event past the
    /// reader's limit): what it told before, which decides how it is
    /// settled as a stream's count does.
    Unreadable(StreamUsage),
    /// Not SSE that can be read.
    Off,
}

pin_project_lite::pin_project! {
    /// A response body on its way to the client, watched for `usage`:
    /// SSE chunks are parsed as they pass (frames go on unchanged), a JSON
    /// body is copied (bounded) and read at its end. The account is settled
    /// when the body ends or is dropped.
    pub struct UsageBody {
        #[pin]
        inner: Body,
        watch: Watch,
        usage: Option<Usage>,
        reconcile: Option<Reconcile>,
    }

    impl PinnedDrop for UsageBody {
        fn drop(this: Pin<&mut Self>) {
            // hyper drops a body with a known length after its last frame
            // without polling it to the end: settle here too.
            let this = this.project();
            // A JSON answer the client left before its end was generated
            // whole before its head, and its `usage` is at its end: read
            // on for it (a while) rather than keep the reservation.
            if matches!(this.watch, Watch::Json(_) | Watch::Tail(..))
                && !this.inner.is_end_stream()
                && this.reconcile.as_ref().is_some_and(|r| !r.failed)
                && let Some(reconcile) = this.reconcile.take()
            {
                let inner = std::mem::replace(this.inner.get_mut(), llm_proxy_core::empty());
                let watch = std::mem::replace(this.watch, Watch::Off);
                read_on(inner, watch, this.usage.take(), reconcile);
                return;
            }
            conclude(this.watch, this.usage, this.reconcile);
        }
    }
}

impl UsageBody {
    /// `inner`, watched for its usage, as the client's body (a body that is
    /// neither an event stream nor JSON, a file download say, is not looked
    /// at): when `strip`
    /// (the usage chunk was requested by the proxy, not the client), the
    /// usage chunk is left out of what the client receives, after it was
    /// counted (core's [`UsageFilter`], which passes every other byte on as
    /// it came: comments, keep-alives, event boundaries).
    /// `sse`: the body is a stream of this kind, whose held event counts
    /// against `budget`.
    pub(crate) fn client_body(
        inner: Body,
        sse: Option<StreamKind>,
        json: bool,
        strip: bool,
        reconcile: Reconcile,
        budget: Option<&llm_proxy_core::BodyBudget>,
    ) -> Body {
        let watched = UsageBody {
            inner,
            watch: match sse {
                Some(kind) => Watch::Sse {
                    outlines: Box::new(Outlines::new().counted_in(budget)),
                    stream: StreamUsage::new(kind),
                },
                None if json => Watch::Json(Vec::new()),
                None => Watch::Off,
            },
            usage: None,
            reconcile: Some(reconcile),
        };
        if strip && sse.is_some() {
            Body::new(UsageFilter::new(watched).counted_in(budget))
        } else {
            Body::new(watched)
        }
    }
}

/// Watch one frame, which goes on unchanged.
fn observe(watch: &mut Watch, usage: &mut Option<Usage>, data: &Bytes) {
    match watch {
        Watch::Sse { outlines, stream } => {
            let read = outlines.push(data, |event| {
                let name = llm_proxy_core::utf8_lossy(event.event);
                stream.observe_event(Some(&name), &event.text());
                if stream.usage().is_some() {
                    *usage = stream.usage();
                }
                Ok::<_, SseError>(())
            });
            if read.is_err() {
                // Not SSE we can read: stop watching, keeping what it told
                // (a Messages stream's opening count is a floor, not its
                // final count).
                *watch = Watch::Unreadable(*stream);
            }
        }
        Watch::Json(copy) => {
            copy.extend_from_slice(data);
            if copy.len() > MAX_JSON_TEE {
                let mut tail = std::mem::take(copy);
                let mut seen = None;
                keep_tail(&mut tail, &mut seen);
                *watch = Watch::Tail(tail, seen);
            }
        }
        Watch::Tail(tail, seen) => {
            tail.extend_from_slice(data);
            keep_tail(tail, seen);
        }
        Watch::Unreadable(_) | Watch::Off => {}
    }
}

impl HttpBody for UsageBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            observe(this.watch, this.usage, data);
        }
        finish(polled, this.watch, this.usage, this.reconcile)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn finish(
    polled: Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    watch: &mut Watch,
    usage: &mut Option<Usage>,
    reconcile: &mut Option<Reconcile>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if let Poll::Ready(None) = polled {
        conclude(watch, usage, reconcile);
    }
    polled
}

/// How long the rest of a JSON answer its client left is read for its
/// usage.
const USAGE_GRACE: Duration = Duration::from_secs(5);

/// Read the rest of `inner`, a JSON answer whose client left before its
/// end, for its usage (up to [`USAGE_GRACE`]), then settle: the answer was
/// generated whole before its head, and a client that reads its start and
/// hangs up must not be charged only the reservation. Without a runtime,
/// settle now.
fn read_on(mut inner: Body, mut watch: Watch, mut usage: Option<Usage>, reconcile: Reconcile) {
    let mut reconcile = Some(reconcile);
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        conclude(&mut watch, &mut usage, &mut reconcile);
        return;
    };
    tracing::debug!("a JSON answer's client left before its end: reading on for its usage");
    runtime.spawn(async move {
        let _ = tokio::time::timeout(USAGE_GRACE, async {
            while let Some(Ok(frame)) = inner.frame().await {
                if let Some(data) = frame.data_ref() {
                    observe(&mut watch, &mut usage, data);
                }
            }
        })
        .await;
        conclude(&mut watch, &mut usage, &mut reconcile);
    });
}

/// Drop all but the last `JSON_TAIL` bytes once twice that is held,
/// reading a `usage` in them first into `seen`: most servers write `usage`
/// last, but not all (vLLM writes `prompt_logprobs` after it, which can
/// run to megabytes), and a usage lost is a request charged its
/// reservation only. (A `usage` shorter than `JSON_TAIL` is whole in the
/// buffer when its key is dropped.)
fn keep_tail(tail: &mut Vec<u8>, seen: &mut Option<Usage>) {
    if tail.len() > 2 * JSON_TAIL {
        if let Some(usage) = usage::from_json_tail(tail) {
            *seen = Some(usage);
        }
        tail.drain(..tail.len() - JSON_TAIL);
    }
}

/// The body is over (ended or dropped): read a JSON body's usage and settle,
/// once. A JSON body cut short does not parse: its reservation stands.
fn conclude(watch: &mut Watch, usage: &mut Option<Usage>, reconcile: &mut Option<Reconcile>) {
    let Some(r) = reconcile.take() else { return };
    match watch {
        Watch::Json(copy) if !copy.is_empty() => *usage = usage::from_json(copy),
        Watch::Tail(tail, seen) => *usage = usage::from_json_tail(tail).or(*seen),
        // A stream cut before its final count: what it reported (a Messages
        // stream after `message_start`) and delivered are floors; the
        // reservation stands above them. An error answer (its status) in
        // SSE generated nothing: refunded below.
        Watch::Sse { stream, .. } | Watch::Unreadable(stream)
            if !stream.is_complete()
                && !r.failed
                && (usage.is_some() || stream.delivered() > 0) =>
        {
            r.settle_cut(*usage, stream.delivered());
            return;
        }
        _ => {}
    }
    r.settle(*usage);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose events stop being readable after `message_start` is
    /// still known to be short of its final count: settled as a cut
    /// stream (its reservation stands), not on the opening count.
    #[test]
    fn a_stream_that_turns_unreadable_keeps_what_it_told() {
        let mut watch = Watch::Sse {
            outlines: Box::new(Outlines::with_max_event_bytes(256)),
            stream: StreamUsage::new(StreamKind::Messages),
        };
        let mut usage = None;
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":\
                     {\"usage\":{\"input_tokens\":500,\"output_tokens\":1}}}\n\n";
        observe(&mut watch, &mut usage, &Bytes::from(start));
        let large = format!("event: content_block_delta\ndata: {}", "x".repeat(300));
        observe(&mut watch, &mut usage, &Bytes::from(large));
        let Watch::Unreadable(stream) = &watch else {
            panic!("the watch forgot the stream's count")
        };
        assert!(!stream.is_complete());
        assert_eq!(
            usage,
            Some(Usage {
                input_tokens: 500,
                output_tokens: 1
            })
        );
    }
}
