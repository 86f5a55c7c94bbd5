//! Anthropic's Message Batches: a batch's `results_url` points at the
//! proxy, not at the upstream.
//!
//! A batch (`/v1/messages/batches…`, passed through) names the URL of its
//! results, and the `anthropic` SDK's `batches.results()` fetches that URL
//! as it is, with the client's own credential: left as the upstream wrote
//! it, the fetch would go around the proxy, to the upstream (Anthropic)
//! with the client's proxy key, which fails there and hands the key to a
//! third party, and every tenant would learn the upstream's address. The
//! URL is rewritten to the same path on the proxy, as the client reached it:
//! the request's `Host` (`:authority` over HTTP/2), `https` when
//! `x-forwarded-proto` says so (a TLS terminator in front). An app that
//! mounts the proxy under a path prefix must rewrite it on (the proxy does
//! not know its prefix).

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use llm_proxy_core::Body;
use serde_json::Value;

/// Where a batch's own paths begin in its `results_url`.
const BATCHES: &str = "/v1/messages/batches";

/// The largest batch answer read to be rewritten: a list of batches, each
/// some hundreds of bytes, is far smaller.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// The proxy's origin as the client of `req` reached it, when `req` is a
/// Message Batches request whose answer may name a `results_url`.
pub(crate) fn origin<B>(req: &Request<B>) -> Option<String> {
    if !req.uri().path().starts_with(BATCHES) {
        return None;
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))?;
    let https = req
        .headers()
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    Some(format!("{}://{host}", if https { "https" } else { "http" }))
}

/// `resp` with every `results_url` it names (a batch's, or each of a
/// list's) moved to `origin`. Anything else (an error, a body that is not
/// JSON, or encoded) passes as it came.
pub(crate) async fn rewrite(resp: Response<Body>, origin: &str) -> Response<Body> {
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !resp.status().is_success() || !json || resp.headers().contains_key(header::CONTENT_ENCODING)
    {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = match llm_proxy_core::read_answer(Bytes::new(), body, MAX_ANSWER_BYTES).await {
        Ok(bytes) => bytes,
        Err(reason) => {
            // Read in part: no answer to pass on whole.
            let upstream = parts
                .extensions
                .get::<llm_proxy_core::UpstreamName>()
                .map_or_else(|| "upstream".into(), |u| u.0.clone());
            let error = llm_proxy_core::Error::BadGateway { upstream, reason };
            return error.into_response_in(llm_proxy_core::Dialect::Anthropic);
        }
    };
    let moved = llm_proxy_core::json_from_slice::<Value>(&bytes)
        .ok()
        .and_then(|mut value| move_results_urls(&mut value, origin).then(|| value.to_string()));
    let bytes = moved.map_or(bytes, Bytes::from);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    Response::from_parts(parts, llm_proxy_core::full(bytes))
}

/// Move the `results_url` of `value` (a batch) or of each batch in its
/// `data` (a list) to `origin`; whether any moved.
fn move_results_urls(value: &mut Value, origin: &str) -> bool {
    let mut moved = move_one(value, origin);
    if let Some(batches) = value.get_mut("data").and_then(Value::as_array_mut) {
        for batch in batches {
            moved |= move_one(batch, origin);
        }
    }
    moved
}

fn move_one(batch: &mut Value, origin: &str) -> bool {
    let Some(Value::String(url)) = batch.get_mut("results_url") else {
        return false;
    };
    let Some(at) = url.find(BATCHES) else {
        return false;
    };
    let moved = format!("{origin}{}", &url[at..]);
    let changed = *url != moved;
    *url = moved;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_urls_move_to_the_proxy() {
        let origin = "http://proxy:8080";
        let mut batch = serde_json::json!({"id": "msgbatch_1",
            "results_url": "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"});
        assert!(move_results_urls(&mut batch, origin));
        assert_eq!(
            batch["results_url"],
            "http://proxy:8080/v1/messages/batches/msgbatch_1/results"
        );
        let mut list = serde_json::json!({"data": [
            {"id": "a", "results_url": null},
            {"id": "b", "results_url": "http://10.0.0.5/v1/messages/batches/b/results"}]});
        assert!(move_results_urls(&mut list, origin));
        assert_eq!(list["data"][0]["results_url"], Value::Null);
        assert_eq!(
            list["data"][1]["results_url"],
            "http://proxy:8080/v1/messages/batches/b/results"
        );
        // A URL elsewhere, or none: nothing moves.
        let mut other = serde_json::json!({"results_url": "https://files.example/r.jsonl"});
        assert!(!move_results_urls(&mut other, origin));
    }

    #[test]
    fn the_origin_is_the_clients() {
        let req = |path: &str, headers: &[(&str, &str)]| {
            let mut b = Request::get(path);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap()
        };
        assert_eq!(origin(&req("/v1/messages", &[("host", "p:1")])), None);
        assert_eq!(
            origin(&req("/v1/messages/batches/x", &[("host", "p:1")])).as_deref(),
            Some("http://p:1")
        );
        assert_eq!(
            origin(&req(
                "/v1/messages/batches",
                &[("host", "llm.example"), ("x-forwarded-proto", "https")]
            ))
            .as_deref(),
            Some("https://llm.example")
        );
        assert_eq!(origin(&req("/v1/messages/batches", &[])), None);
    }
}
