//! Failures: ejection and rest, panic routing, retries and their budget,
//! 429s, pass-through answers, fallbacks.

use std::collections::HashMap;

use http_body_util::BodyExt;
use tower::ServiceExt;

use super::*;
use crate::{RetryBudget, Strategy};

fn rr() -> BalanceConfig {
    BalanceConfig {
        strategy: Strategy::RoundRobin,
        ..BalanceConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_carries_the_requests_metadata_and_extensions() {
    #[derive(Clone)]
    struct Tag;
    // Only the metadata, and the metadata beside an embedder's extension.
    for extra in [false, true] {
        let fleet = Fleet::default();
        fleet.set("a", Mode::Refused);
        let b = balance(&fleet, &["a", "b"], rr());
        let mut req = chat("m", "hello");
        if extra {
            req.extensions_mut().insert(Tag);
        }
        let (status, body) = send(&b, req).await.unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, "b"));
        let seen = fleet.seen();
        let [first, retry] = seen.as_slice() else {
            panic!("two attempts: {seen:?}");
        };
        assert_eq!((first.backend.as_str(), retry.backend.as_str()), ("a", "b"));
        for attempt in [first, retry] {
            assert_eq!(attempt.extensions, 1 + usize::from(extra), "{attempt:?}");
            assert_eq!(
                (attempt.model.as_deref(), attempt.text.as_str()),
                (Some("m"), "hello")
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failing_backend_is_ejected_and_returns_after_its_rest() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Refused);
    let b = balance(&fleet, &["a", "b"], rr());
    let h = b.handle();
    for i in 0..10 {
        let (status, body) = send(&b, chat("m", &i.to_string())).await.unwrap();
        assert_eq!(
            (status.as_u16(), body.as_str()),
            (200, "b"),
            "a dead upstream costs nothing"
        );
    }
    assert_eq!(fleet.calls("a"), 3, "ejected after 3 consecutive failures");
    let a = stats(&h, "a");
    assert!(!a.healthy);
    assert_eq!((a.ejections, h.ejections_total()), (1, 1));
    assert_eq!(h.retries_total(), 3);

    fleet.set("a", Mode::Ok(Duration::ZERO));
    tokio::time::advance(secs(29)).await;
    assert!(!stats(&h, "a").healthy);
    tokio::time::advance(secs(1)).await;
    assert!(stats(&h, "a").healthy, "back after eject (30 s)");
    for i in 0..4 {
        send(&b, chat("m", &i.to_string())).await.unwrap();
    }
    assert_eq!(fleet.calls("a"), 5);
}

#[tokio::test(start_paused = true)]
async fn repeated_ejection_rests_longer() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Refused);
    let b = balance(
        &fleet,
        &["a"],
        BalanceConfig {
            max_retries: 0,
            ..rr()
        },
    );
    let h = b.handle();
    for _ in 0..3 {
        let _ = send(&b, chat("m", "x")).await;
    }
    assert!(!stats(&h, "a").healthy);
    tokio::time::advance(secs(30)).await;
    for _ in 0..3 {
        let _ = send(&b, chat("m", "x")).await;
    }
    assert_eq!(stats(&h, "a").ejections, 2);
    tokio::time::advance(secs(59)).await;
    assert!(!stats(&h, "a").healthy, "second rest is 60 s");
    tokio::time::advance(secs(1)).await;
    assert!(stats(&h, "a").healthy);
}

/// A server that hangs fails each request a whole first-byte timeout
/// after it was sent: with the timeout (60 s) longer than its rest (30 s),
/// its rests double all the same, as a dead server's do.
#[tokio::test(start_paused = true)]
async fn a_hung_backend_rests_longer_each_time() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Hangs(secs(60)));
    let b = balance(
        &fleet,
        &["a", "b"],
        BalanceConfig {
            max_retries: 0,
            ..rr()
        },
    );
    let h = b.handle();
    let mut rests = Vec::new();
    for round in 1..=3 {
        // Each client's request to `a` waits its 60 s; three in a row eject it.
        let calls = fleet.calls("a");
        let clients: Vec<_> = (0..6)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { send(&b, chat("m", &i.to_string())).await })
            })
            .collect();
        for client in clients {
            let _ = client.await.unwrap();
        }
        assert_eq!(fleet.calls("a") - calls, 3, "round {round}");
        assert_eq!(stats(&h, "a").ejections, round);
        let mut rest = 0;
        while !stats(&h, "a").healthy {
            tokio::time::advance(secs(1)).await;
            rest += 1;
        }
        rests.push(rest);
    }
    assert_eq!(rests, [30, 60, 120]);
}

