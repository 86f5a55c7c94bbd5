//! Protocol upgrades (WebSocket) passed through to the upstream.
//!
//! An upgraded connection belongs to one client for as long as it lives, so
//! it is never pooled: each upgrade opens its own HTTP/1.1 connection (TLS
//! for `https://`, offering only `http/1.1` by ALPN, since an upgrade is an
//! HTTP/1.1 exchange), sends the client's request on it with the usual
//! header rules, and, if the upstream switches protocols, hands back the
//! connection. What flows over it afterwards is not HTTP, and not read here.

use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use llm_proxy_core::{Body, Error};
use tower_service::Service;

use crate::body::UpstreamBody;
use crate::headers;
use crate::pool::SendError;
use crate::service::Upstream;

/// What the upstream made of an upgrade request.
#[derive(Debug)]
pub enum Upgrade {
    /// It switched protocols.
    Switched {
        /// Its `101 Switching Protocols` head: the hop-by-hop headers of the
        /// upstream's connection replaced by `connection: upgrade` and the
        /// `upgrade` it switched to, the rest (`sec-websocket-accept`, …)
        /// as it sent them.
        head: Response<()>,
        /// The upstream's end of the connection, now in the new protocol
        /// (with any bytes that came right behind the head).
        io: TokioIo<Upgraded>,
    },
    /// It answered anything else (an error; a server without WebSocket):
    /// the answer, to pass on.
    Refused(Response<Body>),
}

impl Upstream {
    /// Ask the upstream to switch protocols, as the client's `req` asks
    /// (`GET` with `upgrade: websocket`, its `sec-websocket-*` headers):
    /// the same URL mapping and header rules as [`Service::call`] (the
    /// client's credentials out, the upstream's key in), on a connection of
    /// its own. Bounded by the connect timeout, then by the first-byte
    /// timeout for the answer's head.
    ///
    /// # Errors
    ///
    /// 502 when the upstream cannot be reached or breaks the exchange (or
    /// when upgrades are not enabled in [`UpstreamConfig::upgrades`](crate::UpstreamConfig::upgrades)),
    /// 504 when it does not answer in time.
    pub async fn upgrade(&self, req: Request<()>) -> Result<Upgrade, Error> {
        let inner = &self.inner;
        let Some(connector) = &inner.upgrades else {
            return Err(self.bad_gateway("upgrades are not enabled for this upstream".into()));
        };
        let (mut parts, ()) = req.into_parts();
        let Some(protocol) = parts.headers.get(header::UPGRADE).cloned() else {
            return Err(self.bad_gateway("the request asks for no upgrade".into()));
        };
        headers::strip_request(&mut parts.headers, true);
        strip_credential_protocols(&mut parts.headers);
        self.present(&mut parts.headers);
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::HOST, inner.host.clone());
        let mut out = Request::new(llm_proxy_core::empty());
        *out.method_mut() = parts.method;
        *out.uri_mut() = Uri::from(self.path_and_query(&parts.uri)?);
        *out.headers_mut() = parts.headers;

        let target = Uri::builder()
            .scheme(inner.scheme.clone())
            .authority(inner.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| self.bad_gateway(format!("cannot build the upstream URL: {e}")))?;
        // Driven ready before the call, as the `Service` contract has it
        // (an `HttpConnector` always is, today).
        let mut connector = connector.clone();
        let connect = async move {
            std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(target).await
        };
        // Bounded by the connector itself (`connect_timeout`, TCP and TLS):
        // past it, a `TimedOut` that `classify_pool` answers with 504.
        let io = connect
            .await
            .map_err(|e| self.classify_pool(SendError::Connect(e)))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.classify_pool(SendError::Connect(e.into())))?;
        let name = inner.name.0.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %name, error = %e, "upgrade connection ended with an error");
            }
        });

        let exchange = async {
            let mut resp = sender.send_request(out).await?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Ok(Err(resp));
            }
            let switched = hyper::upgrade::on(&mut resp).await?;
            Ok(Ok((resp, switched)))
        };
        let answered = match tokio::time::timeout(inner.first_byte_timeout, exchange).await {
            Err(_elapsed) => {
                return Err(Error::UpstreamTimeout {
                    upstream: inner.name.0.clone(),
                    phase: Error::WAITING_FOR_HEAD,
                });
            }
            Ok(Err(e)) => return Err(self.classify_pool(SendError::Request(e))),
            Ok(Ok(answered)) => answered,
        };
        match answered {
            Ok((resp, switched)) => {
                let (mut parts, _) = resp.into_parts();
                let protocol = parts.headers.get(header::UPGRADE).cloned();
                self.mark(&mut parts);
                if let Some(protocol) = protocol {
                    parts.headers.insert(header::UPGRADE, protocol);
                }
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                Ok(Upgrade::Switched {
                    head: Response::from_parts(parts, ()),
                    io: TokioIo::new(switched),
                })
            }
            Err(resp) => {
                let (mut parts, incoming) = resp.into_parts();
                self.mark(&mut parts);
                let body =
                    UpstreamBody::new(incoming, inner.idle_timeout, None, self.name().clone());
                Ok(Upgrade::Refused(Response::from_parts(
                    parts,
                    body.boxed_unsync(),
                )))
            }
        }
    }
}
/// The subprotocol OpenAI's WebSocket APIs take a key in, from browsers
/// that cannot set headers: `openai-insecure-api-key.<key>`.
const KEY_PROTOCOL: &str = "openai-insecure-api-key.";

/// Leave out of `sec-websocket-protocol` the subprotocols that carry a
/// credential ([`KEY_PROTOCOL`]): as with `authorization`, the client's
/// credentials never reach the upstream. The header goes when nothing is
/// left of it.
fn strip_credential_protocols(headers: &mut http::HeaderMap) {
    let name = header::SEC_WEBSOCKET_PROTOCOL;
    // As bytes: a value with a byte past ASCII still carries its tokens.
    let carries_key = |token: &[u8]| {
        token
            .get(..KEY_PROTOCOL.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(KEY_PROTOCOL.as_bytes()))
    };
    let offered: Vec<Vec<u8>> = headers
        .get_all(&name)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    if !offered.iter().any(|t| carries_key(t)) {
        return;
    }
    headers.remove(&name);
    let kept: Vec<&[u8]> = offered
        .iter()
        .map(Vec::as_slice)
        .filter(|t| !carries_key(t))
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&kept.join(&b", "[..]))
        && !kept.is_empty()
    {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_in_a_subprotocol_does_not_go_upstream() {
        let protocols = |offered: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in offered {
                headers.append(header::SEC_WEBSOCKET_PROTOCOL, value.parse().unwrap());
            }
            strip_credential_protocols(&mut headers);
            headers
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            protocols(&["realtime, openai-insecure-api-key.sk-secret"]),
            ["realtime"]
        );
        assert_eq!(
            protocols(&["realtime", "OpenAI-Insecure-Api-Key.sk-secret", "v2"]),
            ["realtime, v2"]
        );
        assert!(protocols(&["openai-insecure-api-key.sk-secret"]).is_empty());
        // Without a key, untouched (two lines stay two).
        assert_eq!(protocols(&["a", "b"]), ["a", "b"]);
    }
}
