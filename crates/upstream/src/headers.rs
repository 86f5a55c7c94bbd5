use http::{HeaderMap, HeaderName, HeaderValue, header};

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// plus the client's credentials and cookies, which never go upstream (the
/// proxy is the upstream's client, with its own key; a browser's cookies for
/// the proxy's origin are not the model provider's to read), and `expect`:
/// the client's `100-continue` was answered by the proxy's server (or the
/// body read whole already), and the upstream client sends the body without
/// waiting for a `100`, so an upstream could only refuse it (`417`).
/// `api-key` is Azure OpenAI's key header, which its SDKs send instead of
/// `authorization`. `openai-organization` and `openai-project` pick which
/// of the upstream key's organizations and projects a request is billed
/// to: the key is the operator's, and so is that choice (an upstream's
/// `headers` sets them).
///
/// A `match` on the (lowercase) name: a length switch, then one compare.
fn stripped_from_request(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "cookie"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "host"
            | "authorization"
            | "content-length"
            | "expect"
            | "x-api-key"
            | "api-key"
            | "openai-organization"
            | "openai-project"
            | "keep-alive"
            | "proxy-connection"
            // An HTTP/1.1 `Upgrade: h2c` request's, which is the
            // connection's (RFC 7540 §3.2.1): the upgrade is not passed on.
            | "http2-settings"
    )
}

/// Whether `name` may be set on every request to an upstream (its
/// `headers`): `Err` with the reason for a header the proxy manages itself
/// (a connection's, the body's framing and coding, `host`, `expect`, the
/// WebSocket handshake's, each request's `x-request-id`); the upstream's
/// key goes in its own setting.
pub fn settable_header(name: &HeaderName) -> Result<(), &'static str> {
    let name = name.as_str();
    let managed = matches!(
        name,
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "content-type"
            | "content-encoding"
            | "accept-encoding"
            | "expect"
            | "keep-alive"
            | "proxy-connection"
    ) || name.starts_with("sec-websocket-");
    if managed {
        Err("the proxy sets this header itself")
    } else if name == "x-request-id" {
        // One value on every request would make the upstream's logs and
        // ids (vLLM names its answers after it) collide.
        Err("the proxy sends each request's own id")
    } else {
        Ok(())
    }
}

/// Hop-by-hop headers of a response, cookies and proxy authentication
/// (RFC 9110 §11.7): the upstream's are for the proxy, its client, not for
/// the proxy's clients. And the proxy's own `x-llm-proxy-*`, which say
/// what this proxy did (a cache hit, an estimate, its overhead): an
/// upstream's (another proxy's, or a forged one) would tell the client of
/// a cache or an estimate this one does not have.
fn stripped_from_response(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "set-cookie"
            | "proxy-authenticate"
            | "proxy-authentication-info"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    ) || name.as_str().starts_with("x-llm-proxy-")
}

/// Remove hop-by-hop headers (also those named by `connection`), the client's
/// credentials and the framing headers the client connection will recompute;
/// ask for the answer uncompressed.
///
/// The client's `accept-encoding` is replaced by `identity`: the layers read
/// the answers they pass on (the cache stores and replays them, auth counts
/// their tokens, the Responses layer reads ids, translation rewrites them),
/// and a compressed answer would defeat all of them — a coalesced follower
/// that never asked for gzip would even get gzip bytes without a
/// `content-encoding`. The upstream hop is a LAN or loopback hop to a model
/// server, where compressing a token stream saves little.
///
/// `upgrade`: the request asks the upstream to switch protocols, and keeps
/// its `sec-websocket-*` headers; any other request loses them (they mean
/// nothing without the upgrade a proxy does not pass on).
pub(crate) fn strip_request(headers: &mut HeaderMap, upgrade: bool) {
    strip_connection_named(headers, Some(&REQUEST_ID));
    if upgrade {
        remove_where(headers, stripped_from_request);
    } else {
        remove_where(headers, |name| {
            stripped_from_request(name) || name.as_str().starts_with("sec-websocket-")
        });
    }
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// Remove hop-by-hop headers from an upstream's response.
///
/// A response framed by `transfer-encoding` also loses any `content-length`
/// it came with: the transfer coding decided its length (RFC 9112 §6.3, which
/// asks an intermediary to remove the field), and the stale value passed on
/// would cut the client's body short, or leave it waiting for bytes that
/// never come. A length given more than once (`2, 2`, or two fields) goes on
/// once (§6.3 again): repeated, HTTP/2 clients refuse the answer.
pub(crate) fn strip_response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        single_content_length(headers);
    }
    strip_connection_named(headers, None);
    remove_where(headers, stripped_from_response);
}

