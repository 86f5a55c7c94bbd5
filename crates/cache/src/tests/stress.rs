//! Many readers of one flight on a multi-threaded runtime, pausing,
//! stalling and leaving at random; and the leader's client leaving at every
//! point of a stream. No reader hangs, none gets a frame lost, repeated or
//! out of order, a broken answer is never stored, a whole one is, and no
//! upstream body outlives its readers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::fake::{answer_json, stream_frames};
use super::*;

/// xorshift64: reproducible rounds without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How one reader's read ended, with the frames it got.
#[derive(Debug)]
enum Outcome {
    Whole(Vec<Bytes>),
    Failed(Vec<Bytes>),
    Left(Vec<Bytes>),
}

/// A client that reads at a random pace, may stall once, may leave, and
/// stops where hyper stops a body of known length.
async fn reader(
    svc: Svc,
    body: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    seed: u64,
) -> Outcome {
    let mut rng = Rng(seed | 1);
    // Boxed as `Send`: the compiler cannot prove the oneshot's future is
    // for every lifetime of the service's body error.
    let call: std::pin::Pin<Box<dyn Future<Output = _> + Send>> =
        Box::pin(svc.oneshot(chat(body, &headers)));
    let response = call.await.unwrap();
    let mut body = response.into_body();
    let leave_after = (rng.below(4) == 0).then(|| rng.below(8) as usize);
    let stall_at = (rng.below(3) == 0).then(|| rng.below(8) as usize);
    let mut frames = Vec::new();
    loop {
        if stall_at == Some(frames.len()) {
            tokio::time::sleep(Duration::from_millis(15 + rng.below(20))).await;
        }
        if leave_after == Some(frames.len()) {
            return Outcome::Left(frames);
        }
        match rng.below(3) {
            0 => {}
            1 => tokio::task::yield_now().await,
            _ => tokio::time::sleep(Duration::from_micros(rng.below(3000))).await,
        }
        if http_body::Body::is_end_stream(&body) {
            return Outcome::Whole(frames);
        }
        match body.frame().await {
            None => return Outcome::Whole(frames),
            Some(Ok(frame)) => frames.push(frame.into_data().unwrap()),
            Some(Err(_)) => return Outcome::Failed(frames),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_readers_of_one_flight_get_the_answer_or_a_prefix_of_it() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..100 {
        // A window of 200 bytes: followers wait for the leader's client,
        // and the answer is too large to store.
        let small = rng.below(3) == 0;
        let h = harness(CacheConfig {
            max_entry_bytes: if small { 200 } else { 1 << 20 },
            ..CacheConfig::default()
        });
        let json = rng.below(3) == 0;
        let broken = !json && rng.below(4) == 0;
        let body = if json { CHAT } else { STREAM };
        let frame_ms = if rng.below(2) == 0 { "1" } else { "0" };
        let mut headers = vec![("x-fake-frame-ms", frame_ms)];
        if broken {
            headers.push(("x-fake", "break"));
        }
        if json {
            headers.extend([("x-fake", "whole"), ("x-fake-head-ms", "2")]);
        }
        let mut tasks = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let (svc, headers, seed) = (h.svc.clone(), headers.clone(), rng.next());
            let late = Duration::from_millis(rng.below(4));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(late).await;
                reader(svc, body, headers, seed).await
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            let outcome = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a reader hung"))
                .unwrap();
            outcomes.push(outcome);
        }
        // Each reader got answer `n` (of the calls made), whole or a part.
        let answer = |n: usize| {
            let frames = match json {
                true => vec![Bytes::from(answer_json(n).to_string())],
                false => stream_frames(n, false),
            };
            match broken {
                true => frames[..2].to_vec(),
                false => frames,
            }
        };
        let of_answer = |frames: &[Bytes], whole: bool| {
            (1..=h.calls()).any(|n| {
                let all = answer(n);
                match whole {
                    true => frames == all.as_slice(),
                    false => all.starts_with(frames),
                }
            })
        };
        for outcome in &outcomes {
            let fine = match outcome {
                Outcome::Whole(frames) => !broken && of_answer(frames, true),
                // Cut past the window (too large to share), or broken.
                Outcome::Failed(frames) => of_answer(frames, !small),
                Outcome::Left(frames) => of_answer(frames, false),
            };
            assert!(
                fine,
                "round {round} (small {small}, broken {broken}): {outcome:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        let next = h
            .send(chat(body, if json { &[("x-fake", "whole")] } else { &[] }))
            .await;
        if broken {
            assert_eq!(
                next.cache(),
                "miss",
                "round {round}: a broken answer stored"
            );
        } else if !small && outcomes.iter().any(|o| matches!(o, Outcome::Whole(_))) {
            assert_eq!(
                next.cache(),
                "hit",
                "round {round}: a whole answer not stored"
            );
        }
        assert_eq!(
            h.fake.live(),
            0,
            "round {round}: an upstream body outlived its readers"
        );
    }
}

/// The leader's client leaves after `k` frames (0: before its first poll),
/// keeping up with its follower or behind it, with room in its queue or
/// not: the follower gets the whole stream, the upstream is neither
/// cancelled nor kept, and the answer is stored unless too large.
#[tokio::test(start_paused = true)]
async fn the_leaders_client_may_leave_at_any_point() {
    for k in 0..=8usize {
        for behind in [false, true] {
            for window in [1 << 20, 300] {
                let case = format!("k {k}, behind {behind}, window {window}");
                let h = harness(CacheConfig {
                    max_entry_bytes: window,
                    ..CacheConfig::default()
                });
                let paced = [("x-fake-frame-ms", "3")];
                let leader = h.svc.clone().oneshot(chat(STREAM, &paced)).await.unwrap();
                let follower = h.svc.clone().oneshot(chat(STREAM, &paced)).await.unwrap();
                let (mut leader, mut follower) = (leader.into_body(), follower.into_body());
                let mut followed = Vec::new();
                for _ in 0..k {
                    if behind {
                        // The follower reads ahead of the leader's client.
                        let ahead = tokio::time::timeout(50 * MS, follower.frame()).await;
                        if let Ok(Some(frame)) = ahead {
                            followed.push(frame.unwrap().into_data().unwrap());
                        }
                    }
                    if !matches!(leader.frame().await, Some(Ok(_))) {
                        break;
                    }
                }
                drop(leader);
                while let Some(frame) =
                    tokio::time::timeout(Duration::from_secs(5), follower.frame())
                        .await
                        .expect("the follower reads on")
                {
                    followed.push(frame.unwrap().into_data().unwrap());
                }
                drop(follower);
                tokio::time::sleep(50 * MS).await;
                assert_eq!(followed, stream_frames(1, false), "{case}");
                assert_eq!((h.fake.live(), h.fake.cancelled()), (0, 0), "{case}");
                let stored = if window > 1000 { "hit" } else { "miss" };
                assert_eq!(h.send(chat(STREAM, &[])).await.cache(), stored, "{case}");
            }
        }
    }
}

const MS: Duration = Duration::from_millis(1);