#[tokio::test(start_paused = true)]
async fn all_resting_and_one_healthy_again_succeeds() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Refused);
    fleet.set("b", Mode::Refused);
    let cfg = BalanceConfig {
        eject_after_failures: 1,
        ..rr()
    };
    let b = balance(&fleet, &["a", "b"], cfg);
    let h = b.handle();
    let err = send(&b, chat("m", "x")).await.unwrap_err();
    assert_eq!(err.status(), 502, "the last attempt's error, not 503");
    assert!(!h.any_healthy());
    fleet.set("b", Mode::Ok(Duration::ZERO));
    let (status, body) = send(&b, chat("m", "y")).await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "b"),
        "panic routing tried a resting backend"
    );
    assert!(stats(&h, "b").healthy, "a success ends the rest");
}

#[tokio::test(start_paused = true)]
async fn no_retry_once_a_response_is_returned() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Broken);
    let b = balance(&fleet, &["a", "b"], rr());
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The stream breaks after the head and a frame went out: the error
    // reaches the client, nothing is retried.
    assert!(resp.into_body().collect().await.is_err());
    assert_eq!(fleet.total(), 1);
    assert!(b.handle().snapshot().iter().all(|s| s.in_flight == 0));
}

/// A server that answers every head with 200 and then breaks the body is
/// ejected like one that answers 500; bodies that end whole reset the
/// count.
#[tokio::test(start_paused = true)]
async fn streams_broken_mid_way_eject_their_backend() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Broken);
    let b = balance(&fleet, &["a"], rr());
    let h = b.handle();
    let broken = || async {
        let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.into_body().collect().await.is_err());
    };
    // Two breaks, a whole answer, two breaks: never three in a row.
    broken().await;
    broken().await;
    fleet.set("a", Mode::Ok(Duration::ZERO));
    send(&b, chat("m", "ok")).await.unwrap();
    fleet.set("a", Mode::Broken);
    broken().await;
    broken().await;
    assert!(stats(&h, "a").healthy);
    assert_eq!(stats(&h, "a").ejections, 0);
    // The third in a row ejects it.
    broken().await;
    assert!(!stats(&h, "a").healthy);
    assert_eq!(stats(&h, "a").ejections, 1);
    assert_eq!(h.ejections_total(), 1);
}

/// A body the proxy itself cannot carry on (a translation) is no failure
/// of the upstream.
#[tokio::test(start_paused = true)]
async fn streams_the_proxy_breaks_do_not_eject_their_backend() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::BrokenByProxy);
    let b = balance(&fleet, &["a"], rr());
    for _ in 0..5 {
        let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
        assert!(resp.into_body().collect().await.is_err());
    }
    assert!(stats(&b.handle(), "a").healthy);
    assert_eq!(stats(&b.handle(), "a").ejections, 0);
}

#[tokio::test(start_paused = true)]
async fn retry_budget_stops_a_retry_storm() {
    let fleet = Fleet::default();
    for n in ["a", "b", "c"] {
        fleet.set(n, Mode::Status(500, None));
    }
    let cfg = BalanceConfig {
        eject_after_failures: u32::MAX,
        retry_budget: RetryBudget {
            window: secs(10),
            min_per_sec: 1,
            ratio: 0.1,
        },
        ..rr()
    };
    let b = balance(&fleet, &["a", "b", "c"], cfg);
    for i in 0..200 {
        let (status, _) = send(&b, chat("m", &i.to_string())).await.unwrap();
        assert_eq!(status, 500, "the upstream's own answer");
    }
    // Without a budget: 600 calls. With it: 200 + 10 % of 200 + the reserve of 10.
    let calls = fleet.total();
    assert!(calls <= 232, "calls {calls}");
    assert_eq!(b.handle().retries_total() as usize, calls - 200);
}

