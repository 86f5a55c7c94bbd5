//! Picks the upstream for a request: by model, then round robin.
//!
//! This is the proxy's own simple router, used until a balancer layer is
//! configured: upstreams that list the request's `model` are candidates, plus
//! those that serve every model; among them, round robin. A request without a
//! model (a passthrough route) goes to the first upstream in config order.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body_util::BodyExt;
use llm_proxy_core::{Body, Error, Guarded, RequestMeta};
use llm_proxy_upstream::Upstream;
use tower_service::Service;

use crate::metrics::Metrics;

/// One upstream and the models it serves (`None`: every model).
#[derive(Clone, Debug)]
pub struct Member {
    /// The client to it.
    pub upstream: Upstream,
    /// Models it serves; `None` = every model.
    pub models: Option<Vec<String>>,
}

/// Candidates for one model, with their round-robin cursor.
#[derive(Debug, Default)]
struct Candidates {
    members: Vec<usize>,
    next: AtomicUsize,
}

impl Candidates {
    fn pick(&self) -> Option<usize> {
        if self.members.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.members.len();
        Some(self.members[i])
    }
}

/// The model router service.
#[derive(Clone, Debug)]
pub struct ModelRouter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    members: Vec<Member>,
    by_model: HashMap<String, Candidates>,
    /// Upstreams that serve every model: the candidates for unlisted models.
    any_model: Candidates,
    metrics: Arc<Metrics>,
}

impl ModelRouter {
    /// A router over `members`, in config order.
    pub fn new(members: Vec<Member>, metrics: Arc<Metrics>) -> Self {
        let mut by_model: HashMap<String, Candidates> = HashMap::new();
        let any: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].models.is_none())
            .collect();
        for (i, m) in members.iter().enumerate() {
            for model in m.models.iter().flatten() {
                let entry = by_model.entry(model.clone()).or_default();
                if !entry.members.contains(&i) {
                    entry.members.push(i);
                }
            }
        }
        for c in by_model.values_mut() {
            c.members.extend(any.iter().copied());
        }
        for m in &members {
            metrics.set_healthy(m.upstream.name(), true);
        }
        ModelRouter {
            inner: Arc::new(Inner {
                members,
                by_model,
                any_model: Candidates {
                    members: any,
                    next: AtomicUsize::new(0),
                },
                metrics,
            }),
        }
    }

    /// The models named in config, in config order, without repeats.
    pub fn models(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.inner
            .members
            .iter()
            .flat_map(|m| m.models.iter().flatten())
            .filter(|m| seen.insert(m.as_str()))
            .map(String::as_str)
            .collect()
    }

    fn pick(&self, model: Option<&str>) -> Result<&Upstream, Error> {
        let index = match model {
            Some(model) => self
                .inner
                .by_model
                .get(model)
                .unwrap_or(&self.inner.any_model)
                .pick()
                .ok_or_else(|| Error::ModelNotFound(model.to_owned()))?,
            None => 0,
        };
        self.inner
            .members
            .get(index)
            .map(|m| &m.upstream)
            .ok_or_else(|| Error::NoUpstreamAvailable("no upstream is configured".into()))
    }
}

impl Service<Request<Body>> for ModelRouter {
    type Response = Response<Body>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let model = req
            .extensions()
            .get::<RequestMeta>()
            .and_then(RequestMeta::model);
        let mut upstream = match self.pick(model) {
            Ok(u) => u.clone(),
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let guard = self.inner.metrics.in_flight(upstream.name());
        Box::pin(async move {
            let resp = upstream.call(req).await?;
            // In flight until the last frame of the body, not just the head.
            Ok(resp.map(|body| Guarded::new(body, guard).boxed_unsync()))
        })
    }
}
