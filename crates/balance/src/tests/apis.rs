//! Candidates by API, and requests pinned to one upstream.

use llm_proxy_core::{Api, PinnedUpstream};

use super::*;

fn messages(model: &str) -> Request<Body> {
    let json = serde_json::json!({"model": model, "max_tokens": 8, "messages": []});
    parsed(Endpoint::Messages, "/v1/messages", json)
}

/// Model `big` falls back to `small`.
fn big_falls_back_to_small() -> BalanceConfig {
    BalanceConfig {
        fallbacks: std::collections::HashMap::from([("big".to_owned(), vec!["small".to_owned()])]),
        ..BalanceConfig::default()
    }
}

/// A request to `path` whose body the parse layer read as `json`.
fn parsed(endpoint: Endpoint, path: &str, json: serde_json::Value) -> Request<Body> {
    let bytes = Bytes::from(json.to_string());
    let serde_json::Value::Object(map) = json else {
        unreachable!("built as an object")
    };
    let mut req = Request::post(path)
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    req.extensions_mut()
        .insert(RequestMeta::parsed(endpoint, bytes, map));
    req
}

#[tokio::test]
async fn only_upstreams_serving_the_api_are_candidates() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [
            fleet.backend("chat-only").with_apis([Api::ChatCompletions]),
            fleet
                .backend("both")
                .with_apis([Api::ChatCompletions, Api::Messages]),
        ],
        BalanceConfig::default(),
    );
    for _ in 0..6 {
        let (_, body) = send(&b, messages("m")).await.unwrap();
        assert_eq!(body, "both");
    }
    assert_eq!(fleet.calls("chat-only"), 0);
}

#[tokio::test]
async fn no_upstream_for_the_api_is_404_naming_it() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [fleet.backend("chat-only").with_apis([Api::ChatCompletions])],
        BalanceConfig::default(),
    );
    let err = send(&b, messages("m")).await.unwrap_err();
    assert_eq!(err.code(), "api_not_served");
    assert!(err.to_string().contains("`messages` API"), "{err}");
    assert_eq!(fleet.total(), 0);
}

#[tokio::test]
async fn a_pinned_request_goes_only_to_its_upstream() {
    let fleet = Fleet::default();
    let b = balance(&fleet, &["a", "b", "c"], BalanceConfig::default());
    for _ in 0..5 {
        let mut req = chat("m", "hi");
        req.extensions_mut().insert(PinnedUpstream("c".into()));
        let (_, body) = send(&b, req).await.unwrap();
        assert_eq!(body, "c");
    }
    // Failing, it is not rerouted: the last answer is its own.
    fleet.set("c", Mode::Refused);
    let mut req = chat("m", "hi");
    req.extensions_mut().insert(PinnedUpstream("c".into()));
    let err = send(&b, req).await.unwrap_err();
    assert_eq!(err.code(), "bad_gateway");
    assert_eq!(fleet.calls("a") + fleet.calls("b"), 0);
    // An upstream that is gone is a clear 404.
    let mut req = chat("m", "hi");
    req.extensions_mut().insert(PinnedUpstream("gone".into()));
    let err = send(&b, req).await.unwrap_err();
    assert_eq!(err.code(), "response_not_found");
}

#[tokio::test]
async fn native_wins_over_translation_and_translation_fills_in() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [
            fleet
                .backend("translating")
                .with_apis([Api::ChatCompletions])
                .with_translated_apis([Api::Messages]),
            fleet.backend("native").with_apis([Api::Messages]),
        ],
        BalanceConfig::default(),
    );
    for _ in 0..6 {
        let (_, body) = send(&b, messages("m")).await.unwrap();
        assert_eq!(body, "native");
    }
    let only_translating = Balance::new(
        [fleet
            .backend("translating")
            .with_apis([Api::ChatCompletions])
            .with_translated_apis([Api::Messages])],
        BalanceConfig::default(),
    );
    let (_, body) = send(&only_translating, messages("m")).await.unwrap();
    assert_eq!(body, "translating");
}

