//! Prometheus metrics of the proxy (names pinned in DESIGN.md).

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::{Body, BoxError};

use crate::idle::{InFlight, Unread};
use foldhash::fast::FixedState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// A shared name as a label value, without copying it per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write_escaped(encoder, &self.0)
    }
}

/// A label value written as the text format wants it: `\`, `"` and line
/// feeds escaped (prometheus-client 0.24 writes values raw). Values come
/// from config (upstream and key names) and from clients (a model a key
/// names): unescaped, a model named `x"} 1\nfake_total 9` would add a line
/// to the scrape, or break it for the scraper.
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write_escaped(encoder, self.0)
    }
}

fn write_escaped(out: &mut impl std::fmt::Write, value: &str) -> std::fmt::Result {
    if !value.contains(['\\', '"', '\n']) {
        return out.write_str(value);
    }
    for c in value.chars() {
        match c {
            '\\' => out.write_str("\\\\")?,
            '"' => out.write_str("\\\"")?,
            '\n' => out.write_str("\\n")?,
            c => out.write_char(c)?,
        }
    }
    Ok(())
}

#[derive(Debug, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    upstream: Name,
}

#[derive(Debug, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// The proxy's metrics registry.
pub struct Metrics {
    registry: Registry,
    /// Every thread's counts of the requests it answered.
    shards: Arc<Shards>,
    sources: Arc<std::sync::RwLock<Vec<Source>>>,
}

