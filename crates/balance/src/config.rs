//! The balancer's typed configuration: strategy, retries, ejection, health
//! checks, fallbacks and the retry budget. Every field has a default that
//! matches DESIGN.md's `[balance]` section.

use std::collections::HashMap;
use std::time::Duration;

/// How the balancer chooses among the healthy upstreams of a model.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum Strategy {
    /// Each upstream in turn.
    RoundRobin,
    /// Smooth weighted round robin (as nginx does) by [`Backend::weight`](crate::Backend::weight).
    Weighted,
    /// Power of two choices over in-flight requests.
    LeastRequests,
    /// Power of two choices over a peak-EWMA of time to first byte times the
    /// in-flight requests (tower's `PeakEwma`, measured at the first body frame).
    #[default]
    P2cEwma,
    /// Prompt-prefix affinity by consistent hashing with bounded load, for
    /// the upstreams' KV (prefix) caches. See [`PrefixConfig`].
    PrefixAffinity(PrefixConfig),
}

impl Strategy {
    /// The strategy's config name (`round_robin`, `p2c_ewma`, …).
    pub fn as_str(&self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::Weighted => "weighted",
            Strategy::LeastRequests => "least_requests",
            Strategy::P2cEwma => "p2c_ewma",
            Strategy::PrefixAffinity(_) => "prefix_affinity",
        }
    }
}

/// The knobs of [`Strategy::PrefixAffinity`]. The defaults suit chat
/// traffic; see the [crate docs](crate#prefix-affinity) for the algorithm.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixConfig {
    /// Bytes of canonical prompt text per hashed block (default 256, about
    /// 64 tokens). Clamped to 16..=65536.
    pub block_bytes: usize,
    /// How many leading blocks make the routing key (default 8: the first
    /// 2 KiB of prompt, about 500 tokens). Longer keys separate conversations
    /// that share a short system prompt; shorter keys group requests that
    /// share a long one. Clamped to 1..=1024.
    pub prefix_blocks: usize,
    /// Virtual nodes per upstream on the hash ring (default 128). Clamped to
    /// 1..=1024.
    pub virtual_nodes: usize,
    /// ε of the load bound: an upstream takes the request only while its
    /// in-flight count stays within `(1 + ε) × mean` (default 0.25).
    pub load_factor: f64,
    /// Absolute slack of the load bound: the bound is at least
    /// `ceil(mean) + min_slack` (default 2), so a hot prefix may keep a few
    /// requests on its upstream even when the mean is tiny.
    pub min_slack: u32,
    /// When the in-flight spread (max − min over healthy candidates) exceeds
    /// this, and twice `load_factor` of the mean in-flight (the spread the
    /// load bound itself allows), affinity is set aside and the least
    /// loaded upstream is chosen (default 32).
    pub max_spread: u32,
}

impl Default for PrefixConfig {
    fn default() -> Self {
        PrefixConfig {
            block_bytes: 256,
            prefix_blocks: 8,
            virtual_nodes: 128,
            load_factor: 0.25,
            min_slack: 2,
            max_spread: 32,
        }
    }
}

impl PrefixConfig {
    /// The bounds `block_bytes` is clamped to.
    pub const BLOCK_BYTES: std::ops::RangeInclusive<usize> = 16..=65_536;
    /// The bounds `prefix_blocks` is clamped to.
    pub const PREFIX_BLOCKS: std::ops::RangeInclusive<usize> = 1..=1024;
    /// The bounds `virtual_nodes` is clamped to.
    pub const VIRTUAL_NODES: std::ops::RangeInclusive<usize> = 1..=1024;

    /// `block_bytes` within its documented bounds.
    pub(crate) fn block_bytes_clamped(&self) -> usize {
        clamp(self.block_bytes, &Self::BLOCK_BYTES)
    }

    /// `prefix_blocks` within its documented bounds.
    pub(crate) fn prefix_blocks_clamped(&self) -> usize {
        clamp(self.prefix_blocks, &Self::PREFIX_BLOCKS)
    }

