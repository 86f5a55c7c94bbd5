//! Responses and Messages: cached when stateless, replayed byte for byte in
//! their own dialect, never stored when they did not end cleanly.

use std::time::Duration;

use super::fake::{Behaviour, messages_frames, messages_json, responses_frames, responses_json};
use super::*;

const RESPONSES: &str = "/v1/responses";
const MESSAGES: &str = "/v1/messages";

const STATELESS: &str = r#"{"model":"m","store":false,"input":"hi"}"#;
const STATELESS_STREAM: &str = r#"{"model":"m","store":false,"stream":true,"input":"hi"}"#;
const MESSAGE: &str =
    r#"{"model":"m","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
const MESSAGE_STREAM: &str =
    r#"{"model":"m","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

const ANTHROPIC: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

fn responses(body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    post(RESPONSES, body, headers)
}

fn messages(body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut all = ANTHROPIC.to_vec();
    all.extend_from_slice(headers);
    post(MESSAGES, body, &all)
}

fn json_bytes(value: serde_json::Value) -> Bytes {
    Bytes::from(value.to_string())
}

#[tokio::test]
async fn stateless_responses_miss_then_hit_with_the_same_bytes() {
    let h = harness(CacheConfig::default());
    let first = h.send(responses(STATELESS, &[])).await;
    assert_eq!((first.status, first.cache()), (StatusCode::OK, "miss"));
    assert_eq!(
        first.body(),
        json_bytes(responses_json(1, Behaviour::Normal))
    );
    let second = h.send(responses(STATELESS, &[])).await;
    assert_eq!((second.status, second.cache()), (StatusCode::OK, "hit"));
    assert_eq!(second.body(), first.body(), "the original id and usage");
    assert_eq!(second.headers["content-type"], "application/json");
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn stateless_responses_stream_miss_then_hit_replays_the_same_frames() {
    let h = harness(CacheConfig::default());
    let first = h.send(responses(STATELESS_STREAM, &[])).await;
    assert_eq!(first.cache(), "miss");
    assert_eq!(first.frames, responses_frames(1, Behaviour::Normal));
    // No usage logic of chat: the request went upstream as the client sent it.
    let sent = &h.fake.bodies()[0];
    let expected: serde_json::Value = serde_json::from_str(STATELESS_STREAM).unwrap();
    assert_eq!(sent, &expected);
    let second = h.send(responses(STATELESS_STREAM, &[])).await;
    assert_eq!(second.cache(), "hit");
    assert_eq!(
        second.frames, first.frames,
        "frame for frame, event lines and all"
    );
    assert_eq!(second.headers["content-type"], "text/event-stream");
    // A client that sends `stream_options` asks something else (they hold
    // `include_obfuscation`): its own entry.
    let options = r#"{"model":"m","store":false,"stream":true,"input":"hi","stream_options":{"include_obfuscation":false}}"#;
    assert_eq!(h.send(responses(options, &[])).await.cache(), "miss");
    assert_eq!(h.calls(), 2);
    assert_eq!(h.stats.snapshot().stored, 2);
}

#[tokio::test]
async fn stateful_responses_bypass_the_cache() {
    let h = harness(CacheConfig::default());
    let stateful = [
        r#"{"model":"m","input":"hi"}"#,
        r#"{"model":"m","store":true,"input":"hi"}"#,
        r#"{"model":"m","store":null,"input":"hi"}"#,
        r#"{"model":"m","store":"false","input":"hi"}"#,
        r#"{"model":"m","store":false,"previous_response_id":"resp_0","input":"hi"}"#,
        r#"{"model":"m","store":false,"background":true,"input":"hi"}"#,
        r#"{"model":"m","store":false,"conversation":"conv_1","input":"hi"}"#,
        r#"{"model":"m","stream":true,"input":"hi"}"#,
        r#"{"model":"m","stream":true,"store":false,"previous_response_id":"resp_0","input":"hi"}"#,
        r#"{"model":"m","store":false,"input":[{"type":"item_reference","id":"msg_1"}]}"#,
        // A reference may leave its type out.
        r#"{"model":"m","store":false,"input":[{"id":"msg_1"}]}"#,
        r#"{"model":"m","store":false,"input":[{"type":null,"id":"msg_1"}]}"#,
    ];
    for body in stateful {
        for _ in 0..2 {
            let answer = h.send(responses(body, &[])).await;
            assert_eq!(
                (answer.status, answer.cache()),
                (StatusCode::OK, "bypass"),
                "{body}"
            );
        }
    }
    assert_eq!(h.calls(), 2 * stateful.len());
    let stats = h.stats.snapshot();
    assert_eq!(
        (stats.bypasses, stats.stored),
        (2 * stateful.len() as u64, 0)
    );
    // Explicitly absent state is stateless.
    let nulls = r#"{"model":"m","store":false,"previous_response_id":null,"conversation":null,"background":false,"input":"hi"}"#;
    assert_eq!(h.send(responses(nulls, &[])).await.cache(), "miss");
    assert_eq!(h.send(responses(nulls, &[])).await.cache(), "hit");
    // A message without a `type` is no reference, with or without an id.
    for message in [
        r#"{"model":"m","store":false,"input":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"m","store":false,"input":[{"id":"msg_2","role":"user","content":"hi"}]}"#,
    ] {
        assert_eq!(h.send(responses(message, &[])).await.cache(), "miss");
        assert_eq!(h.send(responses(message, &[])).await.cache(), "hit");
    }
}

#[tokio::test]
async fn messages_miss_then_hit_with_the_same_bytes() {
    let h = harness(CacheConfig::default());
    let first = h.send(messages(MESSAGE, &[])).await;
    assert_eq!((first.status, first.cache()), (StatusCode::OK, "miss"));
    assert_eq!(first.body(), json_bytes(messages_json(1)));
    let second = h.send(messages(MESSAGE, &[])).await;
    assert_eq!((second.status, second.cache()), (StatusCode::OK, "hit"));
    assert_eq!(second.body(), first.body());
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn only_if_cached_misses_are_504_in_the_dialect_of_the_route() {
    let h = harness(CacheConfig::default());
    let only = [("cache-control", "only-if-cached")];
    let miss = h.send(messages(MESSAGE, &only)).await;
    assert_eq!((miss.status.as_u16(), miss.cache()), (504, "miss"));
    let json = miss.json();
    assert_eq!(
        (&json["type"], &json["error"]["type"]),
        (&"error".into(), &"timeout_error".into())
    );
    assert_eq!(h.calls(), 0);
    h.send(messages(MESSAGE, &[])).await;
    let hit = h.send(messages(MESSAGE, &only)).await;
    assert_eq!((hit.status.as_u16(), hit.cache()), (200, "hit"));
    assert_eq!(hit.body(), json_bytes(messages_json(1)));
}

#[tokio::test]
async fn messages_stream_miss_then_hit_replays_the_same_frames() {
    let h = harness(CacheConfig::default());
    let first = h.send(messages(MESSAGE_STREAM, &[])).await;
    assert_eq!(first.cache(), "miss");
    assert_eq!(first.frames, messages_frames(1, Behaviour::Normal));
    let expected: serde_json::Value = serde_json::from_str(MESSAGE_STREAM).unwrap();
    assert_eq!(&h.fake.bodies()[0], &expected, "sent unchanged");
    let second = h.send(messages(MESSAGE_STREAM, &[])).await;
    assert_eq!(second.cache(), "hit");
    assert_eq!(
        second.frames, first.frames,
        "frame for frame, event lines and all"
    );
    assert_eq!(second.headers["content-type"], "text/event-stream");
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn failed_incomplete_and_broken_responses_streams_are_not_stored() {
    let h = harness(CacheConfig::default());
    for behaviour in ["failed", "incomplete", "error-event", "break", "no-done"] {
        let answer = h
            .send(responses(STATELESS_STREAM, &[("x-fake", behaviour)]))
            .await;
        assert_eq!((answer.status, answer.cache()), (StatusCode::OK, "miss"));
        assert_eq!(answer.error.is_some(), behaviour == "break", "{behaviour}");
    }
    let ended = h
        .send(responses(STATELESS_STREAM, &[("x-fake", "failed")]))
        .await;
    let last = String::from_utf8(ended.frames.last().unwrap().to_vec()).unwrap();
    assert!(last.starts_with("event: response.failed\n"), "{last}");
    assert_eq!(h.stats.snapshot().stored, 0);
    assert_eq!(
        h.send(responses(STATELESS_STREAM, &[])).await.cache(),
        "miss"
    );
    assert_eq!(
        h.send(responses(STATELESS_STREAM, &[])).await.cache(),
        "hit"
    );
    assert_eq!(h.calls(), 7);
    assert_eq!(h.stats.snapshot().not_stored, 6);
}

#[tokio::test]
async fn failed_and_incomplete_responses_are_not_stored() {
    let h = harness(CacheConfig::default());
    for behaviour in ["incomplete", "failed", "invalid-json", "break", "500"] {
        let answer = h.send(responses(STATELESS, &[("x-fake", behaviour)])).await;
        assert_eq!(answer.cache(), "miss", "{behaviour}");
    }
    let incomplete = h
        .send(responses(STATELESS, &[("x-fake", "incomplete")]))
        .await;
    assert_eq!(incomplete.json()["status"], "incomplete");
    assert_eq!(h.send(responses(STATELESS, &[])).await.cache(), "miss");
    assert_eq!(h.send(responses(STATELESS, &[])).await.cache(), "hit");
    let stats = h.stats.snapshot();
    assert_eq!((stats.stored, stats.not_stored), (1, 6));
}

#[tokio::test]
async fn broken_and_error_messages_streams_are_not_stored() {
    let h = harness(CacheConfig::default());
    for behaviour in ["error-event", "break", "no-done", "529"] {
        let answer = h
            .send(messages(MESSAGE_STREAM, &[("x-fake", behaviour)]))
            .await;
        assert_eq!(answer.cache(), "miss", "{behaviour}");
    }
    assert_eq!(h.stats.snapshot().stored, 0);
    assert_eq!(h.send(messages(MESSAGE_STREAM, &[])).await.cache(), "miss");
    assert_eq!(h.send(messages(MESSAGE_STREAM, &[])).await.cache(), "hit");
    assert_eq!(h.calls(), 5);
    assert_eq!(h.stats.snapshot().not_stored, 4);
}

#[tokio::test]
async fn dialects_with_equal_bodies_never_share_entries() {
    let h = harness(CacheConfig::default());
    let body = r#"{"model":"m","store":false,"max_tokens":16,"input":"hi","messages":[{"role":"user","content":"hi"}]}"#;
    let requests = || {
        [
            chat(body, ANTHROPIC),
            responses(body, ANTHROPIC),
            messages(body, &[]),
        ]
    };
    for request in requests() {
        assert_eq!(h.send(request).await.cache(), "miss");
    }
    let answers: Vec<_> = {
        let mut answers = Vec::new();
        for request in requests() {
            answers.push(h.send(request).await);
        }
        answers
    };
    assert!(answers.iter().all(|a| a.cache() == "hit"));
    assert_eq!(answers[0].json()["object"], "chat.completion");
    assert_eq!(answers[1].json()["object"], "response");
    assert_eq!(answers[2].json()["type"], "message");
    assert_eq!(h.calls(), 3);
}

#[tokio::test]
async fn messages_keys_leave_out_metadata_user_id_and_keep_the_anthropic_headers() {
    let h = harness(CacheConfig::default());
    let with_user = |user: &str| {
        format!(
            r#"{{"model":"m","max_tokens":16,"metadata":{{"user_id":"{user}"}},"messages":[{{"role":"user","content":"hi"}}]}}"#
        )
    };
    assert_eq!(
        h.send(messages(&with_user("alice"), &[])).await.cache(),
        "miss"
    );
    assert_eq!(
        h.send(messages(&with_user("bob"), &[])).await.cache(),
        "hit"
    );
    // `metadata: {}` is not the same as no `metadata`: the body says so.
    assert_eq!(h.send(messages(MESSAGE, &[])).await.cache(), "miss");
    let beta = [("anthropic-beta", "output-128k-2025-02-19")];
    assert_eq!(h.send(messages(MESSAGE, &beta)).await.cache(), "miss");
    assert_eq!(h.send(messages(MESSAGE, &beta)).await.cache(), "hit");
    let version = post(MESSAGES, MESSAGE, &[("anthropic-version", "2023-01-01")]);
    assert_eq!(h.send(version).await.cache(), "miss");
    assert_eq!(h.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn coalesced_responses_and_messages_streams_get_the_leaders_frames() {
    let h = harness(CacheConfig::default());
    const SLOW: &[(&str, &str)] = &[("x-fake-frame-ms", "10")];
    for (request, frames) in [
        (
            (|| responses(STATELESS_STREAM, SLOW)) as fn() -> Request<Body>,
            responses_frames(1, Behaviour::Normal),
        ),
        (
            || messages(MESSAGE_STREAM, SLOW),
            messages_frames(2, Behaviour::Normal),
        ),
    ] {
        let leader = {
            let (svc, fake, stats) = (h.svc.clone(), h.fake.clone(), h.stats.clone());
            tokio::spawn(async move { Harness { svc, fake, stats }.send(request()).await })
        };
        tokio::time::sleep(Duration::from_millis(15)).await;
        let follower = h.send(request()).await;
        let leader = leader.await.unwrap();
        assert_eq!((leader.cache(), follower.cache()), ("miss", "hit"));
        assert_eq!(leader.frames, frames);
        assert_eq!(follower.frames, frames);
    }
    assert_eq!(h.calls(), 2);
}
