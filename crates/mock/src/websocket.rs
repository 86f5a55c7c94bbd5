//! The Responses API over a WebSocket, as Codex speaks it: `GET
//! /v1/responses` upgraded, then one `{"type": "response.create", …}` text
//! message per turn (the fields of a `POST /v1/responses` body beside
//! `type`), answered by the same events a streamed response sends, one text
//! message each, ending with `response.completed`. An error is one
//! `{"type": "error", "error": {…}}` message; the socket stays open.
//! `response.processed` and `response.append` messages are recorded and
//! not answered.
//!
//! Served only by [`serve`](crate::serve)'s connections (an upgrade needs the
//! connection); each session counts as one request in flight until it
//! closes, and every message received is recorded as a request body.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Response, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use llm_proxy_core::header_lists;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::error::Dialect;
use crate::openai::{ApiError, GenerationParams};
use crate::stats::InFlight;
use crate::{Mock, MockApi};

/// Whether `parts` asks to switch to WebSocket.
pub(crate) fn asks_upgrade(parts: &http::request::Parts) -> bool {
    parts.method == http::Method::GET
        && header_lists(&parts.headers, &header::UPGRADE, "websocket")
        && header_lists(&parts.headers, &header::CONNECTION, "upgrade")
}

impl Mock {
    /// Answer an upgrade request on `/responses`: `101` and a session on
    /// the handed-over connection, or an error (not served, no key, not a
    /// connection that can be handed over).
    pub(crate) fn accept(
        &self,
        mut parts: http::request::Parts,
        path: &str,
        guard: InFlight,
    ) -> Response<llm_proxy_core::Body> {
        let refuse = |error: ApiError| {
            let mut resp = Response::new(llm_proxy_core::full(Bytes::from(
                error.to_json(Dialect::OpenAi).to_string(),
            )));
            *resp.status_mut() = error.status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        };
        if path != "/responses" || !self.config().serves(MockApi::Responses) {
            return refuse(ApiError::not_found(format!("Invalid URL (GET {path})")));
        }
        let Some(key) = parts.headers.get("sec-websocket-key") else {
            return refuse(ApiError::bad_request(
                "a WebSocket upgrade needs sec-websocket-key",
                None,
            ));
        };
        let accept = derive_accept_key(key.as_bytes());
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return refuse(ApiError::bad_request(
                "this connection cannot be upgraded",
                None,
            ));
        };
        let mock = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match on_upgrade.await {
                Ok(io) => mock.session(TokioIo::new(io)).await,
                Err(error) => tracing::debug!(%error, "mock: upgrade failed"),
            }
        });
        let mut resp = Response::new(llm_proxy_core::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::try_from(accept) {
            headers.insert("sec-websocket-accept", accept);
        }
        resp
    }

    /// Answer messages until the client closes.
    async fn session(&self, io: TokioIo<hyper::upgrade::Upgraded>) {
        let mut socket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        while let Some(message) = socket.next().await {
            let text = match message {
                Ok(Message::Text(text)) => text,
                // Pings are answered by tungstenite; a close is echoed:
                // tungstenite queued the answer, and flushing it ends the
                // session.
                Ok(Message::Close(_)) => {
                    let _ = socket.flush().await;
                    break;
                }
                Err(_) => break,
                Ok(_) => continue,
            };
            self.stats()
                .record_body(Bytes::copy_from_slice(text.as_bytes()));
            // Paced as a stream is: `tokens_per_second` between messages.
            let interval = self.config().token_interval();
            for (index, reply) in self.turn(text.as_str()).into_iter().enumerate() {
                if let (Some(interval), 1..) = (interval, index) {
                    tokio::time::sleep(interval).await;
                }
                if socket.send(Message::text(reply)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// The messages answering one client message.
    fn turn(&self, text: &str) -> Vec<String> {
        let error = |error: ApiError| {
            let mut value = error.to_json(Dialect::OpenAi);
            value["type"] = json!("error");
            value["status"] = json!(error.status.as_u16());
            vec![value.to_string()]
        };
        let mut body: Value = match serde_json::from_str(text) {
            Ok(body) => body,
            Err(e) => return error(ApiError::bad_request(format!("invalid JSON: {e}"), None)),
        };
        match body.get("type").and_then(Value::as_str) {
            Some("response.create") => {}
            // Acknowledgements and (older clients') more input: recorded,
            // not answered.
            Some("response.processed" | "response.append") => return Vec::new(),
            _ => {
                return error(ApiError::bad_request(
                    "expected a message of type response.create",
                    Some("type"),
                ));
            }
        }
        if let Some(fields) = body.as_object_mut() {
            fields.shift_remove("type");
        }
        let models = self.config().model_ids();
        let params = GenerationParams {
            tokens: crate::service::DEFAULT_TOKENS,
            default_model: models.first().copied().unwrap_or(crate::DEFAULT_MODEL),
            fingerprint: &self.config().name,
        };
        let created = match self.responses().create(&body, text.as_bytes(), &params) {
            Ok(created) => created,
            Err(e) => return error(e),
        };
        (0..)
            .map_while(|index| created.data(index))
            .map(|data| data.to_string())
            .collect()
    }
}
