//! What every boxed service future in the stack looks like.

use std::future::Future;
use std::pin::Pin;

use http::{Request, Response};
use tower_service::Service;

use crate::{Body, Error};

/// The boxed future most layers return.
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Error>> + Send>>;

/// Call `inner` and box its future.
///
/// A layer that awaits `S::Future` inside its own `async` block trips a rustc
/// limitation (higher-ranked `Send` inference over the `dyn Error` inside
/// [`Body`]: "implementation of `Send` is not general enough"); awaiting a
/// boxed `dyn Future + Send` instead sidesteps it.
pub fn call_boxed<S>(inner: &mut S, req: Request<Body>) -> BoxFuture
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Error>,
    S::Future: Send + 'static,
{
    Box::pin(inner.call(req))
}
