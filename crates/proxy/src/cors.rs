//! CORS for browser apps on other origins (`cors_allow_origins`): a
//! preflight from an allowed origin is answered by the face itself, before
//! auth (a browser sends it without the key), and every answer to an
//! allowed origin says so. An origin not allowed gets what it would get
//! without CORS: its preflight is an `OPTIONS` like any other, and its
//! answers carry no `Access-Control-*` header, which the browser enforces.
//!
//! Not tower-http's `CorsLayer`: the face answers before its stack and
//! counts, logs and ids the preflight as its other answers, which a layer
//! around the stack would not see; what is left is the few headers below.

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use llm_proxy_core::{Body, empty};

/// The origins allowed to call the proxy from a browser.
#[derive(Clone, Debug, Default)]
pub struct Cors {
    /// `*`: any origin.
    any: bool,
    /// Exact origins (`https://app.example.com`), lowercase.
    origins: Vec<HeaderValue>,
}

/// What a preflight may ask for: the methods the routes take.
const METHODS: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS");

/// How long a browser may keep a preflight's answer, in seconds.
const MAX_AGE: HeaderValue = HeaderValue::from_static("600");

impl Cors {
    /// From the configured list (`*` for any origin); `None` when empty.
    pub fn new<I: IntoIterator<Item = String>>(origins: I) -> Option<Cors> {
        let mut cors = Cors::default();
        for origin in origins {
            if origin == "*" {
                cors.any = true;
            } else if let Ok(value) = HeaderValue::from_str(&origin.to_ascii_lowercase()) {
                cors.origins.push(value);
            }
        }
        (cors.any || !cors.origins.is_empty()).then_some(cors)
    }

    /// The request's `Origin`, when it is allowed.
    pub(crate) fn allowed<'a>(&self, headers: &'a HeaderMap) -> Option<&'a HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let listed = || {
            self.origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
        };
        (self.any || listed()).then_some(origin)
    }

    /// Whether `method` and `headers` make a preflight from an allowed
    /// origin.
    pub(crate) fn is_preflight(&self, method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
            && self.allowed(headers).is_some()
    }

    /// The answer to an allowed preflight: `204`, the methods, the headers
    /// it asked for (`Authorization` among them: `*` would not cover it).
    pub(crate) fn preflight(&self, headers: &HeaderMap) -> Response<Body> {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let out = resp.headers_mut();
        out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, METHODS);
        if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        out.insert(header::ACCESS_CONTROL_MAX_AGE, MAX_AGE);
        // The answer depends on these too, for a cache between.
        out.append(
            header::VARY,
            HeaderValue::from_static(
                "access-control-request-method, access-control-request-headers",
            ),
        );
        resp
    }

    /// Mark an answer: for an allowed `origin`, that it may read it and
    /// its headers (`x-request-id`, the rate-limit headers, `retry-after`);
    /// for any other, nothing. What the upstream said of CORS is dropped
    /// first (vLLM and LiteLLM allow every origin by default): the proxy's
    /// list decides who reads its answers. Not on the face's own answer to
    /// a preflight (`preflight`), which holds its own.
    pub(crate) fn mark(
        &self,
        origin: Option<HeaderValue>,
        headers: &mut HeaderMap,
        preflight: bool,
    ) {
        if !preflight {
            strip_upstreams(headers);
        }
        if self.any {
            // The same for every request: no `vary` needed.
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        } else {
            // For a cache between: the answer depends on the origin.
            headers.append(header::VARY, HeaderValue::from_static("origin"));
            match origin {
                Some(origin) => headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin),
                None => return,
            };
        }
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("*"),
        );
    }
}

/// Removes the `access-control-*` headers an upstream sent.
fn strip_upstreams(headers: &mut HeaderMap) {
    let theirs: Vec<_> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in theirs {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn only_listed_origins_are_allowed() {
        assert!(Cors::new(Vec::<String>::new()).is_none());
        let cors = Cors::new(["https://App.example".to_owned()]).unwrap();
        let from = |origin| headers(&[("origin", origin)]);
        assert!(cors.allowed(&from("https://app.example")).is_some());
        assert!(cors.allowed(&from("https://evil.example")).is_none());
        assert!(cors.allowed(&headers(&[])).is_none());
        let any = Cors::new(["*".to_owned()]).unwrap();
        assert!(any.allowed(&from("https://evil.example")).is_some());
        let preflight = headers(&[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(cors.is_preflight(&Method::OPTIONS, &preflight));
        assert!(!cors.is_preflight(&Method::POST, &preflight));
        assert!(!cors.is_preflight(&Method::OPTIONS, &from("https://app.example")));
    }
}
