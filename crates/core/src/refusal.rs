//! Whether an upstream's `400`/`422` refused the `stream_options` a layer
//! added to a streamed chat request (the cache, or the auth layer counting
//! tokens, ask for the usage chunk; some servers reject the field), so that
//! the request is worth sending again without it.
//!
//! Any other `400` is the request's own fault and goes to the client as it
//! came, after one trip upstream, not two. The error body is read (up to
//! 64 KiB) to tell the two apart, and then given back intact.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::{Body, BoxError};
use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

/// The most of an error body read to look for the field's name. Error bodies
/// are a few hundred bytes; a longer one is passed on unread past this.
const MAX_READ: usize = 64 * 1024;

/// The words that show an error is about the usage request a layer added.
const MENTIONS: [&[u8]; 2] = [b"stream_options", b"include_usage"];

/// Whether `response` refuses `stream_options`, and the response to pass on
/// in its place when it does not (the same head and the same bytes). The
/// time reading an error body is the upstream's, counted in `waited`.
pub async fn refuses_stream_options(
    response: Response<Body>,
    waited: Option<&crate::Waited>,
) -> (bool, Response<Body>) {
    if !matches!(
        response.status(),
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
    ) {
        return (false, response);
    }
    crate::Waited::timing(waited, read_refusal(response)).await
}

/// [`refuses_stream_options`] for a 400 or 422.
async fn read_refusal(response: Response<Body>) -> (bool, Response<Body>) {
    let (parts, mut body) = response.into_parts();
    let mut read = BytesMut::new();
    let mut error = None;
    let mut ended = false;
    while read.len() <= MAX_READ {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Ok(frame)) => {
                // Trailers of an error body carry nothing the client needs.
                if let Ok(data) = frame.into_data() {
                    read.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                error = Some(e);
                break;
            }
        }
    }
    let read = read.freeze();
    let refused = mentions_stream_options(&read);
    let rest = if ended || error.is_some() {
        crate::empty()
    } else {
        body
    };
    let replay = Replay {
        read: Some(read),
        error,
        rest,
    };
    (refused, Response::from_parts(parts, Body::new(replay)))
}

/// On a request sent again after its upstream refused the
/// `stream_options` a layer added: the upstream takes none, so no layer
/// below adds them again (with the auth layer and the cache both asking
/// for usage, the upstream would otherwise get the refused field twice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamOptionsRefused;

/// On a streamed chat request whose `stream_options.include_usage` a layer
/// added for itself (the auth layer, to count a limited key's tokens),
/// which cuts the usage chunk out again before the client: the client did
/// not ask for it. A layer below that keeps answers (the cache) may then
/// answer with a stream that lacks the chunk because the upstream refused
/// `stream_options`; one the client asked for, it may not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageAskedByLayer;

/// A copy of a request's head, to send it again (its body lives in
/// [`RequestMeta`](crate::RequestMeta)): method, URI, version, headers and
/// extensions.
pub fn copy_head(parts: &http::request::Parts) -> http::request::Parts {
    let mut copy = http::Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.version_mut() = parts.version;
    *copy.headers_mut() = parts.headers.clone();
    *copy.extensions_mut() = parts.extensions.clone();
    copy.into_parts().0
}

/// [`copy_head`] of a whole request, as a request with an empty body.
pub fn copy_request<B>(req: &http::Request<B>) -> http::Request<Body> {
    let mut copy = http::Request::new(crate::empty());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

fn mentions_stream_options(body: &[u8]) -> bool {
    MENTIONS.iter().any(|word| {
        body.windows(word.len())
            .any(|window| window.eq_ignore_ascii_case(word))
    })
}

/// An error body given back after it was read: the bytes read, then the
/// error that stopped the reading, if any, else the rest of the body.
struct Replay {
    read: Option<Bytes>,
    error: Option<BoxError>,
    rest: Body,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(read) = self.read.take().filter(|read| !read.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(error) = self.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.as_ref().is_none_or(Bytes::is_empty)
            && self.error.is_none()
            && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read = self.read.as_ref().map_or(0, Bytes::len) as u64;
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use crate::full;

    fn response(status: u16, body: Body) -> Response<Body> {
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
    }

    async fn bytes(response: Response<Body>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn only_errors_that_name_the_field_are_refusals() {
        let named =
            r#"{"error":{"message":"Unrecognized request argument supplied: Stream_Options"}}"#;
        let (refused, back) = refuses_stream_options(response(400, full(named)), None).await;
        assert!(refused);
        assert_eq!(bytes(back).await, named);
        let usage = r#"{"detail":[{"loc":["body","include_usage"],"msg":"extra"}]}"#;
        assert!(
            refuses_stream_options(response(422, full(usage)), None)
                .await
                .0
        );

        let other = r#"{"error":{"message":"messages: field required"}}"#;
        let (refused, back) = refuses_stream_options(response(400, full(other)), None).await;
        assert!(!refused);
        assert_eq!(back.status(), StatusCode::BAD_REQUEST);
        assert_eq!(bytes(back).await, other, "the body is given back whole");
        // Other statuses are not read at all.
        let (refused, back) = refuses_stream_options(response(500, full(named)), None).await;
        assert!(!refused);
        assert_eq!(bytes(back).await, named);
    }

    #[tokio::test]
    async fn a_long_body_is_read_only_up_to_the_bound_and_passed_on_whole() {
        let long = "x".repeat(MAX_READ + 10) + "stream_options";
        let (refused, back) = refuses_stream_options(response(400, full(long.clone())), None).await;
        // One frame of a full body holds it all: it is seen.
        assert!(refused);
        assert_eq!(bytes(back).await, long);

        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from("a".repeat(MAX_READ + 1)))),
            Ok(Frame::data(Bytes::from_static(b"stream_options"))),
            Err("reset".into()),
        ];
        let body = Body::new(http_body_util::StreamBody::new(stream_of(frames)));
        let (refused, back) = refuses_stream_options(response(400, body), None).await;
        assert!(!refused, "the bytes past the bound are not read");
        let mut body = back.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), MAX_READ + 1);
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "stream_options");
        assert!(body.frame().await.unwrap().is_err(), "the error too");
    }

    #[tokio::test]
    async fn a_body_error_is_passed_on_after_the_bytes_read() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"{\"error\""))),
            Err("reset".into()),
        ];
        let body = Body::new(http_body_util::StreamBody::new(stream_of(frames)));
        let (refused, back) = refuses_stream_options(response(400, body), None).await;
        assert!(!refused);
        let mut body = back.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "{\"error\"");
        assert!(body.frame().await.unwrap().is_err());
    }

    /// A stream of `items`, one per poll.
    fn stream_of<T>(items: Vec<T>) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::iter(items)
    }
}
