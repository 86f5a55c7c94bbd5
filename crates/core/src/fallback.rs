//! [`ServedByFallback`]: the mark of an answer from a fallback model.

use std::sync::Arc;

/// Set on a response by the balancer when the request was rewritten to a
/// fallback model (its own model's upstreams had all failed) and that model
/// answered. Holds the fallback model's name.
///
/// Such an answer is not the one the client's model would have given: the
/// cache passes it to the client and to requests coalesced on it, but never
/// stores it under the key of the client's model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedByFallback(pub Arc<str>);
