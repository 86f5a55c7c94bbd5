use http::{HeaderMap, HeaderName, header};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the client's credentials, which never go upstream.
const STRIP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_LENGTH,
];

/// Remove hop-by-hop headers (also those named by `connection`), the client's
/// credentials and the framing headers the client connection will recompute.
pub(crate) fn strip_request(headers: &mut HeaderMap) {
    strip_connection_named(headers);
    for name in &STRIP {
        headers.remove(name);
    }
    headers.remove("x-api-key");
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Remove hop-by-hop headers from an upstream's response.
pub(crate) fn strip_response(headers: &mut HeaderMap) {
    strip_connection_named(headers);
    for name in [
        header::CONNECTION,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn strip_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_credentials_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer client".parse().unwrap());
        h.insert("x-api-key", "client".parse().unwrap());
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        strip_request(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }
}