/// A 429 to a model request rests that model on its backend (OpenAI's
/// limits are per model, and one tenant's request that hits one model's
/// limit must not shut the backend to every other model and tenant): the
/// model's requests go elsewhere until `retry-after`, other models' still
/// reach it.
#[tokio::test(start_paused = true)]
async fn a_429_rests_its_model_on_its_backend_for_retry_after() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(429, Some("5")));
    let b = balance(&fleet, &["a", "b"], rr());
    let h = b.handle();
    let (status, body) = send(&b, chat("m", "x")).await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "b"),
        "retried elsewhere"
    );
    assert!(stats(&h, "a").healthy, "it takes other models");
    fleet.set("a", Mode::Ok(Duration::ZERO));
    for i in 0..4 {
        send(&b, chat("m", &i.to_string())).await.unwrap();
    }
    assert_eq!(fleet.calls("a"), 1, "resting for `m`");
    let mut others = std::collections::HashSet::new();
    for i in 0..4 {
        let (_, body) = send(&b, chat("n", &i.to_string())).await.unwrap();
        others.insert(body);
    }
    assert!(others.contains("a"), "`n` still reaches it: {others:?}");
    let before = fleet.calls("a");
    tokio::time::advance(secs(5)).await;
    for i in 0..4 {
        send(&b, chat("m", &i.to_string())).await.unwrap();
    }
    assert!(fleet.calls("a") > before, "`m` is back on it");
    assert_eq!(stats(&h, "a").ejections, 0, "a 429 is no failure");
}

/// A passthrough answer's 429 (a files or batches limit) rests nothing: it
/// speaks of that route's own limits, not of the model APIs'.
#[tokio::test(start_paused = true)]
async fn a_passthrough_429_rests_nothing() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(429, Some("300")));
    let b = balance(&fleet, &["a"], rr());
    let h = b.handle();
    let files = Request::get("/v1/files")
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    // A passthrough body that names a model (a fine-tune's base model) is
    // no request of that model's API; nor is a stored response by id.
    let mut tuning = Request::post("/v1/fine_tuning/jobs")
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    let body = serde_json::json!({"model": "m", "training_file": "file-1"});
    let bytes = Bytes::from(body.to_string());
    let serde_json::Value::Object(map) = body else {
        unreachable!("built as an object")
    };
    tuning
        .extensions_mut()
        .insert(RequestMeta::parsed(Endpoint::Passthrough, bytes, map));
    let mut by_id = Request::get("/v1/responses/resp_1")
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    by_id
        .extensions_mut()
        .insert(RequestMeta::unbuffered(Endpoint::ResponseById));
    // A token count (Anthropic limits counting apart from generating).
    let mut count = Request::post("/v1/messages/count_tokens")
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    let body = serde_json::json!({"model": "m", "messages": []});
    let bytes = Bytes::from(body.to_string());
    let serde_json::Value::Object(map) = body else {
        unreachable!("built as an object")
    };
    count.extensions_mut().insert(RequestMeta::parsed(
        Endpoint::MessagesCountTokens,
        bytes,
        map,
    ));
    for req in [files, tuning, by_id, count] {
        let (status, _) = send(&b, req).await.unwrap();
        assert_eq!(status, 429, "the upstream's own answer");
    }
    assert_eq!(stats(&h, "a").throttled, 4, "each counted all the same");
    fleet.set("a", Mode::Ok(Duration::ZERO));
    let (status, body) = send(&b, chat("m", "x")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
}

/// A 503 with `retry-after` is the server shedding load: it rests the
/// whole backend, every model.
#[tokio::test(start_paused = true)]
async fn a_503_with_retry_after_rests_the_whole_backend() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(503, Some("30")));
    let b = balance(&fleet, &["a"], rr());
    let (status, _) = send(&b, chat("m", "x")).await.unwrap();
    assert_eq!(status, 503);
    fleet.set("a", Mode::Ok(Duration::ZERO));
    let err = b.clone().oneshot(chat("n", "y")).await.unwrap_err();
    assert_eq!(err.code(), "no_upstream_available", "{err}");
    assert_eq!(fleet.calls("a"), 1);
}

