//! The addresses of an upstream's host, looked up once and kept a while.
//!
//! Without it every new connection asks the system's resolver
//! (`getaddrinfo`, on a blocking thread): a burst of new connections to an
//! upstream named by a host name, a cold start or a pool that closed idle
//! ones, becomes as many lookups at once, each on a thread of its own (tokio
//! runs up to 512), and as many queries to the DNS server. nginx looks an
//! upstream's name up once, when it reads its config; Envoy's `strict_dns`
//! clusters look it up again every 5 s. This does as Envoy does: one lookup
//! at a time, its addresses kept for [`REFRESH`]. A failure is kept for
//! none: the connections that waited for the failed lookup get its error
//! (not one slow lookup after another), the next one asks again. A host
//! that is an IP address is never looked up.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use tokio::time::Instant;

/// How long a lookup's addresses are used before the next connection looks
/// the name up again (Envoy's default `dns_refresh_rate`).
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// One host's addresses (port 0: the caller sets its own).
#[derive(Debug)]
pub(crate) struct Dns {
    host: Box<str>,
    /// The host as an address: nothing to look up.
    literal: Option<Arc<[SocketAddr]>>,
    /// The last lookup's addresses, and when they were found.
    kept: Mutex<Option<(Instant, Arc<[SocketAddr]>)>>,
    /// The last failed lookup: when it ended, and its error (kind and
    /// text), for the connections that were waiting for it.
    failed: Mutex<Option<(Instant, io::ErrorKind, String)>>,
    /// Held by the one connection looking the name up; the others wait for
    /// its answer instead of asking too. Only taken when `kept` is stale.
    lookup: tokio::sync::Mutex<()>,
}

