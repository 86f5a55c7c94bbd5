use std::sync::Arc;

use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::body::{Body, full};
use crate::endpoint::{Dialect, StreamKind};

/// Everything that can go wrong in the stack, by what went wrong.
///
/// Every layer returns this error; it is rendered once, at the edge, into an
/// OpenAI-style error response by [`Error::into_response`]. Status, `type` and
/// `code` follow DESIGN.md's pinned table.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The body is not valid JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON but not an object.
    #[error("request body must be a JSON object")]
    InvalidBody,
    /// The body could not be read: broken framing (a bad chunk), or a read
    /// that failed otherwise (a client gone is
    /// [`Error::ClientClosedRequest`], when the server says so).
    #[error("could not read the request body: {0}")]
    UnreadableBody(String),
    /// The client went away while sending its body: its connection closed
    /// (or, on HTTP/2, it reset the stream) before the body's end. Status
    /// 499, nginx's "client closed request", as metrics and the access log
    /// count a request abandoned before its answer; an answer rarely has
    /// anyone to read it (a client that only shut down its sending side).
    #[error("the client closed the request before its body's end")]
    ClientClosedRequest,
    /// The body has no string `model`.
    #[error("request body has no string field `model`")]
    MissingModel,
    /// A parameter the proxy cannot honour.
    #[error("{message}")]
    UnsupportedParameter {
        /// The parameter's name.
        param: String,
        /// What is wrong with it.
        message: String,
    },
    /// The client's credential is missing, malformed or unknown.
    #[error("invalid API key")]
    InvalidApiKey,
    /// The caller's key may not use this model.
    #[error("this API key may not use model `{0}`")]
    ModelNotAllowed(String),
    /// The caller's key may not use this route.
    #[error("this API key may not use {0}")]
    RouteNotAllowed(String),
    /// No upstream is configured for the model.
    #[error("model `{0}` does not exist")]
    ModelNotFound(String),
    /// No upstream serves this API for the model.
    #[error("{0}")]
    ApiNotServed(String),
    /// A response id this proxy cannot route (unknown, expired, or its
    /// upstream is gone).
    #[error("{0}")]
    ResponseNotFound(String),
    /// A conversation id this proxy knows, but not for the asking key, or
    /// whose upstream is gone.
    #[error("{0}")]
    ConversationNotFound(String),
    /// No such path.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// The path exists, but not for this method.
    #[error("method {method} is not allowed on {path}; allowed: {allow}")]
    MethodNotAllowed {
        /// The method the client used.
        method: String,
        /// The path.
        path: String,
        /// The value of the `allow` header.
        allow: &'static str,
    },
    /// The body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    RequestTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The body, with the value it is parsed into, is more than the bound on
    /// all request bodies held at once (`max_buffered_body_bytes`): it could
    /// never be held, however idle the proxy.
    #[error(
        "request body, parsed, needs more than the {limit} bytes this proxy holds for all request bodies at once"
    )]
    ParsedTooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The client stopped sending its request body: nothing came for the
    /// read timeout.
    #[error("no request body bytes for {waited_ms} ms: the request is abandoned")]
    RequestTimeout {
        /// The wait, in milliseconds.
        waited_ms: u64,
    },
    /// The client sent a body the proxy buffers too slowly: it did not come
    /// whole within the proxy's bound on the whole body.
    #[error("the request body did not come whole within {within_ms} ms: the request is abandoned")]
    RequestBodyTooSlow {
        /// The bound, in milliseconds.
        within_ms: u64,
    },
    /// Buffering this request's body would pass the proxy's bound on the
    /// request bodies it holds in memory at once (all requests together).
    #[error("the proxy holds {limit} bytes of request bodies already; retry shortly")]
    BodyBufferFull {
        /// The bound, in bytes.
        limit: usize,
    },
    /// The proxy itself ran short of what a connection to an upstream
    /// takes (open files, local ports, socket memory) opening one: no
    /// fault of the upstream's, and another would fare no better.
    #[error(
        "the proxy cannot open a connection to upstream `{upstream}` now: {reason}; retry shortly"
    )]
    OutOfResources {
        /// The upstream it tried to reach.
        upstream: String,
        /// What ran short, as the system said.
        reason: String,
    },
    /// A content type other than JSON.
    #[error("content-type `{0}` is not supported; send application/json")]
    UnsupportedMediaType(String),
    /// A body the proxy reads, sent with a content coding (`gzip`, say):
    /// read as JSON it would fail, and passed on labelled it would be
    /// decoded by an upstream that honours the label.
    #[error("content-encoding `{0}` is not supported on this route; send the body unencoded")]
    UnsupportedContentEncoding(String),
    /// A request body sent with a transfer coding other than `chunked`
    /// alone (`gzip, chunked`; `chunked` twice): hyper removes the chunking
    /// only, and the body would go on coded and unlabelled (RFC 9112 §6.1:
    /// 501).
    #[error("transfer-encoding `{0}` is not supported; send the body with `chunked` alone")]
    UnsupportedTransferCoding(String),
    /// A rate limit was hit.
    #[error("rate limit exceeded: {message}")]
    RateLimited {
        /// Whole seconds until a retry may succeed (at least 1).
        retry_after_secs: u64,
        /// Which limit.
        message: String,
    },
    /// The upstream failed below HTTP: refused, reset, broken response.
    #[error("upstream `{upstream}` failed: {reason}")]
    BadGateway {
        /// The upstream's name.
        upstream: Arc<str>,
        /// What happened.
        reason: String,
    },
    /// The upstream refused the request before processing any of it: an
    /// HTTP/2 stream reset with `REFUSED_STREAM`, or one past the last the
    /// upstream said it would process when it went away (`GOAWAY`), or a
    /// request its connection closed under before sending it (RFC 9113
    /// §8.7: safe to send again). A 502 as [`Error::BadGateway`], but no
    /// failure of the upstream's (it rotates its connections, or is at its
    /// stream cap).
    #[error("upstream `{upstream}` did not take the request: {reason}")]
    UpstreamRefused {
        /// The upstream's name.
        upstream: Arc<str>,
        /// What it said.
        reason: String,
    },
    /// No attempt could be made at all.
    #[error("no upstream available: {0}")]
    NoUpstreamAvailable(String),
    /// No attempt was made: every upstream the request may go to asked to
    /// be left alone (a 429, a 503 with `retry-after`) for a while yet. A
    /// 503 `no_upstream_available`, with a `retry-after` of the soonest.
    #[error("no upstream available: {message}")]
    UpstreamsResting {
        /// What the client is told.
        message: String,
        /// Seconds until the first of them is back (at least 1).
        retry_after_secs: u64,
    },
    /// The store of response and conversation ids (Redis) could not be
    /// asked where an id the request names lives: a 503 to retry, not the
    /// 404 a client would take as final.
    #[error("{0}")]
    IdStoreUnavailable(String),
    /// The stack is put together wrongly: a layer lacks what a layer in
    /// front of it should have done (e.g. the auth layer without the parse
    /// layer before it). A 500: no request can fix it.
    #[error("the proxy is misconfigured: {0}")]
    Misconfigured(String),
    /// The upstream did not answer in time.
    #[error("upstream `{upstream}` timed out {phase}")]
    UpstreamTimeout {
        /// The upstream's name.
        upstream: Arc<str>,
        /// Which wait ran out, e.g. "waiting for the response head".
        phase: &'static str,
    },
    /// The request may be answered only from the cache (`cache-control:
    /// only-if-cached`, RFC 9111 §5.2.1.7), and the cache holds no answer
    /// it may use: a 504, as the RFC asks, without asking an upstream.
    #[error(
        "no stored answer for this request, and `cache-control: only-if-cached` forbids asking an upstream"
    )]
    NotCached,
}

