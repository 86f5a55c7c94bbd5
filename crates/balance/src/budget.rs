//! The fleet-wide retry budget, kept as tower's `TpsBudget` keeps it
//! (finagle's design: every request deposits, every retry withdraws,
//! deposits expire after a window, and a reserve allows a few retries a
//! second whatever the traffic), with two changes:
//!
//! - no lock per request: `TpsBudget` takes a mutex and reads the clock at
//!   every deposit to see whether its window moved on, one mutex that every
//!   request on every core takes. Here that is one atomic load against the
//!   time the caller read anyway; the one thread that finds the window moved
//!   on rolls it, under a `try_lock`, and the others go on. Only a retry
//!   (rare, and bounded by the budget) takes the lock.
//! - the ratio is not truncated: `TpsBudget` withdraws `(1 / ratio) as
//!   isize` deposits per retry, so a ratio of 0.3 allowed a third of the
//!   requests to be retried. Here deposits count in thousandths.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Slots the window is cut into (as `TpsBudget`).
const SLOTS: usize = 10;
/// What a request deposits; a retry withdraws `DEPOSIT / ratio`.
const DEPOSIT: i64 = 1000;

/// See the module docs. Times are nanoseconds on the caller's clock (the
/// balancer's [`Epoch`](crate::state::Epoch)).
#[derive(Debug)]
pub(crate) struct Budget {
    /// What the slots gone by, within the window, hold.
    slots: [AtomicI64; SLOTS],
    /// What the slot under way holds.
    writer: AtomicI64,
    /// When the slot under way began.
    slot_start: AtomicU64,
    /// The slot of `slots` the one under way is committed to.
    index: AtomicUsize,
    /// Held by the thread that rolls the slots on.
    rolling: Mutex<()>,
    slot_ns: u64,
    reserve: i64,
    deposit: i64,
    withdraw: i64,
}

impl Budget {
    /// Deposits live for `window` (clamped to 1–60 s); `min_per_sec`
    /// retries a second are always allowed, and besides them `ratio`
    /// (clamped to 0–1000) retries per request. `now`: the caller's clock.
    pub(crate) fn new(window: Duration, min_per_sec: u32, ratio: f32, now: u64) -> Self {
        let window = window.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let ratio = if ratio.is_finite() {
            f64::from(ratio).clamp(0.0, 1000.0)
        } else {
            0.0
        };
        // No ratio: deposits buy nothing; only the reserve allows retries.
        let (deposit, withdraw) = if ratio > 0.0 {
            (DEPOSIT, ((DEPOSIT as f64 / ratio).round() as i64).max(1))
        } else {
            (0, DEPOSIT)
        };
        let reserve = i64::from(min_per_sec.min(1_000_000))
            .saturating_mul(window.as_secs() as i64)
            .saturating_mul(withdraw);
        Budget {
            slots: Default::default(),
            writer: AtomicI64::new(0),
            slot_start: AtomicU64::new(now),
            index: AtomicUsize::new(0),
            rolling: Mutex::new(()),
            slot_ns: u64::try_from((window / SLOTS as u32).as_nanos()).unwrap_or(u64::MAX),
            reserve,
            deposit,
            withdraw,
        }
    }

