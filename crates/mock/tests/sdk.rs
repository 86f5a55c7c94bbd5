//! The official openai and anthropic Python SDKs parse the mock's Responses,
//! Messages and chat tool-call answers, streamed and not
//! (`tests/sdk_shapes.py`). The virtualenv (`.venv` at the workspace root) is
//! made by `scripts/test`.

use std::path::{Path, PathBuf};
use std::process::Command;

use llm_proxy_mock::{Mock, spawn};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's python, or a failure that says how to make it.
fn venv_python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python SDK tests need the virtualenv {}: run `scripts/test`, or \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt`",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_parse_responses_messages_and_tool_calls() {
    let python = venv_python();
    let server = spawn(Mock::default()).await.expect("bind 127.0.0.1");
    let root = format!("http://{}", server.addr);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk_shapes.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(root)
            .output()
            .expect("run python")
    })
    .await
    .expect("python finished");
    assert!(
        out.status.success(),
        "SDK checks failed (if a module is missing, run `scripts/test` to remake .venv):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = &server.stats;
    assert!(stats.requests_for("/v1/responses") > 0);
    assert!(stats.requests_for("/v1/messages") > 0);
    assert_eq!(stats.requests_for("/v1/messages/count_tokens"), 1);
    let headers = stats.last_request_headers().expect("headers");
    assert!(headers.contains_key("anthropic-version"));
    // The key arrives as `x-api-key` or, from newer SDKs, as a bearer token.
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    assert!(
        header("x-api-key") == Some("sk-ant-test")
            || header("authorization") == Some("Bearer sk-ant-test"),
        "{headers:?}"
    );
}
