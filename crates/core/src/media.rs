//! Media types of answers, as the layers tell them apart.

use http::{HeaderMap, header};

/// Whether `headers` say `text/event-stream` (media types are
/// case-insensitive: `Text/Event-Stream` is one too).
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    const SSE: &[u8] = b"text/event-stream";
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes().trim_ascii_start();
        v.get(..SSE.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(SSE))
            && matches!(v.get(SSE.len()), None | Some(b';' | b' ' | b'\t'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_streams_in_any_case() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_event_stream(&h)
        };
        assert!(with("text/event-stream"));
        assert!(with("Text/Event-Stream; charset=utf-8"));
        assert!(with(" text/event-stream"));
        assert!(!with("text/event-streamx"));
        assert!(!with("application/json"));
        assert!(!is_event_stream(&HeaderMap::new()));
    }
}
