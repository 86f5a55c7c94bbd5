//! Fleet-wide limits: two proxies on one real Redis enforce one limit, and a
//! Redis outage falls back to local limits instead of failing requests.

use std::time::Duration;

use http::Method;
use tests::redis_server::RedisServer;
use tests::*;

fn config(upstream: &str, redis: &str, prefix: &str) -> String {
    format!(
        "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{redis}\"\nkey_prefix = \"{prefix}\"\n\
         [[auth.keys]]\nname = \"fleet\"\nkey = \"sk-fleet\"\nrequests_per_minute = 4\n",
        one_upstream(upstream, "")
    )
}

async fn call(p: &TestProxy) -> Answer {
    send(request(
        Method::POST,
        &p.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-fleet"),
        ],
        chat("m", false),
    ))
    .await
}

#[tokio::test]
async fn two_proxies_share_one_limit() {
    let redis = RedisServer::start().await;
    let up = mock_named("m").await;
    let a = proxy(&config(&up.base_url(), &redis.url(), "t1:")).await;
    let b = proxy(&config(&up.base_url(), &redis.url(), "t1:")).await;
    let mut statuses = Vec::new();
    for p in [&a, &b, &a, &b, &a, &b] {
        statuses.push(call(p).await.status.as_u16());
    }
    // rpm 4 across the fleet: four pass, whichever proxy they hit.
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
    let limited = call(&b).await;
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(limited.header("retry-after"), Some("15"));
    assert_eq!(up.stats.requests(), 4);
}

