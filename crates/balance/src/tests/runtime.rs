//! In-flight accounting, run-time changes, active health checks.

use std::sync::Arc;

use futures_util::stream;
use tower::ServiceExt;
use tower::discover::Change;
use tower_layer::Layer;

use super::*;
use crate::{BalanceLayer, HealthCheck, Strategy};

fn rr() -> BalanceConfig {
    BalanceConfig {
        strategy: Strategy::RoundRobin,
        ..BalanceConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn in_flight_lasts_until_the_body_is_dropped() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a"], rr());
    let h = b.handle();
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(
        stats(&h, "a").in_flight,
        1,
        "the head alone does not end a request"
    );
    drop(resp);
    assert_eq!(stats(&h, "a").in_flight, 0);
    // A request cancelled before its head releases too.
    fleet.set("a", Mode::Ok(secs(10)));
    let pending = tokio::spawn(b.clone().oneshot(chat("m", "y")));
    tokio::time::sleep(secs(1)).await;
    assert_eq!(stats(&h, "a").in_flight, 1);
    pending.abort();
    let _ = pending.await;
    assert_eq!(stats(&h, "a").in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn add_and_remove_with_a_request_in_flight() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a"], rr());
    let h = b.handle();
    let held = b.clone().oneshot(chat("m", "x")).await.unwrap();
    h.insert(fleet.backend("b"));
    assert!(h.remove("a"));
    assert!(!h.remove("a"));
    let names: Vec<String> = h.snapshot().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["b"]);
    let (_, body) = send(&b, chat("m", "y")).await.unwrap();
    assert_eq!(body, "b");
    // The removed backend's request finishes undisturbed; re-adding it while
    // the request is in flight keeps its count.
    h.insert(fleet.backend("a"));
    assert_eq!(stats(&h, "a").in_flight, 1);
    let text = held.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"a");
    assert_eq!(stats(&h, "a").in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn discover_changes_drive_the_set() {
    let fleet = Fleet::default();
    let b: Balance<Fake> = BalanceLayer::new(rr()).layer(vec![fleet.backend("a")]);
    let h = b.handle();
    let changes = stream::iter([
        Ok::<_, std::convert::Infallible>(Change::Insert(Arc::from("b"), fleet.backend("ignored"))),
        Ok(Change::Remove(Arc::from("a"))),
    ]);
    h.drive(changes).await.unwrap();
    let names: Vec<String> = h.snapshot().iter().map(|s| s.name.to_string()).collect();
    assert_eq!(names, ["b"], "the change's key names the backend");
    let err = send(&b, chat("m", "x")).await.map(|(s, _)| s);
    assert_eq!(err.unwrap(), 200);
    h.remove("b");
    let err = b.clone().oneshot(chat("m", "x")).await.unwrap_err();
    assert_eq!(err.code(), "model_not_found");
    let err = b
        .clone()
        .oneshot(Request::new(llm_proxy_core::empty()))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        "no_upstream_available",
        "nothing could be tried"
    );
}

fn checked(every: u64) -> BalanceConfig {
    BalanceConfig {
        health_check: Some(HealthCheck::every(secs(every))),
        eject_after_failures: 1,
        max_retries: 0,
        ..rr()
    }
}

/// Probes mark a backend down and up again, and a probe refused as busy
/// (429, or 503 with `retry-after`: shedding load) changes nothing. Told
/// not to end ejections, an ejection (requests failed) runs its course
/// whatever `/v1/models` says.
#[tokio::test(start_paused = true)]
async fn health_checks_mark_down_and_up_but_leave_ejections_to_run() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Refused);
    let mut cfg = checked(5);
    if let Some(check) = cfg.health_check.as_mut() {
        check.uneject = false;
    }
    let b = balance(&fleet, &["a", "b"], cfg);
    let h = b.handle();
    tokio::time::sleep(secs(1)).await;
    // The first round ran at start and marked `a` down.
    assert!(!stats(&h, "a").healthy);
    fleet.set("a", Mode::Ok(Duration::ZERO));
    tokio::time::sleep(secs(5)).await;
    assert!(stats(&h, "a").healthy, "a passing probe brings it back");
    // Busy, not down: a probe's 429 leaves it healthy.
    fleet.set("a", Mode::Status(429, None));
    tokio::time::sleep(secs(5)).await;
    assert!(stats(&h, "a").healthy, "a 429 probe is no failure");
    fleet.set("a", Mode::Status(503, Some("2")));
    tokio::time::sleep(secs(5)).await;
    assert!(stats(&h, "a").healthy, "nor is a 503 with retry-after");
    // A request failure ejects for 30 s; passing probes do not end that.
    fleet.set("a", Mode::Status(500, None));
    for i in 0..2 {
        let _ = send(&b, chat("m", &i.to_string())).await;
    }
    assert!(!stats(&h, "a").healthy);
    fleet.set("a", Mode::Ok(Duration::ZERO));
    tokio::time::sleep(secs(10)).await;
    assert!(
        !stats(&h, "a").healthy,
        "still resting after two passing probes"
    );
    tokio::time::sleep(secs(21)).await;
    assert!(stats(&h, "a").healthy, "back after its 30 s");
    assert!(fleet.probes() >= 14);
}