/// A model's upstreams that translate are its second choice, not shut out:
/// while its native upstream fails or rests, they serve it (before any
/// fallback, and before panic routing sends it back to the resting one).
#[tokio::test]
async fn translating_upstreams_stand_in_while_the_native_one_fails() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [
            fleet.backend("native").with_apis([Api::Messages]),
            fleet
                .backend("translating")
                .with_apis([Api::ChatCompletions])
                .with_translated_apis([Api::Messages]),
        ],
        BalanceConfig::default(),
    );
    let (_, body) = send(&b, messages("m")).await.unwrap();
    assert_eq!(body, "native");
    fleet.set("native", Mode::Refused);
    for _ in 0..6 {
        let (_, body) = send(&b, messages("m")).await.unwrap();
        assert_eq!(body, "translating");
    }
    assert!(
        fleet.calls("native") >= 2,
        "tried first while it was not resting"
    );
}

/// A Responses request that needs an upstream that keeps responses (it
/// asks to be stored, to run in the background, uses a kept prompt or kept
/// items) is not sent to one that reaches the API by translation, which
/// would refuse it with a 400 telling the client to change its request:
/// while the native upstream fails, the client gets its failure. A request
/// that needs nothing kept is still served by translation.
#[tokio::test]
async fn a_request_for_kept_state_waits_for_its_native_upstream() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [
            fleet.backend("native").with_apis([Api::Responses]),
            fleet
                .backend("translating")
                .with_apis([Api::ChatCompletions])
                .with_translated_apis([Api::Responses]),
        ],
        BalanceConfig::default(),
    );
    let responses = |extra: serde_json::Value| {
        let mut json = serde_json::json!({"model": "m", "input": "hi"});
        if let (Some(json), serde_json::Value::Object(extra)) = (json.as_object_mut(), extra) {
            json.extend(extra);
        }
        parsed(Endpoint::Responses, "/v1/responses", json)
    };
    fleet.set("native", Mode::Refused);
    for extra in [
        serde_json::json!({"store": true}),
        serde_json::json!({"background": true}),
        serde_json::json!({"prompt": {"id": "pmpt_1"}}),
        serde_json::json!({"input": [{"type": "item_reference", "id": "msg_1"}]}),
        serde_json::json!({"conversation": "conv_1"}),
    ] {
        let failed = send(&b, responses(extra.clone())).await;
        assert!(
            failed.is_err(),
            "{extra}: the native failure, not a stand-in"
        );
    }
    assert_eq!(fleet.calls("translating"), 0);
    for extra in [
        serde_json::json!({}),
        serde_json::json!({"store": false}),
        serde_json::json!({"store": null, "prompt": null, "background": false}),
    ] {
        let (_, body) = send(&b, responses(extra.clone())).await.unwrap();
        assert_eq!(body, "translating", "{extra}");
    }
}

/// Per model: a fallback served natively does not take the requests for
/// kept state of a model whose own upstreams translate (they are refused
/// there, with the translation's 400, as without a fallback). And a state
/// key that is `null` names no state.
#[tokio::test]
async fn a_request_for_kept_state_is_judged_per_model() {
    let fleet = Fleet::default();
    let cfg = big_falls_back_to_small();
    let b = Balance::new(
        [
            fleet
                .backend("chat-big")
                .with_models(["big"])
                .with_apis([Api::ChatCompletions])
                .with_translated_apis([Api::Responses]),
            fleet
                .backend("small-native")
                .with_models(["small"])
                .with_apis([Api::Responses]),
            fleet
                .backend("native")
                .with_models(["m"])
                .with_apis([Api::Responses]),
            fleet
                .backend("chat-m")
                .with_models(["m"])
                .with_apis([Api::ChatCompletions])
                .with_translated_apis([Api::Responses]),
        ],
        cfg,
    );
    let json = serde_json::json!({"model": "big", "input": "hi", "store": true});
    let (_, body) = send(&b, parsed(Endpoint::Responses, "/v1/responses", json))
        .await
        .unwrap();
    assert_eq!(body, "chat-big");
    fleet.set("native", Mode::Refused);
    let json = serde_json::json!({"model": "m", "input": "hi", "previous_response_id": null, "conversation": null});
    let (_, body) = send(&b, parsed(Endpoint::Responses, "/v1/responses", json))
        .await
        .unwrap();
    assert_eq!(body, "chat-m");
}

/// With no native upstream for the model at all, such a request still goes
/// to the translating one, whose refusal explains what it cannot do.
#[tokio::test]
async fn a_request_for_kept_state_goes_to_translation_when_nothing_is_native() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [fleet
            .backend("translating")
            .with_apis([Api::ChatCompletions])
            .with_translated_apis([Api::Responses])],
        BalanceConfig::default(),
    );
    let json = serde_json::json!({"model": "m", "input": "hi", "store": true});
    let (_, body) = send(&b, parsed(Endpoint::Responses, "/v1/responses", json))
        .await
        .unwrap();
    assert_eq!(body, "translating");
}

