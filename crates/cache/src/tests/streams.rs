//! Streamed requests: replay with the same chunks, the usage chunk, what is
//! never stored.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tower::ServiceExt;

use super::fake::{stream_frames, usage_frame};
use super::*;
use crate::{CacheKey, Entry, EntryBody, UsageChunk};

#[tokio::test]
async fn streamed_miss_then_hit_replays_the_same_chunks() {
    let h = harness(CacheConfig::default());
    let first = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(first.cache(), "miss");
    assert_eq!(first.frames, stream_frames(1, true));
    let second = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(second.cache(), "hit");
    assert_eq!(second.frames, first.frames, "frame for frame");
    assert_eq!(second.headers["content-type"], "text/event-stream");
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn streamed_and_plain_requests_are_different_entries() {
    let h = harness(CacheConfig::default());
    h.send(chat(CHAT, &[])).await;
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "miss");
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn usage_chunk_is_stored_and_replayed_only_when_asked() {
    let h = harness(CacheConfig::default());
    let plain = h.send(chat(STREAM, &[])).await;
    // The cache asked the upstream for usage on the client's behalf ...
    assert_eq!(h.fake.bodies()[0]["stream_options"]["include_usage"], true);
    // ... and did not hand it to the client, which did not ask.
    assert_eq!(plain.frames, stream_frames(1, false));
    let replay = h.send(chat(STREAM, &[])).await;
    assert_eq!(
        (replay.cache(), &replay.frames),
        ("hit", &stream_frames(1, false))
    );
    let asked = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(
        (asked.cache(), &asked.frames),
        ("hit", &stream_frames(1, true))
    );
    assert!(asked.frames.contains(&usage_frame(1)));
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn a_stream_options_that_is_not_an_object_never_answers_one_that_asks_for_usage() {
    let h = harness(CacheConfig::default());
    // The cache cannot ask for the usage in it: stored without the chunk.
    let odd = STREAM_USAGE.replace(r#"{"include_usage":true}"#, "true");
    let first = h.send(chat(&odd, &[])).await;
    assert_eq!(
        (first.cache(), &first.frames),
        ("miss", &stream_frames(1, false))
    );
    assert_eq!(h.send(chat(&odd, &[])).await.cache(), "hit");
    // A client that asks for the usage is not answered from it.
    let asked = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(
        (asked.cache(), &asked.frames),
        ("miss", &stream_frames(2, true))
    );
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_its_request_unchanged() {
    let h = harness(CacheConfig::default());
    h.send(chat(STREAM_USAGE, &[])).await;
    let sent = &h.fake.bodies()[0];
    let expected: serde_json::Value = serde_json::from_str(STREAM_USAGE).unwrap();
    assert_eq!(sent, &expected);
}

#[tokio::test]
async fn usage_sharing_a_frame_is_filtered_on_replay() {
    let store = Arc::new(MemoryStore::new(100, 1 << 20));
    let h = harness_with(CacheConfig::default(), store.clone());
    // The key of a request without credentials, as the layer computes it.
    let meta = llm_proxy_core::RequestMeta::parsed(
        llm_proxy_core::Endpoint::ChatCompletions,
        Bytes::from_static(STREAM.as_bytes()),
        serde_json::from_str(STREAM).unwrap(),
    );
    let key =
        CacheKey::for_request(&meta, &HeaderMap::new(), None, crate::CacheScope::PerKey).unwrap();
    let frames = stream_frames(7, true);
    let (head, tail) = frames.split_at(frames.len() - 2);
    let mut stored: Vec<Bytes> = head.to_vec();
    stored.push(Bytes::from(tail.concat())); // usage and [DONE] in one frame
    let entry = Entry {
        stored_at_ms: crate::clock::now_ms(),
        content_type: None,
        body: EntryBody::Stream {
            frames: stored.into(),
            usage: UsageChunk::Inside,
        },
    };
    store.put_now(key, entry, Duration::from_secs(60));
    let replay = h.send(chat(STREAM, &[])).await;
    assert_eq!(replay.cache(), "hit");
    assert_eq!(replay.body(), Bytes::from(stream_frames(7, false).concat()));
    let asked = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(asked.body(), Bytes::from(stream_frames(7, true).concat()));
    assert_eq!(h.calls(), 0);
}

#[tokio::test]
async fn broken_and_unfinished_streams_are_not_stored() {
    let h = harness(CacheConfig::default());
    let broken = h.send(chat(STREAM, &[("x-fake", "break")])).await;
    assert_eq!(broken.frames.len(), 2);
    assert_eq!(broken.error.as_deref(), Some("upstream reset"));
    let unfinished = h.send(chat(STREAM, &[("x-fake", "no-done")])).await;
    assert!(unfinished.error.is_none());
    assert_eq!(
        h.send(chat(STREAM, &[("x-fake", "502")])).await.cache(),
        "miss"
    );
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "miss");
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "hit");
    assert_eq!(h.calls(), 4);
    assert_eq!(h.stats.snapshot().not_stored, 3);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_disconnects_early_leaves_nothing_stored() {
    let h = harness(CacheConfig::default());
    let response = h
        .svc
        .clone()
        .oneshot(chat(STREAM, &[("x-fake-frame-ms", "10")]))
        .await
        .unwrap();
    let mut body = response.into_body();
    for _ in 0..2 {
        body.frame().await.unwrap().unwrap();
    }
    drop(body);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.fake.cancelled(), 1, "the upstream's work was cancelled");
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "miss");
    assert_eq!(h.stats.snapshot().not_stored, 1);
}

#[tokio::test]
async fn an_upstream_that_refuses_stream_options_is_asked_again_without() {
    let h = harness(CacheConfig::default());
    let refuse = [("x-fake", "reject-stream-options")];
    let answer = h.send(chat(STREAM, &refuse)).await;
    assert_eq!((answer.status, answer.cache()), (StatusCode::OK, "miss"));
    assert_eq!(answer.frames, stream_frames(2, false));
    let bodies = h.fake.bodies();
    assert!(bodies[0].get("stream_options").is_some());
    assert!(bodies[1].get("stream_options").is_none());
    // Stored without a usage chunk, which a client that asks for it does
    // not get from that entry: it goes upstream with its own request (this
    // time taken, with the chunk), …
    let asked = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(asked.cache(), "miss");
    assert_eq!(asked.frames, stream_frames(3, true));
    // … while one that does not ask is answered from the cache.
    let plain = h.send(chat(STREAM, &[])).await;
    assert_eq!(plain.cache(), "hit");
}

#[tokio::test]
async fn a_400_about_something_else_reaches_the_upstream_once() {
    let h = harness(CacheConfig::default());
    for status in ["400", "422"] {
        let before = h.calls();
        let answer = h.send(chat(STREAM, &[("x-fake", status)])).await;
        assert_eq!(answer.status.as_str(), status);
        assert_eq!(answer.cache(), "miss");
        assert_eq!(
            answer.json(),
            serde_json::json!({"error": {"message": "no"}})
        );
        assert_eq!(h.calls() - before, 1, "{status}: not retried");
        let sent = h.fake.bodies();
        assert_eq!(sent.len(), h.calls());
        let last = &sent[sent.len() - 1];
        assert_eq!(last["stream_options"]["include_usage"], true);
    }
}