#[tokio::test]
async fn redis_down_falls_back_to_local_limits() {
    let mut redis = RedisServer::start().await;
    let up = mock_named("m").await;
    let p = proxy(&config(&up.base_url(), &redis.url(), "t2:")).await;
    assert_eq!(call(&p).await.status, 200);
    redis.stop();
    // Requests keep being served, limited by this process alone, never
    // failed for want of Redis; and from what the fleet had used when Redis
    // last answered (one of rpm 4), not from a fresh bucket.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(call(&p).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let metrics = p.metrics().await;
    assert!(
        metrics.lines().any(
            |l| l.starts_with(r#"llm_proxy_store_errors_total{store="auth"}"#)
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

/// What a proxy let through alone while Redis was away reaches Redis once
/// it is back (here an empty Redis, restarted): the fleet's bucket is not a
/// fresh one.
#[tokio::test]
async fn what_was_decided_while_redis_was_away_reaches_it_once_back() {
    let mut redis = RedisServer::start().await;
    let up = mock_named("m").await;
    // rpm 12: one request every 5 s.
    let p = proxy(&format!(
        "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"t10:\"\n\
         [[auth.keys]]\nname = \"fleet\"\nkey = \"sk-fleet\"\nrequests_per_minute = 12\n",
        one_upstream(&up.base_url(), ""),
        redis.url()
    ))
    .await;
    assert_eq!(call(&p).await.status, 200);
    redis.stop();
    assert_eq!(call(&p).await.status, 200);
    assert_eq!(call(&p).await.status, 200);
    redis.restart().await;
    // Until the proxy asks Redis again (it skips a failing Redis for a
    // second at a time), its requests are still decided alone.
    let mut sent = 3;
    let deadline = tokio::time::Instant::now() + HANG;
    let ahead = loop {
        assert_eq!(call(&p).await.status, 200);
        sent += 1;
        if let Some(ahead) = fleet_ahead(&redis, "t10:").await {
            break ahead;
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis never asked");
        assert!(sent < 12, "the proxy's own bucket ran out first");
        tokio::time::sleep(Duration::from_millis(400)).await;
    };
    // Every request since the first (which the restarted Redis forgot) is
    // in Redis's time (5 s each), less what the seconds since refilled:
    // those the proxy let through alone were added to it. Without that,
    // only those since the restart (at least two fewer).
    let expected = Duration::from_secs(5 * (sent - 1));
    assert!(
        ahead > expected - Duration::from_secs(7) && ahead <= expected,
        "{sent} sent, Redis {ahead:?} ahead"
    );
}

/// What a proxy let through alone and has since refilled is not owed to
/// Redis once it is back: a key that kept within its limit through an
/// outage is not refused after it for the outage's whole spend.
#[tokio::test]
async fn what_refilled_while_redis_was_away_is_not_owed_once_back() {
    let mut redis = RedisServer::start().await;
    let up = mock_named("m").await;
    // rpm 600: a request every 0.1 s.
    let p = proxy(&format!(
        "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"t11:\"\n\
         [[auth.keys]]\nname = \"fleet\"\nkey = \"sk-fleet\"\nrequests_per_minute = 600\n",
        one_upstream(&up.base_url(), ""),
        redis.url()
    ))
    .await;
    assert_eq!(call(&p).await.status, 200);
    redis.stop();
    for _ in 0..5 {
        assert_eq!(call(&p).await.status, 200);
    }
    // Half a second of requests, refilled in a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart().await;
    let deadline = tokio::time::Instant::now() + HANG;
    let ahead = loop {
        assert_eq!(call(&p).await.status, 200);
        if let Some(ahead) = fleet_ahead(&redis, "t11:").await {
            break ahead;
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis never asked");
        // (Each request decided alone meanwhile refills too.)
        tokio::time::sleep(Duration::from_millis(400)).await;
    };
    // Only the request Redis decided: without the refill taken off, the
    // five let through alone (0.5 s) would be owed again.
    assert!(ahead <= Duration::from_millis(100), "Redis {ahead:?} ahead");
}

/// How far the request time of key `fleet` under `prefix` runs ahead of
/// Redis's clock, once Redis holds one.
async fn fleet_ahead(redis: &RedisServer, prefix: &str) -> Option<Duration> {
    let tat: u64 = fleet_state(redis, prefix).await?.parse().ok()?;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    Some(Duration::from_micros(
        tat.saturating_sub(secs * 1_000_000 + micros),
    ))
}

#[tokio::test]
async fn proxy_starts_while_redis_is_down() {
    let port = free_port();
    let up = mock_named("m").await;
    let p = proxy(&config(
        &up.base_url(),
        &format!("redis://127.0.0.1:{port}"),
        "t3:",
    ))
    .await;
    assert_eq!(call(&p).await.status, 200);
}

/// The request-limit state of key `fleet` under `prefix`, read from Redis.
async fn fleet_state(redis: &RedisServer, prefix: &str) -> Option<String> {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("GET")
        .arg(format!("{prefix}rl:{{fleet}}:req"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_silent_redis_connection_is_replaced() {
    let redis = RedisServer::start().await;
    let relay = relay::Relay::start(redis.addr).await;
    let up = mock_named("m").await;
    // A limit never reached: what shows where a decision was made is the
    // state in Redis, which moves only when Redis decides.
    let p = proxy(&format!(
        "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"t4:\"\n\
         [[auth.keys]]\nname = \"fleet\"\nkey = \"sk-fleet\"\nrequests_per_minute = 100000\n",
        one_upstream(&up.base_url(), ""),
        relay.redis_url()
    ))
    .await;
    // (The start-up check's own connection, closed since.)
    let at_start = relay.accepted();
    assert_eq!(call(&p).await.status, 200);
    let before = fleet_state(&redis, "t4:").await;
    assert!(before.is_some(), "decided in Redis");
    relay.freeze();
    // Calls wait for a silent Redis, then skip it, and are decided by the
    // proxy alone (never failed); once the connection is replaced, Redis
    // decides again.
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        assert_eq!(call(&p).await.status, 200);
        // (The state expires a second after its last decision: gone is
        // not "decided".)
        let now = fleet_state(&redis, "t4:").await;
        if now.is_some() && now != before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Redis never decided again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(relay.accepted(), at_start + 2);
}

/// A token limit above 60 000 000 per minute (an interval under 1 µs) is
/// enforced on Redis as in memory: of two in-flight requests that each
/// reserve the whole limit, the second is refused.
#[tokio::test]
async fn a_large_token_limit_is_enforced_on_redis_too() {
    whole_limit_then_more(100_000_000, 200_000_000, 200_000_000).await;
}

/// A limit of u32::MAX tokens a minute is 13.97 ns a token: once the whole
/// of it is reserved, 5% more is refused, on either backend (charged as a
/// whole 13 ns a token, 7% more went through).
#[tokio::test]
async fn a_huge_token_limit_is_not_loosened_by_rounding() {
    let all = u64::from(u32::MAX);
    whole_limit_then_more(u32::MAX, all, all / 20).await;
}

/// On each backend, memory and Redis: a key limited to `limit` tokens a
/// minute sends a request reserving `reserve` tokens and, while it is in
/// flight, one reserving `then`; the first passes, the second is refused.
async fn whole_limit_then_more(limit: u32, reserve: u64, then: u64) {
    let redis = RedisServer::start().await;
    let up = mock_named("m").await;
    for auth in [
        String::new(),
        format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"big:\"",
            redis.url()
        ),
    ] {
        let toml = format!(
            "{}\n[auth]\n{auth}\n[[auth.keys]]\nname = \"big\"\nkey = \"sk-big\"\ntokens_per_minute = {limit}\n",
            one_upstream(&up.base_url(), "")
        );
        let p = proxy(&toml).await;
        let go = |max_tokens: u64| {
            let body = serde_json::json!({"model": "m", "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
            send(request(
                Method::POST,
                &p.url("/v1/chat/completions"),
                &[
                    ("content-type", "application/json"),
                    ("authorization", "Bearer sk-big"),
                    ("x-mock-latency-ms", "500"),
                ],
                body,
            ))
        };
        let first = tokio::spawn(go(reserve));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = go(then).await;
        let first = first.await.unwrap();
        assert_eq!(first.status, 200, "backend {auth:?}");
        assert_eq!(
            second.status,
            429,
            "backend {auth:?}: the whole limit is already reserved; remaining-tokens {:?}",
            second.header("x-ratelimit-remaining-tokens")
        );
    }
}

/// `key`'s remaining tokens as proxy `p` reports them (a `count_tokens`
/// request, which reserves none).
async fn tokens_left(p: &TestProxy, key: &str) -> u32 {
    let a = send(request(
        Method::POST,
        &p.url("/v1/messages/count_tokens"),
        &[
            ("content-type", "application/json"),
            ("authorization", key),
            ("anthropic-version", "2023-06-01"),
        ],
        r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
    ))
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.header("x-ratelimit-remaining-tokens")
        .expect("token headers")
        .parse()
        .unwrap()
}

/// A reservation taken from local limits while Redis was silent is settled
/// locally: its refund, made after Redis is back, must not credit the
/// fleet's bucket with tokens Redis never charged.
#[tokio::test]
async fn a_reservation_taken_while_redis_failed_is_not_refunded_into_redis() {
    let redis = RedisServer::start().await;
    let relay = relay::Relay::start(redis.addr).await;
    let up = mock_named("m").await;
    let config = |url: &str| {
        format!(
            "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"t6:\"\n\
             [[auth.keys]]\nname = \"fleet\"\nkey = \"sk-fleet\"\ntokens_per_minute = 1000\n",
            one_upstream(&up.base_url(), "")
        )
    };
    let a = proxy(&config(&relay.redis_url())).await;
    let b = proxy(&config(&redis.url())).await;
    let post = |headers: &[(&'static str, &'static str)], max_tokens: u32| {
        let mut all = vec![
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-fleet"),
        ];
        all.extend_from_slice(headers);
        let body = serde_json::json!({"model": "m", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]});
        send(request(
            Method::POST,
            &a.url("/v1/chat/completions"),
            &all,
            body.to_string(),
        ))
    };
    // ~300 tokens charged in Redis.
    let spent = post(&[("x-mock-tokens", "300")], 300).await;
    assert_eq!(spent.status, 200);
    let left = tokens_left(&b, "Bearer sk-fleet").await;
    assert!(left < 800, "{left}");
    // Redis goes silent: the next request is decided by proxy `a` alone,
    // reserving ~500. While its upstream works, a second call times out
    // too, a second after the last answer: `a` replaces its connection
    // (the relay passes new ones). The request then fails upstream, and its
    // reservation is given back, with Redis answering again.
    relay.freeze();
    let failed = post(
        &[("x-mock-fail", "500"), ("x-mock-latency-ms", "2500")],
        500,
    );
    let second = async {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        tokens_left(&a, "Bearer sk-fleet").await
    };
    let (failed, _) = tokio::join!(failed, second);
    assert_eq!(failed.status, 500);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fleet's bucket is where it was (plus the refill of ~2 s at
    // 1000 a minute), not ~500 richer.
    let after = tokens_left(&b, "Bearer sk-fleet").await;
    assert!(after < left + 150, "{left} then {after}");
}

/// Something else wrote the limit's keys (another type, not a number): the
/// fleet's limit still holds, decided by Redis, and the keys are written
/// over.
#[tokio::test]
async fn a_damaged_limit_key_is_written_over() {
    let redis = RedisServer::start().await;
    let up = mock_named("m").await;
    let a = proxy(&config(&up.base_url(), &redis.url(), "t9:")).await;
    let b = proxy(&config(&up.base_url(), &redis.url(), "t9:")).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for damage in ["not-a-number", "hash"] {
        let key = "t9:rl:{fleet}:req";
        if damage == "hash" {
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
            redis::cmd("HSET")
                .arg(&[key, "f", "v"])
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        } else {
            redis::cmd("SET")
                .arg(&[key, damage])
                .query_async::<()>(&mut conn)
                .await
                .unwrap();
        }
        // rpm 4 across the fleet, as if the key had been absent.
        four_pass_across_the_fleet(&a, &b, damage).await;
        let state = fleet_state(&redis, "t9:").await.expect("written over");
        assert!(state.parse::<f64>().is_ok(), "{damage}: {state}");
        // No Redis call failed: nothing fell back to local limits.
        no_auth_store_errors(&[&a, &b], damage).await;
    }
}

/// No Redis call of the auth layer failed on any of `proxies`: nothing fell
/// back to local limits.
async fn no_auth_store_errors(proxies: &[&TestProxy], what: &str) {
    for p in proxies {
        let metrics = p.metrics().await;
        assert!(
            !metrics.lines().any(|l| l
                .starts_with(r#"llm_proxy_store_errors_total{store="auth"}"#)
                && !l.ends_with(" 0")),
            "{what}: {metrics}"
        );
    }
}

/// Six calls alternating between proxies `a` and `b` under the fleet's
/// rpm 4: four pass, the rest get 429.
async fn four_pass_across_the_fleet(a: &TestProxy, b: &TestProxy, what: &str) {
    let mut statuses = Vec::new();
    for p in [a, b, a, b, a, b] {
        statuses.push(call(p).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "{what}");
}

/// Something else wrote a limit's key with text Lua reads as a number no
/// clock reaches (`nan`, `inf`, `1e300`), or a request time further ahead
/// than the proxy ever writes one: as for any value the proxy did
/// not write, the fleet's limit still holds, decided by Redis, and the key
/// is written over — not every decision failing (a script error, or a wait
/// that overflows Redis's integer reply) and falling back to local limits
/// for as long as the key stays.
#[tokio::test]
async fn a_limit_key_holding_no_real_time_is_written_over() {
    let redis = RedisServer::start().await;
    let up = mock_named("m").await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // An hour ahead of Redis's clock: never written by the proxy, which
    // keeps a request time within a minute, as after a failover to a
    // replica whose clock is behind.
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let ahead = (secs * 1_000_000 + micros + 3_600_000_000).to_string();
    for (i, damage) in ["nan", "inf", "1e300", &ahead].into_iter().enumerate() {
        // Fresh proxies each round: no breaker or local state carried over.
        let prefix = format!("t10-{i}:");
        let a = proxy(&config(&up.base_url(), &redis.url(), &prefix)).await;
        let b = proxy(&config(&up.base_url(), &redis.url(), &prefix)).await;
        redis::cmd("SET")
            .arg(&[format!("{prefix}rl:{{fleet}}:req").as_str(), damage])
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        // rpm 4 across the fleet, as if the key had been absent.
        four_pass_across_the_fleet(&a, &b, damage).await;
        let state = fleet_state(&redis, &prefix).await.expect("written over");
        assert!(
            state.parse::<f64>().is_ok_and(f64::is_finite),
            "{damage}: {state}"
        );
        no_auth_store_errors(&[&a, &b], damage).await;
    }
}

/// A refund that reached Redis stays there: what a proxy sends Redis after
/// a call of its own failed is what it charged alone, not its whole state
/// (which holds the reservation, as Redis last reported it).
#[tokio::test]
async fn a_refund_in_redis_is_not_undone_after_a_failed_call() {
    let redis = RedisServer::start().await;
    let relay = relay::Relay::start(redis.addr).await;
    let up = mock_named("m").await;
    let config = |url: &str| {
        format!(
            "{}\n[auth]\nbackend = \"redis\"\nredis_url = \"{url}\"\nkey_prefix = \"t11:\"\n\
             [[auth.keys]]\nname = \"fleet\"\nkey = \"sk-fleet\"\ntokens_per_minute = 1000\n",
            one_upstream(&up.base_url(), "")
        )
    };
    let a = proxy(&config(&relay.redis_url())).await;
    let b = proxy(&config(&redis.url())).await;
    // 600 reserved, 10 used: the refund reaches Redis.
    let body = serde_json::json!({"model": "m", "max_tokens": 600,
        "messages": [{"role": "user", "content": "hi"}]});
    let used = send(request(
        Method::POST,
        &a.url("/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer sk-fleet"),
            ("x-mock-tokens", "10"),
        ],
        body.to_string(),
    ))
    .await;
    assert_eq!(used.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = tokens_left(&b, "Bearer sk-fleet").await;
    assert!(before > 900, "{before}");
    // One call of `a` fails (Redis silent; it reserves no tokens), then
    // `a` replaces its connection and asks Redis again.
    let connections = relay.accepted();
    relay.freeze();
    let _ = tokens_left(&a, "Bearer sk-fleet").await;
    let deadline = tokio::time::Instant::now() + HANG;
    while relay.accepted() == connections {
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tokens_left(&a, "Bearer sk-fleet").await;
    }
    let _ = tokens_left(&a, "Bearer sk-fleet").await;
    let after = tokens_left(&b, "Bearer sk-fleet").await;
    assert!(
        after + 100 >= before,
        "{before} then {after}: the refund was undone"
    );
}
