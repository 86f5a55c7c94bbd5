//! The Redis link every Redis-backed store uses: a silent connection is
//! replaced, and a failing Redis is skipped by the breaker.

use std::time::Duration;

use llm_proxy_core::redis::{RedisCallError, RedisLink};
use tests::redis_server::RedisServer;
use tests::relay::Relay;
use tests::{HANG, until_ok};

async fn get(link: &RedisLink, key: &str) -> Result<Option<String>, RedisCallError> {
    link.call("get", |mut c| async move {
        redis::cmd("GET").arg(key).query_async(&mut c).await
    })
    .await
}

/// `SET k v` through the link.
async fn set_k(link: &RedisLink) -> Result<(), RedisCallError> {
    link.call("set", |mut c| async move {
        redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async::<()>(&mut c)
            .await
    })
    .await
}

/// A connection of its own to `redis`, beside the link's.
/// Run an admin command that must succeed (`what` names it if it fails).
async fn admin_cmd(conn: &mut redis::aio::MultiplexedConnection, args: &[&str], what: &str) {
    let mut cmd = redis::cmd(args[0]);
    cmd.arg(&args[1..]);
    cmd.query_async::<()>(conn).await.expect(what);
}

async fn admin(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("a client")
        .get_multiplexed_async_connection()
        .await
        .expect("connected")
}

#[tokio::test]
async fn a_silent_connection_is_replaced() {
    let redis = RedisServer::start().await;
    let relay = Relay::start(redis.addr).await;
    let link = RedisLink::new(&relay.redis_url())
        .expect("a link")
        .with_timeout(Duration::from_millis(200));
    set_k(&link).await.expect("set through the relay");
    assert_eq!(relay.accepted(), 1);

    // The connection goes silent: no error, no answer, ever.
    relay.freeze();
    let silent = get(&link, "k").await;
    assert!(
        matches!(silent, Err(RedisCallError::Timeout { op: "get", .. })),
        "{silent:?}"
    );
    // A second call with no answer replaces the connection; calls go
    // through a new one (the breaker may skip a few for a second first).
    let found = until_ok("still failing", || get(&link, "k")).await;
    assert_eq!(found.as_deref(), Some("v"));
    assert_eq!(relay.accepted(), 2, "one new connection");
}

#[tokio::test]
async fn a_failing_redis_is_skipped_then_probed() {
    // A port held for the whole test and not listening: connections to it
    // are refused (a port only found free could be taken by another test).
    let held = tokio::net::TcpSocket::new_v4().expect("a socket");
    held.bind("127.0.0.1:0".parse().expect("an address"))
        .expect("bind");
    let port = held.local_addr().expect("its address").port();
    let link = RedisLink::new(&format!("redis://127.0.0.1:{port}"))
        .expect("a link")
        .with_timeout(Duration::from_millis(500));
    // Nothing listens: connection refused, three times in a row…
    for _ in 0..3 {
        let refused = get(&link, "k").await;
        assert!(
            matches!(
                refused,
                Err(RedisCallError::Redis(_) | RedisCallError::Timeout { .. })
            ),
            "{refused:?}"
        );
    }
    // …opens the breaker: calls are skipped without touching the network.
    let skipped = get(&link, "k").await;
    assert!(
        matches!(skipped, Err(RedisCallError::Skipped)),
        "{skipped:?}"
    );
    // After its cooldown one call probes Redis again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probe = get(&link, "k").await;
    assert!(
        !matches!(probe, Err(RedisCallError::Skipped) | Ok(_)),
        "{probe:?}"
    );

    // Without a breaker every call goes to Redis.
    let unbroken = link.clone().without_breaker();
    for _ in 0..5 {
        let refused = get(&unbroken, "k").await;
        assert!(
            !matches!(refused, Err(RedisCallError::Skipped) | Ok(_)),
            "{refused:?}"
        );
    }
}

