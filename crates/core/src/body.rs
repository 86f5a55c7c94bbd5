use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// A boxed, thread-safe error, as body errors are carried.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A pause before a body fails. hyper writes out the frames a body has
/// handed it while the body is pending, and drops them when it fails: a
/// body that ends with an error event and then an error pauses once (waking
/// itself) between the two, so the event reaches the client.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushBeforeError {
    flushed: bool,
}

impl FlushBeforeError {
    /// One that has already paused (nothing to flush).
    pub fn flushed() -> Self {
        FlushBeforeError { flushed: true }
    }

    /// `Pending` (woken at once) the first time, `Ready` after.
    pub fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.flushed {
            return std::task::Poll::Ready(());
        }
        self.flushed = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// A response body's error that is the proxy's own doing, not its
/// upstream's: a translation that cannot carry on (interleaved tool calls,
/// a bound it keeps), or an error the upstream reported in its stream and
/// ended cleanly. The balancer does not count it against the upstream's
/// health; an error of any other type from a response body is the
/// upstream's (its connection broke, it stalled, it sent what is not a
/// stream).
#[derive(Debug)]
pub struct NotUpstreamFault(pub String);

impl std::fmt::Display for NotUpstreamFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotUpstreamFault {}

/// Whether a body error is its upstream's fault (see [`NotUpstreamFault`]).
pub fn is_upstream_fault(e: &BoxError) -> bool {
    !e.is::<NotUpstreamFault>()
}

/// The body type of every request and response in the stack.
///
/// Streamed responses stay streamed: this is a boxed `http_body::Body` that
/// yields frames as the inner body produces them.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty [`Body`].
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A [`Body`] holding `bytes` in one frame.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An upstream's answer read whole: `start` (what was read of it already),
/// then `body` to its end, up to `limit` bytes in all. `Err` says why not,
/// as a 502's reason: larger, or broken off.
pub async fn read_answer(start: Bytes, mut body: Body, limit: usize) -> Result<Bytes, String> {
    let larger = || format!("the upstream's answer is larger than {limit} bytes");
    if start.len() > limit {
        return Err(larger());
    }
    let mut buf = Vec::from(start);
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        let frame = frame.map_err(|e| format!("the upstream's answer broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(larger());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

pin_project_lite::pin_project! {
    /// A body that holds `guard` until it is dropped: at its end, or when the
    /// client goes away. Load counters and permits that must live as long as
    /// a streamed response live here, so that no path can leak them.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> Guarded<B, G> {
    /// Hold `guard` for as long as `inner` lives.
    pub fn new(inner: B, guard: G) -> Self {
        Guarded { inner, guard }
    }
}

impl<B: http_body::Body, G> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
