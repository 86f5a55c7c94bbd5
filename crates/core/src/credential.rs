//! The credential a client presents, read the one way the auth layer and
//! the cache's per-key scope both read it.

use http::{HeaderMap, HeaderName, HeaderValue};

/// Anthropic's key header.
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Azure OpenAI's key header.
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The headers a client presents a credential in, in the order
/// [`presented_key`] reads them.
pub const CREDENTIAL_HEADERS: [HeaderName; 3] = [http::header::AUTHORIZATION, X_API_KEY, API_KEY];

/// The key a client presented: `Authorization: Bearer <key>` (scheme
/// case-insensitive, whitespace trimmed), else `x-api-key: <key>`
/// (Anthropic's SDKs), else `api-key: <key>` (Azure OpenAI's). Anything
/// malformed or empty is `None`, and so is the header read when the
/// client sent it twice: which of the two keys counts would be a guess.
pub fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    // By constant names: a `&str` name is parsed and checked on every
    // lookup.
    if let Some(auth) = only(headers, &http::header::AUTHORIZATION)? {
        let value = trim(auth.as_bytes());
        let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return None;
        }
        let key = trim(rest);
        return valid(key);
    }
    let key = match only(headers, &X_API_KEY)? {
        Some(key) => key,
        None => only(headers, &API_KEY)??,
    };
    valid(trim(key.as_bytes()))
}

/// The value of `name` if there is one (`Some(None)` if none), or `None`
/// if there are more.
fn only<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Option<&'h HeaderValue>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    values.next().is_none().then_some(first)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// A key is non-empty visible ASCII without spaces.
fn valid(key: &[u8]) -> Option<&[u8]> {
    (!key.is_empty() && key.iter().all(|b| b.is_ascii_graphic())).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn a_credential_header_sent_twice_presents_no_key() {
        for name in ["authorization", "x-api-key", "api-key"] {
            let value: &[u8] = if name == "authorization" {
                b"Bearer sk-1"
            } else {
                b"sk-1"
            };
            assert_eq!(
                presented_key(&headers(&[(name, value)])),
                Some(&b"sk-1"[..])
            );
            assert_eq!(
                presented_key(&headers(&[(name, value), (name, value)])),
                None
            );
        }
        // Only the header read counts: a repeated one it does not read is
        // left alone.
        let both = headers(&[
            ("authorization", b"Bearer sk-1"),
            ("x-api-key", b"sk-2"),
            ("x-api-key", b"sk-3"),
        ]);
        assert_eq!(presented_key(&both), Some(&b"sk-1"[..]));
    }

    #[test]
    fn presented_key_forms() {
        assert_eq!(
            presented_key(&headers(&[("authorization", b"Bearer sk-1")])),
            Some(&b"sk-1"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", b"bearer   sk-1  ")])),
            Some(&b"sk-1"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", b"BEARER sk-1")])),
            Some(&b"sk-1"[..])
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", b"Bearer")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", b"Bearer ")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", b"Basic abc")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("authorization", b"Bearer a b")])),
            None
        );
        assert_eq!(
            presented_key(&headers(&[("x-api-key", b" sk-2 ")])),
            Some(&b"sk-2"[..])
        );
        assert_eq!(presented_key(&headers(&[("x-api-key", b"\xffsk")])), None);
        assert_eq!(
            presented_key(&headers(&[("api-key", b"sk-3")])),
            Some(&b"sk-3"[..])
        );
        // The first of the three that is there decides.
        assert_eq!(
            presented_key(&headers(&[("x-api-key", b"sk-2"), ("api-key", b"sk-3")])),
            Some(&b"sk-2"[..])
        );
        assert_eq!(presented_key(&HeaderMap::new()), None);
    }
}