#[tokio::test]
async fn a_redis_that_stalls_for_a_moment_keeps_its_connection() {
    let redis = RedisServer::start().await;
    let relay = Relay::start(redis.addr).await;
    let link = RedisLink::new(&relay.redis_url())
        .expect("a link")
        .without_breaker();
    assert_eq!(get(&link, "k").await.expect("an answer"), None);
    // Redis stops answering for 600 ms (as in a fork for a snapshot): every
    // call in flight times out at once, but nothing has been silent for long.
    let mut admin = admin(&redis).await;
    admin_cmd(&mut admin, &["CLIENT", "PAUSE", "600", "ALL"], "paused").await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let link = link.clone();
        calls.spawn(async move { get(&link, "k").await });
    }
    let stalled = calls.join_all().await;
    assert!(
        stalled
            .iter()
            .all(|r| matches!(r, Err(RedisCallError::Timeout { .. }))),
        "{stalled:?}"
    );
    // Once Redis answers again, the same connection serves.
    until_ok("never answered again", || get(&link, "k")).await;
    assert_eq!(relay.accepted(), 1, "no reconnect for a short stall");
}

/// Redis closes the link's connection (a restart, its `timeout` setting, a
/// `CLIENT KILL`) while it stays up: the next call is answered, on a new
/// connection, not failed.
#[tokio::test]
async fn a_connection_redis_closed_is_replaced_within_the_call() {
    let redis = RedisServer::start().await;
    let relay = Relay::start(redis.addr).await;
    let link = RedisLink::new(&relay.redis_url()).expect("a link");
    assert_eq!(get(&link, "k").await.expect("an answer"), None);
    let mut admin = admin(&redis).await;
    for round in 1..=3 {
        let killed: u64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
            .query_async(&mut admin)
            .await
            .expect("killed");
        assert_eq!(killed, 1, "the link's connection");
        // The close reaches the link before its next call.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            get(&link, "k").await.expect("answered after the close"),
            None
        );
        assert_eq!(relay.accepted(), 1 + round, "one new connection a close");
    }
}

/// A call made while Redis was down leaves redis-rs's manager holding the
/// failed reconnect, and the next call, however long after Redis came back,
/// got that stale refusal (a forced cache miss, a limit decided locally, a
/// 503 for a response id). The refusal of a connection, not of a command,
/// is tried once more: the first call after Redis is back is answered.
#[tokio::test]
async fn the_first_call_after_redis_came_back_is_answered() {
    let mut redis = RedisServer::start().await;
    let link = RedisLink::new(&redis.url()).expect("a link");
    set_k(&link).await.expect("set");
    redis.stop();
    let away = get(&link, "k").await;
    assert!(away.is_err(), "{away:?}");
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    set_k(&link).await.expect("answered once Redis is back");
    assert_eq!(
        get(&link, "k").await.expect("an answer").as_deref(),
        Some("v")
    );
    // And with a call that must not run twice.
    redis.stop();
    assert!(get(&link, "k").await.is_err());
    redis.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let once: Option<String> = link
        .call_once("get", |mut c| async move {
            redis::cmd("GET").arg("k").query_async(&mut c).await
        })
        .await
        .expect("answered once Redis is back");
    assert_eq!(once, None, "a new, empty Redis");
}

#[tokio::test]
async fn a_refusal_is_told_from_an_outage() {
    let mut redis = RedisServer::start().await;
    let within = Duration::from_secs(2);
    let ping =
        |url: String| async move { RedisLink::new(&url).expect("a link").ping(within).await };
    let missing_db = ping(format!("{}/99", redis.url())).await;
    assert!(
        missing_db.as_ref().is_err_and(RedisCallError::is_refusal),
        "{missing_db:?}"
    );
    admin_cmd(
        &mut admin(&redis).await,
        &["CONFIG", "SET", "requirepass", "pw"],
        "a password set",
    )
    .await;
    for url in [redis.url(), format!("redis://:wrong@{}", redis.addr)] {
        let refused = ping(url).await;
        assert!(
            refused.as_ref().is_err_and(RedisCallError::is_refusal),
            "{refused:?}"
        );
    }
    ping(format!("redis://:pw@{}", redis.addr))
        .await
        .expect("the right password");
    // Nobody there: an outage, not a refusal.
    redis.stop();
    let away = ping(format!("redis://:pw@{}", redis.addr)).await;
    assert!(away.as_ref().is_err_and(|e| !e.is_refusal()), "{away:?}");
}