/// The error `code` of the event a stream broken mid-way ends with, in
/// every dialect ([`Error::stream_interrupted_event_for`]).
pub const INTERRUPTED_CODE: &str = "stream_interrupted";

/// The longest error message a client is sent ([`Error::message`]).
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// The JSON error object OpenAI clients parse: `{"error":{…}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    /// The error object.
    pub error: ErrorObject<'a>,
}

/// The inner object of [`ErrorBody`].
#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    /// A message for a person.
    pub message: &'a str,
    /// The error's `type`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The parameter at fault, if any.
    pub param: Option<&'a str>,
    /// A stable machine-readable code.
    pub code: &'static str,
}

/// 499, nginx's "client closed request": not an HTTP status, a mark in
/// its logs (and here in metrics and the access log) for a request whose
/// client left before its answer.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => unreachable!(),
};

impl Error {
    /// The `phase` of an [`Error::UpstreamTimeout`] whose upstream took the
    /// request and sent no response head within its first-byte timeout.
    pub const WAITING_FOR_HEAD: &'static str = "waiting for the response head";

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        use Error::*;
        match self {
            InvalidJson(_)
            | InvalidBody
            | UnreadableBody(_)
            | MissingModel
            | UnsupportedParameter { .. } => StatusCode::BAD_REQUEST,
            ClientClosedRequest => CLIENT_CLOSED_REQUEST,
            InvalidApiKey => StatusCode::UNAUTHORIZED,
            ModelNotAllowed(_) | RouteNotAllowed(_) => StatusCode::FORBIDDEN,
            ModelNotFound(_)
            | ApiNotServed(_)
            | ResponseNotFound(_)
            | ConversationNotFound(_)
            | RouteNotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RequestTooLarge { .. } | ParsedTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout { .. } | RequestBodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            UnsupportedMediaType(_) | UnsupportedContentEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            BadGateway { .. } | UpstreamRefused { .. } => StatusCode::BAD_GATEWAY,
            NoUpstreamAvailable(_)
            | UpstreamsResting { .. }
            | BodyBufferFull { .. }
            | OutOfResources { .. }
            | IdStoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamTimeout { .. } | NotCached => StatusCode::GATEWAY_TIMEOUT,
            Misconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
            UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// The OpenAI error `type`.
    pub fn error_type(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidJson(_)
            | InvalidBody
            | UnreadableBody(_)
            | ClientClosedRequest
            | MissingModel
            | UnsupportedParameter { .. }
            | MethodNotAllowed { .. }
            | RequestTooLarge { .. }
            | ParsedTooLarge { .. }
            | RequestTimeout { .. }
            | RequestBodyTooSlow { .. }
            | UnsupportedMediaType(_)
            | UnsupportedContentEncoding(_)
            | UnsupportedTransferCoding(_) => "invalid_request_error",
            InvalidApiKey => "authentication_error",
            ModelNotAllowed(_) | RouteNotAllowed(_) => "permission_error",
            ModelNotFound(_)
            | ApiNotServed(_)
            | ResponseNotFound(_)
            | ConversationNotFound(_)
            | RouteNotFound(_) => "not_found_error",
            RateLimited { .. } => "rate_limit_error",
            BadGateway { .. } | UpstreamRefused { .. } => "upstream_error",
            NoUpstreamAvailable(_)
            | UpstreamsResting { .. }
            | BodyBufferFull { .. }
            | OutOfResources { .. }
            | IdStoreUnavailable(_) => "service_unavailable",
            UpstreamTimeout { .. } | NotCached => "timeout_error",
            Misconfigured(_) => "server_error",
        }
    }