/// Model names are the clients' to choose: a backend keeps the rests of
/// at most 32 models (the one ending soonest makes room), and none for a
/// name longer than any model's.
#[tokio::test(start_paused = true)]
async fn a_backend_keeps_a_bounded_number_of_model_rests() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(429, Some("300")));
    let b = balance(&fleet, &["a"], rr());
    for i in 0..40 {
        let _ = send(&b, chat(&format!("m{i}"), "x")).await;
    }
    let long = "x".repeat(300);
    let calls = fleet.calls("a");
    let _ = send(&b, chat(&long, "x")).await;
    assert_eq!(
        fleet.calls("a"),
        calls + 1,
        "a backend that said 429 is not asked again within the request"
    );
    fleet.set("a", Mode::Ok(Duration::ZERO));
    let calls = fleet.calls("a");
    let (status, _) = send(&b, chat(&long, "y")).await.unwrap();
    assert_eq!(status, 200, "a name that long rests nothing");
    let err = b.clone().oneshot(chat("m39", "y")).await.unwrap_err();
    assert_eq!(err.code(), "no_upstream_available", "the latest rests");
    let (status, _) = send(&b, chat("m0", "y")).await.unwrap();
    assert_eq!(status, 200, "the first made room");
    assert_eq!(fleet.calls("a"), calls + 2);
}

/// Every upstream asked to be left alone: no request reaches any of them
/// until the first is back (no panic routing to them, no retries); the
/// proxy answers 503 with the soonest one's `retry-after`.
#[tokio::test(start_paused = true)]
async fn upstreams_that_all_asked_to_be_left_alone_are_left_alone() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(429, Some("30")));
    fleet.set("b", Mode::Status(503, Some("20")));
    let b = balance(&fleet, &["a", "b"], rr());
    // The first request meets both and gets the last one's answer.
    let (status, _) = send(&b, chat("m", "x")).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(fleet.total(), 2);
    tokio::time::advance(secs(5)).await;
    for i in 0..5 {
        let e = b
            .clone()
            .oneshot(chat("m", &i.to_string()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "no_upstream_available", "{e}");
        let resp = e.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "15", "b is back first");
    }
    assert_eq!(fleet.total(), 2, "neither was asked again");
    // Once `b` is back, it is asked.
    fleet.set("b", Mode::Ok(Duration::ZERO));
    tokio::time::advance(secs(15)).await;
    let (status, body) = send(&b, chat("m", "y")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "b"));
    assert_eq!(fleet.calls("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_return_the_upstreams_own_answer() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(429, Some("2")));
    let b = balance(&fleet, &["a"], rr());
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_eq!(fleet.total(), 1, "a throttled backend is not retried");
    let h = b.handle();
    assert!(stats(&h, "a").healthy, "only `m` rests");
    assert!(
        h.any_healthy(),
        "a rate limit does not make the proxy unready"
    );
    drop(resp);

    // `retry-after: 0` too: the backend rests the default second.
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(429, Some("0")));
    let b = balance(&fleet, &["a"], rr());
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(
        fleet.total(),
        1,
        "not retried at once after `retry-after: 0`"
    );
    drop(resp);

    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(503, None));
    let b = balance(&fleet, &["a"], rr());
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(fleet.total(), 3, "a lone backend is retried after a 5xx");
    assert_eq!(
        b.handle().snapshot()[0].in_flight,
        1,
        "held by the returned body"
    );
    drop(resp);
    assert_eq!(b.handle().snapshot()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn client_errors_pass_through_unretried() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Status(400, None));
    fleet.set("b", Mode::Status(400, None));
    let b = balance(&fleet, &["a", "b"], rr());
    for i in 0..5 {
        let (status, _) = send(&b, chat("m", &i.to_string())).await.unwrap();
        assert_eq!(status, 400);
    }
    assert_eq!(fleet.total(), 5);
    assert!(
        b.handle()
            .snapshot()
            .iter()
            .all(|s| s.healthy && s.ejections == 0)
    );
}

