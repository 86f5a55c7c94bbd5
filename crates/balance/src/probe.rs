//! Active health checks: one tokio task per balancer sends `GET <path>`
//! through every backend's service each interval.
//!
//! The task holds only a `Weak` reference between rounds and is aborted when
//! the last [`Balance`](crate::Balance) clone and handle are dropped, so it
//! never keeps a dropped balancer alive.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, Error};
use tower_service::Service;

use crate::config::HealthCheck;
use crate::service::Shared;

/// Bodies of probe answers are read (to keep pooled connections reusable)
/// for at most this long,
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

/// and at most this many bytes, each dropped as it comes: an upstream that
/// answers with an endless body must not fill the proxy's memory (nor keep
/// it busy) for the drain's whole second.
const DRAIN_BYTES: usize = 1 << 20;

/// How long one probe may take: the interval, but at least a second (a
/// short interval must not fail every probe of an upstream that takes a
/// TLS handshake to answer) and at most ten (a long one must not wait
/// minutes to call a silent upstream down).
fn probe_timeout(interval: Duration) -> Duration {
    interval.clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Start the checker on the current tokio runtime; `None` without one.
pub(crate) fn spawn<S>(
    shared: &Arc<Shared<S>>,
    check: HealthCheck,
) -> Option<tokio::task::AbortHandle>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            "health checks configured but no tokio runtime is running: passive health only"
        );
        return None;
    };
    let weak: Weak<Shared<S>> = Arc::downgrade(shared);
    let interval = check.interval.max(Duration::from_millis(1));
    let task = runtime.spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(shared) = weak.upgrade() else { break };
            round(&shared, &check, probe_timeout(interval)).await;
        }
    });
    Some(task.abort_handle())
}

/// Probe every current backend concurrently and record the results.
async fn round<S>(shared: &Shared<S>, check: &HealthCheck, timeout: Duration)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let set = shared.snapshot();
    let epoch = shared.epoch;
    let probes = set.members.iter().map(|member| {
        let svc = member.service();
        let state = member.state.clone();
        async move {
            let sent = epoch.now();
            let seen = state.ejections_seen();
            // Judged by the head alone, within the timeout; the body is
            // read (and dropped) after, on its own bound.
            let (probed, body) = tokio::time::timeout(timeout, probe(svc, &check.path))
                .await
                .unwrap_or_else(|_| {
                    let why = format!("no answer within {} ms", timeout.as_millis());
                    (Probed::Down(why), None)
                });
            let sent = Sent {
                at: sent,
                ejections_seen: seen,
                now: epoch.now(),
            };
            record(&state, &sent, probed, check.uneject);
            // Drained beside the rounds, not in them: a slow body must not
            // hold the next round back.
            if let Some(body) = body {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(DRAIN_LIMIT, drain(body)).await;
                });
            }
        }
    });
    futures_util::future::join_all(probes).await;
}

/// When a probe was sent (`at`, and the backend's `ejections_seen` then),
/// and when it was answered (`now`).
struct Sent {
    at: u64,
    ejections_seen: u64,
    now: u64,
}

/// What a probe's answer says of its backend.
enum Probed {
    Up,
    /// Refused as busy (a 429, or a 503 with `retry-after`): up.
    Busy,
    /// Down, and why.
    Down(String),
}

/// What a probe's answer says of its backend; `uneject`: a pass ends an
/// ejection it was sent in. A backend a probe marks down, or up again, is
/// logged (down at `warn`, with why: an expired certificate or a wrong
/// `tls_ca_file` is found out here first, with no request to fail).
fn record(state: &crate::state::BackendState, sent: &Sent, probed: Probed, uneject: bool) {
    let ok = match &probed {
        // A probe refused as busy says the server is up: requests'
        // own refusals rest it; the probe changes nothing.
        Probed::Busy => return,
        Probed::Up => true,
        Probed::Down(_) => false,
    };
    // Requests answered while the probe waited are newer news than its
    // failure (a server busy with them may be slow to list its models, or
    // time the probe out): it stays up.
    if !ok && state.answered_since(sent.at) {
        tracing::debug!(upstream = %state.name, "health check failed, but requests were answered meanwhile");
        return;
    }
    let changed = state.update_health(|h| h.on_probe(ok, sent.now, sent.ejections_seen, uneject));
    match probed {
        Probed::Down(why) if changed => {
            tracing::warn!(upstream = %state.name, reason = %why, "health check failed: marked down");
        }
        Probed::Down(why) => {
            tracing::debug!(upstream = %state.name, reason = %why, "health check failed");
        }
        Probed::Up if changed => {
            tracing::info!(upstream = %state.name, "health check passed: marked up");
        }
        Probed::Up | Probed::Busy => {}
    }
}

/// One probe's verdict, and the answer's body, still to be drained.
async fn probe<S>(svc: S, path: &str) -> (Probed, Option<Body>)
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error> + Send + 'static,
    S::Future: Send + 'static,
{
    let req = match Request::get(path).body(llm_proxy_core::empty()) {
        Ok(req) => req,
        Err(e) => return (Probed::Down(format!("bad path `{path}`: {e}")), None),
    };
    match crate::attempt::call(svc, req).await {
        Ok(resp) => {
            let status = resp.status();
            // Busy (a 429, or a 503 with `retry-after`: shedding load) is
            // not down, as for requests.
            let busy = matches!(
                crate::attempt::classify_head(status, resp.headers()),
                crate::attempt::Verdict::Throttled(_) | crate::attempt::Verdict::Shedding(_)
            );
            let probed = if busy {
                Probed::Busy
            } else if status.is_success() {
                Probed::Up
            } else {
                Probed::Down(format!("status {}", status.as_u16()))
            };
            (probed, Some(resp.into_body()))
        }
        Err(e) => (Probed::Down(e.to_string()), None),
    }
}

/// Read `body` to its end, keeping nothing, unless it holds more than
/// [`DRAIN_BYTES`] (then it is dropped, and its connection with it).
async fn drain(mut body: Body) {
    let mut read = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        // (Empty frames count too: the loop ends whatever the upstream sends.)
        read = read.saturating_add(frame.data_ref().map_or(0, |d| d.len()).max(1));
        if read > DRAIN_BYTES {
            return;
        }
    }
}
