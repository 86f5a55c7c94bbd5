//! How each strategy spreads requests, through the whole service.

use std::time::Duration;

use tower::ServiceExt;

use super::*;
use crate::{PrefixConfig, Strategy};

fn cfg(strategy: Strategy) -> BalanceConfig {
    BalanceConfig {
        strategy,
        ..BalanceConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn only_the_prefix_strategy_builds_the_body() {
    // The body is built when a layer first reads it: routing by model
    // reads only what the parse layer's check learned.
    for (strategy, built) in [
        (Strategy::RoundRobin, false),
        (Strategy::default(), false),
        (Strategy::PrefixAffinity(PrefixConfig::default()), true),
    ] {
        let fleet = Fleet::default();
        let b = balance(&fleet, &["a", "b"], cfg(strategy.clone()));
        send(&b, chat("m", "hi")).await.unwrap();
        assert_eq!(fleet.seen()[0].built, built, "{strategy:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn round_robin_is_even() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a", "b", "c"], cfg(Strategy::RoundRobin));
    for i in 0..300 {
        send(&b, chat("m", &i.to_string())).await.unwrap();
    }
    assert_eq!(
        [fleet.calls("a"), fleet.calls("b"), fleet.calls("c")],
        [100; 3]
    );
}

#[tokio::test(start_paused = true)]
async fn weighted_three_to_one() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [
            fleet.backend("a").with_weight(3),
            fleet.backend("b").with_weight(1),
        ],
        cfg(Strategy::Weighted),
    );
    for i in 0..4000 {
        send(&b, chat("m", &i.to_string())).await.unwrap();
    }
    let (a, bb) = (fleet.calls("a") as f64, fleet.calls("b") as f64);
    assert!((a / bb - 3.0).abs() < 0.15, "a {a} : b {bb}");
}

/// Requests arriving every 5 ms against a fast (10 ms) and a slow (1 s)
/// backend; every body is read to its end. Returns the slow one's share.
async fn slow_share(strategy: Strategy) -> f64 {
    let fleet = Fleet::default();
    fleet.set("fast", Mode::Ok(Duration::from_millis(10)));
    fleet.set("slow", Mode::Ok(Duration::from_secs(1)));
    let b = balance(&fleet, &["fast", "slow"], cfg(strategy));
    let mut tasks = Vec::new();
    for i in 0..400 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            send(&b, chat("m", &i.to_string())).await
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(
        b.handle().snapshot().iter().all(|s| s.in_flight == 0),
        "nothing leaks"
    );
    fleet.calls("slow") as f64 / fleet.total() as f64
}

#[tokio::test(start_paused = true)]
async fn least_requests_avoids_a_slow_backend() {
    let share = slow_share(Strategy::LeastRequests).await;
    assert!(share < 0.1, "slow share {share}");
}

#[tokio::test(start_paused = true)]
async fn p2c_ewma_avoids_a_high_latency_backend() {
    let share = slow_share(Strategy::P2cEwma).await;
    assert!(share < 0.05, "slow share {share}");
}

const EIGHT: [&str; 8] = ["g0", "g1", "g2", "g3", "g4", "g5", "g6", "g7"];

#[tokio::test(start_paused = true)]
async fn prefix_affinity_sticks_and_spreads() {
    let fleet = Fleet::default();
    let b = balance(
        &fleet,
        &EIGHT,
        cfg(Strategy::PrefixAffinity(PrefixConfig::default())),
    );
    let long = "a shared conversation start ".repeat(100);
    for i in 0..200 {
        send(&b, chat("m", &format!("{long} turn {i}")))
            .await
            .unwrap();
    }
    let top = EIGHT.iter().map(|n| fleet.calls(n)).max().unwrap();
    assert!(top >= 190, "same prefix stays on one backend: {top}/200");

    let fleet = Fleet::default();
    let b = balance(
        &fleet,
        &EIGHT,
        cfg(Strategy::PrefixAffinity(PrefixConfig::default())),
    );
    for p in 0..50 {
        for turn in 0..4 {
            send(
                &b,
                chat("m", &format!("conversation {p} {long} turn {turn}")),
            )
            .await
            .unwrap();
        }
    }
    let used: Vec<usize> = EIGHT.iter().map(|n| fleet.calls(n)).collect();
    assert!(
        used.iter().all(|&c| c > 0),
        "50 prefixes use all 8: {used:?}"
    );
    let seen = fleet.seen();
    for p in 0..50 {
        let tag = format!("conversation {p} ");
        let mut homes: Vec<&str> = seen
            .iter()
            .filter(|s| s.text.starts_with(&tag))
            .map(|s| s.backend.as_str())
            .collect();
        homes.sort_unstable();
        homes.dedup();
        assert_eq!(homes.len(), 1, "conversation {p} stayed on one backend");
    }
}

#[tokio::test(start_paused = true)]
async fn prefix_affinity_sheds_when_its_backend_is_overloaded() {
    let fleet = Fleet::default();
    let b = balance(
        &fleet,
        &EIGHT,
        cfg(Strategy::PrefixAffinity(PrefixConfig::default())),
    );
    let h = b.handle();
    // Hold responses of one prefix without reading them: they stay in flight.
    let mut held = Vec::new();
    for i in 0..24 {
        held.push(
            b.clone()
                .oneshot(chat(
                    "m",
                    &format!("hot prefix {}", "x".repeat(3000) + &i.to_string()),
                ))
                .await
                .unwrap(),
        );
    }
    let loads: Vec<u32> = h.snapshot().iter().map(|s| s.in_flight).collect();
    let max = *loads.iter().max().unwrap();
    // 24 over 8: mean 3, bound max(ceil(1.25 × 3), 3 + 2) = 5.
    assert!(max <= 5, "home is bounded: {loads:?}");
    assert!(
        loads.iter().filter(|&&l| l > 0).count() >= 5,
        "spilled over several: {loads:?}"
    );
    drop(held);
    assert!(h.snapshot().iter().all(|s| s.in_flight == 0));
}

/// A retry does not advance the rotation: a failing backend gets its share
/// of first attempts, not every one (with two backends, a retry moving the
/// rotation past the healthy one sent each request to the failing one
/// first).
#[tokio::test(start_paused = true)]
async fn round_robin_retries_do_not_turn_the_rotation() {
    for names in [&["a", "b"][..], &["a", "b", "c"]] {
        let fleet = Fleet::default();
        fleet.set("a", Mode::Status(500, None));
        let b = balance(
            &fleet,
            names,
            BalanceConfig {
                // Never ejected: every first attempt shows.
                eject_after_failures: u32::MAX,
                ..cfg(Strategy::RoundRobin)
            },
        );
        let rounds = 10 * names.len();
        for i in 0..rounds {
            send(&b, chat("m", &i.to_string())).await.unwrap();
        }
        let seen = fleet.seen();
        let firsts = seen
            .iter()
            .filter(|s| s.path != "/v1/models")
            .fold((0, None::<&str>), |(a_first, prev), s| {
                // A request's first attempt is the one whose text differs
                // from the previous attempt's.
                let first = prev != Some(s.text.as_str());
                (
                    a_first + usize::from(first && s.backend == "a"),
                    Some(&s.text),
                )
            })
            .0;
        assert_eq!(
            firsts, 10,
            "{names:?}: `a` went first {firsts} times of {rounds}"
        );
    }
}
