//! [`Stack`]: the layers below the HTTP face as one boxed, cloneable
//! service.

use std::task::{Context, Poll};

use http::{Request, Response};
use llm_proxy_core::{Body, BoxFuture, Error};
use tower_service::Service;

/// Everything below the HTTP face: parse, auth, …, upstream, behind one
/// box.
///
/// tower's `BoxCloneSyncService` would do, but it boxes every call's future
/// again, and the layers here answer with boxed futures already: one more
/// allocation and one more poll per request and per box.
pub(crate) struct Stack(Box<dyn StackService>);

impl Stack {
    /// `service`, whose futures are boxed already, behind the box.
    pub(crate) fn new<S>(service: S) -> Stack
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Error, Future = BoxFuture>
            + Clone
            + Send
            + Sync
            + 'static,
    {
        Stack(Box::new(service))
    }

    /// `service` behind the box, its futures boxed on each call.
    pub(crate) fn boxing<S>(service: S) -> Stack
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Error>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Stack::new(Boxing(service))
    }
}

impl Clone for Stack {
    fn clone(&self) -> Self {
        Stack(self.0.clone_box())
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stack")
    }
}

impl Service<Request<Body>> for Stack {
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        self.0.call(req)
    }
}

/// A [`Service`] as [`Stack`] holds it: with boxed futures, cloned into a
/// box.
trait StackService: Send + Sync {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>>;
    fn call(&mut self, req: Request<Body>) -> BoxFuture;
    fn clone_box(&self) -> Box<dyn StackService>;
}

impl<S> StackService for S
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error, Future = BoxFuture>
        + Clone
        + Send
        + Sync
        + 'static,
{
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Service::poll_ready(self, cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        Service::call(self, req)
    }

    fn clone_box(&self) -> Box<dyn StackService> {
        Box::new(self.clone())
    }
}

/// A service whose futures are boxed here.
#[derive(Clone)]
struct Boxing<S>(S);

impl<S> Service<Request<Body>> for Boxing<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Error;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> BoxFuture {
        Box::pin(self.0.call(req))
    }
}
