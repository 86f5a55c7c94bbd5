//! Official client SDKs against the proxy, over real sockets. The Python
//! virtualenv (`.venv` at the workspace root) is made by `scripts/test`.

use std::process::Command;

use tests::*;

/// The venv's python, or a failure that says how to make it.
fn venv_python() -> std::path::PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python SDK tests need the virtualenv: run `scripts/test`, or \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt`"
    );
    python
}

#[tokio::test]
async fn openai_python_sdk_works_against_the_proxy() {
    let python = venv_python();
    let up = mock_named("m").await;
    let p = proxy(&one_upstream(
        &up.base_url(),
        "models = [\"demo\"]\napi_key = \"sk-upstream\"\nfirst_byte_timeout_ms = 500",
    ))
    .await;
    let base = p.url("/v1");
    let script = workspace_root().join("tests/python/openai_sdk.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai SDK checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = up.stats.last_request_headers().unwrap();
    assert_eq!(seen["authorization"], "Bearer sk-upstream");
}

/// Run a script from tests/python with `arg`; fail with its output.
async fn run_python(script: &str, arg: String) {
    let python = venv_python();
    let script = workspace_root().join("tests/python").join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(&script)
            .arg(arg)
            .output()
            .expect("run python")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "SDK checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn anthropic_python_sdk_works_and_gets_its_error_classes() {
    let up = mock_named("m").await;
    let dead = free_port();
    let toml = format!(
        "max_body_bytes = 8000\n\
         [[upstream]]\nname = \"m\"\nurl = \"{}\"\napis = [\"messages\"]\nmodels = [\"claude-ok\", \"claude-other\"]\n\
         [[upstream]]\nname = \"dead\"\nurl = \"http://127.0.0.1:{dead}/v1\"\napis = [\"messages\"]\nmodels = [\"claude-dead\"]\n\
         [balance]\nmax_retries = 0\n\
         [auth]\n\
         [[auth.keys]]\nname = \"ok\"\nkey = \"sk-ok\"\nmodels = [\"claude-ok\", \"claude-dead\", \"\"]\n\
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
