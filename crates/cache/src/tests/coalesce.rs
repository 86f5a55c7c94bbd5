//! Concurrent identical requests: one upstream call, live chunks, leader
//! failure, `max_wait`, a leader whose client leaves.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::fake::{Behaviour, answer_json, stream_frames};
use super::*;

const MS: Duration = Duration::from_millis(1);

/// Send `body` from a task of its own, collecting the whole answer.
fn spawn(
    h: &Harness,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
) -> JoinHandle<Answer> {
    let svc = h.svc.clone();
    let stats = h.stats.clone();
    let fake = h.fake.clone();
    tokio::spawn(async move {
        let h = Harness { svc, fake, stats };
        h.send(chat(body, headers)).await
    })
}

async fn all(tasks: Vec<JoinHandle<Answer>>) -> Vec<Answer> {
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test(start_paused = true)]
async fn eight_identical_requests_reach_the_upstream_once() {
    let h = harness(CacheConfig::default());
    h.fake.script(&[(Behaviour::Normal, 50 * MS)]);
    let answers = all((0..8).map(|_| spawn(&h, CHAT, &[])).collect()).await;
    assert_eq!(h.calls(), 1);
    for answer in &answers {
        assert_eq!(
            (answer.status, answer.json()),
            (StatusCode::OK, answer_json(1))
        );
    }
    let mut labels: Vec<_> = answers.iter().map(Answer::cache).collect();
    labels.sort();
    assert_eq!(
        labels,
        ["hit"; 7]
            .iter()
            .chain(&["miss"])
            .copied()
            .collect::<Vec<_>>()
    );
    let stats = h.stats.snapshot();
    assert_eq!(
        (stats.misses, stats.hits, stats.coalesced, stats.stored),
        (1, 7, 7, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn eight_identical_streams_share_one_call_and_receive_it_live() {
    let h = harness(CacheConfig::default());
    let slow = &[("x-fake-head-ms", "20"), ("x-fake-frame-ms", "5")];
    let tasks: Vec<_> = (0..8)
        .map(|i| spawn(&h, if i % 2 == 0 { STREAM } else { STREAM_USAGE }, slow))
        .collect();
    let answers = all(tasks).await;
    assert_eq!(h.calls(), 1);
    for (i, answer) in answers.iter().enumerate() {
        let asked = i % 2 == 1;
        assert_eq!(
            answer.body(),
            Bytes::from(stream_frames(1, asked).concat()),
            "{i}"
        );
        assert!(answer.error.is_none());
    }
    // Stored once, usage chunk included.
    let replay = h.send(chat(STREAM_USAGE, &[])).await;
    assert_eq!(
        (replay.cache(), &replay.frames),
        ("hit", &stream_frames(1, true))
    );
}

#[tokio::test(start_paused = true)]
async fn followers_receive_frames_before_the_leader_finishes() {
    let h = harness(CacheConfig::default());
    let leader = spawn(&h, STREAM, &[("x-fake-frame-ms", "100")]);
    tokio::time::sleep(MS).await;
    let response = h.svc.clone().oneshot(chat(STREAM, &[])).await.unwrap();
    assert_eq!(response.headers()["x-llm-proxy-cache"], "hit");
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, stream_frames(1, false)[0]);
    assert!(
        !leader.is_finished(),
        "the first chunk came before the stream ended"
    );
    leader.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn when_the_leader_fails_one_follower_retries() {
    let h = harness(CacheConfig::default());
    h.fake.script(&[(Behaviour::Status(500), 50 * MS)]);
    let answers = all((0..8).map(|_| spawn(&h, CHAT, &[])).collect()).await;
    assert_eq!(h.calls(), 2, "the failed call and one retry");
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].cache(), "miss");
    for answer in answers.iter().filter(|a| a.status == StatusCode::OK) {
        assert_eq!(answer.json(), answer_json(2));
    }
    // Seven requests waited, each counted once (six followed twice).
    let stats = h.stats.snapshot();
    assert_eq!((stats.coalesced, stats.misses), (7, 2));
}

#[tokio::test(start_paused = true)]
async fn when_the_leaders_client_leaves_before_the_head_a_follower_retries() {
    let h = harness(CacheConfig::default());
    h.fake.script(&[(Behaviour::Normal, 100 * MS)]);
    let leader = spawn(&h, CHAT, &[]);
    tokio::time::sleep(MS).await;
    let followers: Vec<_> = (0..3).map(|_| spawn(&h, CHAT, &[])).collect();
    tokio::time::sleep(10 * MS).await;
    leader.abort();
    let answers = all(followers).await;
    assert_eq!(h.calls(), 2);
    for answer in &answers {
        assert_eq!(
            (answer.status, answer.json()),
            (StatusCode::OK, answer_json(2))
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_follower_stops_waiting_after_max_wait() {
    let h = harness(CacheConfig {
        max_wait: 50 * MS,
        ..CacheConfig::default()
    });
    h.fake.script(&[(Behaviour::Normal, 1000 * MS)]);
    let leader = spawn(&h, CHAT, &[]);
    tokio::time::sleep(MS).await;
    let started = tokio::time::Instant::now();
    let follower = h.send(chat(CHAT, &[])).await;
    assert!(started.elapsed() < 100 * MS, "went upstream after max_wait");
    assert_eq!(
        (follower.cache(), follower.json()),
        ("miss", answer_json(2))
    );
    let leader = leader.await.unwrap();
    assert_eq!((leader.cache(), leader.json()), ("miss", answer_json(1)));
    assert_eq!(h.stats.snapshot().coalesced, 1);
}

/// A follower whose leaders fail one after another waits `max_wait` in
/// all, not `max_wait` for each of them.
#[tokio::test(start_paused = true)]
async fn max_wait_bounds_the_whole_wait_across_failed_leaders() {
    let h = harness(CacheConfig {
        max_wait: 50 * MS,
        ..CacheConfig::default()
    });
    h.fake.script(&[(Behaviour::Status(500), 45 * MS); 6]);
    let started = tokio::time::Instant::now();
    let answers = all((0..4).map(|_| spawn(&h, CHAT, &[])).collect()).await;
    assert!(
        started.elapsed() < 120 * MS,
        "answered after {:?}",
        started.elapsed()
    );
    assert!(
        answers
            .iter()
            .all(|a| a.status == StatusCode::INTERNAL_SERVER_ERROR)
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_goes_on_for_followers_when_the_leaders_client_leaves() {
    let h = harness(CacheConfig::default());
    let slow = [("x-fake-frame-ms", "10")];
    let response = h.svc.clone().oneshot(chat(STREAM, &slow)).await.unwrap();
    let follower = spawn(&h, STREAM, &[]);
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    tokio::time::sleep(MS).await;
    drop(body);
    let follower = follower.await.unwrap();
    assert_eq!(follower.frames, stream_frames(1, false));
    assert!(follower.error.is_none());
    assert_eq!(h.fake.cancelled(), 0);
    // Read to its end for the follower, the answer was stored.
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "hit");
    assert_eq!(h.calls(), 1);
}

/// The rest of `body`'s frames.
async fn rest_of(mut body: llm_proxy_core::Body) -> Vec<bytes::Bytes> {
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    frames
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_client_stops_reading_holds_no_follower_back() {
    let h = harness(CacheConfig::default());
    let slow = [("x-fake-frame-ms", "10")];
    let response = h.svc.clone().oneshot(chat(STREAM, &slow)).await.unwrap();
    let follower = spawn(&h, STREAM, &[]);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    // The leader's client reads nothing more for now (its body is not
    // polled): the follower reads the upstream itself, to the end.
    let follower = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .expect("the follower is not held back by the leader's client")
        .unwrap();
    assert_eq!(follower.frames, stream_frames(1, false));
    assert!(follower.error.is_none());
    // Stored at the end, read by the follower.
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "hit");
    // What the follower read waited for the leader's client, none lost.
    let mut leader = vec![first];
    leader.extend(rest_of(body).await);
    assert_eq!(leader, stream_frames(1, false));
    assert_eq!(h.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn followers_wait_for_a_slow_leader_only_past_its_queue() {
    let frames = stream_frames(1, false);
    // Room for the frames of about two reads in the leader's queue.
    let window = frames[1].len() + frames[2].len();
    let h = harness(CacheConfig {
        max_entry_bytes: window,
        ..CacheConfig::default()
    });
    let response = h.svc.clone().oneshot(chat(STREAM, &[])).await.unwrap();
    let follower = spawn(&h, STREAM, &[]);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    tokio::time::sleep(100 * MS).await;
    assert!(!follower.is_finished(), "held at the leader's full queue");
    let mut leader = vec![first];
    leader.extend(rest_of(body).await);
    assert_eq!(leader, frames);
    let follower = follower.await.unwrap();
    assert_eq!(follower.frames, frames);
    assert!(follower.error.is_none());
    assert_eq!(h.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_whole_answer_its_followers_read_after_the_leader_left_is_stored() {
    let h = harness(CacheConfig::default());
    let whole = [("x-fake", "whole"), ("x-fake-head-ms", "10")];
    let leader = tokio::spawn(h.svc.clone().oneshot(chat(CHAT, &whole)));
    tokio::time::sleep(MS).await;
    let follower = tokio::spawn(h.svc.clone().oneshot(chat(CHAT, &whole)));
    let leader = leader.await.unwrap().unwrap();
    let follower = follower.await.unwrap().unwrap();
    // The leader's client leaves before the body; the follower reads it as
    // hyper reads a body of known length: to its last byte, then drops it
    // without polling for the end.
    drop(leader);
    assert_eq!(
        read_as_hyper_does(follower.into_body()).await,
        answer_json(1)
    );
    assert_eq!(h.send(chat(CHAT, &whole)).await.cache(), "hit");
    assert_eq!(h.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_leader_pauses_before_an_error_whose_pause_a_follower_took() {
    // hyper drops the frames it holds when a body fails without a pause
    // first (the flush pause): the leader's client must get one even when
    // a follower's read met the upstream's own pause before its error.
    use http_body::Body as _;
    use std::task::{Context, Poll, Waker};
    let h = harness(CacheConfig::default());
    let broken = [("x-fake", "break"), ("x-fake-head-ms", "10")];
    let leader = tokio::spawn(h.svc.clone().oneshot(chat(STREAM, &broken)));
    tokio::time::sleep(MS).await;
    let follower = tokio::spawn(h.svc.clone().oneshot(chat(STREAM, &broken)));
    let mut leader = leader.await.unwrap().unwrap().into_body();
    let mut follower = follower.await.unwrap().unwrap().into_body();
    let mut cx = Context::from_waker(Waker::noop());
    let mut poll =
        |body: &mut llm_proxy_core::Body| match std::pin::Pin::new(body).poll_frame(&mut cx) {
            Poll::Pending => "pending",
            Poll::Ready(Some(Ok(_))) => "frame",
            Poll::Ready(Some(Err(_))) => "error",
            Poll::Ready(None) => "end",
        };
    tokio::time::sleep(MS).await;
    assert_eq!(poll(&mut leader), "frame");
    tokio::time::sleep(MS).await;
    // The follower reads the first frame, then the second for both.
    assert_eq!(poll(&mut follower), "frame");
    assert_eq!(poll(&mut follower), "frame");
    tokio::time::sleep(MS).await;
    // Its next read meets the upstream's pause before the error.
    assert_eq!(poll(&mut follower), "pending");
    assert_eq!(poll(&mut leader), "frame");
    assert_eq!(poll(&mut leader), "pending", "paused before the error");
    assert_eq!(poll(&mut leader), "error");
    assert_eq!(poll(&mut leader), "end");
    assert_eq!(h.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_upstream_is_cancelled_once_nobody_reads() {
    let h = harness(CacheConfig::default());
    let slow = [("x-fake-frame-ms", "10")];
    let leader = h.svc.clone().oneshot(chat(STREAM, &slow)).await.unwrap();
    let follower = h.svc.clone().oneshot(chat(STREAM, &slow)).await.unwrap();
    let (mut leader, mut follower) = (leader.into_body(), follower.into_body());
    leader.frame().await.unwrap().unwrap();
    follower.frame().await.unwrap().unwrap();
    drop(leader);
    follower.frame().await.unwrap().unwrap();
    drop(follower);
    tokio::time::sleep(100 * MS).await;
    assert_eq!(h.fake.cancelled(), 1);
    assert_eq!(h.send(chat(STREAM, &[])).await.cache(), "miss");
}

#[tokio::test(start_paused = true)]
async fn followers_of_a_broken_stream_get_the_same_bytes_then_the_error() {
    let h = harness(CacheConfig::default());
    let broken: &[(&str, &str)] = &[("x-fake", "break"), ("x-fake-frame-ms", "10")];
    let leader = spawn(
        &h,
        STREAM,
        &[("x-fake", "break"), ("x-fake-frame-ms", "10")],
    );
    tokio::time::sleep(MS).await;
    let follower = h.send(chat(STREAM, broken)).await;
    let leader = leader.await.unwrap();
    assert_eq!(follower.frames, leader.frames);
    assert!(leader.error.is_some() && follower.error.is_some());
    assert_eq!(h.calls(), 1);
}

/// A memory store whose lookups take 50 ms and are counted.
#[derive(Clone)]
struct SlowStore {
    inner: Arc<MemoryStore>,
    gets: Arc<std::sync::atomic::AtomicUsize>,
}

impl Store for SlowStore {
    fn get(&self, key: crate::CacheKey) -> crate::StoreFuture<'_, Option<crate::Entry>> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(50 * MS).await;
            self.inner.get(key).await
        })
    }

    fn put(
        &self,
        key: crate::CacheKey,
        entry: crate::Entry,
        ttl: Duration,
    ) -> crate::StoreFuture<'_, ()> {
        self.inner.put(key, entry, ttl)
    }

    fn kind(&self) -> &'static str {
        "slow"
    }
}

impl Default for SlowStore {
    fn default() -> Self {
        SlowStore {
            inner: Arc::new(MemoryStore::new(100, 1 << 20)),
            gets: Arc::default(),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn identical_requests_share_one_store_lookup() {
    let store = SlowStore::default();
    let h = harness_with(CacheConfig::default(), store.clone());
    h.send(chat(STREAM, &[])).await;
    let gets = || store.gets.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(gets(), 1);
    let answers = all((0..4).map(|_| spawn(&h, STREAM, &[])).collect()).await;
    assert_eq!(gets(), 2, "one lookup for the four");
    for answer in &answers {
        assert_eq!(
            (answer.cache(), &answer.frames),
            ("hit", &stream_frames(1, false))
        );
    }
    assert_eq!(h.calls(), 1);
    assert_eq!(h.stats.snapshot().coalesced, 3);
}

#[tokio::test(start_paused = true)]
async fn a_follower_too_strict_for_the_stored_answer_goes_upstream() {
    let store = SlowStore::default();
    let h = harness_with(CacheConfig::default(), store.clone());
    h.send(chat(CHAT, &[])).await;
    tokio::time::advance(Duration::from_secs(30)).await;
    let lenient = spawn(&h, CHAT, &[]);
    tokio::time::sleep(MS).await;
    let strict = h.send(chat(CHAT, &[("cache-control", "max-age=10")])).await;
    assert_eq!((strict.cache(), strict.json()), ("miss", answer_json(2)));
    let lenient = lenient.await.unwrap();
    assert_eq!((lenient.cache(), lenient.json()), ("hit", answer_json(1)));
    assert_eq!(lenient.headers["age"], "30");
}

#[tokio::test(start_paused = true)]
async fn a_fallback_models_answer_is_shared_but_not_stored() {
    for body in [CHAT, STREAM] {
        let h = harness(CacheConfig::default());
        let fallback: &'static [(&str, &str)] =
            &[("x-fake-fallback", "small"), ("x-fake-head-ms", "50")];
        let answers = all((0..3).map(|_| spawn(&h, body, fallback)).collect()).await;
        assert_eq!(h.calls(), 1, "coalesced");
        for answer in &answers {
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.body(), answers[0].body(), "the leader's answer");
            assert_eq!(answer.error, None);
        }
        assert!(!answers[0].body().is_empty());
        let stats = h.stats.snapshot();
        assert_eq!((stats.stored, stats.entries), (0, Some(0)), "{body}");
        // The next request asks the upstream again.
        let next = h.send(chat(body, &[])).await;
        assert_eq!(next.cache(), "miss");
        assert_eq!(h.calls(), 2);
        // An answer of the request's own model is stored as ever.
        assert_eq!(h.send(chat(body, &[])).await.cache(), "hit");
        assert_eq!(h.calls(), 2);
    }
}

/// An entry stored without a content type (its upstream sent none) is
/// served with its kind's usual one, to the request that found it and to
/// those that joined its lookup alike.
#[tokio::test(start_paused = true)]
async fn followers_of_a_lookup_get_the_hits_content_type() {
    let store = SlowStore::default();
    let h = harness_with(CacheConfig::default(), store.clone());
    let meta = llm_proxy_core::RequestMeta::parsed(
        llm_proxy_core::Endpoint::ChatCompletions,
        bytes::Bytes::from_static(STREAM.as_bytes()),
        serde_json::from_str(STREAM).unwrap(),
    );
    let key = crate::CacheKey::for_request(
        &meta,
        &http::HeaderMap::new(),
        None,
        crate::CacheScope::PerKey,
    )
    .unwrap();
    let entry = crate::Entry {
        stored_at_ms: crate::clock::now_ms(),
        content_type: None,
        body: crate::EntryBody::Stream {
            frames: stream_frames(1, false).into(),
            usage: crate::UsageChunk::Absent,
        },
    };
    store.inner.put_now(key, entry, Duration::from_secs(60));
    let answers = all((0..3).map(|_| spawn(&h, STREAM, &[])).collect()).await;
    for answer in &answers {
        assert_eq!(answer.cache(), "hit");
        assert_eq!(answer.headers["content-type"], "text/event-stream");
    }
    assert_eq!(h.stats.snapshot().coalesced, 2);
    assert_eq!(h.calls(), 0);
}

/// An answer that grows too large to store is shared no further: a request
/// arriving then makes its own upstream call instead of reading it from the
/// first frame, and one that joined before is cut once the frames kept for
/// it pass four times `max_entry_bytes`, so an upstream that streams for
/// ever cannot grow the buffer without bound.
#[tokio::test(start_paused = true)]
async fn an_answer_too_large_to_store_is_shared_only_so_far() {
    let h = harness(CacheConfig {
        max_entry_bytes: 100,
        ..CacheConfig::default()
    });
    let total: usize = stream_frames(1, false).iter().map(Bytes::len).sum();
    assert!(total > 400, "the stream outgrows the cap ({total} bytes)");
    let leader = spawn(&h, STREAM, &[("x-fake-frame-ms", "10")]);
    tokio::time::sleep(MS).await;
    let follower = spawn(&h, STREAM, &[]);
    // A few frames in: over 100 bytes, under 400.
    tokio::time::sleep(15 * MS).await;
    let late = spawn(&h, STREAM, &[]);
    let (leader, follower, late) = (
        leader.await.unwrap(),
        follower.await.unwrap(),
        late.await.unwrap(),
    );
    assert_eq!(leader.frames, stream_frames(1, false));
    assert!(leader.error.is_none());
    assert!(follower.error.is_some(), "cut past the cap: {follower:?}");
    assert!(late.error.is_none(), "{late:?}");
    assert_eq!(h.calls(), 2, "the late request made its own call");
}

/// A follower cut because the answer it reads passed the cap is a stream
/// broken mid-way, as DESIGN.md pins it: it ends with the
/// `stream_interrupted` error event (the frames it lost held no such
/// event), then the close, never a silent cut.
#[tokio::test(start_paused = true)]
async fn a_follower_cut_past_the_cap_gets_the_interrupted_event() {
    let h = harness(CacheConfig {
        max_entry_bytes: 100,
        ..CacheConfig::default()
    });
    let leader = spawn(&h, STREAM, &[("x-fake-frame-ms", "10")]);
    tokio::time::sleep(MS).await;
    let follower = spawn(&h, STREAM, &[]);
    let (leader, follower) = (leader.await.unwrap(), follower.await.unwrap());
    assert!(leader.error.is_none());
    assert!(follower.error.is_some(), "cut past the cap: {follower:?}");
    let last = follower.frames.last().unwrap();
    let data = sse_data(last);
    assert_eq!(data.len(), 1, "{last:?}");
    let event: serde_json::Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(event["error"]["code"], "stream_interrupted", "{event}");
    // Every frame before it is one the leader's client got too.
    let before = &follower.frames[..follower.frames.len() - 1];
    assert_eq!(before, &leader.frames[..before.len()]);
}

/// The `data:` payloads of an SSE text.
fn sse_data(bytes: &[u8]) -> Vec<String> {
    std::str::from_utf8(bytes)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}
