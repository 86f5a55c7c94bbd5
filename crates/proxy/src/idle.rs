//! Closing HTTP/2 connections that carry no request.
//!
//! An idle HTTP/1 keep-alive connection is closed by hyper's header-read
//! timeout: waiting for the next request's head is reading a head. HTTP/2
//! has no such wait — a client may open a connection, settle its settings,
//! answer pings and never send a request — and hyper's HTTP/2 server has no
//! idle timeout, so each such connection would hold one of
//! `max_connections` permits for ever. [`Activity`] counts a connection's
//! requests in flight (from the call until the response body is dropped);
//! [`Activity::idle`] resolves once there has been none for the timeout,
//! and the connection is then shut down gracefully (GOAWAY).
//!
//! Only HTTP/2 connections are counted: [`Tracked`] learns the protocol from
//! the request's version, so HTTP/1 requests pay one branch, and a
//! connection that has carried an HTTP/1 request is left to hyper's timer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Version};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, Guarded};
use tokio::time::Instant;

/// One connection's requests in flight, and since when it has had none.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Set by the first HTTP/1 request: hyper watches this connection.
    http1: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` at which `in_flight` last fell to zero.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            http1: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once no request has been in flight for `timeout`; never on
    /// an HTTP/1 connection.
    pub(crate) async fn idle(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            if self.http1.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            let wait_ms = if self.in_flight.load(Ordering::Acquire) == 0 {
                let idle_ms = self
                    .now_ms()
                    .saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
                if idle_ms >= timeout_ms {
                    // Still idle now (a request may have started meanwhile).
                    if self.in_flight.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    timeout_ms
                } else {
                    timeout_ms - idle_ms
                }
            } else {
                timeout_ms
            };
            tokio::time::sleep(Duration::from_millis(wait_ms.max(1))).await;
        }
    }
}

/// One request in flight on a counted connection.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Stamp before the count falls: `idle` never sees zero in flight
        // with a stale stamp.
        activity
            .idle_since_ms
            .store(activity.now_ms(), Ordering::Release);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's service, counting its HTTP/2 requests in `activity`.
#[derive(Clone, Debug)]
pub(crate) struct Tracked<S> {
    pub(crate) inner: S,
    pub(crate) activity: Arc<Activity>,
}

type BoxResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send>>;

pin_project_lite::pin_project! {
    /// The future of [`Tracked`]: an HTTP/1 request's own, or an HTTP/2
    /// request's whose body holds its [`InFlight`].
    #[project = TrackedProj]
    pub(crate) enum TrackedFuture<F> {
        Plain { #[pin] inner: F },
        Counted { inner: BoxResponseFuture },
    }
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<Body>, std::convert::Infallible>>,
{
    type Output = Result<Response<Body>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TrackedProj::Plain { inner } => inner.poll(cx),
            TrackedProj::Counted { inner } => inner.as_mut().poll(cx),
        }
    }
}

impl<S> hyper::service::Service<Request<hyper::body::Incoming>> for Tracked<S>
where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        >,
{
    type Response = Response<Body>;
    type Error = std::convert::Infallible;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        if req.version() != Version::HTTP_2 {
            if !self.activity.http1.load(Ordering::Relaxed) {
                self.activity.http1.store(true, Ordering::Relaxed);
            }
            return TrackedFuture::Plain {
                inner: self.inner.call(req),
            };
        }
        let in_flight = InFlight::new(&self.activity);
        let inner = self.inner.call(req);
        TrackedFuture::Counted {
            inner: Box::pin(async move {
                let resp = inner.await?;
                Ok(resp.map(|body| Guarded::new(body, in_flight).boxed_unsync()))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_request_and_then_the_timeout() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(10);
        let started = Instant::now();
        let first = InFlight::new(&activity);
        tokio::time::advance(Duration::from_secs(25)).await;
        let second = InFlight::new(&activity);
        drop(first);
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(second); // idle from 30 s on
        activity.idle(timeout).await;
        assert_eq!(started.elapsed(), Duration::from_secs(40));
    }
}
