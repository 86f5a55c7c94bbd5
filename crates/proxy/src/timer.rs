//! A coarse timer for hyper's header-read timeout.
//!
//! hyper arms the header-read timeout anew for every request on a kept-alive
//! connection. With tokio's timer each arming is a boxed sleep, a timer-wheel
//! insertion under the driver's lock and, because that deadline (10 s by
//! default) comes before the first-byte timeout already in the wheel, an
//! `eventfd` write to wake the driver that is running the very code that
//! armed it: one system call per request for a timeout that almost never
//! fires. Here a sleep is an entry in a list that one task per server sweeps
//! every `resolution`: arming it costs an allocation and a push under an
//! uncontended lock, and it fires up to `resolution` late — nothing for a
//! cut-off of seconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// A [`hyper::rt::Timer`] whose sleeps fire on the next sweep after their
/// deadline. The sweeping task runs on the runtime that creates the timer and
/// ends when the timer and all its sleeps are gone.
#[derive(Clone, Debug)]
pub(crate) struct CoarseTimer {
    sweeper: Arc<Sweeper>,
}

#[derive(Debug)]
struct Sweeper {
    /// Deadlines are kept as nanoseconds after this instant.
    epoch: Instant,
    /// Sleeps in the `LISTED` state; dropped ones are pruned by the sweep.
    listed: Mutex<Vec<Weak<Entry>>>,
}

/// Not in the sweeper's list (new, or reset after it fired).
const IDLE: u8 = 0;
/// In the sweeper's list.
const LISTED: u8 = 1;
/// Taken out of the list by a sweep at or after the deadline it saw.
const FIRED: u8 = 2;

#[derive(Debug)]
struct Entry {
    deadline: AtomicU64,
    state: AtomicU8,
    waker: AtomicWaker,
}

/// One sleep of a [`CoarseTimer`]. hyper (1.12) makes one for each request
/// head it waits for and drops it once the head is read, so that a sleep
/// costs two allocations (this box and its entry); a reset, which hyper
/// makes only of a sleep it kept, stores the new deadline and allocates
/// nothing.
#[derive(Debug)]
struct CoarseSleep {
    entry: Arc<Entry>,
    sweeper: Weak<Sweeper>,
    epoch: Instant,
}

impl CoarseTimer {
    /// A timer swept every `resolution`. Call it inside a tokio runtime: the
    /// sweeping task is spawned there.
    pub(crate) fn new(resolution: Duration) -> Self {
        let sweeper = Arc::new(Sweeper {
            epoch: Instant::now(),
            listed: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&sweeper);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(resolution);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(sweeper) = weak.upgrade() else {
                    return;
                };
                sweeper.sweep(Instant::now());
            }
        });
        CoarseTimer { sweeper }
    }
}

/// `t` as nanoseconds after `epoch` (0 before it).
fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

