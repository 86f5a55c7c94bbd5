//! Prometheus metrics of the proxy (names pinned in DESIGN.md).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use llm_proxy_core::{Body, BoxError};

use crate::idle::InFlight;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
    upstream: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// The proxy's metrics registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    ttfb: HistogramFamily,
    /// The `upstream` label of answers no upstream gave.
    no_upstream: Name,
    sources: Arc<std::sync::RwLock<Vec<Source>>>,
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

fn latency_histogram() -> Histogram {
    // 100 µs .. ~14 min: a long generation streams for minutes.
    Histogram::new(exponential_buckets(0.0001, 2.0, 24))
}

impl Metrics {
    /// A registry with every metric registered and no samples.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("llm_proxy");
        let requests = Family::default();
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let ttfb: HistogramFamily = Family::new_with_constructor(latency_histogram);
        registry.register(
            "requests",
            "Requests answered, by route, status and upstream",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response body",
            duration.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time from request to the first response body byte",
            ttfb.clone(),
        );
        let sources = Arc::new(std::sync::RwLock::new(Vec::new()));
        registry.register_collector(Box::new(Scraped(sources.clone())));
        Arc::new(Metrics {
            registry,
            requests,
            duration,
            ttfb,
            no_upstream: Name(Arc::from("")),
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
        let upstream = upstream.map_or_else(|| self.no_upstream.clone(), |u| Name(u.clone()));
        self.requests
            .get_or_create(&RequestLabels {
                route,
                status,
                upstream,
            })
            .inc();
    }

    /// Wrap a response body so that its time to first byte and duration are
    /// recorded (duration also when the client goes away early).
    pub fn observe(
        self: &Arc<Self>,
        route: &'static str,
        start: Instant,
        body: Body,
    ) -> ObservedBody {
        self.observe_on(route, start, body, None)
    }

    /// [`Metrics::observe`], also telling the connection's watch (idle,
    /// stalled client) about the body.
    pub(crate) fn observe_on(
        self: &Arc<Self>,
        route: &'static str,
        start: Instant,
        body: Body,
        conn: Option<InFlight>,
    ) -> ObservedBody {
        ObservedBody {
            inner: body,
            route,
            start,
            first: false,
            metrics: self.clone(),
            conn,
        }
    }
}

/// A response body that records time to first byte and total duration.
pub struct ObservedBody {
    inner: Body,
    route: &'static str,
    start: Instant,
    first: bool,
    metrics: Arc<Metrics>,
    conn: Option<InFlight>,
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
        if !self.first && matches!(polled, Poll::Ready(Some(_)) | Poll::Ready(None)) {
            self.first = true;
            let route = self.route;
            self.metrics
                .ttfb
                .get_or_create(&RouteLabels { route })
                .observe(self.start.elapsed().as_secs_f64());
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
        let route = self.route;
        self.metrics
            .duration
            .get_or_create(&RouteLabels { route })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
