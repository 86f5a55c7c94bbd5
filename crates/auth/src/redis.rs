//! Limits kept in Redis, so that every proxy on one Redis enforces one limit.
//!
//! One Lua script does what [`limit::decide`](crate::limit::decide) does, on
//! the TATs stored in Redis and with Redis's own clock (`TIME`), so proxies
//! with skewed clocks still agree. Both keys of a limited key share a hash tag
//! (`<prefix>rl:{<name>}:req` and `…:tok`), so the script is cluster-safe.
//! Every call goes through a [`RedisLink`] (bounded by a timeout, a silent
//! connection replaced, a breaker while Redis keeps failing); an error is
//! returned to the backend, which falls back to the process's own limits.

use std::time::Duration;

use llm_proxy_core::redis::{RedisCallError, RedisLink};

use crate::keys::KeyEntry;
use crate::limit::{Decision, Gcra};

/// A limit's interval in µs, with its fraction: above 60 000 000 a minute
/// it is under one µs, and whole µs would make it 0 ("no limit") or loosen
/// it (40 000 000 would be enforced as 60 000 000); so would whole ns above
/// a few hundred million (u32::MAX a minute is 13.97 ns, not 13). Lua
/// numbers are doubles: exact enough at any `u32` limit.
fn micros(g: Gcra) -> f64 {
    60_000_000.0 / f64::from(g.units())
}

/// What both scripts start with: `tat(key)`, the time a key holds.
const TAT: &str = r"
-- A key's time, 0 when it holds none: absent, or something the proxy did
-- not write there (another type, not a number), which the next write
-- replaces. So is a number no TAT reaches: Lua reads `nan`, `inf` and
-- `1e300` as numbers, and they would fail every decision (a `nan` expiry,
-- a wait beyond Redis's integer reply). The bound, 2^53 us (the year
-- 2255), is where doubles stop holding whole microseconds.
local function tat(key)
  local v = redis.pcall('GET', key)
  if type(v) ~= 'string' then return 0 end
  local n = tonumber(v)
  if n == nil or n ~= n or n < 0 or n > 9007199254740992 then return 0 end
  return n
end
";

/// The acquire script. ARGV: request interval µs (0 = no limit), token
/// interval µs (0 = none; both with their fractions), token cost (already capped by
/// [`Limits::token_charge`](crate::limit::Limits::token_charge), so both
/// backends charge, settle and refund the same amount), and the requests
/// and tokens the calling proxy charged alone while Redis failed (0 =
/// none), added before the decision whatever it is. Returns
/// `{wait_us, requests_tat_us, tokens_tat_us, now_us}`.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = 60000000
local ri, ti = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local rtat = tat(KEYS[1])
-- This script never writes a request time more than a window ahead: a
-- later one is not its own (another program's, or a failover to a replica
-- whose clock runs behind) and would lock the key out for as long. As no
-- time. (A token time may run far ahead: a large usage settled.)
if rtat > now + window then rtat = 0 end
local ttat = tat(KEYS[2])
local function put(key, at)
  redis.call('SET', key, string.format('%.0f', at), 'PX', math.ceil((at - now) / 1000) + 1000)
end
local ralone = tonumber(ARGV[4]) or 0
local talone = tonumber(ARGV[5]) or 0
local rraised = ri > 0 and ralone > 0
local traised = ti > 0 and talone > 0
-- (A request time stays within a window of now, as the script keeps it.)
if rraised then rtat = math.min(math.max(rtat, now) + ralone * ri, now + window) end
if traised then ttat = math.max(ttat, now) + talone * ti end
local rnew = math.max(rtat, now) + ri
local tnew = math.max(ttat, now) + cost * ti
local wait = 0
if ri > 0 and rnew - now > window then wait = math.max(wait, rnew - now - window) end
if ti > 0 and cost > 0 and tnew - now > window then wait = math.max(wait, tnew - now - window) end
-- A reply's number is truncated to an integer: a wait under 1 µs must not
-- read as 0, which means allowed, when nothing was written.
wait = math.ceil(wait)
if wait == 0 then
  if ri > 0 then
    rtat = rnew
    rraised = true
  end
  if ti > 0 and cost > 0 then
    ttat = tnew
    traised = true
  end
end
if rraised then put(KEYS[1], rtat) end
if traised then put(KEYS[2], ttat) end
return {wait, rtat, ttat, now}
";