/// By default (as Envoy's `successful_active_health_check_uneject_host`),
/// the first probe that passes during an ejection ends it: a fleet whose
/// every backend was ejected is ready again once they answer, though no
/// request comes to end the ejections (a load balancer that reads
/// `/readyz` sends none while it says 503).
#[tokio::test(start_paused = true)]
async fn a_passing_probe_ends_an_ejection() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a", "b"], checked(5));
    let h = b.handle();
    tokio::time::sleep(secs(1)).await;
    fleet.set("a", Mode::Status(500, None));
    fleet.set("b", Mode::Status(500, None));
    for i in 0..2 {
        let _ = send(&b, chat("m", &i.to_string())).await;
    }
    assert!(!h.any_healthy(), "both ejected");
    // A probe sent while they still fail passes nothing.
    tokio::time::sleep(secs(5)).await;
    assert!(!h.any_healthy());
    fleet.set("a", Mode::Ok(Duration::ZERO));
    fleet.set("b", Mode::Ok(Duration::ZERO));
    tokio::time::sleep(secs(5)).await;
    assert!(stats(&h, "a").healthy && stats(&h, "b").healthy);
    assert!(h.any_healthy(), "ready again, 10 s into a 30 s rest");
}

/// A probe is judged by its answer's status: a 200 whose body is slow to
/// come (or never does) is a pass, however short the interval (the probe's
/// timeout and the body's drain were one second each, and the drain's ate
/// the probe's).
#[tokio::test(start_paused = true)]
async fn a_probe_answered_200_passes_whatever_its_body_does() {
    let fleet = Fleet::default();
    // The head comes half-way into the probe's second, so the body's
    // second of draining would run past it.
    fleet.set("a", Mode::Stalled(Duration::from_millis(500)));
    let b = balance(&fleet, &["a", "b"], checked(1));
    let h = b.handle();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(stats(&h, "a").healthy);
    }
    assert!(fleet.probes() >= 8, "{}", fleet.probes());
}

#[tokio::test(start_paused = true)]
async fn health_check_stops_with_the_balancer() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a"], checked(1));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let probes = fleet.probes();
    assert_eq!(probes, 3);
    drop(b);
    tokio::time::sleep(secs(10)).await;
    assert_eq!(
        fleet.probes(),
        probes,
        "no probe after the last clone is gone"
    );
}

/// A probe that times out says nothing against a backend that answered
/// requests while it waited: those answers are newer than the probe's
/// silence (a server busy with requests may be slow to list its models).
/// A probe that fails with nothing answered meanwhile still marks it down.
#[tokio::test(start_paused = true)]
async fn a_probe_timeout_does_not_mark_down_a_backend_that_answered_meanwhile() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::SlowProbes(secs(5)));
    let b = balance(&fleet, &["a"], checked(2));
    let h = b.handle();
    // The first probe went out at 0 and times out at 2 s; requests are
    // answered at once in between.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        send(&b, chat("m", "x")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        fleet.probes(),
        2,
        "the first probe timed out, the next is out"
    );
    assert!(stats(&h, "a").healthy, "answered while the probe waited");
    assert!(h.any_healthy());
    // The second probe (sent at 2 s) sees no request answered: down at 4 s.
    tokio::time::sleep(secs(2)).await;
    assert!(!stats(&h, "a").healthy, "a silent probe, nothing answered");
}

