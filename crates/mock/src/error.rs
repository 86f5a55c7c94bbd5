//! Errors the mock answers with, in OpenAI's format.

use http::StatusCode;
use serde_json::{Value, json};

/// An error answered in OpenAI's format:
/// `{"error":{"message","type","param","code"}}`.
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

    /// An injected `Failure::Status`.
    pub(crate) fn injected(status: u16) -> Self {
        let Ok(status) = StatusCode::from_u16(status) else {
            return Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: format!(
                    "mock: injected failure status {status} is not a valid HTTP status"
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

    /// The error body.
    pub(crate) fn to_json(&self) -> Value {
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
