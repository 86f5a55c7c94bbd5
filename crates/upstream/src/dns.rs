//! The addresses of an upstream's host, looked up once and kept a while.
//!
//! Without it every new connection asks the system's resolver
//! (`getaddrinfo`, on a blocking thread): a burst of new connections to an
//! upstream named by a host name, a cold start or a pool that closed idle
//! ones, becomes as many lookups at once, each on a thread of its own (tokio
//! runs up to 512), and as many queries to the DNS server. nginx looks an
//! upstream's name up once, when it reads its config; Envoy's `strict_dns`
//! clusters look it up again every 5 s. This does as Envoy does: one lookup
//! at a time, on a task of its own (a connection that gives up waiting does
//! not take the lookup with it), its addresses kept for [`REFRESH`] and
//! handed out from a rotating start (a burst spreads over a host's
//! addresses as a rotating DNS server would spread it). A lookup that fails
//! where addresses are kept (a DNS server down, a timeout) keeps them for
//! another [`REFRESH`], as Envoy keeps a cluster's hosts when a refresh
//! fails: a DNS outage does not take down upstreams that still answer.
//! One that fails with nothing kept is kept for none: the connections
//! waiting for the lookup get its error, the next one asks again. A
//! connection that fails to every kept address forgets them
//! ([`Dns::forget`]): an upstream that moved is looked up again at once,
//! and stale addresses that no longer answer are not served on. A host
//! that is an IP address is never looked up.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::Name;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a lookup's addresses are used before the next connection looks
/// the name up again (Envoy's default `dns_refresh_rate`).
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// A lookup's answer, as its waiters get it.
type Answer = Result<Arc<[SocketAddr]>, Failure>;

/// A failed lookup, for each of its waiters to get as its own error (with
/// the OS's error code, when it had one: out of descriptors is read from it).
#[derive(Clone, Debug)]
struct Failure {
    kind: io::ErrorKind,
    os: Option<i32>,
    text: String,
}

impl Failure {
    fn of(e: &io::Error) -> Self {
        Failure {
            kind: e.kind(),
            os: e.raw_os_error(),
            text: e.to_string(),
        }
    }

    fn error(&self) -> io::Error {
        match self.os {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.kind, self.text.clone()),
        }
    }
}

