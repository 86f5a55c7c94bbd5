//! [`BodyBudget`]: a bound on the request-body bytes (and the response
//! events being read) held in memory at once, all requests together.
//!
//! `max_body_bytes` bounds one request. Many requests at once — thousands of
//! connections, or one h2 connection with a couple of hundred streams — can
//! each hold that much while their bodies are read and until their answers
//! end, so the product is far more than a machine's memory. A budget counts
//! every buffered body's bytes from its first byte read until the last
//! reference to them is dropped (they live in [`RequestMeta`](crate::RequestMeta)
//! while the request is retried, cached or translated), and a body that
//! would pass it is refused with 503 `server_overloaded` and `retry-after:
//! 1`, before more of it is read. Only bytes that came count: a head that
//! announces a large body and sends nothing takes nothing.
//!
//! The same bound, in a pool of its own, holds on the answer side: an
//! upstream's event stream is read, as it passes, by several layers at once
//! (the upstream client's check, the cache's tee, auth's usage count,
//! translation), and each holds an event that spans chunks until its end,
//! up to the event limit
//! ([`DEFAULT_MAX_EVENT_BYTES`](crate::sse::DEFAULT_MAX_EVENT_BYTES)). An
//! upstream that sends one endless event on many streams would otherwise
//! hold that much per layer per stream. Each of those readers counts what it
//! holds ([`Outlines::counted_in`](crate::sse::Outlines::counted_in), and
//! translation's [`Parser::counted_in`](crate::sse::Parser::counted_in)); the
//! upstream client's check, which reads each chunk first and can end the
//! stream with an error event, is the one bounded by it
//! ([`Outlines::bounded_by`](crate::sse::Outlines::bounded_by)): past the
//! bound it cuts its stream as broken. Events that lie whole in the chunk
//! that brought them, the usual case, are never held. Answers have their
//! own pool ([`BodyBudget::answers_in_use`]): request bodies that fill
//! theirs do not cut answers already under way, nor the reverse.
//!
//! The count is one atomic add and subtract per body: no lock, no wait.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// The shared bound; cheap to clone (clones share the count).
#[derive(Clone, Debug)]
pub struct BodyBudget {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limit: usize,
    used: AtomicUsize,
    /// Bytes of answers held: a pool of its own, with the same limit.
    answers: AtomicUsize,
}

/// Which of a budget's pools a claim counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pool {
    /// Request bodies, and what they are parsed into.
    Bodies,
    /// What the layers hold of answers: events being read, answers kept to
    /// be stored.
    Answers,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        BodyBudget {
            inner: Arc::new(Shared {
                limit,
                used: AtomicUsize::new(0),
                answers: AtomicUsize::new(0),
            }),
        }
    }

    /// The bound, in bytes.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes of request bodies held now.
    pub fn in_use(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Bytes of answers held now, in their own pool of the same bound:
    /// events being read by the layers that watch a stream, answers kept
    /// to be stored.
    pub fn answers_in_use(&self) -> usize {
        self.inner.answers.load(Ordering::Relaxed)
    }

    /// An empty claim on the budget, grown as a body is read.
    pub(crate) fn claim(&self) -> Claim {
        self.claim_in(Pool::Bodies)
    }

    /// An empty claim on `pool`.
    pub(crate) fn claim_in(&self, pool: Pool) -> Claim {
        Claim {
            budget: self.inner.clone(),
            bytes: 0,
            pool,
        }
    }
}

/// Bytes taken from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Claim {
    budget: Arc<Shared>,
    bytes: usize,
    pool: Pool,
}

impl Claim {
    /// The error for a body this claim could not hold.
    pub(crate) fn full(&self) -> crate::Error {
        crate::Error::BodyBufferFull {
            limit: self.budget.limit,
        }
    }

    /// Hold at least `total` bytes; `false` (holding what it held) when the
    /// budget has not that much left.
    pub(crate) fn hold(&mut self, total: usize) -> bool {
        let Some(more) = total.checked_sub(self.bytes).filter(|m| *m > 0) else {
            return true;
        };
        let used = self.counter();
        let mut now = used.load(Ordering::Relaxed);
        loop {
            let Some(next) = now.checked_add(more).filter(|n| *n <= self.budget.limit) else {
                return false;
            };
            match used.compare_exchange_weak(now, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    self.bytes = total;
                    return true;
                }
                Err(actual) => now = actual,
            }
        }
    }

    /// The bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.bytes
    }

    /// Hold `total` bytes in all, more or less than now, whether or not
    /// the budget has room for them: what is held is counted (so that the
    /// claims that are bounded see it), never refused.
    pub(crate) fn count(&mut self, total: usize) {
        let counter = self.counter();
        if total > self.bytes {
            counter.fetch_add(total - self.bytes, Ordering::Relaxed);
        } else if total < self.bytes {
            counter.fetch_sub(self.bytes - total, Ordering::Relaxed);
        }
        self.bytes = total;
    }

    fn counter(&self) -> &AtomicUsize {
        match self.pool {
            Pool::Bodies => &self.budget.used,
            Pool::Answers => &self.budget.answers,
        }
    }

    /// The whole budget, in bytes.
    pub(crate) fn limit(&self) -> usize {
        self.budget.limit
    }

    /// Give back what is held beyond `total` (a body shorter than its
    /// `content-length` said).
    pub(crate) fn shrink_to(&mut self, total: usize) {
        if let Some(extra) = self.bytes.checked_sub(total).filter(|e| *e > 0) {
            self.counter().fetch_sub(extra, Ordering::Relaxed);
            self.bytes = total;
        }
    }

    /// `bytes`, holding this claim (what it holds: the bytes, and what was
    /// built from them) until their last clone is dropped.
    pub(crate) fn attach(self, bytes: Bytes) -> Bytes {
        if self.bytes == 0 {
            return bytes;
        }
        Bytes::from_owner(Held {
            bytes,
            _claim: self,
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.counter().fetch_sub(self.bytes, Ordering::Relaxed);
        }
    }
}

/// Body bytes and the claim that counts them.
struct Held {
    bytes: Bytes,
    _claim: Claim,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_grow_within_the_limit_and_are_given_back_with_their_bytes() {
        let budget = BodyBudget::new(100);
        let mut a = budget.claim();
        assert!(a.hold(60));
        assert!(a.hold(40), "already held");
        let mut b = budget.claim();
        assert!(!b.hold(41), "60 + 41 > 100");
        assert!(b.hold(40));
        assert_eq!(budget.in_use(), 100);
        a.shrink_to(50);
        let bytes = a.attach(Bytes::from(vec![7u8; 50]));
        assert_eq!(budget.in_use(), 90, "shrunk to the body's length");
        let copy = bytes.clone();
        drop(bytes);
        assert_eq!(budget.in_use(), 90, "a clone still holds them");
        assert_eq!(&copy[..2], &[7, 7]);
        drop(copy);
        assert_eq!(budget.in_use(), 40);
        drop(b);
        assert_eq!(budget.in_use(), 0);
        assert!(!budget.claim().hold(101));
        assert!(!budget.claim().hold(usize::MAX), "no overflow");
        assert_eq!(budget.in_use(), 0);
    }
}
