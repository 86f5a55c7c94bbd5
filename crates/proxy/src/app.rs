//! Assembly: validated settings -> the service stack, outermost first.

use std::sync::Arc;
use std::time::Duration;

use llm_proxy_auth::{AuthLayer, LimitBackend, RedisLimits};
use llm_proxy_balance::{Backend, Balance, BalanceHandle, Strategy};
use llm_proxy_core::Api;
use llm_proxy_core::{BodyBudget, ParseLayer, ParseLimits};
use llm_proxy_mock::{Mock, MockConfig, MockServer};
use llm_proxy_translate::{Protocol as TranslateProtocol, Translate, TranslateConfig};
use llm_proxy_upstream::{AuthStyle, Upstream, UpstreamConfig};

/// One upstream as the balancer holds it: the client, behind translation.
pub(crate) type UpstreamService = Translate<Upstream>;

const ALL_APIS: [Api; 5] = [
    Api::ChatCompletions,
    Api::Completions,
    Api::Embeddings,
    Api::Responses,
    Api::Messages,
];
use tower::ServiceBuilder;

use crate::config::{AuthSpec, CacheSpec, CacheStore, LimitStore, Protocol, Settings, Target};
use crate::estimate::EstimateLayer;
use crate::metrics::{Metrics, Series, Source};
use crate::redis_ids::RedisIds;
use crate::responses::{ResponseAffinityLayer, ResponseIds};
use crate::routes::{Face, FaceOptions, ProxyService, Readiness};
use crate::stack::Stack;
use crate::websocket::{SocketCounters, SocketUpstream, Sockets};
use llm_proxy_cache::{CacheConfig, CacheLayer, MemoryStore, RedisStore, Store};
use tower_layer::Layer;