/// One host's addresses (port 0: the caller sets its own).
#[derive(Debug)]
pub(crate) struct Dns {
    host: Arc<str>,
    /// The host as an address: nothing to look up.
    literal: Option<Arc<[SocketAddr]>>,
    /// Shared with the lookup task under way, which ends it.
    state: Arc<Mutex<State>>,
    /// Where the next connection starts in the addresses.
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    /// The last lookup's addresses, and when they were found.
    kept: Option<(Instant, Arc<[SocketAddr]>)>,
    /// The lookup under way, for more connections to wait for.
    pending: Option<watch::Receiver<Option<Answer>>>,
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
            state: Arc::default(),
            next: AtomicUsize::new(0),
        }
    }

    /// The host, as looked up.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    /// The host's addresses, with port 0, from the next start in turn:
    /// kept ones younger than [`REFRESH`], else a lookup's (one at a time).
    pub(crate) async fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        self.resolve_with(|host| async move {
            Ok(tokio::net::lookup_host((&*host, 0)).await?.collect())
        })
        .await
    }

    /// Forget the kept addresses: a connection failed to every one of
    /// them, and the next is to look the name up again.
    pub(crate) fn forget(&self) {
        if self.literal.is_none() {
            self.lock().kept = None;
        }
    }

    /// Whether addresses are kept (fresh or not), for tests.
    #[cfg(test)]
    pub(crate) fn keeps(&self) -> bool {
        self.lock().kept.is_some()
    }

    async fn resolve_with<F, Fut>(&self, look_up: F) -> io::Result<Vec<SocketAddr>>
    where
        F: FnOnce(Arc<str>) -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        let addrs = match &self.literal {
            Some(addr) => addr.clone(),
            None => self.addresses(look_up).await?,
        };
        let mut addrs = addrs.to_vec();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % addrs.len().max(1);
        addrs.rotate_left(start);
        Ok(addrs)
    }

    async fn addresses<F, Fut>(&self, look_up: F) -> io::Result<Arc<[SocketAddr]>>
    where
        F: FnOnce(Arc<str>) -> Fut,
        Fut: Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'static,
    {
        let mut answer = {
            let mut state = self.lock();
            match (&state.kept, &state.pending) {
                (Some((at, addrs)), _) if at.elapsed() < REFRESH => return Ok(addrs.clone()),
                // (A lookup's task ends it before it answers: one still
                // pending with its sender gone was dropped unfinished, by
                // its runtime shutting down, and another is started.)
                (_, Some(pending)) if pending.has_changed().is_ok() => pending.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    state.pending = Some(rx.clone());
                    let lookup = look_up(self.host.clone());
                    let host = self.host.clone();
                    // The lookup outlives the connection that started it.
                    let record = self.recorder();
                    tokio::spawn(async move {
                        let answer = match lookup.await {
                            Ok(addrs) if addrs.is_empty() => Err(Failure::of(&io::Error::new(
                                io::ErrorKind::NotFound,
                                format!("`{host}` resolves to no address"),
                            ))),
                            Ok(addrs) => Ok(Arc::from(addrs)),
                            Err(e) => Err(Failure::of(&e)),
                        };
                        let answer = record(answer);
                        let _ = tx.send(Some(answer));
                    });
                    rx
                }
            }
        };
        let answer = answer
            .wait_for(Option::is_some)
            .await
            .map_err(|_| io::Error::other("the lookup ended without an answer"))?;
        match answer.as_ref() {
            Some(Ok(addrs)) => Ok(addrs.clone()),
            Some(Err(failure)) => Err(failure.error()),
            None => Err(io::Error::other("the lookup ended without an answer")),
        }
    }

    /// What the lookup task calls with its answer: keep addresses found,
    /// end the lookup for the connections to come, and say what its
    /// waiters get: the addresses found, or after a failed lookup the
    /// addresses kept (kept another [`REFRESH`]), else the failure.
    fn recorder(&self) -> impl FnOnce(Answer) -> Answer + Send + 'static {
        // The task holds no `Dns` (an `Upstream` dropped mid-lookup is
        // dropped); it reaches the state through a weak handle.
        let weak = Arc::downgrade(&self.state);
        let host = self.host.clone();
        move |answer| {
            let Some(state) = weak.upgrade() else {
                return answer;
            };
            let mut state = lock(&state);
            state.pending = None;
            match (answer, &mut state.kept) {
                (Ok(addrs), kept) => {
                    *kept = Some((Instant::now(), addrs.clone()));
                    Ok(addrs)
                }
                (Err(failure), Some((at, addrs))) => {
                    tracing::warn!(
                        host = %host,
                        error = %failure.text,
                        "upstream host lookup failed: its last addresses stay in use"
                    );
                    *at = Instant::now();
                    Ok(addrs.clone())
                }
                (Err(failure), _) => Err(failure),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
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
                Ok(dns.resolve().await?.into_iter())
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

    type Lookup = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send>>;

    /// A lookup that counts itself, takes `ms`, and answers `answer`.
    fn counted(
        calls: &Arc<AtomicUsize>,
        ms: u64,
        answer: io::Result<Vec<SocketAddr>>,
    ) -> impl FnOnce(Arc<str>) -> Lookup {
        let calls = calls.clone();
        move |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                answer
            })
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// `n` connections resolving `dns` at once with lookups of `ms` that
    /// answer `answer()`; their results in order.
    async fn at_once(
        dns: &Arc<Dns>,
        calls: &Arc<AtomicUsize>,
        n: usize,
        ms: u64,
        answer: fn() -> io::Result<Vec<SocketAddr>>,
    ) -> Vec<io::Result<Vec<SocketAddr>>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (dns, calls) = (dns.clone(), calls.clone());
                tokio::spawn(async move { dns.resolve_with(counted(&calls, ms, answer())).await })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    }

    fn two() -> io::Result<Vec<SocketAddr>> {
        Ok(vec![addr("10.0.0.1:0"), addr("10.0.0.2:0")])
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_connections_share_one_lookup_kept_for_the_refresh() {
        let dns = Arc::new(Dns::new("upstream.internal"));
        let calls = Arc::new(AtomicUsize::new(0));
        let got = at_once(&dns, &calls, 8, 10, two).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Each gets both addresses, from a start that turns: a burst
        // spreads over them.
        let firsts: Vec<_> = got.iter().map(|a| a.as_ref().unwrap()[0]).collect();
        assert_eq!(
            firsts.iter().filter(|a| **a == addr("10.0.0.1:0")).count(),
            4
        );
        assert!(got.iter().all(|a| a.as_ref().unwrap().len() == 2));
        // Kept until the refresh, then looked up again.
        tokio::time::advance(REFRESH - Duration::from_millis(100)).await;
        dns.resolve_with(counted(&calls, 10, two())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        let moved = dns
            .resolve_with(counted(&calls, 10, Ok(vec![addr("10.0.0.3:0")])))
            .await
            .unwrap();
        assert_eq!(moved, [addr("10.0.0.3:0")]);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Forgotten (every address failed): looked up at once.
        dns.forget();
        dns.resolve_with(counted(&calls, 10, two())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// A connection that stops waiting (its connect timeout, its client
    /// gone) leaves the lookup running for those still waiting and the
    /// ones to come.
    #[tokio::test(start_paused = true)]
    async fn a_lookup_outlives_the_connection_that_started_it() {
        let dns = Arc::new(Dns::new("upstream.internal"));
        let calls = Arc::new(AtomicUsize::new(0));
        let gave_up = tokio::time::timeout(
            Duration::from_millis(500),
            dns.resolve_with(counted(&calls, 800, two())),
        );
        assert!(gave_up.await.is_err());
        let waiter = dns.resolve_with(counted(&calls, 800, two()));
        let got = tokio::time::timeout(Duration::from_millis(400), waiter).await;
        assert_eq!(got.unwrap().unwrap().len(), 2, "the first lookup's answer");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        dns.resolve_with(counted(&calls, 800, two())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "kept");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_lookup_is_shared_by_its_waiters_and_not_kept() {
        let dns = Arc::new(Dns::new("upstream.internal"));
        let calls = Arc::new(AtomicUsize::new(0));
        let got = at_once(&dns, &calls, 4, 10, || {
            Err(io::Error::other("no such host"))
        })
        .await;
        assert!(
            got.iter()
                .all(|r| r.as_ref().unwrap_err().to_string() == "no such host")
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one lookup for the four");
        // The OS's code goes to every waiter (out of descriptors is read from it).
        let got = at_once(&dns, &calls, 2, 10, || {
            Err(io::Error::from_raw_os_error(24))
        })
        .await;
        assert!(
            got.iter()
                .all(|r| r.as_ref().unwrap_err().raw_os_error() == Some(24))
        );
        let none = dns.resolve_with(counted(&calls, 10, Ok(Vec::new()))).await;
        assert!(
            none.unwrap_err()
                .to_string()
                .contains("resolves to no address")
        );
        let found = dns.resolve_with(counted(&calls, 10, Ok(vec![addr("10.0.0.1:0")])));
        assert_eq!(found.await.unwrap(), [addr("10.0.0.1:0")]);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// A refresh that fails keeps the last addresses in use (a DNS outage
    /// does not take down upstreams that still answer), for another
    /// refresh; forgotten (every address failed), they are not served on.
    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_last_addresses() {
        let dns = Arc::new(Dns::new("upstream.internal"));
        let calls = Arc::new(AtomicUsize::new(0));
        let down = || Err(io::Error::other("dns server down"));
        dns.resolve_with(counted(&calls, 10, two())).await.unwrap();
        tokio::time::advance(REFRESH + Duration::from_millis(1)).await;
        let got = at_once(&dns, &calls, 3, 10, down).await;
        for addrs in got {
            let mut addrs = addrs.unwrap();
            addrs.sort();
            assert_eq!(addrs, two().unwrap());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one failed lookup");
        // Kept for another refresh: no lookup per connection while DNS is down.
        tokio::time::advance(REFRESH - Duration::from_millis(100)).await;
        assert_eq!(
            dns.resolve_with(counted(&calls, 10, down()))
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            dns.resolve_with(counted(&calls, 10, down()))
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // A lookup that answers again replaces them.
        tokio::time::advance(REFRESH).await;
        let moved = dns.resolve_with(counted(&calls, 10, Ok(vec![addr("10.0.0.3:0")])));
        assert_eq!(moved.await.unwrap(), [addr("10.0.0.3:0")]);
        // Forgotten, a failure is the connection's error.
        dns.forget();
        let failed = dns.resolve_with(counted(&calls, 10, down())).await;
        assert_eq!(failed.unwrap_err().to_string(), "dns server down");
        assert!(!dns.keeps());
    }

    /// A lookup whose task was dropped unfinished (its runtime shut down:
    /// each server thread has its own) does not hold the name for ever.
    #[test]
    fn a_lookup_dropped_unfinished_is_started_again() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        };
        let dns = Arc::new(Dns::new("upstream.internal"));
        let calls = Arc::new(AtomicUsize::new(0));
        let first = runtime();
        let gave_up = first.block_on(async {
            let lookup = dns.resolve_with(counted(&calls, 60_000, two()));
            tokio::time::timeout(Duration::from_millis(10), lookup).await
        });
        assert!(gave_up.is_err());
        drop(first);
        let got = runtime().block_on(dns.resolve_with(counted(&calls, 1, two())));
        assert_eq!(got.unwrap().len(), 2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_is_never_looked_up() {
        let calls = Arc::new(AtomicUsize::new(0));
        for (host, ip) in [
            ("127.0.0.1", "127.0.0.1:0"),
            ("[::1]", "[::1]:0"),
            ("::1", "[::1]:0"),
        ] {
            let dns = Dns::new(host);
            dns.forget();
            let got = dns.resolve_with(counted(&calls, 10, Err(io::ErrorKind::Other.into())));
            assert_eq!(got.await.unwrap(), [addr(ip)], "{host}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