#[tokio::test(start_paused = true)]
async fn unbuffered_requests_get_one_attempt() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Refused);
    let b = balance(&fleet, &["a", "b"], rr());
    let mut req = Request::post("/v1/files")
        .body(llm_proxy_core::full("raw"))
        .unwrap();
    req.extensions_mut()
        .insert(RequestMeta::unbuffered(Endpoint::Passthrough));
    let err = b.clone().oneshot(req).await.unwrap_err();
    assert_eq!(err.status(), 502);
    assert_eq!(fleet.total(), 1);
    // Passthrough: first healthy in config order.
    fleet.set("a", Mode::Ok(Duration::ZERO));
    let (status, body) = send(
        &b,
        Request::post("/v1/files")
            .body(llm_proxy_core::full("raw"))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "a"));
}

#[tokio::test(start_paused = true)]
async fn fallbacks_rewrite_the_model() {
    let fleet = Fleet::default();
    fleet.set("big-1", Mode::Refused);
    let cfg = BalanceConfig {
        fallbacks: HashMap::from([(
            "big".to_owned(),
            vec!["gone".to_owned(), "small".to_owned()],
        )]),
        ..rr()
    };
    let b = Balance::new(
        [
            fleet.backend("big-1").with_models(["big"]),
            fleet.backend("small-1").with_models(["small"]),
        ],
        cfg,
    );
    let (status, body) = send(&b, chat("big", "x")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "small-1"));
    let seen = fleet.seen();
    assert_eq!(seen[0].model.as_deref(), Some("big"));
    assert_eq!(seen[1].model.as_deref(), Some("small"));
    assert_eq!(
        seen[1].body_model.as_deref(),
        Some("small"),
        "body rewritten"
    );
    let err = b.clone().oneshot(chat("nope", "x")).await.unwrap_err();
    assert_eq!(err.code(), "model_not_found");
}

/// Each backend gets the model under its own name for it: the first
/// attempt's rewrite does not follow the request to the next backend, a
/// backend without one gets the client's body as sent, and a fallback model
/// is renamed by the backend that serves it.
#[tokio::test(start_paused = true)]
async fn each_backend_gets_the_model_under_its_served_name() {
    let fleet = Fleet::default();
    for down in ["vllm", "ollama", "plain"] {
        fleet.set(down, Mode::Refused);
    }
    let cfg = BalanceConfig {
        fallbacks: HashMap::from([("llama".to_owned(), vec!["small".to_owned()])]),
        max_retries: 3,
        ..rr()
    };
    let b = Balance::new(
        [
            fleet
                .backend("vllm")
                .with_models(["llama"])
                .with_served_names([("llama", "meta-llama/Llama-3.1-8B-Instruct")]),
            fleet
                .backend("ollama")
                .with_models(["llama"])
                .with_served_names([("llama", "llama3.1:8b"), ("other", "x")]),
            fleet.backend("plain").with_models(["llama"]),
            fleet
                .backend("tiny")
                .with_models(["small"])
                .with_served_names([("small", "qwen2.5:0.5b")]),
        ],
        cfg,
    );
    // Every upstream of the model tried in turn (in the picker's order),
    // then the fallback.
    let (status, body) = send(&b, chat("llama", "x")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "tiny"));
    let seen = fleet.seen();
    assert_eq!(seen.len(), 4);
    let sent: HashMap<String, (Option<String>, Option<String>)> = seen
        .into_iter()
        .map(|s| (s.backend, (s.model, s.body_model)))
        .collect();
    let served = |model: &str| (Some(model.to_owned()), Some(model.to_owned()));
    assert_eq!(sent["vllm"], served("meta-llama/Llama-3.1-8B-Instruct"));
    assert_eq!(sent["ollama"], served("llama3.1:8b"));
    assert_eq!(sent["plain"], served("llama"), "the client's own name");
    assert_eq!(sent["tiny"], served("qwen2.5:0.5b"), "the fallback's");
}

