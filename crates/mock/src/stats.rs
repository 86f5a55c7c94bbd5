//! What the mock saw, for tests to assert on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::HeaderMap;

/// Counters and the last request seen by a [`Mock`](crate::Mock) and all its
/// clones. Cheap to clone: every clone reads the same counters.
#[derive(Clone, Debug, Default)]
pub struct MockStats {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    requests: AtomicU64,
    in_flight: AtomicUsize,
    cancelled: AtomicU64,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    per_route: HashMap<String, u64>,
    last_headers: Option<HeaderMap>,
    last_body: Option<Bytes>,
    last_path: Option<String>,
}

impl MockStats {
    /// Requests received, whatever their route or outcome.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Requests received for `path`. The path is compared without its query
    /// and without a leading `/v1`, so `"/v1/chat/completions"` and
    /// `"/chat/completions"` count the same requests.
    pub fn requests_for(&self, path: &str) -> u64 {
        let route = crate::route_path(path);
        self.seen().per_route.get(route).copied().unwrap_or(0)
    }

    /// The headers of the last request received.
    pub fn last_request_headers(&self) -> Option<HeaderMap> {
        self.seen().last_headers.clone()
    }

    /// The body of the last request whose body was read in full.
    pub fn last_request_body(&self) -> Option<Bytes> {
        self.seen().last_body.clone()
    }

    /// The path and query of the last request, as received.
    pub fn last_path(&self) -> Option<String> {
        self.seen().last_path.clone()
    }

    /// Requests not finished yet: waiting for their head (latency, hang) or
    /// with a response body still being produced and not dropped.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Streamed response bodies dropped before their last frame.
    pub fn cancelled(&self) -> u64 {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Records a request's head; returns the guard that keeps it in flight.
    pub(crate) fn record_request(&self, parts: &http::request::Parts) -> InFlight {
        self.inner.requests.fetch_add(1, Ordering::SeqCst);
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
        {
            let mut seen = self.seen();
            let route = crate::route_path(parts.uri.path()).to_owned();
            *seen.per_route.entry(route).or_insert(0) += 1;
            seen.last_headers = Some(parts.headers.clone());
            seen.last_path = Some(path);
        }
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight {
            stats: self.clone(),
            streamed: false,
            finished: false,
        }
    }

    /// Records the body of the request last recorded.
    pub(crate) fn record_body(&self, body: Bytes) {
        self.seen().last_body = Some(body);
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        // A panic while holding this lock cannot leave `Seen` inconsistent:
        // every update is a single assignment or increment.
        self.inner
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Keeps one request counted in [`MockStats::in_flight`] until dropped; a
/// streamed body dropped before [`InFlight::finish`] counts as cancelled.
#[derive(Debug)]
pub(crate) struct InFlight {
    stats: MockStats,
    streamed: bool,
    finished: bool,
}

impl InFlight {
    /// Marks the response as streamed, so an early drop counts as cancelled.
    pub(crate) fn streamed(mut self) -> Self {
        self.streamed = true;
        self
    }

    /// The body has produced its last frame (or its injected error).
    pub(crate) fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let inner = &self.stats.inner;
        if self.streamed && !self.finished {
            inner.cancelled.fetch_add(1, Ordering::SeqCst);
        }
        inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
