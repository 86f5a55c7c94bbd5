//! Official client SDKs against the proxy, over real sockets. The Python
//! virtualenv (`.venv` at the workspace root) is made by `scripts/test`.

use tests::*;

#[tokio::test]
async fn openai_python_sdk_works_against_the_proxy() {
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(
        &up.base_url(),
        "models = [\"demo\"]\napi_key = \"sk-upstream\"\nfirst_byte_timeout_ms = 1000",
    ))
    .await;
    run_python("openai_sdk.py", p.url("/v1")).await;
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
}

#[tokio::test]
async fn anthropic_python_sdk_works_and_gets_its_error_classes() {
    let up = mock_named("m").await;
    let dead = dead_port().await;
    let toml = format!(
        "max_body_bytes = 8000\n\
         [[upstream]]\nname = \"m\"\nurl = \"{}\"\napis = [\"messages\"]\nmodels = [\"claude-ok\", \"claude-other\"]\n\
         [[upstream]]\nname = \"dead\"\nurl = \"http://127.0.0.1:{dead}/v1\"\napis = [\"messages\"]\nmodels = [\"claude-dead\"]\n\
         [balance]\nmax_retries = 0\n\
         [auth]\n\
         [[auth.keys]]\nname = \"ok\"\nkey = \"sk-ok\"\nmodels = [\"claude-ok\", \"claude-dead\"]\n\
         [[auth.keys]]\nname = \"slow\"\nkey = \"sk-slow\"\nrequests_per_minute = 1\n\
         [[auth.keys]]\nname = \"any\"\nkey = \"sk-any\"\n",
        up.base_url()
    );
    let p = proxy(&toml).await;
    run_python("anthropic_sdk.py", p.url("")).await;
    let seen = up.stats.last_request_headers().unwrap();
    assert!(seen.get("anthropic-version").is_some());
    assert!(
        seen.get("x-api-key").is_none() && seen.get("authorization").is_none(),
        "no client key upstream"
    );
}

#[tokio::test]
async fn openai_python_sdk_responses_client_works() {
    let (a, b) = (mock_named("a").await, mock_named("b").await);
    let toml = format!(
        "[[upstream]]\nname = \"a\"\nurl = \"{}\"\napis = [\"responses\"]\n\
         [[upstream]]\nname = \"b\"\nurl = \"{}\"\napis = [\"responses\"]\n\
         [balance]\nstrategy = \"round_robin\"\n",
        a.base_url(),
        b.base_url()
    );
    let p = proxy(&toml).await;
    run_python("openai_responses.py", p.url("/v1")).await;
}