/// A model with more upstreams than `max_retries + 1`, all failing: its
/// fallback still gets an attempt (beyond `max_retries`), and only one;
/// without fallbacks, `max_retries` holds as before.
#[tokio::test(start_paused = true)]
async fn a_fallback_gets_its_attempt_however_many_upstreams_the_model_has() {
    let fleet = failing_bigs();
    fleet.set("small-1", Mode::Status(500, None));
    let cfg = BalanceConfig {
        max_retries: 1,
        fallbacks: HashMap::from([("big".to_owned(), vec!["small".to_owned()])]),
        ..rr()
    };
    let b = Balance::new(backends_of(&fleet), cfg.clone());
    let (status, _) = send(&b, chat("big", "x")).await.unwrap();
    assert_eq!(status, 500);
    let models: Vec<Option<String>> = fleet.seen().into_iter().map(|s| s.model).collect();
    assert_eq!(
        models,
        [Some("big".into()), Some("big".into()), Some("small".into())],
        "two of the model's (max_retries = 1), then the fallback's one"
    );
    // Answered by the fallback: as any answer.
    fleet.set("small-1", Mode::Ok(Duration::ZERO));
    let (status, body) = send(&b, chat("big", "y")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "small-1"));

    let fleet = failing_bigs();
    let b = Balance::new(
        backends_of(&fleet),
        BalanceConfig {
            fallbacks: HashMap::new(),
            ..cfg
        },
    );
    let (status, _) = send(&b, chat("big", "x")).await.unwrap();
    assert_eq!(status, 500);
    assert_eq!(fleet.total(), 2, "no fallback: max_retries + 1 attempts");

    // `max_retries = 0`: one call, fallbacks or not; and a request pinned
    // to one upstream never goes to a fallback.
    for (max_retries, pinned, calls) in [(0, false, 1), (1, true, 2), (0, true, 1)] {
        let fleet = failing_bigs();
        let b = Balance::new(
            backends_of(&fleet),
            BalanceConfig {
                max_retries,
                fallbacks: HashMap::from([("big".to_owned(), vec!["small".to_owned()])]),
                ..rr()
            },
        );
        let mut req = chat("big", "x");
        if pinned {
            req.extensions_mut()
                .insert(llm_proxy_core::PinnedUpstream("big-1".into()));
        }
        let (status, _) = send(&b, req).await.unwrap();
        assert_eq!(status, 500);
        assert_eq!(
            fleet.total(),
            calls,
            "max_retries {max_retries}, pinned {pinned}"
        );
        assert_eq!(fleet.calls("small-1"), 0);
    }

    /// `big-1`..`big-3` answering 500.
    fn failing_bigs() -> Fleet {
        let fleet = Fleet::default();
        for big in ["big-1", "big-2", "big-3"] {
            fleet.set(big, Mode::Status(500, None));
        }
        fleet
    }

    fn backends_of(fleet: &Fleet) -> [crate::Backend<Fake>; 4] {
        [
            fleet.backend("big-1").with_models(["big"]),
            fleet.backend("big-2").with_models(["big"]),
            fleet.backend("big-3").with_models(["big"]),
            fleet.backend("small-1").with_models(["small"]),
        ]
    }
}

#[tokio::test(start_paused = true)]
async fn response_extensions_are_kept() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a"], rr());
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(
        resp.extensions()
            .get::<llm_proxy_core::UpstreamName>()
            .map(|n| &*n.0),
        Some("a")
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"a");
}

/// An upstream that left the request without a head until its first-byte
/// timeout is not tried again for that request: the client has waited that
/// long once. Another upstream is; and one that failed fast (a 5xx) may be
/// tried again as before.
#[tokio::test(start_paused = true)]
async fn a_timed_out_upstream_is_not_retried_for_the_same_request() {
    let cfg = BalanceConfig {
        max_retries: 2,
        ..rr()
    };
    let fleet = Fleet::default();
    fleet.set("a", Mode::TimedOut);
    let b = balance(&fleet, &["a"], cfg.clone());
    let err = b.clone().oneshot(chat("m", "x")).await.unwrap_err();
    assert_eq!(err.code(), "upstream_timeout");
    assert_eq!(fleet.total(), 1, "one wait for the head, not three");

    let fleet = Fleet::default();
    fleet.set("a", Mode::TimedOut);
    fleet.set("b", Mode::Status(500, None));
    let b = balance(&fleet, &["a", "b"], cfg);
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert_eq!(resp.status(), 500);
    let order: Vec<String> = fleet.seen().into_iter().map(|s| s.backend).collect();
    assert_eq!(order, ["a", "b", "b"]);
}

