use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// A boxed, thread-safe error, as body errors are carried.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
