use super::*;
use crate::config::PrefixConfig;
use crate::hash::splitmix;

fn members(names: &[&'static str], weights: &[u32]) -> Vec<PickerMember<'static>> {
    names
        .iter()
        .zip(weights)
        .map(|(&name, &weight)| PickerMember { name, weight })
        .collect()
}

fn idle(n: usize) -> Vec<Load> {
    vec![
        Load {
            available: true,
            in_flight: 0,
            cost: 0.0
        };
        n
    ]
}

fn counts(picker: &Picker, loads: &[Load], picks: usize) -> Vec<usize> {
    let mut counts = vec![0; loads.len()];
    let mut r = 1;
    for _ in 0..picks {
        r = splitmix(r);
        let i = picker.pick(loads, None, r).expect("a backend is available");
        counts[i] += 1;
    }
    counts
}

#[test]
fn round_robin_is_even_and_skips_unavailable() {
    let p = Picker::new(
        &Strategy::RoundRobin,
        &members(&["a", "b", "c"], &[1, 1, 1]),
    );
    assert_eq!(counts(&p, &idle(3), 300), vec![100, 100, 100]);
    let mut loads = idle(3);
    loads[1].available = false;
    let c = counts(&p, &loads, 300);
    // The unavailable one's turns are shared, not handed to its neighbour.
    assert_eq!(c, vec![150, 0, 150]);
}

#[test]
fn weighted_three_to_one_is_smooth() {
    let p = Picker::new(&Strategy::Weighted, &members(&["a", "b"], &[3, 1]));
    let seq: Vec<usize> = (0..8)
        .filter_map(|r| p.pick(&idle(2)[..], None, r))
        .collect();
    assert_eq!(seq, vec![0, 0, 1, 0, 0, 0, 1, 0]);
    assert_eq!(counts(&p, &idle(2), 4000), vec![3000, 1000]);
}

#[test]
fn weight_zero_only_when_nothing_else() {
    let p = Picker::new(&Strategy::Weighted, &members(&["a", "b"], &[0, 1]));
    assert_eq!(counts(&p, &idle(2), 10), vec![0, 10]);
    let mut loads = idle(2);
    loads[1].available = false;
    assert_eq!(counts(&p, &loads, 10), vec![10, 0]);
}

#[test]
fn least_requests_prefers_the_idle_backend() {
    let p = Picker::new(
        &Strategy::LeastRequests,
        &members(&["a", "b", "c", "d"], &[1; 4]),
    );
    let mut loads = idle(4);
    loads[2].in_flight = 50;
    let c = counts(&p, &loads, 1000);
    assert_eq!(c[2], 0, "a loaded backend never wins a draw: {c:?}");
}

#[test]
fn p2c_ewma_reads_cost() {
    let p = Picker::new(&Strategy::P2cEwma, &members(&["a", "b"], &[1, 1]));
    let mut loads = idle(2);
    loads[0].cost = 10.0;
    loads[1].cost = 1.0;
    assert_eq!(counts(&p, &loads, 100), vec![0, 100]);
}

#[test]
fn none_available_is_none() {
    for s in [
        Strategy::RoundRobin,
        Strategy::Weighted,
        Strategy::LeastRequests,
        Strategy::P2cEwma,
        Strategy::PrefixAffinity(PrefixConfig::default()),
    ] {
        let p = Picker::new(&s, &members(&["a", "b"], &[1, 1]));
        let mut loads = idle(2);
        loads.iter_mut().for_each(|l| l.available = false);
        assert_eq!(p.pick(&loads[..], Some(7), 3), None, "{s:?}");
        assert_eq!(p.pick(&[][..], Some(7), 3), None, "{s:?}");
    }
}

#[test]
fn prefix_sticks_spreads_and_sheds() {
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let p = Picker::new(
        &Strategy::PrefixAffinity(PrefixConfig::default()),
        &members(&names, &[1; 8]),
    );
    let loads = idle(8);
    // One key: one home.
    let home = p.pick(&loads[..], Some(42), 1).expect("available");
    assert!((0..100).all(|r| p.pick(&loads[..], Some(42), r) == Some(home)));
    // Many keys: every backend is some key's home.
    let mut seen = [false; 8];
    let mut key = 5;
    for _ in 0..200 {
        key = splitmix(key);
        seen[p.pick(&loads[..], Some(key), 0).expect("available")] = true;
    }
    assert!(seen.iter().all(|&s| s), "{seen:?}");
    // Home overloaded: the same key goes elsewhere, and always to the same next one.
    let mut busy = idle(8);
    busy[home].in_flight = 3;
    let next = p.pick(&busy[..], Some(42), 1).expect("available");
    assert_ne!(next, home);
    assert!((0..20).all(|r| p.pick(&busy[..], Some(42), r) == Some(next)));
}

#[test]
fn prefix_bound_has_slack_and_spread_falls_back() {
    let cfg = PrefixConfig::default();
    let p = Picker::new(
        &Strategy::PrefixAffinity(cfg.clone()),
        &members(&["a", "b"], &[1, 1]),
    );
    let mut loads = idle(2);
    let home = p.pick(&loads[..], Some(9), 0).expect("available");
    // mean (2+1)/2 = 1.5: bound max(ceil(1.875), 2 + 2) = 4, so 2 in flight is fine.
    loads[home].in_flight = 2;
    assert_eq!(p.pick(&loads[..], Some(9), 0), Some(home));
    loads[home].in_flight = 40;
    assert_eq!(
        p.pick(&loads[..], Some(9), 0),
        Some(1 - home),
        "spread > 32: least loaded"
    );
}

#[test]
fn under_heavy_load_the_bounds_own_spread_keeps_affinity() {
    // Four backends near 128 in flight each, 60 apart: within what the
    // bound itself allows (twice ε of the mean, 62), beyond max_spread (32).
    let p = Picker::new(
        &Strategy::PrefixAffinity(PrefixConfig::default()),
        &members(&["a", "b", "c", "d"], &[1, 1, 1, 1]),
    );
    let mut loads = idle(4);
    for (load, n) in loads.iter_mut().zip([156, 128, 112, 96]) {
        load.in_flight = n;
    }
    // The bound: ceil(1.25 · (492 + 1) / 4) = 155, so `a` takes none.
    let picks: Vec<usize> = (0..64u64)
        .map(|k| {
            p.pick(&loads[..], Some(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)), 0)
                .unwrap()
        })
        .collect();
    assert!(!picks.contains(&0), "over the bound: {picks:?}");
    assert!(
        picks.iter().any(|&i| i != 3),
        "by key, not all to the least loaded: {picks:?}"
    );
    // A stuck backend, far past that: least loaded.
    loads[0].in_flight = 400;
    assert_eq!(p.pick(&loads[..], Some(7), 0), Some(3));
}
