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

/// How much of an answer's start a layer reads at most to tell a stream
/// of events from JSON ([`events_start`]): a start of whitespace only past
/// it is no stream of events.
pub const MAX_SNIFF_BYTES: usize = 64 << 10;

/// Whether `start`, the first bytes of an answer, begins as an SSE stream
/// does, after a byte order mark and blank lines: with a field of the
/// stream (`data:`, `event:`, `id:`, `retry:`) or a comment (`:`). `None`:
/// too few bytes yet to tell. A JSON answer begins with `{`.
pub fn events_start(start: &[u8]) -> Option<bool> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    const STARTS: [&[u8]; 5] = [b"data:", b"event:", b"id:", b"retry:", b":"];
    if BOM.starts_with(start) {
        return None;
    }
    let rest = start.strip_prefix(BOM).unwrap_or(start).trim_ascii_start();
    if STARTS.iter().any(|s| rest.starts_with(s)) {
        Some(true)
    } else if rest.is_empty() || STARTS.iter().any(|s| s.starts_with(rest)) {
        None
    } else {
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_told_by_its_first_line() {
        for events in [
            &b"data: {}"[..],
            b"\n\r\ndata:{}",
            b"event: message_start",
            b": ping",
            b"id: 1",
            b"retry: 10",
            b"\xEF\xBB\xBFdata: {}",
        ] {
            assert_eq!(events_start(events), Some(true), "{events:?}");
        }
        for not in [
            &b"{\"id\""[..],
            b"  [1]",
            b"<html>",
            b"data {}",
            b"dat\n",
            b"\xEF\xBBx",
        ] {
            assert_eq!(events_start(not), Some(false), "{not:?}");
        }
        // Too little yet: a stream's start so far, or blank.
        for undecided in [
            &b""[..],
            b"\xEF\xBB",
            b"\r\n  ",
            b"da",
            b"\nevent",
            b"retry",
        ] {
            assert_eq!(events_start(undecided), None, "{undecided:?}");
        }
    }

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