    /// The stable error `code`.
    pub fn code(&self) -> &'static str {
        use Error::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidBody | UnreadableBody(_) => "invalid_body",
            ClientClosedRequest => "client_closed_request",
            MissingModel => "missing_model",
            UnsupportedParameter { .. } => "unsupported_parameter",
            InvalidApiKey => "invalid_api_key",
            ModelNotAllowed(_) => "model_not_allowed",
            RouteNotAllowed(_) => "route_not_allowed",
            ModelNotFound(_) => "model_not_found",
            ApiNotServed(_) => "api_not_served",
            ResponseNotFound(_) => "response_not_found",
            ConversationNotFound(_) => "conversation_not_found",
            RouteNotFound(_) => "route_not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            RequestTooLarge { .. } | ParsedTooLarge { .. } => "request_too_large",
            RequestTimeout { .. } | RequestBodyTooSlow { .. } => "request_timeout",
            UnsupportedMediaType(_) | UnsupportedContentEncoding(_) => "unsupported_media_type",
            RateLimited { .. } => "rate_limit_exceeded",
            BadGateway { .. } | UpstreamRefused { .. } => "bad_gateway",
            NoUpstreamAvailable(_) | UpstreamsResting { .. } => "no_upstream_available",
            BodyBufferFull { .. } | OutOfResources { .. } => "server_overloaded",
            IdStoreUnavailable(_) => "id_store_unavailable",
            UpstreamTimeout { .. } => "upstream_timeout",
            NotCached => "not_cached",
            Misconfigured(_) => "misconfigured",
            UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
        }
    }

    /// The parameter at fault, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            Error::UnsupportedParameter { param, .. } => Some(param),
            Error::MissingModel => Some("model"),
            _ => None,
        }
    }

    /// The message a client is sent: the error's text, cut to
    /// [`MAX_MESSAGE_BYTES`] (at a character's boundary, with `…`). Many
    /// messages quote what the client sent (a model name, an id, a path),
    /// which may be as long as a body: it is named, not echoed whole.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        message
    }

    /// The error as OpenAI-style JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let message = self.message();
        let body = ErrorBody {
            error: ErrorObject {
                message: &message,
                kind: self.error_type(),
                param: self.param(),
                code: self.code(),
            },
        };
        serde_json::to_vec(&body).expect("an ErrorBody of strings always serialises")
    }

    /// Anthropic's error `type` for this error's status, so the `anthropic`
    /// SDK raises its matching exception class.
    pub fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            504 => "timeout_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The error as JSON in `dialect`'s shape.
    pub fn to_json_in(&self, dialect: Dialect) -> Vec<u8> {
        match dialect {
            Dialect::OpenAi => self.to_json(),
            Dialect::Anthropic => serde_json::to_vec(&serde_json::json!({
                "type": "error",
                "error": {"type": self.anthropic_type(), "message": self.message()},
            }))
            .expect("a JSON value always serialises"),
        }
    }

    /// Render the error as an HTTP response with an OpenAI-style JSON body and
    /// the headers its status calls for (`retry-after`, `allow`).
    pub fn into_response(self) -> http::Response<Body> {
        self.into_response_in(Dialect::OpenAi)
    }

    /// Render the error as an HTTP response in `dialect`'s error shape.
    pub fn into_response_in(self, dialect: Dialect) -> http::Response<Body> {
        let mut resp = http::Response::new(full(self.to_json_in(dialect)));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match &self {
            Error::RateLimited {
                retry_after_secs, ..
            }
            | Error::UpstreamsResting {
                retry_after_secs, ..
            } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from((*retry_after_secs).max(1)),
                );
            }
            Error::MethodNotAllowed { allow, .. } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            Error::BodyBufferFull { .. }
            | Error::OutOfResources { .. }
            | Error::IdStoreUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Error::BadGateway { upstream, .. }
            | Error::UpstreamRefused { upstream, .. }
            | Error::UpstreamTimeout { upstream, .. } => {
                // Which upstream failed, for the metrics' `upstream` label,
                // as on the answers upstreams give.
                resp.extensions_mut()
                    .insert(crate::UpstreamName(upstream.clone()));
            }
            _ => {}
        }
        resp.extensions_mut().insert(self);
        resp
    }

    /// The event that ends a stream of `kind` broken mid-way, in that
    /// dialect's own shape: `data: {"error":{…"stream_interrupted"}}` for chat
    /// streams (DESIGN.md), an `error` event for Responses
    /// (`{"type":"error","code":"stream_interrupted",…}`) and for Messages
    /// (`{"type":"error","error":{"type":"api_error",…}}`). A Responses
    /// event takes the stream's next `sequence_number` from `numbers` (the
    /// other dialects' events are not numbered).
    pub fn stream_interrupted_event_for(
        kind: StreamKind,
        reason: &str,
        numbers: &crate::sse::SequenceNumbers,
    ) -> bytes::Bytes {
        let data = match kind {
            StreamKind::Chat => return Self::stream_interrupted_event(reason),
            StreamKind::Responses => serde_json::json!({
                "type": "error", "code": INTERRUPTED_CODE, "message": reason, "param": null,
                "sequence_number": numbers.next(),
            }),
            StreamKind::Messages => serde_json::json!({
                "type": "error",
                "error": {"type": "api_error", "message": reason, "code": INTERRUPTED_CODE},
            }),
        };
        bytes::Bytes::from(format!("event: error\ndata: {data}\n\n"))
    }

    /// The `data: {...}` SSE event that ends a chat stream broken mid-way
    /// (`code: "stream_interrupted"`), as DESIGN.md pins it.
    pub fn stream_interrupted_event(reason: &str) -> bytes::Bytes {
        let body = ErrorBody {
            error: ErrorObject {
                message: reason,
                kind: "upstream_error",
                param: None,
                code: INTERRUPTED_CODE,
            },
        };
        let json = serde_json::to_string(&body).expect("an ErrorBody of strings always serialises");
        bytes::Bytes::from(format!("data: {json}\n\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_client_value_is_cut() {
        // A model name as long as a body: named, not echoed whole, and cut
        // at a character's boundary.
        let long = format!("{}é", "m".repeat(MAX_MESSAGE_BYTES - 8));
        for dialect in [Dialect::OpenAi, Dialect::Anthropic] {
            let json = Error::ModelNotFound(long.clone()).to_json_in(dialect);
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            let message = v["error"]["message"].as_str().unwrap();
            assert!(
                message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8(),
                "{dialect:?}"
            );
            assert!(message.starts_with("model `mmm") && message.ends_with('…'));
        }
        let short = Error::ModelNotFound("m".into());
        assert_eq!(short.message(), "model `m` does not exist");
    }

    #[test]
    fn renders_openai_shape() {
        let resp = Error::MissingModel.into_response();
        assert_eq!(resp.status(), 400);
        let json = Error::MissingModel.to_json();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "missing_model");
        assert_eq!(v["error"]["param"], "model");
    }

    #[test]
    fn rate_limited_has_retry_after_at_least_one() {
        let resp = Error::RateLimited {
            retry_after_secs: 0,
            message: "rpm".into(),
        }
        .into_response();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "1");
    }

    #[test]
    fn anthropic_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&Error::InvalidApiKey.to_json_in(Dialect::Anthropic)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        let ev =
            Error::stream_interrupted_event_for(StreamKind::Messages, "cut", &Default::default());
        assert!(
            std::str::from_utf8(&ev)
                .unwrap()
                .starts_with("event: error\ndata: {")
        );
    }

    #[test]
    fn not_cached_is_a_504_in_either_dialect() {
        let resp = Error::NotCached.into_response_in(Dialect::OpenAi);
        assert_eq!(resp.status(), 504);
        let v: serde_json::Value = serde_json::from_slice(&Error::NotCached.to_json()).unwrap();
        assert_eq!(
            (
                &v["error"]["type"],
                &v["error"]["code"],
                &v["error"]["param"]
            ),
            (
                &"timeout_error".into(),
                &"not_cached".into(),
                &serde_json::Value::Null
            )
        );
        let v: serde_json::Value =
            serde_json::from_slice(&Error::NotCached.to_json_in(Dialect::Anthropic)).unwrap();
        assert_eq!(
            (&v["type"], &v["error"]["type"]),
            (&"error".into(), &"timeout_error".into())
        );
    }

    #[test]
    fn interrupted_event_is_sse_data() {
        let ev = Error::stream_interrupted_event("upstream reset");
        let s = std::str::from_utf8(&ev).unwrap();
        assert!(s.starts_with("data: {\"error\":"));
        assert!(s.ends_with("\n\n"));
        assert!(s.contains("\"code\":\"stream_interrupted\""));
    }
}
