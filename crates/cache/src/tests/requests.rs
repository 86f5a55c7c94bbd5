//! Non-streamed requests: keys, scopes, what is stored, controls, TTL.

use std::time::Duration;

use super::fake::answer_json;
use super::*;
use crate::CacheScope;

#[tokio::test]
async fn hit_after_identical_miss() {
    let h = harness(CacheConfig::default());
    let first = h.send(chat(CHAT, &[])).await;
    assert_eq!((first.status, first.cache()), (StatusCode::OK, "miss"));
    assert_eq!(first.json(), answer_json(1));
    let second = h.send(chat(CHAT, &[])).await;
    assert_eq!((second.status, second.cache()), (StatusCode::OK, "hit"));
    assert_eq!(
        second.body(),
        first.body(),
        "the same bytes, usage included"
    );
    assert_eq!(second.headers["age"], "0");
    assert_eq!(second.headers["content-type"], "application/json");
    assert_eq!(h.calls(), 1);
    let stats = h.stats.snapshot();
    assert_eq!((stats.hits, stats.misses, stats.stored), (1, 1, 1));
    assert_eq!(stats.stored_bytes, first.body().len() as u64);
    assert_eq!(stats.entries, Some(1));
}

#[tokio::test]
async fn a_miss_read_as_hyper_reads_it_is_stored() {
    // hyper reads a body of known length until `is_end_stream` says so,
    // then drops it without polling for its end: the body must say so
    // after its last byte (else a layer above, auth's usage watch, takes
    // the drop for a client that left), and the drop must store it.
    let h = harness(CacheConfig::default());
    let whole = [("x-fake", "whole")];
    let resp = h.svc.clone().oneshot(chat(CHAT, &whole)).await.unwrap();
    assert_eq!(resp.headers()["x-llm-proxy-cache"], "miss");
    assert_eq!(read_as_hyper_does(resp.into_body()).await, answer_json(1));
    let second = h.send(chat(CHAT, &whole)).await;
    assert_eq!(second.cache(), "hit");
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn parameter_change_misses() {
    let h = harness(CacheConfig::default());
    h.send(chat(CHAT, &[])).await;
    let other = r#"{"model":"m","temperature":0.5,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(h.send(chat(other, &[])).await.cache(), "miss");
    let other_model = r#"{"model":"n","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(h.send(chat(other_model, &[])).await.cache(), "miss");
    assert_eq!(h.calls(), 3);
}

#[tokio::test]
async fn key_order_whitespace_and_excluded_fields_do_not_split_the_cache() {
    let h = harness(CacheConfig::default());
    h.send(chat(CHAT, &[])).await;
    let same = "{ \"messages\" : [ {\"content\":\"hi\", \"role\":\"user\"} ],\n\t\"model\":\"m\", \"user\": \"u-42\" }";
    let answer = h.send(chat(same, &[])).await;
    assert_eq!(answer.cache(), "hit");
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn per_key_scope_separates_callers() {
    let h = harness(CacheConfig::default());
    let alice = [("authorization", "Bearer alice")];
    assert_eq!(h.send(chat(CHAT, &alice)).await.cache(), "miss");
    assert_eq!(h.send(chat(CHAT, &alice)).await.cache(), "hit");
    let bob = [("authorization", "Bearer bob")];
    assert_eq!(h.send(chat(CHAT, &bob)).await.cache(), "miss");
    assert_eq!(
        h.send(chat(CHAT, &[("x-api-key", "carol")])).await.cache(),
        "miss"
    );
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "hit");
    assert_eq!(h.calls(), 4);
}

#[tokio::test]
async fn shared_scope_shares_between_callers() {
    let h = harness(CacheConfig {
        scope: CacheScope::Shared,
        ..CacheConfig::default()
    });
    h.send(chat(CHAT, &[("authorization", "Bearer alice")]))
        .await;
    let bob = h.send(chat(CHAT, &[("authorization", "Bearer bob")])).await;
    assert_eq!(bob.cache(), "hit");
    assert_eq!(h.calls(), 1);
}

#[tokio::test]
async fn completions_and_embeddings_are_cached_other_routes_bypass() {
    let h = harness(CacheConfig::default());
    for path in ["/v1/completions", "/v1/embeddings"] {
        let body = r#"{"model":"m","input":"x","prompt":"x"}"#;
        assert_eq!(h.send(post(path, body, &[])).await.cache(), "miss");
        assert_eq!(h.send(post(path, body, &[])).await.cache(), "hit");
    }
    assert_eq!(h.calls(), 2);
    for _ in 0..2 {
        let files = h.send(post("/v1/files", r#"{"model":"m"}"#, &[])).await;
        assert_eq!(files.cache(), "bypass");
    }
    assert_eq!(h.calls(), 4);
    assert_eq!(h.stats.snapshot().bypasses, 2);
}

#[tokio::test]
async fn bodies_with_integers_beyond_64_bits_bypass() {
    let h = harness(CacheConfig::default());
    let seeded = |seed: &str| {
        format!(r#"{{"model":"m","seed":{seed},"messages":[{{"role":"user","content":"hi"}}]}}"#)
    };
    // Both parse to the f64 2^64: keyed on their canonical form, the second
    // would get the first's answer.
    for (n, seed) in ["18446744073709551616", "18446744073709551617"]
        .into_iter()
        .enumerate()
    {
        let answer = h.send(chat(&seeded(seed), &[])).await;
        assert_eq!(
            (answer.cache(), answer.json()),
            ("bypass", answer_json(n + 1))
        );
    }
    // Nested, anywhere in the body.
    let nested = r#"{"model":"m","messages":[],"tools":[{"max":[-99999999999999999999]}]}"#;
    assert_eq!(h.send(chat(nested, &[])).await.cache(), "bypass");
    // The largest integers that parse exactly are cached as ever.
    for seed in ["18446744073709551615", "-9223372036854775808"] {
        assert_eq!(h.send(chat(&seeded(seed), &[])).await.cache(), "miss");
        assert_eq!(h.send(chat(&seeded(seed), &[])).await.cache(), "hit");
    }
    assert_eq!(h.calls(), 5);
    assert_eq!(h.stats.snapshot().stored, 2);
}

#[tokio::test]
async fn failures_are_not_stored() {
    let h = harness(CacheConfig::default());
    let failed = h.send(chat(CHAT, &[("x-fake", "500")])).await;
    assert_eq!((failed.status.as_u16(), failed.cache()), (500, "miss"));
    // The upstream's failure is answered here, marked like an answer.
    let refused = h.send(chat(CHAT, &[("x-fake", "error")])).await;
    assert_eq!((refused.status.as_u16(), refused.cache()), (502, "miss"));
    assert_eq!(refused.json()["error"]["code"], "bad_gateway");
    let invalid = h.send(chat(CHAT, &[("x-fake", "invalid-json")])).await;
    assert_eq!((invalid.status.as_u16(), invalid.cache()), (200, "miss"));
    let broken = h.send(chat(CHAT, &[("x-fake", "break")])).await;
    assert!(broken.error.is_some());
    // Nothing of the above was stored: this one goes upstream.
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
    assert_eq!(h.calls(), 5);
    let stats = h.stats.snapshot();
    assert_eq!((stats.stored, stats.not_stored), (1, 4));
}

#[tokio::test]
async fn answers_over_max_entry_bytes_are_not_stored() {
    let h = harness(CacheConfig {
        max_entry_bytes: 64,
        ..CacheConfig::default()
    });
    let first = h.send(chat(CHAT, &[])).await;
    assert_eq!(first.json(), answer_json(1), "passed on whole");
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
    assert_eq!(h.stats.snapshot().stored, 0);
}

/// An answer larger than the memory store's shard may hold is not kept,
/// and says so: `not_stored` and `too_large`, not `store`.
#[tokio::test]
async fn an_answer_the_memory_store_cannot_hold_is_counted_as_not_stored() {
    // One shard of 100 bytes: the ~150-byte answer does not fit.
    let h = harness_with(CacheConfig::default(), MemoryStore::new(1, 100));
    let first = h.send(chat(CHAT, &[])).await;
    assert_eq!(first.json(), answer_json(1), "passed on whole");
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
    let stats = h.stats.snapshot();
    assert_eq!((stats.stored, stats.not_stored, stats.too_large), (0, 2, 2));
    assert!(stats.events().contains(&("too_large", 2)));
}

#[tokio::test]
async fn no_cache_skips_the_lookup_but_stores() {
    let h = harness(CacheConfig::default());
    h.send(chat(CHAT, &[])).await;
    let fresh = h.send(chat(CHAT, &[("cache-control", "no-cache")])).await;
    assert_eq!(fresh.cache(), "bypass");
    assert_eq!(fresh.json(), answer_json(2));
    let hit = h.send(chat(CHAT, &[])).await;
    assert_eq!((hit.cache(), hit.json()), ("hit", answer_json(2)));
    assert_eq!(h.calls(), 2);
}

#[tokio::test]
async fn no_store_neither_looks_up_nor_stores() {
    let h = harness(CacheConfig::default());
    let first = h.send(chat(CHAT, &[("cache-control", "no-store")])).await;
    assert_eq!(first.cache(), "bypass");
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
    let again = h.send(chat(CHAT, &[("cache-control", "no-store")])).await;
    assert_eq!((again.cache(), again.json()), ("bypass", answer_json(3)));
    assert_eq!(h.stats.snapshot().stored, 1);
}

#[tokio::test]
async fn pragma_no_cache_is_no_cache_without_cache_control() {
    let h = harness(CacheConfig::default());
    h.send(chat(CHAT, &[])).await;
    let fresh = h.send(chat(CHAT, &[("pragma", "no-cache")])).await;
    assert_eq!((fresh.cache(), fresh.json()), ("bypass", answer_json(2)));
    // Stored: the next plain request gets the fresh answer.
    let hit = h.send(chat(CHAT, &[])).await;
    assert_eq!((hit.cache(), hit.json()), ("hit", answer_json(2)));
    // With a Cache-Control header, Pragma is not read.
    let both = [("pragma", "no-cache"), ("cache-control", "max-age=60")];
    assert_eq!(h.send(chat(CHAT, &both)).await.cache(), "hit");
    assert_eq!(h.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn only_if_cached_answers_from_the_store_or_with_504() {
    let h = harness(CacheConfig::default());
    let only = ("cache-control", "only-if-cached");
    let miss = h.send(chat(CHAT, &[only])).await;
    assert_eq!(
        (miss.status.as_u16(), miss.cache()),
        (504, "miss"),
        "{:?}",
        miss.body()
    );
    assert_eq!(miss.headers["content-type"], "application/json");
    let error = &miss.json()["error"];
    assert_eq!(
        (&error["type"], &error["code"]),
        (&"timeout_error".into(), &"not_cached".into())
    );
    assert_eq!(h.calls(), 0, "never upstream");
    h.send(chat(CHAT, &[])).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let hit = h.send(chat(CHAT, &[only])).await;
    assert_eq!(
        (hit.status.as_u16(), hit.cache(), hit.json()),
        (200, "hit", answer_json(1))
    );
    assert_eq!(hit.headers["age"], "10");
    // With other directives: an entry too old for max-age, one that
    // no-cache or no-store may not use, a request the cache does not serve.
    for (control, verdict) in [
        ("only-if-cached, max-age=5", "miss"),
        ("only-if-cached, no-cache", "bypass"),
        ("only-if-cached, no-store", "bypass"),
    ] {
        let answer = h.send(chat(CHAT, &[("cache-control", control)])).await;
        assert_eq!(
            (answer.status.as_u16(), answer.cache()),
            (504, verdict),
            "{control}"
        );
    }
    let files = h.send(post("/v1/files", r#"{"model":"m"}"#, &[only])).await;
    assert_eq!((files.status.as_u16(), files.cache()), (504, "bypass"));
    assert_eq!(h.calls(), 1);
    let stats = h.stats.snapshot();
    assert_eq!((stats.hits, stats.misses, stats.bypasses), (1, 3, 3));
}

#[tokio::test(start_paused = true)]
async fn max_age_accepts_only_younger_entries() {
    let h = harness(CacheConfig::default());
    h.send(chat(CHAT, &[])).await;
    tokio::time::advance(Duration::from_secs(10)).await;
    let young_enough = h.send(chat(CHAT, &[("cache-control", "max-age=60")])).await;
    assert_eq!(
        (young_enough.cache(), &young_enough.headers["age"]),
        ("hit", &"10".parse::<http::HeaderValue>().unwrap())
    );
    let too_old = h.send(chat(CHAT, &[("cache-control", "max-age=5")])).await;
    assert_eq!((too_old.cache(), too_old.json()), ("miss", answer_json(2)));
    // The fresh answer replaced the old one.
    let hit = h.send(chat(CHAT, &[("cache-control", "max-age=5")])).await;
    assert_eq!((hit.cache(), hit.json()), ("hit", answer_json(2)));
}

#[tokio::test(start_paused = true)]
async fn entries_expire_after_the_ttl() {
    let h = harness(CacheConfig {
        ttl: Duration::from_secs(60),
        ..CacheConfig::default()
    });
    h.send(chat(CHAT, &[])).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    let hit = h.send(chat(CHAT, &[])).await;
    assert_eq!(
        (hit.cache(), &hit.headers["age"]),
        ("hit", &http::HeaderValue::from(59))
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
    assert_eq!(h.stats.snapshot().expirations, 1);
}

#[tokio::test]
async fn a_ttl_past_the_clock_stores_for_ever() {
    for ttl in [Duration::MAX, Duration::from_secs_f64(1e19)] {
        let h = harness(CacheConfig {
            ttl,
            ..CacheConfig::default()
        });
        assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "miss");
        let stats = h.stats.snapshot();
        assert_eq!((stats.stored, stats.entries), (1, Some(1)), "{ttl:?}");
        assert_eq!(h.send(chat(CHAT, &[])).await.cache(), "hit");
        assert_eq!(h.calls(), 1);
    }
}

#[tokio::test]
async fn byte_bound_evicts_the_least_recently_used_answer() {
    let size = answer_json(1).to_string().len();
    let h = harness_with(
        CacheConfig::default(),
        MemoryStore::new(100, size * 2 + size / 2),
    );
    let a = r#"{"model":"a","messages":[]}"#;
    let b = r#"{"model":"b","messages":[]}"#;
    let c = r#"{"model":"c","messages":[]}"#;
    for body in [a, b, a, c] {
        h.send(chat(body, &[])).await;
    }
    // `c` evicted `b`, the least recently used; `a` stayed.
    assert_eq!(h.send(chat(a, &[])).await.cache(), "hit");
    assert_eq!(h.send(chat(b, &[])).await.cache(), "miss");
    assert_eq!(h.stats.snapshot().evictions, 2);
}

#[tokio::test(start_paused = true)]
async fn store_errors_degrade_to_misses_and_open_the_breaker() {
    let store = BrokenStore::default();
    let h = harness_with(CacheConfig::default(), store.clone());
    for n in 1..=4 {
        let answer = h.send(chat(CHAT, &[])).await;
        assert_eq!((answer.status, answer.cache()), (StatusCode::OK, "miss"));
        assert_eq!(answer.json(), answer_json(n));
    }
    // get, put, get: three errors in a row open the breaker; the store is
    // left alone from then on (a put and two requests' get and put).
    assert_eq!(store.calls(), 3);
    let stats = h.stats.snapshot();
    assert_eq!(
        (stats.misses, stats.store_errors, stats.store_skipped),
        (4, 3, 5)
    );
    assert_eq!(h.stats.store_kind(), "broken");
    // After a second, one call probes the store again.
    tokio::time::advance(Duration::from_millis(1001)).await;
    h.send(chat(CHAT, &[])).await;
    assert_eq!(store.calls(), 4);
}

/// A model request the parse layer did not read (a stack built without it
/// in front of the cache) is refused as a misconfiguration, not quietly
/// bypassed: the cache cannot key it.
#[tokio::test]
async fn an_unparsed_model_request_is_refused_as_misconfigured() {
    let fake = Fake::default();
    let cache = CacheLayer::new(CacheConfig::default(), MemoryStore::new(1000, 1 << 20));
    let svc = cache.layer(fake.clone());
    let err = tower::ServiceExt::oneshot(svc.clone(), chat(CHAT, &[]))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Misconfigured(_)), "{err}");
    assert_eq!(fake.calls(), 0);
}

/// An embedder's own auth names its callers with an `Identity` in the
/// request's extensions: per-key, each has its own entries, though none
/// presents a credential the cache could tell apart.
#[tokio::test]
async fn an_identity_in_the_extensions_scopes_the_entries() {
    let h = harness(CacheConfig::default());
    let as_user = |name: &str| {
        let mut req = chat(CHAT, &[]);
        req.extensions_mut()
            .insert(llm_proxy_core::Identity { name: name.into() });
        req
    };
    assert_eq!(h.send(as_user("alice")).await.cache(), "miss");
    assert_eq!(h.send(as_user("bob")).await.cache(), "miss");
    assert_eq!(h.send(as_user("alice")).await.cache(), "hit");
    assert_eq!(h.calls(), 2);
}
