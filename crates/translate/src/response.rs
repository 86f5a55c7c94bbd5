//! The response half of a translation: what the request side learned
//! ([`Translation`]), whole answers, error answers, and the switch to
//! [`TranslateBody`] for streams.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, BodyBudget, Dialect, Error, UpstreamName, Waited};
use serde_json::{Value, json};

use crate::body::TranslateBody;
use crate::chat_over_messages::stream::MessagesToChat;
use crate::messages_over_chat::stream::ChatToMessages;
use crate::responses_over_chat::stream::ChatToResponses;
use crate::stream::StreamMap;
use crate::{chat_over_messages, messages_over_chat, responses_over_chat};

/// The largest whole (non-streamed) answer translated: far above any chat
/// completion, and a bound on what an upstream can make the proxy hold.
pub(crate) const MAX_ANSWER_BYTES: usize = 32 << 20;
/// The most of an error body read; the message of a longer one is the
/// start of its text.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// The most characters of an upstream's error text that become the
/// client's message when it is not a readable JSON error.
const MAX_MESSAGE_CHARS: usize = 500;

/// What the response translation needs from the request, per direction.
#[derive(Debug)]
pub(crate) enum Translation {
    MessagesOverChat(messages_over_chat::Context),
    ChatOverMessages(chat_over_messages::Context),
    ResponsesOverChat(Box<responses_over_chat::Context>),
}

impl Translation {
    fn client_dialect(&self) -> Dialect {
        match self {
            Translation::MessagesOverChat(_) => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        }
    }

    fn upstream_dialect(&self) -> Dialect {
        match self {
            Translation::ChatOverMessages(_) => Dialect::Anthropic,
            _ => Dialect::OpenAi,
        }
    }

    fn whole(&self, answer: &Value) -> Result<Value, String> {
        match self {
            Translation::MessagesOverChat(ctx) => {
                messages_over_chat::response::response(answer, ctx)
            }
            Translation::ChatOverMessages(ctx) => {
                chat_over_messages::response::response(answer, ctx)
            }
            Translation::ResponsesOverChat(ctx) => {
                responses_over_chat::response::response(answer, ctx)
            }
        }
    }

    fn into_stream(self) -> StreamMap {
        match self {
            Translation::MessagesOverChat(ctx) => {
                StreamMap::ChatToMessages(Box::new(ChatToMessages::new(ctx)))
            }
            Translation::ChatOverMessages(ctx) => {
                StreamMap::MessagesToChat(Box::new(MessagesToChat::new(ctx)))
            }
            Translation::ResponsesOverChat(ctx) => {
                StreamMap::ChatToResponses(Box::new(ChatToResponses::new(*ctx)))
            }
        }
    }
}

/// How one answer is translated.
pub(crate) struct Translating {
    pub(crate) translation: Translation,
    /// The client asked for a stream.
    pub(crate) streamed: bool,
    /// What the events of a streamed answer hold counts against.
    pub(crate) budget: Option<BodyBudget>,
    /// Where the time reading a whole answer is counted (the upstream's,
    /// not the proxy's overhead).
    pub(crate) waited: Option<Waited>,
}

