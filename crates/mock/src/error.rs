//! Errors the mock answers with, in OpenAI's format or Anthropic's.

use http::StatusCode;
use serde_json::{Value, json};

/// The error format of a route: which API family's clients read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `{"error":{"message","type","param","code"}}`.
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`.
    Anthropic,
}

/// An error answered in OpenAI's format,
/// `{"error":{"message","type","param","code"}}`, or in Anthropic's,
/// `{"type":"error","error":{"type","message"}}` (see [`ApiError::to_json`]).
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    /// Sent as the `retry-after` header.
    pub(crate) retry_after_secs: Option<u64>,
}

impl ApiError {
    /// `400 Bad Request`, optionally naming the offending parameter.
    pub(crate) fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after_secs: None,
        }
    }

    /// `404 Not Found`.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            retry_after_secs: None,
        }
    }

    /// `404 Not Found` with OpenAI's `invalid_request_error` type, naming
    /// `param` and `code`, as OpenAI answers an unknown object id.
    pub(crate) fn not_found_param(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: Option<&'static str>,
    ) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code,
            retry_after_secs: None,
        }
    }

    /// An injected `Failure::Status`. A 1xx is no final answer (hyper
    /// would send an empty 500 for it), so it is refused as an invalid one.
    pub(crate) fn injected(status: u16) -> Self {
        let Some(status) = StatusCode::from_u16(status)
            .ok()
            .filter(|s| !s.is_informational())
        else {
            return Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!(
                    "mock: injected failure status {status} is not a valid final HTTP status"
                ),
                kind: "server_error",
                param: None,
                code: Some("mock_injected_failure"),
                retry_after_secs: None,
            };
        };
        Self {
            status,
            message: format!("mock: injected failure ({status})"),
            kind: if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            },
            param: None,
            code: Some("mock_injected_failure"),
            retry_after_secs: None,
        }
    }

    /// An injected `Failure::RateLimited`.
    pub(crate) fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("mock: rate limit reached; retry after {retry_after_secs}s"),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after_secs: Some(retry_after_secs),
        }
    }

    /// The error body in `dialect`'s format. Anthropic's error `type` is
    /// chosen by the status, as Anthropic's API does: `invalid_request_error`
    /// (400 and other 4xx), `authentication_error` (401), `permission_error`
    /// (403), `not_found_error` (404), `request_too_large` (413),
    /// `rate_limit_error` (429), `api_error` (500 and other 5xx),
    /// `timeout_error` (504) or `overloaded_error` (529).
    pub(crate) fn to_json(&self, dialect: Dialect) -> Value {
        match dialect {
            Dialect::OpenAi => self.to_openai_json(),
            Dialect::Anthropic => json!({
                "type": "error",
                "error": { "type": self.anthropic_type(), "message": self.message },
            }),
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            504 => "timeout_error",
            529 => "overloaded_error",
            status if status >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    fn to_openai_json(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}
