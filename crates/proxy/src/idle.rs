//! What a connection's task watches besides the connection itself: an
//! HTTP/2 connection that carries no request, and a client that stops
//! reading its answer.
//!
//! **Idle HTTP/2.** An idle HTTP/1 keep-alive connection is closed by
//! hyper's header-read timeout: waiting for the next request's head is
//! reading a head. HTTP/2 has no such wait — a client may open a connection,
//! settle its settings, answer pings and never send a request — and hyper's
//! HTTP/2 server has no idle timeout, so each such connection would hold one
//! of `max_connections` permits for ever. [`Activity`] counts a connection's
//! requests in flight (from the call until the response body is dropped);
//! [`Activity::idle`] resolves once an HTTP/2 connection has had none for
//! the timeout, and the connection is then shut down gracefully (GOAWAY).
//!
//! **Stalled client** (nginx's `send_timeout`). A client that stops reading
//! a streamed answer holds its upstream request — and a model server's
//! slot — for as long as it likes: the socket buffers fill, hyper stops
//! asking the response body for more, and the upstream's writes block.
//! [`Activity::stalled`] resolves when every request on the connection is a
//! response body that has handed hyper a frame, and no body has been asked
//! for another for the timeout; the connection is then closed, which
//! cancels the upstream requests. A stream waiting for its upstream is not
//! stalled: hyper has asked for the next frame, and the body has none yet.
//!
//! **Unread HTTP/2 stream.** On HTTP/2 one stream may be left unread while
//! others are read or wait for their upstream; closing the connection would
//! take the healthy streams with it. So each HTTP/2 response body is held
//! where the connection's watch can reach it ([`InFlight::watch`]): one the
//! client has taken nothing of for the timeout is dropped there, which
//! cancels its upstream request (its upstream connection is driven by the
//! body's poll, which hyper no longer makes: only dropping the body ends
//! it). The stream itself stays open until the client reads it again (its
//! body then fails, and hyper resets it) or the connection ends; what it
//! queued is bounded by HTTP/2's flow control. nginx applies its
//! `send_timeout` to each HTTP/2 stream too.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::{Body, BoxError};
use slab::Slab;
use tokio::time::Instant;

use crate::metrics::lock;
use crate::websocket::Tunnel;