/// Translate the upstream's response for the client.
pub(crate) async fn translate(
    resp: Response<Body>,
    translating: Translating,
) -> Result<Response<Body>, Error> {
    let Translating {
        translation,
        streamed,
        budget,
        waited,
    } = translating;
    let (mut parts, body) = resp.into_parts();
    parts.extensions.insert(llm_proxy_core::Translated);
    let upstream: Arc<str> = parts
        .extensions
        .get::<UpstreamName>()
        .map_or_else(|| Arc::from("upstream"), |u| u.0.clone());
    let is_sse = llm_proxy_core::media::is_event_stream(&parts.headers);
    if !parts.status.is_success() {
        let error = Waited::timing(waited.as_ref(), read_error(body)).await;
        let converted = convert_error(
            parts.status,
            &error,
            translation.upstream_dialect(),
            translation.client_dialect(),
        );
        return Ok(json_response(parts, converted));
    }
    let bad = |reason: String| Error::BadGateway {
        upstream: upstream.clone(),
        reason,
    };
    let mut body = body;
    // What a streamed answer under another media type begins with.
    let mut start = Bytes::new();
    if streamed && !is_sse {
        start = Waited::timing(waited.as_ref(), sniff(&mut body))
            .await
            .map_err(bad)?;
        if llm_proxy_core::media::events_start(&start) == Some(true) {
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            parts.headers.remove(header::CONTENT_LENGTH);
            let body = TranslateBody::new(body, translation.into_stream())
                .counted_in(budget.as_ref())
                .started_with(&start);
            return Ok(Response::from_parts(parts, body.boxed_unsync()));
        }
    }
    if is_sse {
        if !streamed {
            // The upstream ignored `stream: false` (or its absence): a
            // stream for a client whose SDK reads one JSON answer is not
            // an answer it can read.
            return Err(bad("the upstream streamed an answer asked for whole".into()));
        }
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = TranslateBody::new(body, translation.into_stream()).counted_in(budget.as_ref());
        return Ok(Response::from_parts(parts, body.boxed_unsync()));
    }
    let bytes = Waited::timing(
        waited.as_ref(),
        llm_proxy_core::read_answer(start, body, MAX_ANSWER_BYTES),
    )
    .await
    .map_err(bad)?;
    let answer: Value = llm_proxy_core::json_from_slice(&bytes)
        .map_err(|e| bad(format!("the upstream's answer is not JSON: {e}")))?;
    // Also for a client that streams: an answer that is not the upstream's
    // dialect (an error object some servers send with 200) told as a
    // stream would be an empty, successful answer that loses its message.
    let translated = translation
        .whole(&answer)
        .map_err(|e| bad(format!("the upstream's answer cannot be translated: {e}")))?;
    if streamed {
        // The upstream ignored `stream: true`: the client reads only events.
        let sse = match translation.upstream_dialect() {
            Dialect::Anthropic => crate::synthesize::messages_stream(&answer),
            Dialect::OpenAi => crate::synthesize::chat_stream(&answer),
        };
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::CONTENT_ENCODING);
        let body = TranslateBody::new(llm_proxy_core::full(sse), translation.into_stream());
        return Ok(Response::from_parts(parts, body.boxed_unsync()));
    }
    Ok(json_response(parts, Bytes::from(translated.to_string())))
}

fn json_response(mut parts: http::response::Parts, body: Bytes) -> Response<Body> {
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    parts.headers.remove(header::CONTENT_ENCODING);
    Response::from_parts(parts, llm_proxy_core::full(body))
}

/// The start of an answer to a streamed request that came without the
/// `text/event-stream` media type, read until it tells whether it is a
/// stream of events (see [`llm_proxy_core::media::events_start`]). Some servers stream under
/// another type (Starlette's `StreamingResponse` sends none unless told,
/// others `text/plain` or `application/json`) and the clients that read
/// events whatever the type (the `openai` SDKs, LiteLLM) never notice:
/// translated, such a stream is translated as one, not refused as an
/// answer that is not JSON.
async fn sniff(body: &mut Body) -> Result<Bytes, String> {
    let mut start = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the upstream's answer broke off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            start.extend_from_slice(&data);
            if start.len() >= llm_proxy_core::media::MAX_SNIFF_BYTES
                || llm_proxy_core::media::events_start(&start).is_some()
            {
                break;
            }
        }
    }
    Ok(Bytes::from(start))
}

/// An upstream's error body as far as it was read.
#[derive(Debug, Default)]
pub(crate) struct ErrorBody {
    /// The bytes read, at most [`MAX_ERROR_BYTES`].
    pub bytes: Bytes,
    /// Why the bytes are not the whole body, when they are not.
    pub cut: Option<&'static str>,
}

/// Read an error body up to [`MAX_ERROR_BYTES`], keeping what came of one
/// that is longer or breaks off.
async fn read_error(mut body: Body) -> ErrorBody {
    let mut buf = Vec::new();
    let mut cut = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            cut = Some("broke off");
            break;
        };
        if let Ok(data) = frame.into_data() {
            let room = MAX_ERROR_BYTES - buf.len();
            if data.len() > room {
                buf.extend_from_slice(&data[..room]);
                cut = Some("is longer than 64 KiB");
                break;
            }
            buf.extend_from_slice(&data);
        }
    }
    ErrorBody {
        bytes: Bytes::from(buf),
        cut,
    }
}