impl Sweeper {
    fn lock(&self) -> MutexGuard<'_, Vec<Weak<Entry>>> {
        // A list of weak pointers holds no invariant a panic could break.
        self.listed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fire every listed entry whose deadline has passed; forget dropped ones.
    fn sweep(&self, now: Instant) {
        let now = nanos_since(self.epoch, now);
        let mut due = Vec::new();
        self.lock().retain(|weak| match weak.upgrade() {
            None => false,
            Some(entry) if entry.deadline.load(Ordering::Acquire) <= now => {
                if entry
                    .state
                    .compare_exchange(LISTED, FIRED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    due.push(entry);
                }
                false
            }
            Some(entry) => entry.state.load(Ordering::Acquire) == LISTED,
        });
        // Wake outside the lock.
        for entry in due {
            entry.waker.wake();
        }
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let epoch = self.sweeper.epoch;
        Box::pin(CoarseSleep {
            entry: Arc::new(Entry {
                deadline: AtomicU64::new(nanos_since(epoch, deadline)),
                state: AtomicU8::new(IDLE),
                waker: AtomicWaker::new(),
            }),
            sweeper: Arc::downgrade(&self.sweeper),
            epoch,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<CoarseSleep>() {
            Some(sleep) => {
                let entry = &sleep.entry;
                entry
                    .deadline
                    .store(nanos_since(sleep.epoch, new_deadline), Ordering::Release);
                // Already fired: out of the list, so the next poll lists it
                // again. Still listed: the sweep reads the new deadline.
                let _ =
                    entry
                        .state
                        .compare_exchange(FIRED, IDLE, Ordering::AcqRel, Ordering::Acquire);
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let entry = &self.entry;
        // Registered before the state is read: a sweep that fires after the
        // read wakes this task.
        entry.waker.register(cx.waker());
        loop {
            match entry.state.load(Ordering::Acquire) {
                LISTED => return Poll::Pending,
                FIRED => {
                    let deadline = entry.deadline.load(Ordering::Acquire);
                    if nanos_since(self.epoch, Instant::now()) >= deadline {
                        return Poll::Ready(());
                    }
                    // A reset moved the deadline as a sweep fired the old one:
                    // not due yet, so list it again.
                    let _ = entry.state.compare_exchange(
                        FIRED,
                        IDLE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                _ => {
                    // The server is gone: nothing will sweep, so never fire.
                    let Some(sweeper) = self.sweeper.upgrade() else {
                        return Poll::Pending;
                    };
                    let mut listed = sweeper.lock();
                    if entry
                        .state
                        .compare_exchange(IDLE, LISTED, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        listed.push(Arc::downgrade(entry));
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn a_sleep_fires_after_its_deadline() {
        let timer = CoarseTimer::new(Duration::from_millis(5));
        let start = Instant::now();
        timer.sleep(Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_dropped_sleep_leaves_the_list() {
        let timer = CoarseTimer::new(Duration::from_millis(5));
        let mut sleep = timer.sleep(Duration::from_secs(3600));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        assert_eq!(timer.sweeper.lock().len(), 1, "listed once");
        drop(sleep);
        timer.sweeper.sweep(Instant::now());
        assert!(timer.sweeper.lock().is_empty());
    }

    /// Sweep once the real clock has passed `deadline` (a fired sleep checks
    /// the clock itself).
    async fn sweep_after(timer: &CoarseTimer, deadline: Instant) {
        tokio::time::sleep_until((deadline + Duration::from_millis(1)).into()).await;
        timer.sweeper.sweep(Instant::now());
    }

    #[tokio::test]
    async fn a_sleep_not_yet_due_stays() {
        let timer = CoarseTimer::new(Duration::from_secs(3600));
        let deadline = Instant::now() + Duration::from_millis(30);
        let mut sleep = timer.sleep_until(deadline);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        // A sweep just before the deadline (not the clock's now: a thread
        // paused past the deadline here would make this one fire it).
        timer.sweeper.sweep(deadline - Duration::from_millis(1));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        sweep_after(&timer, deadline).await;
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_reset_sleep_is_reused_and_fires_at_its_new_deadline() {
        let timer = CoarseTimer::new(Duration::from_secs(3600));
        let first = Instant::now() + Duration::from_millis(20);
        let mut sleep = timer.sleep_until(first);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        sweep_after(&timer, first).await;
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
        // Reset for a later deadline (hyper's next request): the same sleep.
        let before: *const () = std::ptr::from_ref(&*sleep).cast();
        let second = Instant::now() + Duration::from_millis(30);
        timer.reset(&mut sleep, second);
        assert_eq!(
            std::ptr::from_ref(&*sleep).cast::<()>(),
            before,
            "no new sleep"
        );
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        assert_eq!(timer.sweeper.lock().len(), 1, "listed again");
        timer.sweeper.sweep(second - Duration::from_millis(1));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        sweep_after(&timer, second).await;
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
    }
    #[tokio::test]
    async fn a_fire_that_raced_a_reset_does_not_end_the_sleep_early() {
        let timer = CoarseTimer::new(Duration::from_secs(3600));
        let mut sleep = timer.sleep(Duration::from_secs(10));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        // A sweep that saw the old deadline fires after the reset stored a new one.
        timer.reset(&mut sleep, Instant::now() + Duration::from_secs(60));
        let entry = timer.sweeper.lock()[0].upgrade().unwrap();
        entry.state.store(FIRED, Ordering::Release);
        timer.sweeper.lock().clear();
        assert!(sleep.as_mut().poll(&mut cx).is_pending(), "not due yet");
        assert_eq!(timer.sweeper.lock().len(), 1, "listed again");
    }
}
