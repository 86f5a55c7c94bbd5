//! The gate: the key checked from the request's head, before the parse layer
//! reads the body.
//!
//! The auth layer sits below the parse layer because it reads the model from
//! the body. Without a gate in front, a caller with no key (or a wrong one)
//! still has its body read and parsed, up to the body limit, before the 401:
//! memory and CPU spent on anyone who can open a connection. The gate
//! answers 401 (and 403 for a route the key may not use) from the head
//! alone, and hands the key it found to the auth layer, which then does not
//! hash it a second time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use llm_proxy_core::{Body, Endpoint, Error};
use tower_layer::Layer;
use tower_service::Service;

use crate::keys::KeyEntry;
use crate::service::{AuthLayer, Shared};

/// Put in front of the parse layer, with the [`AuthLayer`] it was made from
/// below it ([`AuthLayer::gate`]).
#[derive(Clone)]
pub struct AuthGateLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuthGateLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGateLayer").finish_non_exhaustive()
    }
}

/// The key the gate found, for the auth layer of the same key table.
#[derive(Clone)]
pub(crate) struct Authenticated {
    shared: Arc<Shared>,
    key: Arc<KeyEntry>,
}

impl Authenticated {
    /// The key, if the gate that found it checked `shared`'s table.
    pub(crate) fn key_for(self, shared: &Arc<Shared>) -> Option<Arc<KeyEntry>> {
        Arc::ptr_eq(&self.shared, shared).then_some(self.key)
    }
}

impl AuthLayer {
    /// The gate for this layer's keys: see [`AuthGateLayer`].
    pub fn gate(&self) -> AuthGateLayer {
        AuthGateLayer {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for AuthGateLayer {
    type Service = AuthGate<S>;

    fn layer(&self, inner: S) -> AuthGate<S> {
        AuthGate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`AuthGateLayer`].
#[derive(Clone)]
pub struct AuthGate<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for AuthGate<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGate").finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for AuthGate<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Error>,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = GateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.shared.admit_head(&req) {
            Ok(key) => {
                if let Some(slot) = req.extensions().get::<llm_proxy_core::CallerSlot>() {
                    slot.set(&key.name);
                }
                req.extensions_mut().insert(Authenticated {
                    shared: self.shared.clone(),
                    key,
                });
                GateFuture {
                    inner: Some(self.inner.call(req)),
                    error: None,
                }
            }
            Err(e) => GateFuture {
                inner: None,
                error: Some(e),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`AuthGate`]: the inner service's, or the refusal.
    pub struct GateFuture<F> {
        #[pin]
        inner: Option<F>,
        error: Option<Error>,
    }
}

impl<F> Future for GateFuture<F>
where
    F: Future<Output = Result<Response<Body>, Error>>,
{
    type Output = Result<Response<Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        match this.inner.as_pin_mut() {
            Some(inner) => inner.poll(cx),
            None => Poll::Pending,
        }
    }
}

impl Shared {
    /// What the head alone decides: the key (401), and whether it may use
    /// a passthrough route (403). A model's description (`GET` or `HEAD`
    /// `/v1/models/{id}`, which reaches the stack for a model the config
    /// does not name, when an upstream serves every model) is the key's to
    /// read if it may use the model, passthrough or not, and a model it
    /// may not use is not found (404), as the models the config names are.
    pub(crate) fn admit_head<B>(&self, req: &Request<B>) -> Result<Arc<KeyEntry>, Error> {
        let key = self
            .table
            .authenticate(req.headers())
            .ok_or(Error::InvalidApiKey)?;
        let path = req.uri().path();
        let endpoint = Endpoint::from_path(path).unwrap_or(Endpoint::Passthrough);
        if let Some(model) = Endpoint::described_model(req.method(), path) {
            if !key.allows_model(&model) {
                return Err(Error::ModelNotFound(model.into_owned()));
            }
            return Ok(key);
        }
        if endpoint == Endpoint::Passthrough && !key.passthrough {
            return Err(Error::RouteNotAllowed(
                "this route (only the model APIs; the key lacks `passthrough`)".into(),
            ));
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeySpec;
    use llm_proxy_core::{ParseLayer, ParseLimits, RequestMeta, full};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    async fn status(gate: &AuthLayer, auth: &AuthLayer, key: &str) -> Result<String, Error> {
        let svc = ServiceBuilder::new()
            .layer(gate.gate())
            .layer(ParseLayer::new(ParseLimits::default()))
            .layer(auth.clone())
            .service(service_fn(|req: Request<Body>| async move {
                let meta = req.extensions().get::<RequestMeta>().expect("parsed");
                let who = meta.identity().map(|i| i.name.to_string());
                Ok::<_, Error>(Response::new(full(who.unwrap_or_default())))
            }));
        let req = Request::post("/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .body(full(r#"{"model":"m","messages":[]}"#))
            .expect("a request");
        let resp = svc.oneshot(req).await?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("a body")
            .to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_models_description_is_the_allowlists_and_no_other_route() {
        let mut narrow = KeySpec::from_key("narrow", "sk-narrow");
        narrow.models = Some(vec!["m1".into()]);
        let layer = AuthLayer::new(vec![KeySpec::from_key("open", "sk-open"), narrow]);
        let svc = ServiceBuilder::new()
            .layer(layer.gate())
            .service(service_fn(|_: Request<Body>| async {
                Ok::<_, Error>(Response::new(llm_proxy_core::empty()))
            }));
        let get = |key: &str, path: &str| {
            let req = Request::get(path)
                .header("authorization", format!("Bearer {key}"))
                .body(llm_proxy_core::empty())
                .expect("a request");
            svc.clone().oneshot(req)
        };
        assert!(get("sk-open", "/v1/models/any").await.is_ok());
        assert!(get("sk-narrow", "/v1/models/m1").await.is_ok());
        assert!(matches!(
            get("sk-narrow", "/v1/models/m2").await,
            Err(Error::ModelNotFound(m)) if m == "m2"
        ));
        // Paths the proxy does not route as they are (an upstream could
        // read them as another route) are no model's description.
        for path in [
            "/v1/models/x/../../files",
            "/v1/models/x%2F..%2F..%2Ffiles",
            "/v1/models/x;y",
            "/v1/models/x\\..\\files",
        ] {
            assert!(
                matches!(get("sk-open", path).await, Err(Error::RouteNotAllowed(_))),
                "{path}"
            );
        }
    }

    #[tokio::test]
    async fn the_gate_hands_its_key_to_its_own_layer_only() {
        let a = AuthLayer::new(vec![KeySpec::from_key("a", "sk-a")]);
        let b = AuthLayer::new(vec![KeySpec::from_key("b", "sk-b")]);
        assert_eq!(status(&a, &a, "sk-a").await.expect("admitted"), "a");
        assert!(matches!(
            status(&a, &a, "sk-b").await,
            Err(Error::InvalidApiKey)
        ));
        // A key another table's gate let through is checked again.
        assert!(matches!(
            status(&a, &b, "sk-a").await,
            Err(Error::InvalidApiKey)
        ));
    }
}