/// Anthropic's error `type` for a status (as core renders the proxy's own
/// errors), so the `anthropic` SDK raises its matching exception class.
fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// An upstream error body in the client's dialect, keeping its message.
/// A whole JSON body in the client's own dialect goes on as it came; one
/// that is not JSON, or was cut, becomes a fresh error whose message is the
/// start of its text.
pub(crate) fn convert_error(
    status: StatusCode,
    body: &ErrorBody,
    from: Dialect,
    to: Dialect,
) -> Bytes {
    let parsed: Option<Value> = body
        .cut
        .is_none()
        .then(|| llm_proxy_core::json_from_slice(&body.bytes).ok())
        .flatten();
    if from == to && parsed.is_some() {
        return body.bytes.clone();
    }
    // `{"error": {…}}` (OpenAI, Anthropic's inner object), or the error
    // object itself at the top: vLLM's older `{"object": "error", …}`.
    let error = parsed.as_ref().and_then(|v| {
        v.get("error")
            .or_else(|| (v.get("object").and_then(Value::as_str) == Some("error")).then_some(v))
    });
    let message = error
        .and_then(|e| {
            e.get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
        })
        .map(str::to_owned)
        .unwrap_or_else(|| text_message(status, body));
    let converted = match to {
        Dialect::Anthropic => json!({
            "type": "error",
            "error": {"type": anthropic_type(status), "message": message},
        }),
        Dialect::OpenAi => {
            let kind = error
                .and_then(|e| e.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("upstream_error");
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
    };
    Bytes::from(converted.to_string())
}

/// The message of an error body that is not a readable JSON error: the
/// start of its text, saying when the body was cut.
fn text_message(status: StatusCode, body: &ErrorBody) -> String {
    let text = String::from_utf8_lossy(&body.bytes);
    let text = text.trim();
    let mut chars = text.chars();
    let mut message: String = chars.by_ref().take(MAX_MESSAGE_CHARS).collect();
    let more = chars.next().is_some();
    match (message.is_empty(), body.cut) {
        (true, None) => format!("the upstream answered {status}"),
        (true, Some(cut)) => format!("the upstream answered {status}; its error body {cut}"),
        (false, None) if more => {
            message.push('…');
            message
        }
        (false, None) => message,
        (false, Some(cut)) => {
            message.push_str(&format!("… (the upstream's error body {cut})"));
            message
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> ErrorBody {
        ErrorBody {
            bytes: Bytes::copy_from_slice(body),
            cut: None,
        }
    }

    #[test]
    fn vllm_top_level_error_object_is_unwrapped() {
        let body = br#"{"object":"error","message":"This model's maximum context length is 4096 tokens","type":"BadRequestError","param":null,"code":400}"#;
        let out = convert_error(
            StatusCode::BAD_REQUEST,
            &whole(body),
            Dialect::OpenAi,
            Dialect::Anthropic,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["error"]["message"],
            "This model's maximum context length is 4096 tokens"
        );
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn openai_error_to_anthropic() {
        let body = br#"{"error":{"message":"model overloaded","type":"server_error","code":null}}"#;
        let out = convert_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &whole(body),
            Dialect::OpenAi,
            Dialect::Anthropic,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "model overloaded"}})
        );
    }

    #[test]
    fn anthropic_error_to_openai_and_plain_text() {
        let body = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#;
        let out = convert_error(
            StatusCode::BAD_REQUEST,
            &whole(body),
            Dialect::Anthropic,
            Dialect::OpenAi,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["message"], "max_tokens: too big");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"].get("param").is_some());
        let out = convert_error(
            StatusCode::BAD_GATEWAY,
            &whole(b"<html>bad</html>"),
            Dialect::OpenAi,
            Dialect::Anthropic,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["message"], "<html>bad</html>");
        assert_eq!(v["error"]["type"], "api_error");
        let json = br#"{"error":{"message":"m","type":"t","param":"p","code":"c"}}"#;
        let same = convert_error(
            StatusCode::BAD_REQUEST,
            &whole(json),
            Dialect::OpenAi,
            Dialect::OpenAi,
        );
        assert_eq!(
            &same[..],
            json,
            "the client's own dialect goes on as it came"
        );
        let same = convert_error(
            StatusCode::BAD_REQUEST,
            &whole(b"x"),
            Dialect::OpenAi,
            Dialect::OpenAi,
        );
        let v: Value = serde_json::from_slice(&same).unwrap();
        assert_eq!(v["error"]["message"], "x", "not JSON: a fresh error");
    }

    #[test]
    fn a_cut_body_is_not_copied_and_its_message_is_bounded() {
        let long = format!(r#"{{"error":{{"message":"{}"#, "y".repeat(10_000));
        for (cut, to) in [
            ("is longer than 64 KiB", Dialect::OpenAi),
            ("broke off", Dialect::Anthropic),
        ] {
            let body = ErrorBody {
                bytes: Bytes::from(long.clone()),
                cut: Some(cut),
            };
            let out = convert_error(StatusCode::BAD_REQUEST, &body, Dialect::OpenAi, to);
            let v: Value = serde_json::from_slice(&out).unwrap();
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.starts_with(&long[..500]), "{message}");
            assert!(message.ends_with(&format!("(the upstream's error body {cut})")));
            assert!(message.chars().count() < 600, "{message}");
        }
        let body = ErrorBody {
            bytes: Bytes::new(),
            cut: Some("broke off"),
        };
        let out = convert_error(
            StatusCode::BAD_GATEWAY,
            &body,
            Dialect::OpenAi,
            Dialect::OpenAi,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["error"]["message"],
            "the upstream answered 502 Bad Gateway; its error body broke off"
        );
    }
}

#[cfg(test)]
mod whole_answer_to_a_stream_tests {
    use super::*;

    /// An upstream that answers a streamed request with a 200 JSON body
    /// that is not an answer of its dialect (an error object some servers
    /// send with 200, or anything else) is a bad gateway, as the same body
    /// is for a request that did not stream: never an empty, successful
    /// stream that loses the upstream's message.
    #[tokio::test]
    async fn a_json_body_that_is_not_an_answer_is_a_bad_gateway_streamed_or_not() {
        // The client's API, and what its upstream answered.
        let cases = [
            (
                "messages",
                r#"{"error":{"message":"model is loading","type":"server_error"}}"#,
            ),
            (
                "responses",
                r#"{"error":{"message":"model is loading","type":"server_error"}}"#,
            ),
            (
                "chat",
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
            ("messages", "[]"),
            ("responses", r#""ok""#),
            ("chat", "42"),
        ];
        let translation = |api| match api {
            "messages" => Translation::MessagesOverChat(Default::default()),
            "responses" => Translation::ResponsesOverChat(Default::default()),
            _ => Translation::ChatOverMessages(Default::default()),
        };
        for (api, body) in cases {
            for streamed in [false, true] {
                let resp = Response::new(llm_proxy_core::full(body));
                let translating = Translating {
                    translation: translation(api),
                    streamed,
                    budget: None,
                    waited: None,
                };
                let result = translate(resp, translating).await;
                assert!(
                    matches!(result, Err(Error::BadGateway { .. })),
                    "{body} (streamed: {streamed}): {:?}",
                    result.map(|r| r.status())
                );
            }
        }
    }

    /// The reverse: a stream for a client that asked for a whole answer
    /// (an upstream that ignored `stream: false`) is a bad gateway, never
    /// events its SDK cannot read as one answer.
    #[tokio::test]
    async fn a_stream_for_a_whole_answer_is_a_bad_gateway() {
        let sse = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        for translation in [
            Translation::MessagesOverChat(Default::default()),
            Translation::ResponsesOverChat(Default::default()),
        ] {
            let resp = Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(llm_proxy_core::full(sse))
                .unwrap();
            let translating = Translating {
                translation,
                streamed: false,
                budget: None,
                waited: None,
            };
            let result = translate(resp, translating).await;
            match result {
                Err(Error::BadGateway { reason, .. }) => {
                    assert!(reason.contains("streamed"), "{reason}");
                }
                other => panic!("expected a bad gateway: {:?}", other.map(|r| r.status())),
            }
        }
    }
}