impl Dns {
    /// The addresses of `host` (a name, or an IP address with or without
    /// the brackets of an IPv6 one in a URL).
    pub(crate) fn new(host: &str) -> Self {
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Dns {
            host: host.into(),
            literal: host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| Arc::from([SocketAddr::new(ip, 0)])),
            kept: Mutex::new(None),
            failed: Mutex::new(None),
            lookup: tokio::sync::Mutex::new(()),
        }
    }

    /// The host, as looked up.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// The host's addresses, with port 0: kept ones younger than
    /// [`REFRESH`], else from a lookup (one at a time).
    pub(crate) async fn resolve(&self) -> io::Result<Arc<[SocketAddr]>> {
        self.resolve_with(|host| async move {
            Ok(tokio::net::lookup_host((&*host, 0)).await?.collect())
        })
        .await
    }

    async fn resolve_with<F, Fut>(&self, look_up: F) -> io::Result<Arc<[SocketAddr]>>
    where
        F: FnOnce(Box<str>) -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>>,
    {
        if let Some(addr) = &self.literal {
            return Ok(addr.clone());
        }
        if let Some(addrs) = self.fresh() {
            return Ok(addrs);
        }
        let asked = Instant::now();
        let _turn = self.lookup.lock().await;
        // Another connection may have looked it up while this one waited,
        // or failed to: its answer is this one's.
        if let Some(addrs) = self.fresh() {
            return Ok(addrs);
        }
        if let Some((at, kind, error)) = &*lock(&self.failed)
            && *at > asked
        {
            return Err(io::Error::new(*kind, error.clone()));
        }
        let found = match look_up(self.host.clone()).await {
            Ok(addrs) if addrs.is_empty() => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("`{}` resolves to no address", self.host),
            )),
            found => found,
        };
        match found {
            Ok(addrs) => {
                let addrs: Arc<[SocketAddr]> = addrs.into();
                *lock(&self.kept) = Some((Instant::now(), addrs.clone()));
                Ok(addrs)
            }
            Err(e) => {
                *lock(&self.failed) = Some((Instant::now(), e.kind(), e.to_string()));
                Err(e)
            }
        }
    }

    fn fresh(&self) -> Option<Arc<[SocketAddr]>> {
        match &*lock(&self.kept) {
            Some((at, addrs)) if at.elapsed() < REFRESH => Some(addrs.clone()),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // An answer kept holds no invariant a panic could break.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`Dns`] as hyper-util's connector asks a resolver: it sets the port.
/// A name other than the upstream's host (none is asked for today) is
/// looked up afresh.
#[derive(Clone)]
pub(crate) struct Resolver(pub(crate) Arc<Dns>);

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let dns = self.0.clone();
        Box::pin(async move {
            if name.as_str() == dns.host() {
                Ok(dns.resolve().await?.to_vec().into_iter())
            } else {
                Ok(tokio::net::lookup_host((name.as_str(), 0))
                    .await?
                    .collect::<Vec<_>>()
                    .into_iter())
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Lookup = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

    /// A lookup that counts itself, takes 10 ms, and answers `answer`.
    fn counted(
        calls: &Arc<AtomicUsize>,
        answer: io::Result<Vec<SocketAddr>>,
    ) -> impl FnOnce(Box<str>) -> Lookup {
        let calls = calls.clone();
        move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                answer
            })
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_connections_share_one_lookup_kept_for_the_refresh() {
        let dns = Arc::new(Dns::new("upstream.internal"));
        let calls = Arc::new(AtomicUsize::new(0));
        let answer = || Ok(vec![addr("10.0.0.1:0"), addr("10.0.0.2:0")]);
        let all = (0..8).map(|_| {
            let (dns, calls) = (dns.clone(), calls.clone());
            tokio::spawn(async move { dns.resolve_with(counted(&calls, answer())).await })
        });
        for got in futures_join(all).await {
            assert_eq!(&*got.unwrap(), [addr("10.0.0.1:0"), addr("10.0.0.2:0")]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Kept until the refresh, then looked up again.
        tokio::time::advance(REFRESH - Duration::from_millis(100)).await;
        dns.resolve_with(counted(&calls, answer())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        let moved = dns
            .resolve_with(counted(&calls, Ok(vec![addr("10.0.0.3:0")])))
            .await
            .unwrap();
        assert_eq!(&*moved, [addr("10.0.0.3:0")]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_lookup_is_not_kept_and_an_address_is_never_looked_up() {
        let dns = Dns::new("upstream.internal");
        let calls = Arc::new(AtomicUsize::new(0));
        let failed = dns
            .resolve_with(counted(&calls, Err(io::ErrorKind::NotFound.into())))
            .await;
        assert!(failed.is_err());
        let none = dns.resolve_with(counted(&calls, Ok(Vec::new()))).await;
        assert!(
            none.unwrap_err()
                .to_string()
                .contains("resolves to no address")
        );
        let found = dns.resolve_with(counted(&calls, Ok(vec![addr("10.0.0.1:0")])));
        assert_eq!(&*found.await.unwrap(), [addr("10.0.0.1:0")]);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        // Connections waiting for a lookup that fails get its error; the
        // next one asks again.
        let dns = Arc::new(Dns::new("other.internal"));
        let waiting = (0..4).map(|_| {
            let (dns, calls) = (dns.clone(), calls.clone());
            tokio::spawn(async move {
                let failed = counted(&calls, Err(io::Error::other("no such host")));
                dns.resolve_with(failed).await
            })
        });
        for got in futures_join(waiting).await {
            assert_eq!(got.unwrap_err().to_string(), "no such host");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4, "one lookup for the four");
        let again = dns.resolve_with(counted(&calls, Ok(vec![addr("10.0.0.9:0")])));
        assert_eq!(&*again.await.unwrap(), [addr("10.0.0.9:0")]);
        assert_eq!(calls.load(Ordering::SeqCst), 5);

        for (host, ip) in [
            ("127.0.0.1", "127.0.0.1:0"),
            ("[::1]", "[::1]:0"),
            ("::1", "[::1]:0"),
        ] {
            let dns = Dns::new(host);
            let got = dns.resolve_with(counted(&calls, Err(io::ErrorKind::Other.into())));
            assert_eq!(&*got.await.unwrap(), [addr(ip)], "{host}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }

    /// Every task's output, in order.
    async fn futures_join<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::new();
        for task in tasks.collect::<Vec<_>>() {
            out.push(task.await.unwrap());
        }
        out
    }
}