/// A mutex's guard, poisoned or not (every update leaves its data whole).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One metric read from a layer at scrape time.
#[derive(Debug)]
pub struct Series {
    /// Name without the `llm_proxy_` prefix (and, for counters, `_total`).
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Counter or gauge.
    pub counter: bool,
    /// Label sets and values.
    pub samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

/// A function that reads a layer's counters at scrape time.
pub type Source = Box<dyn Fn() -> Vec<Series> + Send + Sync>;

/// Encodes the [`Source`]s' series on each scrape: layers keep their own
/// atomics, and nothing is copied per request.
struct Scraped(Arc<std::sync::RwLock<Vec<Source>>>);

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scraped")
    }
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sources = self.0.read().unwrap_or_else(|p| p.into_inner());
        for series in sources.iter().flat_map(|source| source()) {
            let kind = if series.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(series.name, series.help, None, kind)?;
            let encode = |metric: MetricEncoder<'_>, value: u64| {
                if series.counter {
                    ConstCounter::new(value).encode(metric)
                } else {
                    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)
                }
            };
            if let [(labels, value)] = series.samples.as_slice()
                && labels.is_empty()
            {
                // One unlabelled value: `name 5`, not `name{} 5`.
                encode(family, *value)?;
                continue;
            }
            for (labels, value) in &series.samples {
                let labels: Vec<(&str, Escaped<'_>)> = labels
                    .iter()
                    .map(|(name, value)| (*name, Escaped(value)))
                    .collect();
                encode(family.encode_family(&labels)?, *value)?;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with every metric registered and no samples.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("llm_proxy");
        let shards = Arc::new(Shards::default());
        registry.register_collector(Box::new(Answered(shards.clone())));
        let sources = Arc::new(std::sync::RwLock::new(Vec::new()));
        registry.register_collector(Box::new(Scraped(sources.clone())));
        Arc::new(Metrics {
            registry,
            shards,
            sources,
        })
    }

    /// Add a layer's counters, read at each scrape.
    pub fn add_source(&self, source: Source) {
        self.sources
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(source);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count one answered request.
    pub fn count_request(&self, route: &'static str, status: u16, upstream: Option<&Arc<str>>) {
        self.count_answer(route, status, upstream, None);
    }

    /// Count one answered request, and the proxy's overhead on it, if
    /// measured (in one visit to the thread's counts).
    pub(crate) fn count_answer(
        &self,
        route: &'static str,
        status: u16,
        upstream: Option<&Arc<str>>,
        overhead: Option<Duration>,
    ) {
        self.shards.with_counts(|counts| {
            let by_upstream = counts.requests.entry((route, status)).or_default();
            let name = upstream.map_or("", |u| &**u);
            match by_upstream.iter_mut().find(|(u, _)| **u == *name) {
                Some((_, n)) => *n += 1,
                None => by_upstream.push((upstream.cloned().unwrap_or_else(|| Arc::from("")), 1)),
            }
            if let Some(overhead) = overhead {
                counts
                    .times
                    .entry(route)
                    .or_default()
                    .overhead
                    .observe(overhead);
            }
        });
    }

    /// Wrap a response body so that its time to first byte and duration are
    /// recorded (duration also when the client goes away early).
    pub fn observe(
        self: &Arc<Self>,
        route: &'static str,
        start: Instant,
        body: Body,
    ) -> ObservedBody {
        self.observe_on(route, start, body, None, None)
    }

    /// [`Metrics::observe`], also telling the connection's watch (idle,
    /// stalled client) about the body, and logging a body that fails with
    /// the request's id.
    #[inline]
    pub(crate) fn observe_on(
        self: &Arc<Self>,
        route: &'static str,
        start: Instant,
        body: Body,
        mut conn: Option<InFlight>,
        request_id: Option<http::HeaderValue>,
    ) -> ObservedBody {
        ObservedBody {
            inner: match conn.as_mut() {
                Some(conn) => conn.watch(body, request_id.as_ref()),
                None => body,
            },
            route,
            start,
            first: false,
            timed: true,
            metrics: self.clone(),
            conn,
            request_id,
            access: None,
            ended: None,
        }
    }

    /// Record one latency of `route`'s answers.
    fn time(&self, route: &'static str, latency: Latency, elapsed: Duration) {
        self.shards.with_counts(|counts| {
            let times = counts.times.entry(route).or_default();
            match latency {
                Latency::FirstByte => times.ttfb.observe(elapsed),
                Latency::Whole => times.duration.observe(elapsed),
            }
        });
    }
}

/// Which latency of an answer.
#[derive(Clone, Copy)]
enum Latency {
    /// To the first byte of the body.
    FirstByte,
    /// To the end of the body (or the client's going away).
    Whole,
}

/// The counts of answered requests, one [`Counts`] per thread that answered
/// any.
///
/// Every request adds to three of them (the request counter and two
/// latency histograms). With prometheus-client's own types that was two
/// write locks and three read locks on maps and histograms every thread
/// shares: each lock's cache line moved between cores on every request, and
/// the write locks made requests on different cores wait for each other.
/// Here a thread writes only its own [`Counts`], under a lock no other thread
/// takes except a scrape, which adds them all up.
#[derive(Debug)]
struct Shards {
    /// Unique per registry, to find this registry's shard among a thread's.
    id: ShardsId,
    all: Mutex<Vec<Arc<Mutex<Counts>>>>,
    /// The counts of threads that have ended, and of a body dropped while
    /// its thread is being torn down, when the thread's own shards are
    /// gone: shared, so locked by any thread.
    spare: Arc<Mutex<Counts>>,
}

impl Default for Shards {
    fn default() -> Self {
        let spare = Arc::new(Mutex::new(Counts::default()));
        Shards {
            id: ShardsId::default(),
            all: Mutex::new(vec![spare.clone()]),
            spare,
        }
    }
}

/// A number no other [`Shards`] of the process has.
#[derive(Debug)]
struct ShardsId(u64);

impl Default for ShardsId {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        ShardsId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A thread's shard of one registry, and whether that registry is alive.
struct LocalShard {
    id: u64,
    registry: Weak<Shards>,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for LocalShard {
    /// A thread that ends (or a registry's shard pruned) gives its counts
    /// to the registry's spare and leaves the list a scrape reads, which
    /// so stays as long as the threads alive, not as all that ever counted.
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut all = lock(&registry.all);
        all.retain(|shard| !Arc::ptr_eq(shard, &self.counts));
        // Under the list's lock: a scrape sees the counts in one place.
        lock(&registry.spare).add(&lock(&self.counts));
    }
}

thread_local! {
    /// This thread's shards, one per registry it has counted for (one,
    /// unless a process runs several proxies).
    static LOCAL: RefCell<Vec<LocalShard>> = const { RefCell::new(Vec::new()) };
}

impl Shards {
    /// Run `f` on this thread's counts.
    fn with_counts(self: &Arc<Self>, f: impl FnOnce(&mut Counts)) {
        let id = self.id.0;
        let mut f = Some(f);
        let counted = LOCAL.try_with(|local| {
            let mut local = local.borrow_mut();
            let at = match local.iter().position(|s| s.id == id) {
                Some(at) => at,
                None => {
                    // Shards of registries gone are dropped here, not on
                    // the way of every request.
                    local.retain(|s| s.registry.strong_count() > 0);
                    let counts = Arc::new(Mutex::new(Counts::default()));
                    lock(&self.all).push(counts.clone());
                    local.push(LocalShard {
                        id,
                        registry: Arc::downgrade(self),
                        counts,
                    });
                    local.len() - 1
                }
            };
            if let Some(f) = f.take() {
                f(&mut lock(&local[at].counts));
            }
        });
        if let (Err(_), Some(f)) = (counted, f) {
            f(&mut lock(&self.spare));
        }
    }

    /// Every thread's counts, added up.
    fn total(&self) -> Counts {
        let mut total = Counts::default();
        for shard in lock(&self.all).iter() {
            total.add(&lock(shard));
        }
        total
    }
}

/// One thread's counts (or, at a scrape, everyone's).
#[derive(Debug, Default)]
struct Counts {
    /// Answers by route and status, then by upstream (`""` for none): a
    /// handful per route, found by comparing names.
    requests: HashMap<(&'static str, u16), ByUpstream, FixedState>,
    /// Latencies by route.
    times: HashMap<&'static str, RouteTimes, FixedState>,
}

impl Counts {
    /// Add `other`'s counts to these.
    fn add(&mut self, other: &Counts) {
        for (&key, upstreams) in &other.requests {
            let into = self.requests.entry(key).or_default();
            for (name, n) in upstreams {
                match into.iter_mut().find(|(u, _)| u == name) {
                    Some((_, sum)) => *sum += n,
                    None => into.push((name.clone(), *n)),
                }
            }
        }
        for (&route, times) in &other.times {
            let into = self.times.entry(route).or_default();
            into.duration.add(&times.duration);
            into.ttfb.add(&times.ttfb);
            into.overhead.add(&times.overhead);
        }
    }
}

/// Counts by upstream name.
type ByUpstream = Vec<(Arc<str>, u64)>;

#[derive(Debug, Default)]
struct RouteTimes {
    duration: Histogram,
    ttfb: Histogram,
    /// The proxy's own time to the head (10 µs doubling to ~84 s).
    overhead: Histogram<10>,
}

/// Latency buckets: by default 100 µs doubling to ~14 min (a long
/// generation streams for minutes), then `+Inf`.
const BUCKETS: usize = 24;

/// A latency histogram with the buckets of prometheus-client's
/// `exponential_buckets(FIRST_MICROS / 1e6, 2.0, 24)`, counted per bucket
/// (a scrape makes them cumulative).
#[derive(Debug)]
struct Histogram<const FIRST_MICROS: u64 = 100> {
    buckets: [u64; BUCKETS + 1],
    sum: f64,
}

impl<const FIRST_MICROS: u64> Default for Histogram<FIRST_MICROS> {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS + 1],
            sum: 0.0,
        }
    }
}