    /// A request was made.
    pub(crate) fn deposit(&self, now: u64) {
        self.expire(now);
        if self.deposit != 0 {
            self.writer.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Whether a retry may be made now (and if so, it is paid for).
    ///
    /// Under the lock that rolls the slots: retries are few (the budget
    /// bounds them), and the sum below must see every slot as one roll
    /// left them. Unlocked, a withdrawal summing the slots while a roll
    /// moved the slot under way's count into the ring missed that count,
    /// and racing retries took more than the budget held (16 of 10, in a
    /// test of 8 threads). A deposit made meanwhile, unseen, only makes the
    /// answer stricter.
    pub(crate) fn withdraw(&self, now: u64) -> bool {
        let _rolling = self
            .rolling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.roll(now);
        let held = self
            .slots
            .iter()
            .map(|slot| slot.load(Ordering::Relaxed))
            .fold(self.writer.load(Ordering::Relaxed), i64::saturating_add)
            .saturating_add(self.reserve);
        if held < self.withdraw {
            return false;
        }
        self.writer.fetch_sub(self.withdraw, Ordering::Relaxed);
        true
    }

    /// Roll the slots on if the one under way is over.
    fn expire(&self, now: u64) {
        let start = self.slot_start.load(Ordering::Acquire);
        if now.saturating_sub(start) < self.slot_ns {
            return;
        }
        // Another thread rolls them now.
        let Ok(_rolling) = self.rolling.try_lock() else {
            return;
        };
        self.roll(now);
    }

    /// Roll the slots on if the one under way is over; the caller holds
    /// `rolling`.
    fn roll(&self, now: u64) {
        // Rolled on since the caller looked, perhaps.
        let start = self.slot_start.load(Ordering::Acquire);
        let mut elapsed = now.saturating_sub(start);
        if elapsed < self.slot_ns {
            return;
        }
        // The next slot begins where the slots gone by end, not now: a roll
        // made late (the first request after a slot's end) must not stretch
        // the window.
        let next_start = start + elapsed / self.slot_ns * self.slot_ns;
        let mut index = self.index.load(Ordering::Relaxed);
        self.slots[index].store(self.writer.swap(0, Ordering::Relaxed), Ordering::Relaxed);
        // Slots as old as the window are emptied (all of them, after a
        // window or more without a request).
        index = (index + 1) % SLOTS;
        let mut emptied = 0;
        while elapsed >= self.slot_ns.saturating_mul(2) && emptied < SLOTS {
            self.slots[index].store(0, Ordering::Relaxed);
            elapsed -= self.slot_ns;
            index = (index + 1) % SLOTS;
            emptied += 1;
        }
        self.slots[index].store(0, Ordering::Relaxed);
        self.index.store(index, Ordering::Relaxed);
        self.slot_start.store(next_start, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn budget(min_per_sec: u32, ratio: f32) -> Budget {
        Budget::new(Duration::from_secs(10), min_per_sec, ratio, 0)
    }

    /// Withdrawals allowed at `now`, until refused (at most 10,000).
    fn retries(b: &Budget, now: u64) -> usize {
        (0..10_000).take_while(|_| b.withdraw(now)).count()
    }

    #[test]
    fn requests_buy_their_ratio_of_retries() {
        for (ratio, requests, expected) in
            [(0.2, 100, 20), (0.3, 100, 30), (1.0, 7, 7), (2.5, 4, 10)]
        {
            let b = budget(0, ratio);
            for _ in 0..requests {
                b.deposit(SEC);
            }
            assert_eq!(retries(&b, SEC), expected, "ratio {ratio}");
        }
    }

    #[test]
    fn the_reserve_allows_its_retries_a_second_without_requests() {
        let b = budget(3, 0.2);
        assert_eq!(retries(&b, SEC), 30);
        let none = budget(0, 0.0);
        none.deposit(SEC);
        assert_eq!(retries(&none, SEC), 0);
    }

    #[test]
    fn deposits_expire_after_the_window() {
        let b = budget(0, 0.2);
        for _ in 0..100 {
            b.deposit(0);
        }
        // Within the window (slots roll every second), still there.
        b.deposit(9 * SEC);
        assert!(b.withdraw(9 * SEC));
        // A window later, the first hundred are gone: what is left (the
        // deposit at 9 s, less the retry it paid for) buys none.
        assert!(!b.withdraw(11 * SEC + SEC / 2));
        // After a long quiet time, nothing is left, whatever came before.
        let b = budget(0, 1.0);
        for _ in 0..100 {
            b.deposit(0);
        }
        assert!(!b.withdraw(1000 * SEC));
    }

    #[test]
    fn sparse_requests_expire_with_the_window() {
        // A request every 1.9 s (slots of 1 s): the slots roll once per
        // request, late by most of a slot each time, and must still age
        // deposits by the clock, not by the rolls.
        let b = budget(0, 1.0);
        for n in 0..=10 {
            b.deposit(n * 19 * SEC / 10);
        }
        // At 19 s, the window holds the requests of 11.4, 13.3, 15.2, 17.1
        // and 19 s (the slot of 9.5 s is a window old).
        assert_eq!(retries(&b, 19 * SEC), 5);
    }

    #[test]
    fn racing_retries_never_take_more_than_the_budget_holds() {
        // The reserve holds 10 retries; 8 threads ask for 1,600, while the
        // first of them rolls the slots on (a second has passed). Many
        // times over: the race is narrow.
        for _ in 0..200 {
            let b = budget(1, 0.0);
            let granted = AtomicUsize::new(0);
            let start = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        start.wait();
                        for _ in 0..200 {
                            if b.withdraw(SEC) {
                                granted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let granted = granted.into_inner();
            assert_eq!(granted, 10, "retries granted");
        }
    }

    #[test]
    fn deposits_from_many_threads_all_count() {
        let b = budget(0, 1.0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let b = &b;
                s.spawn(move || {
                    for i in 0..1000u64 {
                        // Times move on across slots while threads race.
                        b.deposit(t + i * 1_000_000);
                    }
                });
            }
        });
        assert_eq!(retries(&b, 1_000_000_000), 4000);
    }
}