/// Why the proxy could not be built from valid settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// An upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] llm_proxy_upstream::BuildError),
    /// The Redis limit store could not be set up.
    #[error("[auth] redis: {0}")]
    AuthRedis(#[from] llm_proxy_core::redis::RedisCallError),
    /// The Redis cache store could not be set up.
    #[error("[cache] redis: {0}")]
    CacheRedis(#[from] llm_proxy_cache::StoreError),
    /// The Redis for response ids could not be set up.
    #[error("response ids: redis: {0}")]
    IdsRedis(redis::RedisError),
    /// A configured Redis refused the proxy at start-up: a wrong or
    /// missing password, a database it does not have.
    #[error("{section} redis_url {url}: redis refused the proxy: {source}")]
    RedisRefused {
        /// The config section whose `redis_url` it is (`[auth]`, `[cache]`).
        section: &'static str,
        /// The URL, its password hidden.
        url: String,
        /// What Redis answered.
        source: llm_proxy_core::redis::RedisCallError,
    },
    /// An in-process mock upstream could not start.
    #[error("upstream `{name}`: cannot start the mock: {source}")]
    Mock {
        /// The upstream's name.
        name: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A built proxy: its service, settings, shared state, and the in-process
/// mock upstreams it owns (stopped when it is dropped).
pub struct Proxy {
    pub(crate) service: ProxyService,
    pub(crate) settings: Settings,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) readiness: Arc<Readiness>,
    /// `metrics_listen`'s socket, when the caller bound it.
    pub(crate) metrics_listener: Option<tokio::net::TcpListener>,
    _mocks: Vec<MockServer>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("listen", &self.settings.listen)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Build the stack. Must run inside a tokio runtime (mock upstreams are
    /// spawned on it).
    ///
    /// Each configured Redis is asked for a `PING` first (up to 2 s): one
    /// that refuses the proxy (a wrong password, a missing database) fails
    /// the build with [`BuildError::RedisRefused`]; one that does not
    /// answer is logged, and its features fall back until it does.
    pub async fn build(settings: Settings) -> Result<Proxy, BuildError> {
        check_redis(&settings).await?;
        let metrics = Metrics::new();
        let readiness = Arc::new(Readiness::default());
        let mut mocks = Vec::new();
        let mut backends = Vec::with_capacity(settings.upstreams.len());
        let mut sockets = Vec::new();
        for spec in &settings.upstreams {
            let url = match &spec.target {
                Target::Url(url) => url.clone(),
                Target::Mock {
                    latency,
                    tokens_per_second,
                } => {
                    let mock = Mock::new(MockConfig {
                        latency: *latency,
                        tokens_per_second: *tokens_per_second,
                        // The names it is asked for: its own for a model
                        // it serves under another.
                        models: spec
                            .models
                            .iter()
                            .flatten()
                            .map(|m| spec.served_names.get(m).unwrap_or(m).clone())
                            .collect(),
                        name: spec.name.clone(),
                        ..MockConfig::default()
                    });
                    let server =
                        llm_proxy_mock::spawn(mock)
                            .await
                            .map_err(|source| BuildError::Mock {
                                name: spec.name.clone(),
                                source,
                            })?;
                    let url = server
                        .base_url()
                        .parse()
                        .expect("the mock's base URL is a valid URI");
                    mocks.push(server);
                    url
                }
            };
            let mut cfg = UpstreamConfig::new(spec.name.as_str(), url);
            cfg.api_key = spec.api_key.clone();
            cfg.connect_timeout = spec.connect_timeout;
            cfg.first_byte_timeout = spec.first_byte_timeout;
            cfg.idle_timeout = spec.idle_timeout;
            cfg.pool_idle_timeout = spec.pool_idle_timeout;
            cfg.extra_roots_pem = spec.extra_roots_pem.clone();
            cfg.auth_style = match spec.protocol {
                Protocol::OpenAi => AuthStyle::Bearer,
                Protocol::Anthropic => AuthStyle::XApiKey,
            };
            // One pool per server shard (Proxy::serve_sharded), plus the shared one.
            cfg.shards = settings.workers;
            cfg.upgrades = spec.websocket;
            cfg.http2 = spec.http2;
            cfg.headers = spec.headers.clone();
            let translate = TranslateConfig::new(
                match spec.protocol {
                    Protocol::OpenAi => TranslateProtocol::OpenAi,
                    Protocol::Anthropic => TranslateProtocol::Anthropic,
                },
                spec.apis.iter().copied(),
            );
            // What this upstream can serve only by translation (native wins).
            let translated: Vec<Api> = ALL_APIS
                .into_iter()
                .filter(|a| !spec.apis.contains(a) && translate.can_serve(*a))
                .collect();
            let client = Upstream::new(cfg)?;
            if spec.websocket {
                sockets.push(SocketUpstream {
                    client: client.clone(),
                    models: spec.models.clone(),
                    idle_timeout: spec.idle_timeout,
                    between_turns: spec.websocket_idle_timeout,
                });
            }
            let service = Translate::new(client, translate);
            let mut backend = Backend::new(spec.name.as_str(), service)
                .with_weight(spec.weight)
                .with_apis(spec.apis.iter().copied())
                .with_translated_apis(translated)
                .with_served_names(spec.served_names.clone());
            backend.models = spec.models.clone();
            backends.push(backend);
        }
        let balance = Balance::new(backends, settings.balance.clone());
        let handle = balance.handle();
        metrics.add_source(balance_metrics(handle.clone()));
        let auth = match &settings.auth {
            None => None,
            Some(a) => Some(build_auth(a)?),
        };
        if let Some(auth) = &auth {
            metrics.add_source(auth_metrics(auth.clone()));
        }
        let first_byte = settings
            .upstreams
            .iter()
            .map(|u| u.first_byte_timeout)
            .max();
        let cache = match &settings.cache {
            None => None,
            Some(c) => Some(build_cache(c, first_byte.unwrap_or_default())?),
        };
        if let Some(cache) = &cache {
            metrics.add_source(cache_metrics(cache.clone()));
        }
        let redis_ids = response_ids_redis(&settings)?;
        let ids = ResponseIds::new(
            redis_ids.clone(),
            settings.max_response_ids,
            settings.response_id_ttl,
        );
        metrics.add_source(store_metrics(auth.clone(), cache.clone(), redis_ids));
        let body_budget = BodyBudget::new(settings.max_buffered_body_bytes);
        metrics.add_source(budget_metrics(body_budget.clone()));
        let sockets = Sockets::new(
            sockets,
            settings.balance.max_retries,
            ids.clone(),
            settings.max_body_bytes,
            Some(body_budget.clone()),
            settings.request_body_timeout,
        );
        metrics.add_source(socket_metrics(sockets.counters()));
        // The stack below the HTTP face, outermost first.
        // Each layer present or not, without tower's `Either` (whose
        // futures would need boxing again).
        // Prefix routing reads every body (its prompt): built as it is
        // checked. Otherwise only the requests a layer reads (a
        // translation, a `previous_response_id`, a streamed chat request
        // whose usage token limits ask for, a Responses request in the
        // `background`, a Responses or Messages request the cache keys, a
        // Responses request whose native upstreams failed while others
        // translate: does it need kept state?) are built; the cache keys chat, completions and embeddings from their
        // bytes in one pass, and token limits estimate from what the check
        // learned (`RequestMeta::generation_caps`).
        let every_body_read = matches!(settings.balance.strategy, Strategy::PrefixAffinity(_));
        let below = match cache {
            Some(cache) => Stack::new(cache.layer(balance)),
            None => Stack::new(balance),
        };
        let parsed = ServiceBuilder::new()
            .layer(
                ParseLayer::new(ParseLimits {
                    max_body_bytes: settings.max_body_bytes,
                })
                .with_budget(body_budget.clone())
                .build_eagerly(every_body_read),
            )
            .option_layer(auth.clone())
            .layer(ResponseAffinityLayer::new(ids))
            .service(EstimateLayer.layer(below));
        let stack = match &auth {
            // The key is checked from the head, before the body is read.
            Some(auth) => Stack::boxing(auth.gate().layer(parsed)),
            None => Stack::new(parsed),
        };
        let service = ProxyService::new(
            stack,
            Face {
                auth,
                models: configured_models(&settings),
                every_model: settings.upstreams.iter().any(|u| u.models.is_none()),
                balance: handle,
                sockets,
            },
            metrics.clone(),
            readiness.clone(),
            FaceOptions {
                upstream_header: settings.upstream_header,
                overhead_header: settings.overhead_header,
                access_log: settings.access_log,
                serve_metrics: settings.metrics_listen.is_none(),
                // One knob for slow clients, head and body alike.
                body_read_timeout: settings.header_read_timeout,
                buffered_body_timeout: settings.request_body_timeout,
                cors: crate::Cors::new(settings.cors_allow_origins.iter().cloned()),
            },
        );
        Ok(Proxy {
            service,
            settings,
            metrics,
            readiness,
            metrics_listener: None,
            _mocks: mocks,
        })
    }

    /// The proxy as a tower `Service`, to serve or to nest in an axum app.
    pub fn service(&self) -> ProxyService {
        self.service.clone()
    }

    /// The settings it was built from.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Serve `metrics_listen` on `listener`, bound by the caller (with
    /// [`crate::listen`], on that address): a binary that binds both of its
    /// ports before it says it is listening fails at once, serving nothing,
    /// when one is taken. Without it, [`Proxy::serve`] binds
    /// `metrics_listen` itself. Without `metrics_listen` the proxy answers
    /// `/metrics` on `listen` (decided when it was built): the listener is
    /// then closed, with a warning, not served too.
    pub fn with_metrics_listener(mut self, listener: tokio::net::TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// The proxy's readiness. An app that serves [`Proxy::service`] itself
    /// calls [`Readiness::start_draining`] when its graceful shutdown
    /// begins, so that `/readyz` answers 503 and load balancers stop
    /// sending new requests ([`Proxy::serve`] does this itself).
    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }
}

fn build_auth(spec: &AuthSpec) -> Result<AuthLayer, BuildError> {
    let backend = match &spec.backend {
        LimitStore::Memory => LimitBackend::local(),
        LimitStore::Redis { url, key_prefix } => {
            LimitBackend::redis(RedisLimits::new(url, key_prefix)?)
        }
    };
    Ok(AuthLayer::with_backend(spec.keys.clone(), backend))
}

/// The models named in config, in config order, without repeats.
fn configured_models(settings: &Settings) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    settings
        .upstreams
        .iter()
        .flat_map(|u| u.models.iter().flatten())
        .filter(|m| seen.insert(m.as_str()))
        .cloned()
        .collect()
}

/// The balancer's per-upstream state, read at scrape time.
fn balance_metrics(handle: BalanceHandle<UpstreamService>) -> Source {
    Box::new(move || {
        let snapshot = handle.snapshot();
        let per = |f: &dyn Fn(&llm_proxy_balance::BackendStats) -> u64| {
            snapshot
                .iter()
                .map(|b| (vec![("upstream", b.name.to_string())], f(b)))
                .collect()
        };
        vec![
            Series {
                name: "in_flight",
                help: "Requests in flight (until the last body frame), by upstream",
                counter: false,
                samples: per(&|b| u64::from(b.in_flight)),
            },
            Series {
                name: "upstream_healthy",
                help: "1 when the upstream may be chosen (not resting)",
                counter: false,
                samples: per(&|b| u64::from(b.healthy)),
            },
            Series {
                name: "ejections",
                help: "Times an upstream was rested after failures, by upstream",
                counter: true,
                samples: per(&|b| b.ejections),
            },
            Series {
                name: "upstream_failures",
                help: "Attempts that failed (5xx, connection or timeout errors, broken bodies), retried or not, by upstream",
                counter: true,
                samples: per(&|b| b.failures),
            },
            Series {
                name: "upstream_throttled",
                help: "Answers asking to be left alone (429, or 503 with retry-after), retried or not, by upstream",
                counter: true,
                samples: per(&|b| b.throttled),
            },
            Series {
                name: "retries",
                help: "Attempts retried (on another upstream, or on one tried before when none is left)",
                counter: true,
                samples: vec![(vec![], handle.retries_total())],
            },
        ]
    })
}

/// The auth layer's counters, read at scrape time.
fn auth_metrics(auth: AuthLayer) -> Source {
    Box::new(move || {
        let mut limited = Vec::new();
        let mut tokens = Vec::new();
        for key in auth.keys() {
            let name = key.name.to_string();
            let n = key
                .stats
                .rate_limited
                .load(std::sync::atomic::Ordering::Relaxed);
            limited.push((vec![("key", name.clone())], n));
            for (model, input, output) in key.stats.tokens() {
                for (kind, value) in [("input", input), ("output", output)] {
                    let labels = vec![
                        ("key", name.clone()),
                        ("model", model.to_string()),
                        ("kind", kind.to_owned()),
                    ];
                    tokens.push((labels, value));
                }
            }
        }
        vec![
            Series {
                name: "rate_limited",
                help: "Requests answered 429 by the auth layer, by key name",
                counter: true,
                samples: limited,
            },
            Series {
                name: "tokens",
                help: "Tokens used, by key name, model and kind (input, output)",
                counter: true,
                samples: tokens,
            },
        ]
    })
}

fn build_cache(
    spec: &CacheSpec,
    first_byte: std::time::Duration,
) -> Result<CacheLayer, BuildError> {
    let config = CacheConfig {
        ttl: spec.ttl,
        scope: spec.scope,
        // A follower waits for its leader no longer than the leader may wait
        // for its upstream's first byte.
        max_wait: first_byte,
        key_headers: spec.key_headers.clone(),
        ..CacheConfig::default()
    };
    let store: Arc<dyn Store> = match &spec.store {
        CacheStore::Memory {
            max_entries,
            max_bytes,
        } => Arc::new(MemoryStore::new(*max_entries, *max_bytes)),
        CacheStore::Redis { url, key_prefix } => Arc::new(RedisStore::lazy(url, key_prefix)?),
    };
    Ok(CacheLayer::with_shared_store(config, store))
}

/// The cache layer's counters, read at scrape time.
fn cache_metrics(cache: CacheLayer) -> Source {
    Box::new(move || {
        let snap = cache.stats().snapshot();
        let mut series = vec![Series {
            name: "cache_events",
            help: "Cache events: hit, miss, bypass, coalesced, store, not_stored, eviction, expiration, too_large, store_skipped",
            counter: true,
            samples: snap
                .events()
                .iter()
                .map(|(e, n)| (vec![("event", (*e).to_owned())], *n))
                .collect(),
        }];
        series.push(Series {
            name: "cache_stored_bytes",
            help: "Body bytes written to the cache store",
            counter: true,
            samples: vec![(vec![], snap.stored_bytes)],
        });
        if let (Some(entries), Some(bytes)) = (snap.entries, snap.bytes) {
            series.push(Series {
                name: "cache_entries",
                help: "Entries held by the memory store",
                counter: false,
                samples: vec![(vec![], entries)],
            });
            series.push(Series {
                name: "cache_bytes",
                help: "Body bytes held by the memory store",
                counter: false,
                samples: vec![(vec![], bytes)],
            });
        }
        series
    })
}

/// How long the start-up check waits for each configured Redis.
const REDIS_CHECK: Duration = Duration::from_secs(2);

/// Ask each configured Redis for a `PING` before anything is built. One that
/// refuses the proxy (a wrong password, a missing database) is a setting to
/// fix: the build fails, naming it, rather than every request falling back
/// for ever. One that is away or slow is only logged: the proxy starts, and
/// its Redis features fall back until Redis answers.
async fn check_redis(settings: &Settings) -> Result<(), BuildError> {
    let cache = settings.cache.as_ref().and_then(|c| match &c.store {
        CacheStore::Redis { url, key_prefix } => Some(("[cache]", url, key_prefix)),
        CacheStore::Memory { .. } => None,
    });
    let auth = settings.auth.as_ref().and_then(|a| match &a.backend {
        LimitStore::Redis { url, key_prefix } => Some(("[auth]", url, key_prefix)),
        LimitStore::Memory => None,
    });
    let mut checked: Vec<(&String, &String)> = Vec::new();
    for (section, url, key_prefix) in auth.into_iter().chain(cache) {
        if checked.contains(&(url, key_prefix)) {
            continue;
        }
        checked.push((url, key_prefix));
        let shown = llm_proxy_core::redact::url(url).into_owned();
        // (A URL redis-rs cannot read fails the store's own set-up below.)
        let Ok(link) = llm_proxy_core::redis::RedisLink::new(url) else {
            continue;
        };
        match link.check(REDIS_CHECK, key_prefix).await {
            Ok(()) => tracing::debug!(section, url = %shown, "redis answers"),
            Err(source) if source.is_refusal() => {
                return Err(BuildError::RedisRefused {
                    section,
                    url: shown,
                    source,
                });
            }
            Err(error) => tracing::warn!(
                section,
                url = %shown,
                // One line, whatever Redis (or what answers for it) sent.
                error = %error.to_string().replace(['\n', '\r'], " "),
                "redis does not answer at start-up; its features fall back until it does"
            ),
        }
    }
    Ok(())
}

/// The Redis for response ids: the cache's when the cache uses Redis, else
/// the auth layer's, else none (memory only).
fn response_ids_redis(settings: &Settings) -> Result<Option<RedisIds>, BuildError> {
    let cache = settings.cache.as_ref().and_then(|c| match &c.store {
        CacheStore::Redis { url, key_prefix } => Some((url, key_prefix)),
        CacheStore::Memory { .. } => None,
    });
    let auth = settings.auth.as_ref().and_then(|a| match &a.backend {
        LimitStore::Redis { url, key_prefix } => Some((url, key_prefix)),
        LimitStore::Memory => None,
    });
    match cache.or(auth) {
        Some((url, prefix)) => Ok(Some(
            RedisIds::new(url, prefix).map_err(BuildError::IdsRedis)?,
        )),
        None => Ok(None),
    }
}

/// The request bodies held in memory now, what the layers hold of answers
/// (in a pool of their own), and their bound.
fn budget_metrics(budget: BodyBudget) -> Source {
    Box::new(move || {
        let gauge = |name, help, value: usize| Series {
            name,
            help,
            counter: false,
            samples: vec![(Vec::new(), u64::try_from(value).unwrap_or(u64::MAX))],
        };
        vec![
            gauge(
                "buffered_body_bytes",
                "Request body bytes held in memory now",
                budget.in_use(),
            ),
            gauge(
                "buffered_answer_bytes",
                "Bytes of answers held in memory now: events being read, answers kept to be cached",
                budget.answers_in_use(),
            ),
            gauge(
                "buffered_body_limit_bytes",
                "Bound on the request body bytes held at once, and apart on the answer bytes (max_buffered_body_bytes)",
                budget.limit(),
            ),
        ]
    })
}

/// WebSocket sessions: open now, turns passed on, messages refused.
fn socket_metrics(counters: Arc<SocketCounters>) -> Source {
    use std::sync::atomic::Ordering::Relaxed;
    Box::new(move || {
        let one = |name, help, counter, value: &std::sync::atomic::AtomicU64| Series {
            name,
            help,
            counter,
            samples: vec![(Vec::new(), value.load(Relaxed))],
        };
        vec![
            one(
                "websockets_open",
                "WebSocket sessions open now (/v1/responses upgrades)",
                false,
                &counters.open,
            ),
            one(
                "websocket_turns",
                "Turns (response.create and response.append messages) admitted and passed on",
                true,
                &counters.turns,
            ),
            one(
                "websocket_refused",
                "WebSocket client messages refused with an error message",
                true,
                &counters.refused,
            ),
        ]
    })
}

/// Failed calls to shared stores, one family for every store.
fn store_metrics(
    auth: Option<AuthLayer>,
    cache: Option<CacheLayer>,
    ids: Option<RedisIds>,
) -> Source {
    Box::new(move || {
        let mut samples = Vec::new();
        if let Some(auth) = &auth {
            samples.push((vec![("store", "auth".to_owned())], auth.store_errors()));
        }
        if let Some(cache) = &cache {
            let snap = cache.stats().snapshot();
            samples.push((vec![("store", "cache".to_owned())], snap.store_errors));
        }
        if let Some(ids) = &ids {
            samples.push((vec![("store", "responses".to_owned())], ids.errors()));
        }
        vec![Series {
            name: "store_errors",
            help: "Failed calls to a store (Redis), by store",
            counter: true,
            samples,
        }]
    })
}