/// An answer whose body is over at its head (`content-length: 0`, a
/// `HEAD`) is whole when it arrives: it resets the failure count though
/// nobody polls its body (hyper does not).
#[tokio::test(start_paused = true)]
async fn an_empty_answer_unpolled_resets_the_failure_count() {
    let fleet = Fleet::default();
    let b = one_ejected_after_three(&fleet);
    let h = b.handle();
    for mode in [
        Mode::Status(500, None),
        Mode::Status(500, None),
        Mode::Empty,
        Mode::Status(500, None),
        Mode::Status(500, None),
    ] {
        fleet.set("a", mode);
        // The answer's body is dropped unpolled.
        drop(b.clone().oneshot(chat("m", "x")).await.unwrap());
    }
    assert!(
        stats(&h, "a").healthy,
        "two failures since the empty answer"
    );
    assert_eq!(stats(&h, "a").ejections, 0);
}

/// Streams answered before a backend began to fail, ending whole while it
/// fails every new request, do not reset its failure count: they say how
/// it was when they were answered, not how it is now. Otherwise a server
/// that refuses every new request is never ejected as long as it has
/// long streams left to finish.
#[tokio::test(start_paused = true)]
async fn old_streams_ending_whole_do_not_hide_new_failures() {
    let fleet = Fleet::default();
    let b = one_ejected_after_three(&fleet);
    let h = b.handle();
    // Three answers whose bodies are still on their way to their clients.
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(b.clone().oneshot(chat("m", "long")).await.unwrap());
    }
    fleet.set("a", Mode::Status(500, None));
    for stream in streams {
        let (status, _) = send(&b, chat("m", "new")).await.unwrap();
        assert_eq!(status, 500);
        // One of the old streams ends whole.
        stream.into_body().collect().await.unwrap();
    }
    assert_eq!(
        stats(&h, "a").ejections,
        1,
        "three new requests failed in a row"
    );
    assert!(!stats(&h, "a").healthy);
    // An answer that came after the failures still resets the count.
    let fleet = Fleet::default();
    let b = one_ejected_after_three(&fleet);
    for mode in [
        Mode::Status(500, None),
        Mode::Status(500, None),
        Mode::Ok(Duration::ZERO),
        Mode::Status(500, None),
        Mode::Status(500, None),
    ] {
        fleet.set("a", mode);
        send(&b, chat("m", "x")).await.unwrap();
    }
    assert_eq!(stats(&b.handle(), "a").ejections, 0);
}

/// A request panic-routed to a resting backend ends its rest when its
/// body ends whole, not at its head: a server that breaks every stream
/// answers every head with 200, and would be let back by each request the
/// other backends' failures panic-route to it.
#[tokio::test(start_paused = true)]
async fn a_panic_routed_answer_ends_the_rest_only_once_whole() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Broken);
    let b = balance(
        &fleet,
        &["a"],
        BalanceConfig {
            eject_after_failures: 1,
            max_retries: 0,
            ..rr()
        },
    );
    let h = b.handle();
    let resp = b.clone().oneshot(chat("m", "x")).await.unwrap();
    assert!(resp.into_body().collect().await.is_err());
    assert!(!stats(&h, "a").healthy);
    // Panic-routed (it is the only backend): a 200 head, then a break.
    let resp = b.clone().oneshot(chat("m", "y")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!stats(&h, "a").healthy, "let back by its head");
    assert!(resp.into_body().collect().await.is_err());
    assert!(!stats(&h, "a").healthy);
    assert_eq!(stats(&h, "a").ejections, 1, "its rest runs on");
    // A client that leaves mid-way shows nothing either.
    fleet.set("a", Mode::Endless(Default::default()));
    let resp = b.clone().oneshot(chat("m", "z")).await.unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    assert!(!stats(&h, "a").healthy);
    // One that ends whole ends it: here its one frame read, at its end
    // after it, and dropped unread further (as hyper's server does with a
    // body of known length).
    fleet.set("a", Mode::Ok(Duration::ZERO));
    let resp = b.clone().oneshot(chat("m", "w")).await.unwrap();
    assert!(!stats(&h, "a").healthy);
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    assert!(stats(&h, "a").healthy);
    // So does one over at its head (never polled), at its head.
    fleet.set("a", Mode::Broken);
    let resp = b.clone().oneshot(chat("m", "v")).await.unwrap();
    assert!(resp.into_body().collect().await.is_err());
    assert!(!stats(&h, "a").healthy);
    fleet.set("a", Mode::Empty);
    let _resp = b.clone().oneshot(chat("m", "u")).await.unwrap();
    assert!(stats(&h, "a").healthy);
}

