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
use std::sync::atomic::{AtomicBool, Ordering};
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

#[derive(Debug, Default)]
struct Sweeper {
    /// Sleeps armed and not yet fired; dropped ones are pruned by the sweep.
    armed: Mutex<Vec<Weak<Entry>>>,
}

#[derive(Debug)]
struct Entry {
    deadline: Instant,
    fired: AtomicBool,
    waker: AtomicWaker,
}

/// One sleep of a [`CoarseTimer`].
#[derive(Debug)]
struct CoarseSleep {
    entry: Arc<Entry>,
    /// In the sweeper's list (done on the first poll that has to wait).
    armed: bool,
    sweeper: Weak<Sweeper>,
}

impl CoarseTimer {
    /// A timer swept every `resolution`. Call it inside a tokio runtime: the
    /// sweeping task is spawned there.
    pub(crate) fn new(resolution: Duration) -> Self {
        let sweeper = Arc::new(Sweeper::default());
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

impl Sweeper {
    fn lock(&self) -> MutexGuard<'_, Vec<Weak<Entry>>> {
        // A list of weak pointers holds no invariant a panic could break.
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fire every entry whose deadline has passed; forget dropped ones.
    fn sweep(&self, now: Instant) {
        let mut due = Vec::new();
        self.lock().retain(|weak| match weak.upgrade() {
            None => false,
            Some(entry) if entry.deadline <= now => {
                due.push(entry);
                false
            }
            Some(_) => true,
        });
        // Wake outside the lock.
        for entry in due {
            entry.fired.store(true, Ordering::Release);
            entry.waker.wake();
        }
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep {
            entry: Arc::new(Entry {
                deadline,
                fired: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            }),
            armed: false,
            sweeper: Arc::downgrade(&self.sweeper),
        })
    }
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.entry.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.entry.waker.register(cx.waker());
        if !self.armed {
            self.armed = true;
            match self.sweeper.upgrade() {
                Some(sweeper) => sweeper.lock().push(Arc::downgrade(&self.entry)),
                // The server is gone: nothing will sweep, so never fire.
                None => return Poll::Pending,
            }
        }
        // Fired between the first check and the registration.
        if self.entry.fired.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
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
        assert_eq!(timer.sweeper.lock().len(), 1);
        drop(sleep);
        timer.sweeper.sweep(Instant::now());
        assert!(timer.sweeper.lock().is_empty());
    }

    #[tokio::test]
    async fn a_sleep_not_yet_due_stays() {
        let timer = CoarseTimer::new(Duration::from_secs(3600));
        let mut sleep = timer.sleep(Duration::from_secs(60));
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        timer.sweeper.sweep(Instant::now());
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        timer
            .sweeper
            .sweep(Instant::now() + Duration::from_secs(61));
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
    }
}