/// The adjust script. ARGV: token interval µs, delta tokens (may be
/// negative; [`Gcra::bounded`]). Returns how far (µs) the time runs ahead
/// of Redis's clock after it.
const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local new = math.max(tat(KEYS[1]), now) + tonumber(ARGV[2]) * tonumber(ARGV[1])
if new <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return new - now
";

/// A connection to the Redis that holds the limits.
pub struct RedisLimits {
    link: RedisLink,
    prefix: String,
    acquire: redis::Script,
    adjust: redis::Script,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisLimits {
    /// Limits in the Redis at `url` (`redis://`, `redis://user:pass@host:port/db`,
    /// `rediss://` for TLS), under `prefix`. Connects lazily: a proxy starts
    /// even while Redis is down, and uses local limits until it is back.
    pub fn new(url: &str, prefix: &str) -> Result<Self, RedisCallError> {
        Ok(RedisLimits {
            link: RedisLink::new(url)?.used_by("auth"),
            prefix: prefix.to_owned(),
            acquire: redis::Script::new(&format!("{TAT}{ACQUIRE}")),
            adjust: redis::Script::new(&format!("{TAT}{ADJUST}")),
        })
    }

    /// Bound every Redis call by `timeout` (default 250 ms).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.link = self.link.with_timeout(timeout);
        self
    }

    fn key(&self, name: &str, which: &str) -> String {
        format!("{}rl:{{{name}}}:{which}", self.prefix)
    }

    /// Ask for one request reserving `tokens` (see [`crate::limit`]), after
    /// adding the requests and tokens `alone` this process charged alone,
    /// if any. Also returns how far (ns) each time runs ahead of Redis's
    /// clock after the decision.
    pub(crate) async fn acquire(
        &self,
        key: &KeyEntry,
        tokens: u64,
        alone: Option<[u64; 2]>,
    ) -> Result<(Decision, [u64; 2]), RedisCallError> {
        let interval = |g: Option<Gcra>| g.map_or(0.0, micros);
        let [requests_alone, tokens_alone] = alone.unwrap_or_default();
        // (Bounded as one adjustment is: Lua's doubles stay exact.)
        let bound = |g: Option<Gcra>, n: u64| {
            g.map_or(0, |g| g.bounded(i64::try_from(n).unwrap_or(i64::MAX)))
        };
        let requests_alone = bound(key.limits.requests, requests_alone);
        let tokens_alone = bound(key.limits.tokens, tokens_alone);
        let mut call = self.acquire.key(self.key(&key.name, "req"));
        call.key(self.key(&key.name, "tok"))
            .arg(interval(key.limits.requests))
            .arg(interval(key.limits.tokens))
            .arg(key.limits.token_charge(tokens))
            .arg(requests_alone)
            .arg(tokens_alone);
        let call = &call;
        let invoke =
            |mut c: redis::aio::ConnectionManager| async move { call.invoke_async(&mut c).await };
        // With a tally, once: a second run would add it twice.
        let (wait, rtat, ttat, now): (u64, u64, u64, u64) = if alone.is_some() {
            self.link.call_once("acquire", invoke).await?
        } else {
            self.link.call("acquire", invoke).await?
        };
        let ns = |us: u64| us.saturating_mul(1000);
        let decision = Decision {
            allowed: wait == 0,
            retry_after: Duration::from_micros(wait),
            requests: key.limits.requests.map(|g| g.status(ns(rtat), ns(now))),
            tokens: key.limits.tokens.map(|g| g.status(ns(ttat), ns(now))),
            held_locally: false,
        };
        let ahead = [rtat, ttat].map(|tat| ns(tat.saturating_sub(now)));
        Ok((decision, ahead))
    }

    /// Charge or refund tokens; returns how far (ns) the key's token time
    /// runs ahead of Redis's clock after it.
    pub(crate) async fn adjust(&self, key: &KeyEntry, delta: i64) -> Result<u64, RedisCallError> {
        let Some(g) = key.limits.tokens else {
            return Ok(0);
        };
        let mut call = self.adjust.key(self.key(&key.name, "tok"));
        call.arg(micros(g)).arg(g.bounded(delta));
        let call = &call;
        // Once: a refund run twice would give tokens back twice.
        let ahead_us: u64 = self
            .link
            .call_once(
                "adjust",
                |mut c| async move { call.invoke_async(&mut c).await },
            )
            .await?;
        Ok(ahead_us.saturating_mul(1000))
    }
}
