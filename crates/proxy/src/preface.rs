//! A deadline for a new connection's first bytes.
//!
//! hyper-util's automatic HTTP/1-or-HTTP/2 server first reads until it can
//! tell the protocols apart (the 24-byte HTTP/2 preface, or any byte that
//! departs from it), with no timer: hyper's header-read timeout starts only
//! once the HTTP/1 connection exists. A client that connects and sends
//! nothing, or a prefix of the preface (`PRI * HTTP/2.0`…) and then nothing,
//! would hold its connection — and one of `max_connections` permits —
//! forever. [`FirstBytes`] fails the reads with `TimedOut` once the deadline
//! passes while every byte read so far is still a prefix of the preface; the
//! first byte that departs from it, or the whole preface, disarms it (hyper's
//! own timers take over from there).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::idle::Activity;

/// What an HTTP/2 connection starts with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pin_project_lite::pin_project! {
    /// An I/O stream whose reads fail with [`io::ErrorKind::TimedOut`] if the
    /// bytes that tell HTTP/1 from HTTP/2 have not come by a deadline.
    #[derive(Debug)]
    pub(crate) struct FirstBytes<T> {
        #[pin]
        io: T,
        // Bytes read so far, while they are a prefix of the preface.
        seen: usize,
        // `None` once disarmed.
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
        // Told when the connection turns out to be HTTP/1.
        activity: Option<Arc<Activity>>,
        // Told whether writes go through, and when reads bring bytes.
        watch: Option<Arc<Activity>>,
    }
}

impl<T> FirstBytes<T> {
    /// Arm the deadline `timeout` from now (call it inside a tokio runtime).
    pub(crate) fn new(io: T, timeout: Duration) -> Self {
        FirstBytes {
            io,
            seen: 0,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            activity: None,
            watch: None,
        }
    }

    /// Tell `activity` as soon as the first bytes show HTTP/1 (hyper's
    /// timers watch that connection from then on; `crate::idle`).
    pub(crate) fn telling(mut self, activity: Arc<Activity>) -> Self {
        self.watch = Some(activity.clone());
        self.activity = Some(activity);
        self
    }
}

/// Tell `activity` whether a write went through (`crate::idle`'s stall).
fn tell_writes(
    activity: Option<&Activity>,
    written: Poll<io::Result<usize>>,
) -> Poll<io::Result<usize>> {
    if let Some(activity) = activity {
        match &written {
            Poll::Ready(Ok(n)) if *n > 0 => activity.wrote(),
            Poll::Pending => activity.write_pending(),
            _ => {}
        }
    }
    written
}

/// Whether `read`, coming after `seen` bytes that matched, completes the
/// preface (an HTTP/2 connection).
fn completes_preface(seen: usize, read: &[u8]) -> bool {
    PREFACE
        .get(seen..)
        .is_some_and(|rest| read.starts_with(rest))
}

/// Whether `read`, coming after `seen` bytes that matched, still matches.
fn continues_preface(seen: usize, read: &[u8]) -> bool {
    PREFACE
        .get(seen..)
        .is_some_and(|rest| rest.len() > read.len() && rest.starts_with(read))
}

impl<T: AsyncRead> AsyncRead for FirstBytes<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let Some(deadline) = this.deadline.as_mut() else {
            let before = buf.filled().len();
            let read = this.io.poll_read(cx, buf);
            if let Some(watch) = this.watch.as_deref()
                && buf.filled().len() > before
            {
                watch.read_some();
            }
            return read;
        };
        let before = buf.filled().len();
        match this.io.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() && continues_preface(*this.seen, read) {
                    *this.seen += read.len();
                } else {
                    // Decided (or at end of stream): hyper's timers rule now.
                    *this.deadline = None;
                    if !read.is_empty()
                        && !completes_preface(*this.seen, read)
                        && let Some(activity) = this.activity.take()
                    {
                        activity.saw(http::Version::HTTP_11);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request within the header read timeout",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        tell_writes(this.watch.as_deref(), this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        tell_writes(this.watch.as_deref(), this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test should panic on unexpected input
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_whole_preface_completes_it() {
        assert!(completes_preface(0, PREFACE));
        assert!(completes_preface(
            3,
            b" * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"
        ));
        assert!(!completes_preface(0, b"POST / HTTP/1.1"));
        assert!(!completes_preface(0, b"PRI * HTTP/2.0"));
    }

    #[test]
    fn only_a_proper_prefix_of_the_preface_keeps_it_armed() {
        assert!(continues_preface(0, b"PRI * HTTP/2.0"));
        assert!(continues_preface(3, b" * "));
        assert!(!continues_preface(0, b"POST / HTTP/1.1"));
        assert!(!continues_preface(0, b"GET"));
        // The whole preface decides for HTTP/2.
        assert!(!continues_preface(0, PREFACE));
        assert!(!continues_preface(PREFACE.len(), b"x"));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_times_out_and_a_request_disarms_it() {
        // Nothing sent: the read fails at the deadline.
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = FirstBytes::new(server, Duration::from_secs(1));
        let mut buf = [0u8; 8];
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(client);

        // A prefix of the preface, then nothing: still cut off.
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = FirstBytes::new(server, Duration::from_secs(1));
        client.write_all(b"PRI *").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 5);
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        // An HTTP/1 request's first bytes disarm it: a later wait is hyper's
        // to bound, not this one's.
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = FirstBytes::new(server, Duration::from_secs(1));
        client.write_all(b"POST /").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 6);
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.write_all(b"v1").await.unwrap();
            client
        });
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 2);
        drop(later.await.unwrap());
    }
}