/// Only a request sent while its backend rests (panic routing) ends the
/// rest by succeeding: one sent before the ejection, whose answer comes
/// after it (a long non-streamed answer), says nothing of the backend now.
#[tokio::test(start_paused = true)]
async fn an_answer_to_a_request_sent_before_the_ejection_does_not_end_it() {
    let fleet = Fleet::default();
    fleet.set("a", Mode::Ok(secs(10)));
    let b = balance(
        &fleet,
        &["a", "b"],
        BalanceConfig {
            eject_after_failures: 1,
            max_retries: 0,
            ..rr()
        },
    );
    let h = b.handle();
    let slow = tokio::spawn({
        let b = b.clone();
        async move { send(&b, chat("m", "slow")).await.map(|(s, _)| s) }
    });
    tokio::time::sleep(secs(1)).await;
    fleet.set("a", Mode::Status(500, None));
    // Round robin: b, then a (which fails and is ejected for 30 s).
    send(&b, chat("m", "x")).await.unwrap();
    let (status, _) = send(&b, chat("m", "y")).await.unwrap();
    assert_eq!(status, 500);
    assert!(!stats(&h, "a").healthy);
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    assert!(!stats(&h, "a").healthy, "the old answer ended the ejection");
}

/// An exchange outside the balancer's requests (a WebSocket session,
/// told through the handle) is judged as its requests are: one answered
/// before the backend began to fail that ends whole does not reset the
/// failures counted since, and one sent before an ejection does not end it.
#[tokio::test(start_paused = true)]
async fn sessions_told_through_the_handle_are_ordered_like_requests() {
    let fleet = Fleet::default();
    let b = one_ejected_after_three(&fleet);
    let h = b.handle();
    let long_ago = h.seen("a").expect("backend a");
    fleet.set("a", Mode::Status(500, None));
    for _ in 0..2 {
        send(&b, chat("m", "x")).await.unwrap();
    }
    // The old session ends whole: the two failures stand.
    h.ended_whole("a", long_ago);
    send(&b, chat("m", "x")).await.unwrap();
    assert_eq!(stats(&h, "a").ejections, 1, "three failures in a row");
    // An upgrade sent before the ejection, answered after it, leaves it.
    h.answered("a", long_ago);
    assert!(!stats(&h, "a").healthy);
    // One sent during the ejection ends it.
    h.answered("a", h.seen("a").unwrap());
    assert!(stats(&h, "a").healthy);
    assert!(h.seen("gone").is_none());
}

/// One backend, `a`, ejected after three failures in a row; no retries.
fn one_ejected_after_three(fleet: &Fleet) -> Balance<Fake> {
    balance(
        fleet,
        &["a"],
        BalanceConfig {
            eject_after_failures: 3,
            max_retries: 0,
            ..rr()
        },
    )
}

/// Attempts an upstream processed none of (refused streams, streams past
/// a `GOAWAY`) are given back beyond `max_retries`, four at most; with
/// `max_retries = 0` there is still one call a request. None of them is a
/// failure of the upstream.
#[tokio::test(start_paused = true)]
async fn unprocessed_attempts_are_given_back_a_few_times() {
    for (max_retries, calls) in [(0, 1), (1, 2 + 4), (2, 3 + 4)] {
        let fleet = Fleet::default();
        fleet.set("a", Mode::Unprocessed);
        let b = balance(
            &fleet,
            &["a"],
            BalanceConfig {
                max_retries,
                eject_after_failures: 1,
                ..rr()
            },
        );
        let e = send(&b, chat("m", "hi")).await.expect_err("refused");
        assert!(matches!(e, Error::UpstreamRefused { .. }), "{e}");
        assert_eq!(fleet.calls("a"), calls, "max_retries = {max_retries}");
        assert!(stats(&b.handle(), "a").healthy, "no failure");
    }
}
