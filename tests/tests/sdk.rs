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