/// One connection's requests in flight, and what its response bodies do.
pub(crate) struct Activity {
    epoch: Instant,
    /// Set by the first HTTP/1 request: hyper watches this connection's
    /// idle time itself.
    http1: AtomicBool,
    /// The HTTP/2 response bodies in flight, which the watch may drop.
    streams: Mutex<Slab<Arc<Stream>>>,
    /// Steps (quarters of the send timeout) the watch has taken.
    ticks: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` at which `in_flight` last fell to zero.
    idle_since_ms: AtomicU64,
    /// Times any response body of the connection was asked for a frame.
    body_polls: AtomicU64,
    /// Response bodies that handed out a frame and have not been asked for
    /// the next one.
    unsent: AtomicUsize,
    /// One more than the millisecond (since `epoch`) from which writes to
    /// the connection have not gone through (the socket's send buffer is
    /// full); 0 while they do.
    write_blocked_ms: AtomicU64,
    /// What the connection becomes once hyper hands it over after a `101`
    /// (`crate::websocket`); run by the connection's task.
    tunnel: Mutex<Option<Tunnel>>,
    /// Bytes came from the client since the last request in flight ended:
    /// on HTTP/1, the next request's head is on its way.
    read_since_request: AtomicBool,
    /// The server's drain began: a tunnel ends its session.
    draining: AtomicBool,
    drain: tokio::sync::Notify,
    /// A request was taken during the drain (it may be answered already).
    took_in_drain: AtomicBool,
    /// Told of a request taken during the drain.
    taken_in_drain: tokio::sync::Notify,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            http1: AtomicBool::new(false),
            streams: Mutex::new(Slab::new()),
            ticks: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            body_polls: AtomicU64::new(0),
            unsent: AtomicUsize::new(0),
            write_blocked_ms: AtomicU64::new(0),
            tunnel: Mutex::new(None),
            read_since_request: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drain: tokio::sync::Notify::new(),
            took_in_drain: AtomicBool::new(false),
            taken_in_drain: tokio::sync::Notify::new(),
        })
    }

    /// The server's drain began: tell the connection's tunnel.
    pub(crate) fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain.notify_waiters();
    }

    /// Resolves once the server's drain has begun.
    pub(crate) async fn draining(&self) {
        let notified = self.drain.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.draining.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// Run `tunnel` on the connection's task once its HTTP life is over.
    pub(crate) fn hold(&self, tunnel: Tunnel) {
        *lock(&self.tunnel) = Some(tunnel);
    }

    /// The tunnel to run, if a request set one up.
    pub(crate) fn take_tunnel(&self) -> Option<Tunnel> {
        lock(&self.tunnel).take()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A write to the connection could not go through (its socket's send
    /// buffer is full: the client is not reading).
    pub(crate) fn write_pending(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            self.write_blocked_ms
                .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        }
    }

    /// A write to the connection went through.
    pub(crate) fn wrote(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
            self.write_blocked_ms.store(0, Ordering::Relaxed);
        }
    }

    /// A read from the connection brought bytes.
    pub(crate) fn read_some(&self) {
        if !self.read_since_request.load(Ordering::Relaxed) {
            self.read_since_request.store(true, Ordering::Relaxed);
        }
    }

    /// An HTTP/1 connection with no request in flight whose client has sent
    /// some of its next request: hyper would close it as idle, and lose
    /// that request, if told to shut down now.
    pub(crate) fn request_under_way(&self) -> bool {
        self.http1.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Acquire) == 0
            && self.read_since_request.load(Ordering::Relaxed)
    }

    /// Resolves once a request was taken since the drain began, whether
    /// still in flight or answered already: hyper may take and answer one
    /// within the poll of its connection that comes before this is first
    /// polled (call it once the drain began).
    pub(crate) async fn request_taken(&self) {
        let notified = self.taken_in_drain.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.took_in_drain.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// Whether the connection speaks HTTP/1 (known from its first bytes;
    /// one that has sent none yet may be either).
    pub(crate) fn is_http1(&self) -> bool {
        self.http1.load(Ordering::Relaxed)
    }

    /// How long no request has been on an HTTP/2 connection (since it
    /// opened, for one that has had none); `None` while one is in flight,
    /// and on HTTP/1, whose idle time is not kept.
    pub(crate) fn quiet_for(&self) -> Option<Duration> {
        if self.http1.load(Ordering::Relaxed) || self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let quiet_ms = self
            .now_ms()
            .saturating_sub(self.idle_since_ms.load(Ordering::Acquire));
        Some(Duration::from_millis(quiet_ms))
    }

    /// A request of this version arrived.
    pub(crate) fn saw(&self, version: http::Version) {
        if version != http::Version::HTTP_2 && !self.http1.load(Ordering::Relaxed) {
            self.http1.store(true, Ordering::Relaxed);
        }
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

    /// Resolves once every request in flight has been a response body
    /// waiting for the client to take what it handed out for `timeout`
    /// (measured in quarters of it), with no body of this connection asked
    /// for more meanwhile; or once no write to the connection has gone
    /// through for `timeout` (nginx's `send_timeout`: an HTTP/2 client that
    /// reads nothing at all, while one of its streams keeps its window open
    /// and so keeps being asked for frames that pile up unsent). Meanwhile
    /// it drops each HTTP/2 response body left unread for `timeout`
    /// ([`InFlight::watch`]).
    pub(crate) async fn stalled(&self, timeout: Duration) {
        let step = (timeout / 4).max(Duration::from_millis(1));
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut polls = self.body_polls.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(step).await;
            let tick = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
            self.drop_unread(tick);
            let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
            if blocked != 0 && self.now_ms().saturating_sub(blocked - 1) >= timeout_ms {
                return;
            }
            let now_polls = self.body_polls.load(Ordering::Relaxed);
            let unsent = self.unsent.load(Ordering::Relaxed);
            let all_unsent = unsent > 0 && unsent >= self.in_flight.load(Ordering::Acquire);
            if now_polls != polls || !all_unsent {
                polls = now_polls;
                since = Instant::now();
            } else if since.elapsed() >= timeout {
                return;
            }
        }
    }

    /// Drops the body of each HTTP/2 stream that has handed out a frame and
    /// not been asked for the next for four steps (`tick` is the step just
    /// taken): its upstream request is cancelled.
    fn drop_unread(&self, tick: u64) {
        let unread = |stream: &Stream| {
            let handed = stream.handed_at.load(Ordering::Relaxed);
            handed != 0 && tick.saturating_sub(handed) >= UNREAD_STEPS
        };
        let mut dropped = Vec::new();
        {
            let streams = lock(&self.streams);
            for (_, stream) in streams.iter().filter(|(_, stream)| unread(stream)) {
                let mut body = lock(&stream.body);
                // Asked meanwhile: it is read after all. At its end: no
                // upstream request is left to cancel.
                if unread(stream) && !body.as_ref().is_none_or(HttpBody::is_end_stream) {
                    dropped.extend(body.take());
                    stream.handed_at.store(0, Ordering::Relaxed);
                    tracing::debug!(
                        request_id = stream
                            .request_id
                            .as_ref()
                            .and_then(|id| id.to_str().ok())
                            .unwrap_or(""),
                        "cancelling an HTTP/2 stream whose client stopped reading it"
                    );
                }
            }
        }
        // Dropped outside the locks: the bodies' layers see a cut.
        drop(dropped);
    }
}

/// Steps (quarters of the send timeout) a stream's frame may wait for the
/// client to take it: four, so that an unread stream is cancelled between
/// one and one and a quarter send timeouts after its last frame.
const UNREAD_STEPS: u64 = 4;

/// An HTTP/2 response body where the connection's watch can drop it.
struct Stream {
    /// Its place in the connection's `streams`.
    key: usize,
    /// `None` once dropped by the watch.
    body: Mutex<Option<Body>>,
    /// One more than the watch's step count when the body last handed out
    /// a frame not yet followed by a request for the next; 0 otherwise.
    handed_at: AtomicU64,
    /// The request's `x-request-id`, for the line that says it was cut.
    request_id: Option<http::HeaderValue>,
}

/// The most of a data frame a watched stream hands hyper at once. hyper
/// asks for the next frame only once the last one is sent, and sends it as
/// the client's flow-control window lets it: a frame of 16 KiB or 400 KB
/// (an upstream that ran ahead of a slow reader; the upstream client hands
/// on what one read brought) would be asked past only after the client
/// read all of it, and a client still reading, slowly, would look like one
/// that stopped. In pieces of at most this, the watch sees a client that
/// takes 4 KiB per send timeout (68 bytes a second at the default 60 s) as
/// reading: nginx's `send_timeout` likewise counts from the last write
/// that went through. Token streams' frames are far smaller, and are not
/// cut.
const PIECE: usize = 4 * 1024;

/// The body the client reads of a watched HTTP/2 stream ([`InFlight::watch`]).
struct Watched {
    stream: Arc<Stream>,
    /// What is left of a data frame handed out in [`PIECE`]s.
    rest: Bytes,
}

impl Watched {
    fn piece(&mut self, mut data: Bytes) -> Frame<Bytes> {
        if data.len() > PIECE {
            self.rest = data.split_off(PIECE);
        }
        Frame::data(data)
    }
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let rest = std::mem::take(&mut this.rest);
            return Poll::Ready(Some(Ok(this.piece(rest))));
        }
        let polled = match lock(&this.stream.body).as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => return Poll::Ready(Some(Err(Unread::new().into()))),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Poll::Ready(Some(Ok(this.piece(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
            && lock(&self.stream.body)
                .as_ref()
                .is_some_and(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let inner = lock(&self.stream.body)
            .as_ref()
            .map_or_else(SizeHint::default, HttpBody::size_hint);
        // A fresh hint: raising an exact one's lower bound first would
        // pass its upper one, which `set_lower` refuses with a panic.
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// Why a watched stream's body failed: the watch dropped it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the client took none of this answer for the send timeout; its upstream request was cancelled"
)]
pub(crate) struct Unread {
    /// How the stream is reset: `CANCEL` (the answer is no longer
    /// wanted), which hyper finds among the error's sources, where it would
    /// otherwise say `INTERNAL_ERROR`.
    #[source]
    reset: h2::Error,
}

impl Unread {
    fn new() -> Self {
        Unread {
            reset: h2::Reason::CANCEL.into(),
        }
    }
}

/// One request in flight on a watched connection; its response body keeps
/// it until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    /// The body handed out a frame and has not been asked for the next.
    handed: bool,
    /// An HTTP/2 body's place in the connection's watch, once
    /// [`InFlight::watch`] put it there.
    stream: Option<Arc<Stream>>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("handed_at", &self.handed_at)
            .finish_non_exhaustive()
    }
}

impl InFlight {
    /// The connection's watch.
    pub(crate) fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub(crate) fn new(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        if activity.draining.load(Ordering::Acquire) {
            activity.took_in_drain.store(true, Ordering::Release);
            activity.taken_in_drain.notify_waiters();
        }
        InFlight {
            activity: activity.clone(),
            handed: false,
            stream: None,
        }
    }

    /// `body`, as the client is to read it: on HTTP/2, held where the
    /// connection's watch drops it once unread for the send timeout
    /// (`Activity::stalled`). On HTTP/1 the watch closes the connection
    /// instead, and `body` is returned as it is.
    pub(crate) fn watch(&mut self, body: Body, request_id: Option<&http::HeaderValue>) -> Body {
        if self.activity.http1.load(Ordering::Relaxed) || self.stream.is_some() {
            return body;
        }
        let mut streams = lock(&self.activity.streams);
        let entry = streams.vacant_entry();
        let stream = Arc::new(Stream {
            key: entry.key(),
            body: Mutex::new(Some(body)),
            handed_at: AtomicU64::new(0),
            request_id: request_id.cloned(),
        });
        entry.insert(stream.clone());
        drop(streams);
        self.stream = Some(stream.clone());
        Body::new(Watched {
            stream,
            rest: Bytes::new(),
        })
    }

    /// The response body is asked for a frame.
    pub(crate) fn asked(&mut self) {
        self.activity.body_polls.fetch_add(1, Ordering::Relaxed);
        if self.handed {
            self.handed = false;
            self.activity.unsent.fetch_sub(1, Ordering::Relaxed);
            if let Some(stream) = &self.stream {
                stream.handed_at.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The response body answered `polled`.
    pub(crate) fn answered<T, E>(&mut self, polled: &Poll<Option<Result<T, E>>>) {
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.handed = true;
            self.activity.unsent.fetch_add(1, Ordering::Relaxed);
            if let Some(stream) = &self.stream {
                let tick = self.activity.ticks.load(Ordering::Relaxed);
                stream.handed_at.store(tick + 1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        if self.handed {
            activity.unsent.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(stream) = self.stream.take() {
            lock(&activity.streams).try_remove(stream.key);
        }
        // Stamp before the count falls: `idle` never sees zero in flight
        // with a stale stamp. (HTTP/1 connections need no stamp, nor the
        // clock read.)
        if !activity.http1.load(Ordering::Relaxed) {
            activity
                .idle_since_ms
                .store(activity.now_ms(), Ordering::Release);
        }
        // What the client sends from now on is its next request (bytes of
        // this one's body read late may count as such: the header timeout
        // still bounds the wait for a head that is not coming).
        activity.read_since_request.store(false, Ordering::Relaxed);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
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

    #[tokio::test(start_paused = true)]
    async fn writes_that_do_not_go_through_for_the_timeout_are_a_stall() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(8);
        // A body keeps being asked for frames (its stream's window is
        // open), but nothing reaches the client.
        let mut body = InFlight::new(&activity);
        body.asked();
        activity.write_pending();
        let started = Instant::now();
        let stalled = activity.stalled(timeout);
        let mut stalled = std::pin::pin!(stalled);
        loop {
            tokio::select! {
                () = &mut stalled => break,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    body.asked();
                    body.answered::<(), ()>(&Poll::Ready(Some(Ok(()))));
                    activity.write_pending();
                }
            }
        }
        let took = started.elapsed();
        assert!(took >= timeout && took <= timeout + timeout / 4, "{took:?}");
        // Writes that go through again: no stall.
        activity.wrote();
        body.asked();
        let waiting = tokio::time::timeout(Duration::from_secs(60), activity.stalled(timeout));
        assert!(waiting.await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_left_with_its_frame_is_stalled_and_one_waiting_upstream_is_not() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(8);
        let mut body = InFlight::new(&activity);
        // Asked, and waiting for its upstream: never stalled.
        body.asked();
        body.answered::<(), ()>(&Poll::Pending);
        let waiting = tokio::time::timeout(Duration::from_secs(60), activity.stalled(timeout));
        assert!(waiting.await.is_err());
        // A frame handed out, never asked for the next: stalled in about
        // the timeout (measured in quarters).
        body.asked();
        body.answered::<(), ()>(&Poll::Ready(Some(Ok(()))));
        let started = Instant::now();
        activity.stalled(timeout).await;
        let took = started.elapsed();
        assert!(took >= timeout && took <= timeout + timeout / 4, "{took:?}");
        // Another request on the connection still waiting for its
        // upstream: the connection is not closed for the first one.
        let mut other = InFlight::new(&activity);
        other.asked();
        other.answered::<(), ()>(&Poll::Pending);
        let waiting = tokio::time::timeout(Duration::from_secs(60), activity.stalled(timeout));
        assert!(waiting.await.is_err());
        drop(other);
        // Asked again: no longer.
        body.asked();
        let waiting = tokio::time::timeout(Duration::from_secs(60), activity.stalled(timeout));
        assert!(waiting.await.is_err());
    }

    /// A body of frames sent on a channel; the sender tells when it is
    /// dropped.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, BoxError>(Frame::data(data)), rx))
        });
        (tx, http_body_util::StreamBody::new(frames).boxed_unsync())
    }

    /// Polls `body` once as hyper does, telling `conn`.
    fn poll_once(
        conn: &mut InFlight,
        body: &mut Body,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        conn.asked();
        let polled = Pin::new(body).poll_frame(&mut cx);
        conn.answered(&polled);
        polled
    }

    #[tokio::test(start_paused = true)]
    async fn an_unread_http2_stream_is_dropped_and_a_read_one_is_not() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(8);
        let (unread_tx, unread) = channel_body();
        let (read_tx, read) = channel_body();
        let mut unread_conn = InFlight::new(&activity);
        let mut unread = unread_conn.watch(unread, None);
        let mut read_conn = InFlight::new(&activity);
        let mut read = read_conn.watch(read, None);
        // Each hands out a frame; only one is asked for more, now and then.
        unread_tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(poll_once(&mut unread_conn, &mut unread).is_ready());
        let stalled = activity.stalled(timeout);
        let mut stalled = std::pin::pin!(stalled);
        let started = Instant::now();
        while !unread_tx.is_closed() {
            read_tx.send(Bytes::from_static(b"b")).await.unwrap();
            assert!(matches!(
                poll_once(&mut read_conn, &mut read),
                Poll::Ready(Some(Ok(_)))
            ));
            tokio::select! {
                () = &mut stalled => panic!("the connection is not closed for one stream"),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            assert!(
                started.elapsed() < timeout * 2,
                "the unread body is dropped"
            );
        }
        let took = started.elapsed();
        assert!(
            took >= timeout && took <= timeout + timeout / 4 + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(!read_tx.is_closed(), "the read stream goes on");
        // Read again, the dropped stream fails.
        assert!(matches!(
            poll_once(&mut unread_conn, &mut unread),
            Poll::Ready(Some(Err(_)))
        ));
        drop((unread, unread_conn));
        assert_eq!(lock(&activity.streams).len(), 1);
        drop((read, read_conn));
        assert!(lock(&activity.streams).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn http1_bodies_are_not_held_for_the_watch() {
        let activity = Activity::new();
        activity.saw(http::Version::HTTP_11);
        let mut conn = InFlight::new(&activity);
        let (_tx, body) = channel_body();
        let _body = conn.watch(body, None);
        assert!(lock(&activity.streams).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_watched_body_hands_out_large_frames_in_pieces_and_is_not_dropped_at_its_end() {
        let activity = Activity::new();
        let mut conn = InFlight::new(&activity);
        let whole = Bytes::from(vec![7u8; 2 * PIECE + 100]);
        let mut body = conn.watch(llm_proxy_core::full(whole.clone()), None);
        let mut pieces = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = poll_once(&mut conn, &mut body) {
            pieces.push(frame.into_data().unwrap());
            let left = (whole.len() - pieces.iter().map(Bytes::len).sum::<usize>()) as u64;
            assert_eq!(body.size_hint().exact(), Some(left));
            if body.is_end_stream() {
                break;
            }
        }
        let lengths: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        // (Asked between pieces, the hint counts what is left.)
        assert_eq!(lengths, [PIECE, PIECE, 100]);
        assert_eq!(pieces.concat(), whole);
        // Its last piece handed out and never asked past: at its end,
        // nothing upstream to cancel, and it is not dropped (beside a
        // stream that waits, which keeps the connection open).
        let mut waiting = InFlight::new(&activity);
        let (_tx, pending) = channel_body();
        let mut pending = waiting.watch(pending, None);
        assert!(poll_once(&mut waiting, &mut pending).is_pending());
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            activity.stalled(Duration::from_secs(4)),
        );
        let _ = waited.await;
        let streams = lock(&activity.streams);
        assert_eq!(streams.len(), 2);
        assert!(
            streams
                .iter()
                .all(|(_, stream)| lock(&stream.body).is_some()),
            "dropped at its end"
        );
    }
}