/// Remove every header whose name `strip` picks.
///
/// One pass over the names present rather than a hashed lookup per name
/// that could be there: a message carries a handful of names and few of
/// those. The names found are removed in a second step, as the map cannot
/// change while its names are read; a message with more of them than one
/// step takes is scanned again.
fn remove_where(headers: &mut HeaderMap, strip: impl Fn(&HeaderName) -> bool) {
    const BATCH: usize = 4;
    loop {
        let mut found: [Option<HeaderName>; BATCH] = Default::default();
        let mut n = 0;
        for name in headers.keys() {
            if strip(name) {
                found[n] = Some(name.clone());
                n += 1;
                if n == BATCH {
                    break;
                }
            }
        }
        for name in found.iter().flatten() {
            headers.remove(name);
        }
        if n < BATCH {
            return;
        }
    }
}

/// Why an answer's bytes are not the message itself, when they are not:
/// a transfer coding other than `chunked` (its header is stripped, so the
/// client could not undo it), or, where the layers read the answer
/// (`readable`), a content coding other than `identity`, which the proxy
/// asked for (see [`strip_request`]).
pub(crate) fn unreadable_coding(headers: &HeaderMap, readable: bool) -> Option<&'static str> {
    let codings = |name| {
        headers
            .get_all(name)
            .into_iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty())
    };
    if codings(header::TRANSFER_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"chunked")) {
        return Some("a transfer coding other than chunked");
    }
    if readable && codings(header::CONTENT_ENCODING).any(|c| !c.eq_ignore_ascii_case(b"identity")) {
        return Some("a compressed answer (content-encoding), though asked for identity");
    }
    None
}