    /// `virtual_nodes` within its documented bounds.
    pub(crate) fn virtual_nodes_clamped(&self) -> usize {
        clamp(self.virtual_nodes, &Self::VIRTUAL_NODES)
    }

    /// `load_factor`, non-negative and finite (NaN and negatives are 0).
    pub(crate) fn load_factor_clamped(&self) -> f64 {
        if self.load_factor.is_finite() {
            self.load_factor.max(0.0)
        } else {
            0.0
        }
    }
}

/// Active health checks: `GET <path>` on every upstream each `interval`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between two probe rounds; a probe also times out after it.
    pub interval: Duration,
    /// The client path probed (default `/v1/models`; the upstream client
    /// maps it onto its base URL).
    pub path: String,
    /// Whether a passing probe sent during an ejection ends it (default
    /// true, as Envoy's `successful_active_health_check_uneject_host`):
    /// without, an ejected backend rests its time out unless a request
    /// panic-routed to it succeeds, and a fleet whose every backend was
    /// ejected stays unready that long when no request comes.
    pub uneject: bool,
}

impl HealthCheck {
    /// Probe `/v1/models` every `interval`; a passing probe ends an
    /// ejection.
    pub fn every(interval: Duration) -> Self {
        HealthCheck {
            interval,
            path: "/v1/models".to_owned(),
            uneject: true,
        }
    }
}

/// How many retries the balancer may spend, fleet-wide, so that a failing
/// fleet is not hammered (as tower's `TpsBudget`, see `budget.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    /// The window over which requests deposit and retries withdraw
    /// (default 10 s; clamped to 1..=60 s).
    pub window: Duration,
    /// Retries per second always allowed, whatever the traffic (default 3).
    pub min_per_sec: u32,
    /// Retries allowed as a fraction of requests in the window (default 0.2).
    pub ratio: f32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            window: Duration::from_secs(10),
            min_per_sec: 3,
            ratio: 0.2,
        }
    }
}

impl RetryBudget {
    /// The budget, starting at `now` on the balancer's clock.
    pub(crate) fn build(&self, now: u64) -> crate::budget::Budget {
        crate::budget::Budget::new(self.window, self.min_per_sec, self.ratio, now)
    }
}

/// Everything the balancer needs to know, with DESIGN.md's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BalanceConfig {
    /// How to choose among healthy candidates (default `p2c_ewma`).
    pub strategy: Strategy,
    /// Further attempts after the first, before the first response byte
    /// (default 2).
    pub max_retries: u32,
    /// Consecutive failures (connect error, timeout, 5xx) that eject an
    /// upstream (default 3; 0 is treated as 1).
    pub eject_after_failures: u32,
    /// Rest of a first ejection (default 30 s). Each repeated ejection
    /// doubles it, up to `eject × max_eject_multiplier`.
    pub eject: Duration,
    /// Cap of the rest growth, as a multiple of `eject` (default 10).
    pub max_eject_multiplier: u32,
    /// Longest rest a 429's `retry-after` may impose (default 300 s).
    pub max_retry_after: Duration,
    /// Optional active health checks (default off: passive health only).
    pub health_check: Option<HealthCheck>,
    /// Model -> other models tried in order when every upstream of the
    /// first is failing or resting.
    pub fallbacks: HashMap<String, Vec<String>>,
    /// The fleet-wide retry budget.
    pub retry_budget: RetryBudget,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            strategy: Strategy::default(),
            max_retries: 2,
            eject_after_failures: 3,
            eject: Duration::from_secs(30),
            max_eject_multiplier: 10,
            max_retry_after: Duration::from_secs(300),
            health_check: None,
            fallbacks: HashMap::new(),
            retry_budget: RetryBudget::default(),
        }
    }
}

fn clamp(value: usize, bounds: &std::ops::RangeInclusive<usize>) -> usize {
    value.clamp(*bounds.start(), *bounds.end())
}