/// An interval too long for the clock (the proxy's config refuses one
/// over a day, but a `HealthCheck` built in code takes any `Duration`)
/// does not panic the probe task (`now + interval` would overflow an
/// `Instant`; tokio caps an interval's period), which would end the
/// checks silently.
#[tokio::test]
async fn a_huge_probe_interval_does_not_kill_the_probe_task() {
    let fleet = Fleet::default();
    let b = balance(
        &fleet,
        &["a"],
        BalanceConfig {
            health_check: Some(HealthCheck::every(Duration::MAX)),
            ..rr()
        },
    );
    // (Real time: the first round runs at once.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fleet.probes(), 1);
    let probe = b.shared.probe.lock().unwrap();
    assert!(
        !probe.as_ref().expect("a probe task").is_finished(),
        "the probe task ended (panicked) after its first round"
    );
}

/// A probe answered with a body that never ends (a hostile or broken
/// upstream) reads only a bounded amount of it: the body is there to keep
/// the connection reusable, not to be kept.
#[tokio::test]
async fn a_probe_reads_a_bounded_amount_of_an_endless_body() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let fleet = Fleet::default();
    let served = Arc::new(AtomicU64::new(0));
    fleet.set("a", Mode::Endless(served.clone()));
    let b = balance(&fleet, &["a"], checked(60));
    let h = b.handle();
    // (Real time: the first round runs at once, its drain ends within 1 s.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fleet.probes(), 1);
    assert!(stats(&h, "a").healthy, "a 200 is a passing probe");
    let read = served.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        served.load(Ordering::Relaxed),
        read,
        "the probe stopped reading"
    );
    assert!(read <= 2 << 20, "the probe read {read} bytes of its answer");
}

/// A backend put back unchanged (as discovery does on every refresh), or
/// a change to another backend, keeps the rotation turning: rebuilding the
/// set must not start it over at the first backend.
#[tokio::test(start_paused = true)]
async fn an_unchanged_backend_put_back_keeps_the_rotation() {
    for strategy in [Strategy::RoundRobin, Strategy::Weighted] {
        let fleet = Fleet::default();
        let b = balance(
            &fleet,
            &["a", "b"],
            BalanceConfig {
                strategy: strategy.clone(),
                ..BalanceConfig::default()
            },
        );
        let h = b.handle();
        for i in 0..20 {
            h.insert(fleet.backend("b"));
            if i % 2 == 0 {
                h.insert(fleet.backend("c"));
            } else {
                h.remove("c");
            }
            send(&b, chat("m", "x")).await.unwrap();
        }
        let (a, b, c) = (fleet.calls("a"), fleet.calls("b"), fleet.calls("c"));
        // (With `c` in the set on half the requests, the group changes;
        // what must not happen is `a` taking every request.)
        assert!(a < 15 && b > 0, "{strategy:?}: a {a}, b {b}, c {c}");
    }
}

/// A backend added while the balancer runs starts from the default
/// estimate, not from one decayed since the balancer's start to nothing:
/// under `p2c_ewma` it must not take every request of a burst while its
/// first answer is outstanding.
#[tokio::test(start_paused = true)]
async fn a_backend_added_later_does_not_take_a_whole_burst() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Ok(Duration::from_millis(100)));
    let b = balance(&fleet, &["a"], BalanceConfig::default());
    let h = b.handle();
    tokio::time::advance(secs(600)).await;
    for _ in 0..3 {
        send(&b, chat("m", "x")).await.unwrap();
    }
    fleet.set("b", Mode::Ok(secs(10)));
    h.insert(fleet.backend("b"));
    let burst: Vec<_> = (0..40)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { send(&b, chat("m", &i.to_string())).await.map(|_| ()) })
        })
        .collect();
    for task in burst {
        task.await.unwrap().unwrap();
    }
    let (a, b) = (fleet.calls("a") - 3, fleet.calls("b"));
    assert_eq!(a + b, 40);
    assert!(b <= 20, "the new backend took {b} of 40 (a: {a})");
}