/// One `content-length` field with one value, where the upstream repeated
/// it; none where the repeats disagree (the body's own length then tells
/// the client's connection).
fn single_content_length(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = fields.next() else {
        return;
    };
    if fields.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let mut values = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    let one = values.next().map(<[u8]>::to_vec);
    let agree = one.as_deref().is_some_and(|one| values.all(|v| v == one));
    match one
        .filter(|_| agree)
        .map(|one| HeaderValue::from_bytes(&one))
    {
        Some(Ok(one)) => {
            headers.insert(header::CONTENT_LENGTH, one);
        }
        _ => {
            headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// The request id the proxy sends: its own header, whatever the client's
/// `connection` named.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Remove the headers a `connection` value names, but `keep`.
fn strip_connection_named(headers: &mut HeaderMap, keep: Option<&HeaderName>) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
    // As bytes: a value with one byte past ASCII still names the others.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|n| HeaderName::from_bytes(n.trim_ascii()).ok())
        .filter(|n| Some(n) != keep)
        .collect();
    for name in named {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    /// The client's OpenAI organization and project would pick what the
    /// operator's key bills: they do not go upstream.
    #[test]
    fn the_clients_openai_organization_and_project_are_stripped() {
        let mut h = super::HeaderMap::new();
        h.insert("openai-organization", "org-c".parse().unwrap());
        h.insert("openai-project", "proj-c".parse().unwrap());
        h.insert("openai-beta", "assistants=v2".parse().unwrap());
        super::strip_request(&mut h, false);
        assert!(!h.contains_key("openai-organization"));
        assert!(!h.contains_key("openai-project"));
        assert_eq!(h["openai-beta"], "assistants=v2");
    }

    #[test]
    fn headers_named_by_a_connection_value_past_ascii_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-private, caf\xe9").unwrap(),
        );
        h.insert("x-private", "internal".parse().unwrap());
        super::strip_request(&mut h, false);
        assert!(!h.contains_key("x-private"), "{h:?}");
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn the_request_id_stays_whatever_connection_names_and_websocket_headers_need_an_upgrade() {
        let with = |upgrade| {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static("x-request-id, x-other"),
            );
            h.insert("x-request-id", "req-1".parse().unwrap());
            h.insert("x-other", "1".parse().unwrap());
            h.insert("sec-websocket-key", "abc".parse().unwrap());
            h.insert("sec-websocket-version", "13".parse().unwrap());
            super::strip_request(&mut h, upgrade);
            h
        };
        let plain = with(false);
        assert_eq!(plain.get("x-request-id").unwrap(), "req-1");
        assert!(!plain.contains_key("x-other"));
        assert!(!plain.contains_key("sec-websocket-key"), "{plain:?}");
        assert!(!plain.contains_key("sec-websocket-version"));
        let upgrade = with(true);
        assert_eq!(upgrade.get("x-request-id").unwrap(), "req-1");
        assert_eq!(upgrade.get("sec-websocket-key").unwrap(), "abc");
    }

    #[test]
    fn every_listed_header_goes_however_many_come() {
        const REQUEST: [&str; 16] = [
            "connection",
            "cookie",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "host",
            "authorization",
            "content-length",
            "expect",
            "x-api-key",
            "api-key",
            "keep-alive",
            "proxy-connection",
            "http2-settings",
        ];
        let mut h = HeaderMap::new();
        for name in REQUEST.iter().rev() {
            h.append(*name, HeaderValue::from_static("a"));
            h.append(*name, HeaderValue::from_static("b"));
        }
        h.insert("x-kept", HeaderValue::from_static("yes"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_request(&mut h, false);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept-encoding", "content-type", "x-kept"]);

        let response = [
            "connection",
            "set-cookie",
            "proxy-authenticate",
            "proxy-authentication-info",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ];
        let mut h = HeaderMap::new();
        for name in response {
            h.insert(name, HeaderValue::from_static("a"));
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        strip_response(&mut h);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["content-type"]
        );
    }

    #[test]
    fn cookies_stay_on_their_side() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "session=abc".parse().unwrap());
        strip_request(&mut h, false);
        assert!(!h.contains_key(header::COOKIE));
        let mut h = HeaderMap::new();
        h.insert(header::SET_COOKIE, "__cf_bm=x; path=/".parse().unwrap());
        strip_response(&mut h);
        assert!(!h.contains_key(header::SET_COOKIE));
    }

    #[test]
    fn a_repeated_content_length_goes_on_once() {
        let lengths = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_LENGTH, v.parse().unwrap());
            }
            strip_response(&mut h);
            h.get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(lengths(&["5"]), ["5"]);
        assert_eq!(lengths(&["5", "5"]), ["5"]);
        assert_eq!(lengths(&["5, 5"]), ["5"]);
        assert!(lengths(&["5", "6"]).is_empty());
        assert!(lengths(&[]).is_empty());
    }

    #[test]
    fn proxy_authentication_is_the_proxys() {
        let mut h = HeaderMap::new();
        h.insert(header::PROXY_AUTHENTICATE, "Basic".parse().unwrap());
        h.insert("proxy-authentication-info", "x".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
        strip_response(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn codings_the_layers_cannot_read() {
        let with = |name: header::HeaderName, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            h
        };
        let te = |v| with(header::TRANSFER_ENCODING, v);
        let ce = |v| with(header::CONTENT_ENCODING, v);
        assert!(unreadable_coding(&te("chunked"), true).is_none());
        assert!(unreadable_coding(&te("Chunked"), true).is_none());
        assert!(unreadable_coding(&te("gzip, chunked"), false).is_some());
        assert!(unreadable_coding(&ce("identity"), true).is_none());
        assert!(unreadable_coding(&ce("gzip"), true).is_some());
        assert!(
            unreadable_coding(&ce("gzip"), false).is_none(),
            "passthrough"
        );
        assert!(unreadable_coding(&HeaderMap::new(), true).is_none());
    }

    use super::*;

    #[test]
    fn strips_credentials_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer client".parse().unwrap());
        h.insert("x-api-key", "client".parse().unwrap());
        h.insert("api-key", "client".parse().unwrap());
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("accept-encoding", "gzip, br".parse().unwrap());
        h.insert("expect", "100-continue".parse().unwrap());
        strip_request(&mut h, false);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("x-request-id"));
        assert_eq!(h["accept-encoding"], "identity");
    }
}