impl<const FIRST_MICROS: u64> Histogram<FIRST_MICROS> {
    /// The first bucket's upper bound.
    const FIRST_BOUND: Duration = Duration::from_micros(FIRST_MICROS);

    fn observe(&mut self, elapsed: Duration) {
        self.buckets[bucket(elapsed, Self::FIRST_BOUND)] += 1;
        self.sum += elapsed.as_secs_f64();
    }

    fn add(&mut self, other: &Self) {
        for (into, n) in self.buckets.iter_mut().zip(&other.buckets) {
            *into += n;
        }
        self.sum += other.sum;
    }

    fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn encode(&self, mut metric: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let bounds = exponential_buckets(Self::FIRST_BOUND.as_secs_f64(), 2.0, BUCKETS as u16)
            .chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds.zip(self.buckets.iter().copied()).collect();
        let count = self.count();
        metric.encode_histogram::<NoLabelSet>(self.sum, count, &buckets, None)
    }
}

/// The bucket of `elapsed`: the first whose bound (`first_bound` × 2^i) it
/// does not pass, else `+Inf`.
fn bucket(elapsed: Duration, first_bound: Duration) -> usize {
    let first = first_bound.as_nanos();
    let nanos = elapsed.as_nanos();
    if nanos <= first {
        return 0;
    }
    // (first × 2^(i-1), first × 2^i] is bucket i.
    let over = (nanos - 1) / first;
    let i = (u128::BITS - over.leading_zeros()) as usize;
    i.min(BUCKETS)
}

