//! The cache and the balancer's model fallbacks, over real sockets: an answer
//! from a fallback model reaches the client but is never stored under the
//! key of the model the client asked for.

use tests::*;

const CHAT_PATH: &str = "/v1/chat/completions";

/// `big` at a port nobody listens on, falling back to `small` on `small_url`,
/// with the memory cache.
async fn config(small_url: &str) -> String {
    let dead = dead_port().await;
    format!(
        "[[upstream]]\nname = \"big\"\nurl = \"http://127.0.0.1:{dead}/v1\"\nmodels = [\"big\"]\n\
         [[upstream]]\nname = \"small\"\nurl = \"{small_url}\"\nmodels = [\"small\"]\n\
         [balance]\nfallbacks = {{ big = [\"small\"] }}\n\
         [cache]\nenabled = true\nbackend = \"memory\"\nmax_entries = 1000\n\
         max_bytes = 1048576\nttl_secs = 60\n"
    )
}

#[tokio::test]
async fn a_fallback_models_answer_is_not_cached_for_the_primary_model() {
    let small = mock_named("small").await;
    let p = proxy(&config(&small.base_url()).await).await;
    for stream in [false, true] {
        let before = small.stats.requests_for(CHAT_PATH);
        let first = post_json(&p.url(CHAT_PATH), &chat("big", stream)).await;
        assert_eq!(first.status, 200, "{}", first.text());
        assert_eq!(first.header("x-llm-proxy-cache"), Some("miss"));
        assert!(
            first.text().contains("\"model\":\"small\""),
            "{}",
            first.text()
        );
        let second = post_json(&p.url(CHAT_PATH), &chat("big", stream)).await;
        assert_eq!(second.status, 200, "{}", second.text());
        assert_ne!(
            second.header("x-llm-proxy-cache"),
            Some("hit"),
            "stream = {stream}: `small`'s answer served as `big`'s from the cache"
        );
        assert_eq!(small.stats.requests_for(CHAT_PATH) - before, 2);
    }
    // The fallback model's own requests are cached as ever.
    let own = post_json(&p.url(CHAT_PATH), &chat("small", false)).await;
    assert_eq!(own.header("x-llm-proxy-cache"), Some("miss"));
    let again = post_json(&p.url(CHAT_PATH), &chat("small", false)).await;
    assert_eq!(again.header("x-llm-proxy-cache"), Some("hit"));
}

/// In the shared scope, a request coalesced on another key's request must
/// not be handed that key's fallback answer: its own key may not use the
/// fallback model.
#[tokio::test]
async fn a_fallback_answer_is_not_handed_to_a_coalesced_key_that_may_not_use_it() {
    let small = mock(MockConfig {
        name: "small".into(),
        latency: std::time::Duration::from_millis(600),
        ..MockConfig::default()
    })
    .await;
    let toml = config(&small.base_url()).await.replace(
        "[cache]\n",
        "[auth]\n\
         [[auth.keys]]\nname = \"all\"\nkey = \"sk-all\"\nmodels = [\"big\", \"small\"]\n\
         [[auth.keys]]\nname = \"big-only\"\nkey = \"sk-big\"\nmodels = [\"big\"]\n\
         [cache]\nscope = \"shared\"\n",
    );
    let p = proxy(&toml).await;
    let ask = |key: &'static str| {
        send(request(
            http::Method::POST,
            &p.url(CHAT_PATH),
            &[("content-type", "application/json"), ("authorization", key)],
            chat("big", false),
        ))
    };
    let leader = ask("Bearer sk-all");
    let follower = async {
        // Joins while the leader waits for `small`.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        ask("Bearer sk-big").await
    };
    let (leader, follower) = tokio::join!(leader, follower);
    assert_eq!(leader.status, 200, "{}", leader.text());
    assert!(leader.text().contains("\"model\":\"small\""));
    assert_eq!(follower.status, 502, "{}", follower.text());
    assert!(!follower.text().contains("\"model\":\"small\""));
}