/// The tier is chosen per model: a fallback served natively does not shut
/// out the request's own model where it is served only by translation.
#[tokio::test]
async fn a_native_fallback_does_not_shut_out_the_models_translating_upstreams() {
    let fleet = Fleet::default();
    let cfg = big_falls_back_to_small();
    let b = Balance::new(
        [
            fleet
                .backend("claude")
                .with_models(["big"])
                .with_apis([Api::ChatCompletions])
                .with_translated_apis([Api::Messages]),
            fleet
                .backend("small-native")
                .with_models(["small"])
                .with_apis([Api::Messages]),
        ],
        cfg,
    );
    for _ in 0..4 {
        let (_, body) = send(&b, messages("big")).await.unwrap();
        assert_eq!(body, "claude");
    }
    // The fallback still stands in once the model's own upstream fails.
    fleet.set("claude", Mode::Refused);
    let (_, body) = send(&b, messages("big")).await.unwrap();
    assert_eq!(body, "small-native");
}

/// A model request the parse layer did not read (an embedder's stack
/// without it): its model is unknown, so it is refused as a
/// misconfiguration rather than sent to any upstream as passthrough. A
/// passthrough path goes on.
#[tokio::test]
async fn an_unparsed_model_request_is_refused_as_misconfigured() {
    let fleet = Fleet::default();
    let b = Balance::new(
        [fleet.backend("a").with_models(["m1"])],
        BalanceConfig::default(),
    );
    let unparsed = Request::post("/v1/chat/completions")
        .body(llm_proxy_core::full(r#"{"model":"zz"}"#))
        .expect("a valid request");
    let err = tower::ServiceExt::oneshot(b.clone(), unparsed)
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Misconfigured(_)), "{err}");
    assert_eq!(fleet.total(), 0);
    let passthrough = Request::get("/v1/files")
        .body(llm_proxy_core::empty())
        .expect("a valid request");
    let resp = tower::ServiceExt::oneshot(b, passthrough).await;
    assert!(resp.is_ok(), "{:?}", resp.err());
}

/// OpenAI's Conversations API belongs to its Responses API: a conversation
/// goes to an upstream that serves Responses natively when there is one,
/// whatever the order of the config (other passthrough paths go to the
/// first healthy upstream). Without one, anywhere, as passthrough. And
/// Anthropic's Message Batches API to an upstream that serves Messages.
#[tokio::test]
async fn conversations_go_where_responses_are_served() {
    let bare = |method: http::Method, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .body(llm_proxy_core::empty())
            .expect("a valid request")
    };
    let fleet = Fleet::default();
    let b = Balance::new(
        [
            fleet.backend("chat").with_apis([Api::ChatCompletions]),
            fleet.backend("native").with_apis([Api::Responses]),
        ],
        BalanceConfig::default(),
    );
    for (method, path) in [
        (http::Method::POST, "/v1/conversations"),
        (http::Method::GET, "/v1/conversations/conv_1/items"),
        (http::Method::POST, "/v1/conversations"),
    ] {
        let (_, body) = send(&b, bare(method, path)).await.unwrap();
        assert_eq!(body, "native", "{path}");
    }
    let (_, body) = send(&b, bare(http::Method::GET, "/v1/files"))
        .await
        .unwrap();
    assert_eq!(body, "chat");
    // Anthropic's Message Batches API, likewise, to a Messages upstream.
    let b = Balance::new(
        [
            fleet.backend("openai").with_apis([Api::ChatCompletions]),
            fleet.backend("anthropic").with_apis([Api::Messages]),
        ],
        BalanceConfig::default(),
    );
    for (method, path) in [
        (http::Method::POST, "/v1/messages/batches"),
        (http::Method::GET, "/v1/messages/batches/msgbatch_1/results"),
    ] {
        let (_, body) = send(&b, bare(method, path)).await.unwrap();
        assert_eq!(body, "anthropic", "{path}");
    }
    let b = Balance::new(
        [fleet.backend("chat-only").with_apis([Api::ChatCompletions])],
        BalanceConfig::default(),
    );
    let (_, body) = send(&b, bare(http::Method::POST, "/v1/conversations"))
        .await
        .unwrap();
    assert_eq!(body, "chat-only");
}