/// Encodes the answered requests of [`Shards`] on each scrape.
#[derive(Debug)]
struct Answered(Arc<Shards>);

impl Collector for Answered {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let total = self.0.total();
        let mut requests: Vec<_> = total.requests.iter().collect();
        requests.sort_unstable_by_key(|(key, _)| *key);
        let mut family = encoder.encode_descriptor(
            "requests",
            "Requests answered, by route, status and upstream",
            None,
            MetricType::Counter,
        )?;
        for (&(route, status), upstreams) in requests {
            for (upstream, n) in upstreams {
                let labels = RequestLabels {
                    route,
                    status,
                    upstream: Name(upstream.clone()),
                };
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut routes: Vec<_> = total.times.iter().collect();
        routes.sort_unstable_by_key(|(route, _)| *route);
        type Which = fn(&RouteTimes) -> &Histogram;
        let latencies: [(&str, &str, Which); 2] = [
            (
                "request_duration_seconds",
                "Time from request to the end of the response body",
                |t| &t.duration,
            ),
            (
                "time_to_first_byte_seconds",
                "Time from request to the first response body byte",
                |t| &t.ttfb,
            ),
        ];
        for (name, help, which) in latencies {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (route, times) in &routes {
                which(times).encode(family.encode_family(&RouteLabels { route })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "overhead_seconds",
            "The proxy's own time from request to response head: all but the waits for the \
             client's body and the upstreams' heads",
            None,
            MetricType::Histogram,
        )?;
        for (route, times) in &routes {
            if times.overhead.count() > 0 {
                times
                    .overhead
                    .encode(family.encode_family(&RouteLabels { route })?)?;
            }
        }
        Ok(())
    }
}

/// A response body that records time to first byte and total duration.
pub struct ObservedBody {
    inner: Body,
    route: &'static str,
    start: Instant,
    /// The first byte's time is recorded (or not to be: a switch of
    /// protocols is in no histogram).
    first: bool,
    /// The duration is to be recorded when the body is dropped.
    timed: bool,
    metrics: Arc<Metrics>,
    conn: Option<InFlight>,
    /// The request's `x-request-id`, for the line that says the body failed.
    request_id: Option<http::HeaderValue>,
    /// The access log's line, logged when the body is done.
    access: Option<Box<Access>>,
    /// How the body ended, for the access log: `None` while it runs.
    ended: Option<&'static str>,
}

/// One request's line of the access log (`access_log = true`): logged at
/// `info` under the target `llm_proxy::access` when its response ends (and
/// for a WebSocket session, once more when the session ends).
#[derive(Clone, Debug)]
pub(crate) struct Access {
    pub(crate) method: http::Method,
    /// The path, without the query (which may carry what is not the
    /// operator's to log).
    pub(crate) path: String,
    pub(crate) request_id: http::HeaderValue,
    pub(crate) status: u16,
    pub(crate) upstream: Option<Arc<str>>,
    /// The upstream the request went to last, written by the upstream
    /// client: the line's upstream when no answer came.
    pub(crate) tried: llm_proxy_core::UpstreamSlot,
    /// The name of the key the request came with, once the auth layer has
    /// found it.
    pub(crate) caller: llm_proxy_core::CallerSlot,
}

impl Access {
    /// Log the line: `duration` from the request to the end, and how it
    /// ended (`complete`; `failed`: the body broke; `cut`: dropped before its
    /// end, the client having left or the drain's timeout closed it), and
    /// for a WebSocket session's end, the turns it started.
    pub(crate) fn log(&self, duration: Duration, end: &'static str, turns: Option<u64>) {
        tracing::info!(
            target: "llm_proxy::access",
            request_id = self.request_id.to_str().unwrap_or(""),
            method = %self.method,
            path = self.path.as_str(),
            status = self.status,
            upstream = self
                .upstream
                .clone()
                .or_else(|| self.tried.get())
                .as_deref()
                .unwrap_or(""),
            key = self.caller.get().map_or("", |name| &**name),
            // To the microsecond: whole microseconds over 1000 print as at
            // most three decimals (not a float's last digits), and stay a
            // number for a JSON subscriber.
            duration_ms = micros_as_ms(duration),
            end,
            turns,
        );
    }
}

/// `d` in milliseconds, to the microsecond.
fn micros_as_ms(d: Duration) -> f64 {
    // (Exact below 2^53 µs: 285 years.)
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX) as f64 / 1000.0
}

impl ObservedBody {
    /// Log `access` when the body is done.
    pub(crate) fn with_access(mut self, access: Option<Box<Access>>) -> Self {
        self.access = access;
        self
    }

    /// In neither histogram: the head of a `101 Switching Protocols`,
    /// whose connection lives on as a session (timed apart) after an empty
    /// body.
    pub(crate) fn untimed(mut self) -> Self {
        self.first = true;
        self.timed = false;
        self
    }
}

impl std::fmt::Debug for ObservedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(conn) = self.conn.as_mut() {
            conn.asked();
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(conn) = self.conn.as_mut() {
            conn.answered(&polled);
        }
        // (A body that fails before its first byte has none.)
        if !self.first && matches!(polled, Poll::Ready(Some(Ok(_))) | Poll::Ready(None)) {
            self.first = true;
            self.metrics
                .time(self.route, Latency::FirstByte, self.start.elapsed());
        }
        match &polled {
            Poll::Ready(None) => self.ended = Some("complete"),
            // Dropped by the connection's watch: the client stopped
            // reading (nothing failed; a client can cause it at will, so
            // no warning either).
            Poll::Ready(Some(Err(error))) if error.is::<Unread>() => {
                self.ended = Some("cut");
                return polled;
            }
            Poll::Ready(Some(Err(_))) => self.ended = Some("failed"),
            _ => {}
        }
        if let Poll::Ready(Some(Err(error))) = &polled {
            // The one line an operator can tie to the client's
            // `x-request-id`: the layer that failed (an upstream that broke
            // its stream, went silent) says why at debug level.
            tracing::warn!(
                request_id = self
                    .request_id
                    .as_ref()
                    .and_then(|id| id.to_str().ok())
                    .unwrap_or(""),
                route = self.route,
                error = %error,
                "response body failed"
            );
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        if self.timed {
            // An empty body (a HEAD's, a 204's) is not polled: its first
            // byte is its end, when the head was sent.
            if !self.first && self.ended.is_none() && self.inner.is_end_stream() {
                self.metrics.time(self.route, Latency::FirstByte, elapsed);
            }
            self.metrics.time(self.route, Latency::Whole, elapsed);
        }
        if let Some(access) = &self.access {
            // hyper drops a body of known length after its last frame
            // without polling it to its end: that is complete too.
            let end = self.ended.unwrap_or(if self.inner.is_end_stream() {
                "complete"
            } else {
                "cut"
            });
            access.log(elapsed, end, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `text` that start with `prefix`, the prefix cut.
    fn lines_of<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .collect()
    }

    #[test]
    fn latencies_render_as_prometheus_client_histograms_do() {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        let reference = prometheus_client::metrics::histogram::Histogram::new(exponential_buckets(
            0.0001, 2.0, 24,
        ));
        registry.register("reference", "", reference.clone());
        // Zero, bounds exactly, just past them, between them, past the last.
        let micros = [
            0,
            1,
            99,
            100,
            101,
            150,
            200,
            201,
            399,
            400,
            401,
            1_000,
            52_000,
            1_600_000,
            838_860_800,
            838_860_801,
            3_600_000_000,
        ];
        for (i, &us) in micros.iter().enumerate() {
            let elapsed = Duration::from_micros(us);
            reference.observe(elapsed.as_secs_f64());
            let latency = if i % 2 == 0 {
                Latency::Whole
            } else {
                Latency::FirstByte
            };
            metrics.time("chat_completions", latency, elapsed);
            // The other histogram of the route gets every value too, so
            // that both can be compared with the one reference.
            let other = match latency {
                Latency::Whole => Latency::FirstByte,
                Latency::FirstByte => Latency::Whole,
            };
            metrics.time("chat_completions", other, elapsed);
        }
        let mut expected = String::new();
        prometheus_client::encoding::text::encode(&mut expected, &registry).unwrap();
        let text = metrics.encode();
        for name in ["request_duration_seconds", "time_to_first_byte_seconds"] {
            let ours: Vec<String> = lines_of(&text, &format!("llm_proxy_{name}_"))
                .iter()
                .map(|l| {
                    l.replace(r#",route="chat_completions""#, "")
                        .replace(r#"{route="chat_completions"}"#, "")
                })
                .collect();
            let reference: Vec<&str> = lines_of(&expected, "reference_");
            assert_eq!(ours, reference, "{text}");
        }
        assert!(
            text.contains(r#"_bucket{le="+Inf",route="chat_completions"} 17"#),
            "{text}"
        );
        assert!(
            text.contains(r#"_bucket{le="0.0001",route="chat_completions"} 4"#),
            "{text}"
        );
    }

    #[test]
    fn counts_from_every_thread_add_up() {
        let metrics = Arc::new(Metrics::new());
        let upstream: Arc<str> = Arc::from("up");
        // Joined, not scoped: a scope may end before its threads' locals
        // are dropped; a join waits for the thread's end.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (metrics, upstream) = (metrics.clone(), upstream.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        metrics.count_request("chat_completions", 200, Some(&upstream));
                        // Another allocation of the same name counts as it.
                        metrics.count_request("chat_completions", 200, Some(&Arc::from("up")));
                        metrics.count_request("chat_completions", 502, None);
                        metrics.time("embeddings", Latency::Whole, Duration::from_millis(1));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // The threads that ended gave their counts to the spare: a scrape
        // reads it and this thread's shard, not a shard per thread that
        // ever counted.
        metrics.count_request("chat_completions", 200, Some(&upstream));
        assert_eq!(lock(&metrics.shards.all).len(), 2);
        let text = metrics.encode();
        for line in [
            r#"llm_proxy_requests_total{route="chat_completions",status="200",upstream="up"} 801"#,
            r#"llm_proxy_requests_total{route="chat_completions",status="502",upstream=""} 400"#,
            r#"llm_proxy_request_duration_seconds_count{route="embeddings"} 400"#,
            r#"llm_proxy_time_to_first_byte_seconds_count{route="embeddings"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // A second registry on the same threads counts apart.
        let other = Metrics::new();
        other.count_request("chat_completions", 200, Some(&upstream));
        assert!(other.encode().contains(r#"upstream="up"} 1"#));
        assert!(metrics.encode().contains(r#"upstream="up"} 801"#));
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        let model = "x\"} 1\nllm_proxy_injected_total 12345\n#";
        metrics.add_source(Box::new(move || {
            vec![Series {
                name: "tokens",
                help: "Tokens.",
                counter: true,
                samples: vec![(vec![("model", model.to_owned())], 7)],
            }]
        }));
        let upstream: Arc<str> = Arc::from("a\"b\\c");
        metrics.count_request("chat_completions", 200, Some(&upstream));
        let text = metrics.encode();
        assert!(
            !text.lines().any(|l| l.starts_with("llm_proxy_injected")),
            "{text}"
        );
        assert!(
            text.contains(r#"model="x\"} 1\nllm_proxy_injected_total 12345\n#"} 7"#),
            "{text}"
        );
        assert!(text.contains(r#"upstream="a\"b\\c""#), "{text}");
    }
}
