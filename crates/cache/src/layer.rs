//! [`CacheLayer`]: configuration plus the store, shared by every service it
//! makes.

use std::sync::Arc;

use tower_layer::Layer;

use crate::flight::Flights;
use crate::service::Shared;
use crate::stats::Counters;
use crate::{Cache, CacheConfig, CacheStats, Store};

/// Wraps a service in a [`Cache`]. Every service made by one layer (and its
/// clones) shares the store, the flights in progress and the counters.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("config", &self.shared.config)
            .field("store", &self.shared.store.kind())
            .finish()
    }
}

impl CacheLayer {
    /// A cache with `config` keeping its entries in `store` (pass an
    /// `Arc<MemoryStore>` to keep a handle on the store).
    pub fn new(config: CacheConfig, store: impl Store) -> Self {
        Self::with_shared_store(config, Arc::new(store))
    }

    /// [`CacheLayer::new`] with a store already behind an `Arc<dyn Store>`.
    pub fn with_shared_store(config: CacheConfig, store: Arc<dyn Store>) -> Self {
        CacheLayer {
            shared: Arc::new(Shared {
                config,
                store,
                counters: Arc::new(Counters::default()),
                flights: Arc::new(Flights::new()),
            }),
        }
    }

    /// The layer's counters, to read at scrape time.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            counters: self.shared.counters.clone(),
            store: self.shared.store.clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.shared.config
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Cache<S> {
        Cache::new(inner, self.shared.clone())
    }
}