/// A failover that demotes the primary without closing its connections
/// (`REPLICAOF`, as an operator or a Kubernetes operator does it) and moves
/// its address to the new primary: the link's connection now leads to a
/// replica, whose every write is refused with `READONLY`. The link makes a
/// new connection, to where the address leads now, instead of sending every
/// write to the replica for as long as the old connection lives.
#[tokio::test]
async fn a_connection_to_a_demoted_primary_is_replaced() {
    let old = RedisServer::start().await;
    let new = RedisServer::start().await;
    let relay = Relay::start(old.addr).await;
    let link = RedisLink::new(&relay.redis_url()).expect("a link");
    let set = || set_k(&link);
    set().await.expect("set on the primary");
    let mut demoted = admin(&old).await;
    // (The replica loads the primary's data without writing a file.)
    admin_cmd(
        &mut demoted,
        &["CONFIG", "SET", "repl-diskless-load", "swapdb"],
        "set",
    )
    .await;
    let (ip, port) = (new.addr.ip().to_string(), new.addr.port().to_string());
    admin_cmd(&mut demoted, &["REPLICAOF", &ip, &port], "demoted").await;
    relay.retarget(new.addr);
    until_ok("still writing to the replica", set).await;
    assert_eq!(relay.accepted(), 2, "one new connection");
}

/// The start-up check asks of a Redis no more than the proxy's features
/// do: an ACL user allowed exactly the commands they run (scripts, and in
/// them or beside them `GET`, `SET`, `DEL`, `TIME`, on the prefix's keys)
/// passes; one that may not write those keys is refused.
#[tokio::test]
async fn the_start_up_check_asks_only_what_the_features_use() {
    let redis = RedisServer::start().await;
    let mut admin = admin(&redis).await;
    for (name, rules) in [
        (
            "least",
            &[
                "on",
                ">pw",
                "~pfx:*",
                "+ping",
                "+@scripting",
                "+get",
                "+set",
                "+del",
                "+time",
            ][..],
        ),
        (
            "nowrite",
            &[
                "on",
                ">pw",
                "~pfx:*",
                "+ping",
                "+@scripting",
                "+get",
                "+time",
            ],
        ),
    ] {
        let args: Vec<&str> = ["ACL", "SETUSER", name]
            .iter()
            .chain(rules)
            .copied()
            .collect();
        admin_cmd(&mut admin, &args, "a user").await;
    }
    let check = |user: &str| {
        let url = format!("redis://{user}:pw@{}", redis.addr);
        async move {
            RedisLink::new(&url)
                .expect("a link")
                .check(Duration::from_secs(2), "pfx:")
                .await
        }
    };
    check("least").await.expect("what the features need");
    let refused = check("nowrite").await;
    assert!(
        refused.as_ref().is_err_and(RedisCallError::is_refusal),
        "{refused:?}"
    );
}

/// A reconnect that timed out (Redis took the connection and said
/// nothing, as a stalled or half-started one does) is not handed to the
/// first call after Redis is back: that call connects anew and is
/// answered. (The manager keeps its last reconnect's outcome, however old.)
#[tokio::test]
async fn a_reconnect_that_timed_out_does_not_fail_the_next_call() {
    let redis = RedisServer::start().await;
    // Takes connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("its address");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let relay = Relay::start(redis.addr).await;
    let link = RedisLink::new(&relay.redis_url())
        .expect("a link")
        .without_breaker()
        .with_timeout(Duration::from_millis(200));
    set_k(&link).await.expect("set through the relay");
    // Redis goes silent, and so does every connection made to it now:
    // calls go unanswered until the link replaces its connection, and the
    // new one's connect goes unanswered too.
    relay.retarget(silent_addr);
    relay.freeze();
    let deadline = tokio::time::Instant::now() + HANG;
    while relay.accepted() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no reconnect");
        let silent = get(&link, "k").await;
        assert!(silent.is_err(), "{silent:?}");
    }
    // Past that connect's timeout (1 s): it failed, and the link's manager
    // keeps the failure. Then Redis is back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.retarget(redis.addr);
    let found = get(&link, "k").await;
    assert_eq!(found.expect("answered").as_deref(), Some("v"));
    holder.abort();
}
