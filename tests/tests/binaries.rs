//! The example binaries, run as a user runs them: the llm-proxy binary's
//! config errors and graceful shutdown, `minimal` and `axum_embed`.

use std::io::Read;
use std::time::Duration;

use http::Method;
use tests::*;

fn config_error(name: &str, text: Option<&str>) -> (i32, String) {
    run_to_exit(name, text, &[])
}

/// `llm-proxy --check` on the config `text`: its exit code and stderr.
fn checked(name: &str, text: &str) -> (i32, String) {
    run_to_exit(name, Some(text), &["--check"])
}

/// The llm-proxy binary on the config `text` (none: a missing file), with
/// `args` before `--config`, which must exit within `HANG`.
fn run_to_exit(name: &str, text: Option<&str>, args: &[&str]) -> (i32, String) {
    let dir = scratch_dir("config");
    let path = dir.join(format!("{name}.toml"));
    if let Some(text) = text {
        std::fs::write(&path, text).unwrap();
    }
    let mut child = std::process::Command::new(example_binary("llm-proxy"))
        .args(args)
        .args(["--config", path.to_str().unwrap()])
        // For the case of a secret read from an empty variable.
        .env("LLM_PROXY_TEST_EMPTY", "")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run llm-proxy");
    // A config error exits at once; a proxy that starts instead is a failure,
    // not a hang.
    let deadline = std::time::Instant::now() + HANG;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{name}: llm-proxy started instead of refusing the config");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code().unwrap_or(-1), stderr)
}

/// A `listen` on port 0 is logged as the port the system picked, which
/// is where the proxy answers.
#[test]
fn port_0_is_logged_as_the_port_bound() {
    use std::io::BufRead;
    let path = scratch_dir("port-0").join("proxy.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\n[[upstream]]\nname = \"m\"\nmock = {}\n",
    )
    .unwrap();
    let mut child = Child(
        std::process::Command::new(example_binary("llm-proxy"))
            .args(["--config", path.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run llm-proxy"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("llm-proxy listening") {
                let _ = tx.send(line);
                break;
            }
        }
    });
    let plain = rx
        .recv_timeout(HANG)
        .expect("a line saying where it listens");
    // Logged to a pipe, not a terminal: no colours' escape codes.
    assert!(!plain.contains('\x1b'), "{plain:?}");
    let addr = plain
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr in {plain:?}"));
    assert!(!addr.ends_with(":0"), "{plain}");
    std::net::TcpStream::connect(addr).expect("the proxy answers where it says it listens");
}

#[test]
fn config_errors_are_one_line_and_exit_2() {
    let up = "[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/v1\"\n";
    let cases: &[(&str, Option<String>, &str)] = &[
        ("missing", None, "cannot read the config file"),
        ("bad_toml", Some("listen = \n".into()), ":1:"),
        (
            "unknown_key",
            Some(format!("{up}colour = \"blue\"\n")),
            "colour",
        ),
        (
            "unknown_key_line",
            Some(format!("{up}colour = \"blue\"\n")),
            ":4:",
        ),
        (
            "bad_url",
            Some("[[upstream]]\nname = \"a\"\nurl = \"not a url\"\n".into()),
            ":3: upstream `a`: bad url",
        ),
        (
            "duplicate",
            Some(format!("{up}{up}")),
            "duplicate upstream name `a`",
        ),
        (
            "no_upstream",
            Some("listen = \"127.0.0.1:0\"\n".into()),
            "no [[upstream]]",
        ),
        (
            "bad_strategy",
            Some(format!("{up}[balance]\nstrategy = \"random\"\n")),
            ":5: [balance] strategy `random`",
        ),
        (
            "bad_auth_key",
            Some(format!(
                "{up}[auth]\n[[auth.keys]]\nname = \"k\"\nkey_sha256 = \"abc\"\n"
            )),
            "`key_sha256` must be 64 hex digits",
        ),
        (
            "websocket_without_responses",
            Some(format!("{up}websocket = true\n")),
            "`websocket = true` needs \"responses\" in `apis`",
        ),
        (
            "empty_env_secret",
            Some(format!("{up}api_key = \"env:LLM_PROXY_TEST_EMPTY\"\n")),
            ":4: upstream `a`: `api_key`: environment variable `LLM_PROXY_TEST_EMPTY` is empty",
        ),
        (
            "huge_workers",
            Some(format!("workers = 18446744073709551615\n{up}")),
            "`workers` must be between 0",
        ),
        (
            "metrics_on_listen",
            Some(format!(
                "listen = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"\n{up}"
            )),
            "`metrics_listen` is `listen`",
        ),
    ];
    for (name, text, needle) in cases {
        let (code, stderr) = config_error(name, text.as_deref());
        assert_eq!(code, 2, "{name}: exit code; stderr: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{name}: one line: {stderr}"
        );
        assert!(stderr.contains(needle), "{name}: `{needle}` in: {stderr}");
        assert!(
            stderr.starts_with("llm-proxy: config error: "),
            "{name}: {stderr}"
        );
    }
}

/// `--check` (nginx's `-t`): the config read and the stack built, nothing
/// served, exit 0; a bad config is the same one line and exit 2 as at a
/// start.
#[test]
fn check_validates_a_config_without_serving_it() {
    // Its `listen` is taken: a check binds nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let up = "[[upstream]]\nname = \"m\"\nmock = {}\n";
    let (code, stderr) = checked(
        "check_valid",
        &format!("listen = \"{addr}\"\n{up}[cache]\nbackend = \"memory\"\n"),
    );
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stderr.contains("check_valid.toml is valid"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
    let (code, stderr) = checked("check_unknown", &format!("{up}colour = \"blue\"\n"));
    assert_eq!(code, 2, "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("llm-proxy: config error: ") && stderr.contains("colour"),
        "{stderr}"
    );
    drop(taken);
}

#[test]
fn an_address_in_use_is_a_start_up_failure_naming_its_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let up = "[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/v1\"\n";
    for (key, text) in [
        ("listen", format!("listen = \"{addr}\"\n{up}")),
        (
            "metrics_listen",
            format!("listen = \"127.0.0.1:0\"\nmetrics_listen = \"{addr}\"\n{up}"),
        ),
    ] {
        let (code, stderr) = config_error(&format!("in_use_{key}"), Some(&text));
        assert_eq!(code, 1, "{key}: exit code; stderr: {stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on {addr} (`{key}`)")),
            "{key}: {stderr}"
        );
        // Found before anything is served (a replacement started while the
        // old process drains, holding `metrics_listen`, takes no request).
        assert!(!stderr.contains("llm-proxy listening"), "{key}: {stderr}");
    }
    drop(taken);
}

#[tokio::test]
async fn a_redis_that_refuses_the_proxy_stops_it_at_start() {
    let redis = tests::redis_server::RedisServer::start().await;
    let mut admin = redis::Client::open(redis.url())
        .expect("a client")
        .get_multiplexed_async_connection()
        .await
        .expect("connected");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("right")
        .query_async::<()>(&mut admin)
        .await
        .expect("a password set");
    let config = format!(
        "[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/v1\"\n\
         [auth]\nbackend = \"redis\"\nredis_url = \"redis://:wrong@{}\"\n\
         [[auth.keys]]\nname = \"k\"\nkey = \"sk-k\"\n",
        redis.addr
    );
    let again = config.clone();
    let (code, stderr) =
        tokio::task::spawn_blocking(move || config_error("redis_refuses", Some(&again)))
            .await
            .expect("ran");
    assert_eq!(code, 2, "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("[auth] redis_url redis://***@127.0.0.1:") && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong"), "the password shown: {stderr}");
    // A check builds what a start builds: the same refusal.
    let (code, check) =
        tokio::task::spawn_blocking(move || checked("redis_refuses_check", &config))
            .await
            .expect("ran");
    assert_eq!(code, 2, "stderr: {check}");
    assert_eq!(check, stderr);
    // An ACL user that may PING but run no script, or touch no key under
    // the prefix: every limit would fall back to this proxy's own.
    for (name, rules) in [
        ("noscript", &["on", ">pw", "~*", "+@all", "-@scripting"][..]),
        ("otherkeys", &["on", ">pw", "~other:*", "+@all"]),
    ] {
        let mut acl = redis::cmd("ACL");
        acl.arg("SETUSER").arg(name).arg(rules);
        acl.query_async::<()>(&mut admin).await.expect("a user");
        let config = format!(
            "[[upstream]]\nname = \"a\"\nurl = \"http://127.0.0.1:9/v1\"\n\
             [cache]\nbackend = \"redis\"\nredis_url = \"redis://{name}:pw@{}\"\n",
            redis.addr
        );
        let (code, stderr) = tokio::task::spawn_blocking(move || config_error(name, Some(&config)))
            .await
            .expect("ran");
        assert_eq!(code, 2, "{name}: stderr: {stderr}");
        assert!(
            stderr.contains("[cache] redis_url") && stderr.contains("refused"),
            "{name}: {stderr}"
        );
    }
}

/// The exit status and stderr of `child`, which must exit within `HANG`
/// (`what` says why it should).
async fn exit_of(mut child: Child, what: &'static str) -> (std::process::ExitStatus, String) {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + HANG;
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut stderr) = child.0.stderr.take() {
                    let _ = stderr.read_to_string(&mut err);
                }
                return (status, err);
            }
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap()
}

/// SIGTERM `child` and wait for it to exit 0 (`what` says why it should):
/// its stderr.
async fn stderr_after_term(child: Child, what: &'static str) -> String {
    signal(&child, "-TERM");
    let (status, stderr) = exit_of(child, what).await;
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    stderr
}

/// The lines of `stderr` that hold every one of `parts`.
fn lines_with<'a>(stderr: &'a str, parts: &[&str]) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| parts.iter().all(|part| l.contains(part)))
        .collect()
}

/// `examples/llm-proxy.rs` started on `config` (what follows `listen`, in
/// a scratch directory `dir`) with `RUST_LOG` at `log`, listening: the
/// process and its address.
async fn start_proxy(dir: &str, config: &str, log: &str) -> (Child, std::net::SocketAddr) {
    let port = free_port();
    let path = scratch_dir(dir).join("proxy.toml");
    std::fs::write(&path, format!("listen = \"127.0.0.1:{port}\"\n{config}")).unwrap();
    let child = run_example_logging("llm-proxy", &["--config", path.to_str().unwrap()], log);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr).await;
    (child, addr)
}

/// `examples/llm-proxy.rs` started on `config` (what follows `listen`),
/// with its mock streaming `tokens` tokens to a chat request under way:
/// the process, its address and the stream's answer.
async fn proxy_streaming(
    dir: &str,
    config: &str,
    tokens: u32,
) -> (
    Child,
    std::net::SocketAddr,
    hyper::Response<hyper::body::Incoming>,
) {
    // At `info`, for the lines that say how the drain ended.
    let (child, addr) = start_proxy(dir, config, "info").await;
    let resp = client()
        .request(request(
            Method::POST,
            &format!("http://{addr}/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-mock-tokens", &tokens.to_string()),
            ],
            chat("any", true),
        ))
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    (child, addr, resp)
}

/// Send `signal` (as `kill` spells it: `-TERM`) to `child`.
fn signal(child: &Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_stream_then_exits_0() {
    let (child, _, resp) = proxy_streaming(
        "sigterm",
        "drain_timeout_secs = 20\n[[upstream]]\nname = \"m\"\nmock = { tokens_per_second = 20 }\n",
        10,
    )
    .await;
    signal(&child, "-TERM");
    drained_whole(child, resp).await;
}

/// The in-flight stream `resp` finished whole, then `child` exited 0: its
/// stderr.
async fn drained_whole(child: Child, resp: hyper::Response<hyper::body::Incoming>) -> String {
    let (body, broke) = read_stream(resp).await;
    assert!(!broke, "the in-flight stream finished cleanly");
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
    let exit = exit_of(child, "proxy exited after draining").await;
    assert_eq!(exit.0.code(), Some(0), "stderr: {}", exit.1);
    exit.1
}

/// SIGTERM with a stream that outlasts `drain_timeout` on the sharded
/// server (two workers): each shard cuts what is left at the timeout, the
/// stream breaks, and the process exits 0 soon after, not at the stream's
/// end.
#[tokio::test]
async fn sigterm_cuts_a_stream_past_the_drain_timeout_then_exits_0() {
    // A stream that would take 50 s, a drain of 0.5 s.
    let (child, _, resp) = proxy_streaming(
        "sigterm-cut",
        "workers = 2\ndrain_timeout_secs = 0.5\n\
         [[upstream]]\nname = \"m\"\nmock = { tokens_per_second = 2 }\n",
        100,
    )
    .await;
    signal(&child, "-TERM");
    let (_, broke) = tokio::time::timeout(HANG, read_stream(resp))
        .await
        .expect("the stream was cut at the drain timeout");
    assert!(broke, "a stream cut by the drain must not look whole");
    let exit = exit_of(child, "proxy exited after the drain's cut").await;
    assert_eq!(exit.0.code(), Some(0), "stderr: {}", exit.1);
    // One line for the whole server: not "drained" from the shard that
    // had nothing in flight, as if the cut stream had finished.
    let ends: Vec<&str> = exit
        .1
        .lines()
        .filter(|l| l.contains("drained") || l.contains("drain timeout reached"))
        .collect();
    assert_eq!(ends.len(), 1, "{}", exit.1);
    assert!(ends[0].contains("drain timeout reached"), "{}", exit.1);
}

/// One signal sent twice at once (GNU `timeout` signals the process, then
/// its group) is one: the drain goes on. SIGHUP (a reload, which is not
/// built) neither stops nor drains.
#[tokio::test]
async fn sighup_and_a_signal_sent_twice_at_once_do_not_stop_the_drain() {
    let (mut child, _, resp) = proxy_streaming(
        "repeated-signal",
        "drain_timeout_secs = 20\n[[upstream]]\nname = \"m\"\nmock = { tokens_per_second = 20 }\n",
        10,
    )
    .await;
    sighup_is_ignored(&mut child).await;
    signal(&child, "-TERM");
    signal(&child, "-TERM");
    let stderr = drained_whole(child, resp).await;
    assert!(
        stderr.contains("SIGHUP received and ignored"),
        "stderr: {stderr}"
    );
}

/// A stderr nobody reads any more (a log pipe whose reader went) loses
/// the logs, nothing else: requests are answered and logged (into the
/// broken pipe), SIGHUP is ignored, and SIGTERM drains an in-flight
/// stream and exits 0.
#[tokio::test]
async fn a_broken_stderr_loses_logs_not_requests_nor_the_drain() {
    let (mut child, addr, resp) = proxy_streaming(
        "broken-stderr",
        "access_log = true\ndrain_timeout_secs = 20\n\
         [[upstream]]\nname = \"m\"\nmock = { tokens_per_second = 20 }\n",
        10,
    )
    .await;
    // The reader goes: each write to stderr now fails (EPIPE).
    drop(child.0.stderr.take());
    for _ in 0..3 {
        let answer = send(request(
            Method::POST,
            &format!("http://{addr}/v1/chat/completions"),
            &[("content-type", "application/json"), ("x-mock-tokens", "1")],
            chat("any", false),
        ))
        .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    sighup_is_ignored(&mut child).await;
    signal(&child, "-TERM");
    drained_whole(child, resp).await;
}

/// SIGHUP `child`, which must still run a moment later.
async fn sighup_is_ignored(child: &mut Child) {
    signal(child, "-HUP");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP stopped the proxy"
    );
}

#[tokio::test]
async fn a_second_signal_during_the_drain_stops_at_once() {
    // A 60 s drain and a stream that would take 50 s: only the second
    // signal can end this within the test's bound.
    let (mut child, addr, resp) = proxy_streaming(
        "second-signal",
        "drain_timeout_secs = 60\n[[upstream]]\nname = \"m\"\nmock = { tokens_per_second = 2 }\n",
        100,
    )
    .await;
    signal(&child, "-TERM");
    // Draining: still running a moment later, and no longer listening: a
    // new connection is refused, not left in a backlog nobody serves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.0.try_wait().unwrap().is_none(), "draining, not gone");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "a new connection during the drain was accepted"
    );
    signal(&child, "-INT");
    let exit = exit_of(child, "the second signal stops the proxy").await;
    assert_eq!(exit.0.code(), Some(1), "stderr: {}", exit.1);
    assert!(exit.1.contains("second signal"), "stderr: {}", exit.1);
    drop(resp);
}

#[tokio::test]
async fn minimal_example_proxies_and_renders_errors() {
    let up = mock_named("m").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _child = run_example("minimal", &[&listen, &up.base_url()]);
    wait_listening(listen.parse().unwrap()).await;
    let ok = post_json(
        &format!("http://{listen}/v1/chat/completions"),
        &chat("m", false),
    )
    .await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("x-llm-proxy-upstream"), Some("default"));
    post_json(&format!("http://{listen}/v1/chat/completions"), "{")
        .await
        .assert_error(400, "invalid_request_error", "invalid_json");
    assert_eq!(up.stats.requests(), 1);
}

#[tokio::test]
async fn axum_embed_example_serves_app_and_proxy_side_by_side() {
    let up = mock_named("m").await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _child = run_example("axum_embed", &[&listen, &up.base_url()]);
    wait_listening(listen.parse().unwrap()).await;
    let app = send(request(Method::GET, &format!("http://{listen}/"), &[], "")).await;
    assert_eq!(app.text(), "my app\n");
    let streamed = post_json(
        &format!("http://{listen}/llm/v1/chat/completions"),
        &chat("m", true),
    )
    .await;
    assert_eq!(streamed.status, 200);
    assert_eq!(
        sse_data(&streamed.body).last().map(String::as_str),
        Some("[DONE]")
    );
    let health = send(request(
        Method::GET,
        &format!("http://{listen}/llm/healthz"),
        &[],
        "",
    ))
    .await;
    assert_eq!(health.status, 200);
    assert_eq!(
        up.stats.last_path().as_deref(),
        Some("/v1/chat/completions")
    );
}

/// One request on a fresh connection to `addr`, which stays open.
async fn keep_alive_connection(
    addr: std::net::SocketAddr,
    path: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    // The answer's head and body arrive together: read until the body's
    // length is in.
    loop {
        let n = tokio::time::timeout(HANG, conn.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "the connection stays open");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|l| l.trim().parse::<usize>().ok())
                .expect("a content-length");
            if body.len() >= length {
                return (conn, body.to_owned());
            }
        }
    }
}

#[tokio::test]
async fn workers_share_the_connections_evenly() {
    let (_child, addr) = start_proxy(
        "workers",
        "workers = 2\n[[upstream]]\nname = \"m\"\nmock = {}\n",
        "warn",
    )
    .await;
    // Connected together, as a client's pool opens them: whichever thread
    // accepts them, each serves half.
    let opened: Vec<_> = (0..9)
        .map(|_| tokio::spawn(keep_alive_connection(addr, "/healthz")))
        .collect();
    let mut open = Vec::new();
    for conn in opened {
        open.push(conn.await.unwrap());
    }
    assert!(open.iter().all(|(_, body)| body == "ok\n"));
    let (_metrics_conn, metrics) = keep_alive_connection(addr, "/metrics").await;
    let per_shard: Vec<u64> = (0..2)
        .map(|shard| {
            let line = format!("llm_proxy_shard_connections{{shard=\"{shard}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&line))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{line} in {metrics}"))
        })
        .collect();
    // Ten open connections over two threads (and maybe the start-up probe
    // of `wait_listening`, if its close has not been read yet on a busy
    // machine): one thread at most one ahead.
    let (total, spread) = (
        per_shard.iter().sum::<u64>(),
        per_shard[0].abs_diff(per_shard[1]),
    );
    assert!(
        (10..=11).contains(&total) && spread <= 1,
        "{per_shard:?}: ten open connections over two threads"
    );
    drop(open);
}

#[test]
fn the_command_line_is_read_as_users_write_it() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(example_binary("llm-proxy"))
            .args(args)
            .output()
            .expect("run llm-proxy");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("llm-proxy "), "{stdout}");
    // `--config=FILE` is `--config FILE`: a missing file is a config error.
    let (code, _, stderr) = run(&["--config=/nonexistent/llm-proxy.toml"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.starts_with("llm-proxy: config error: ") && stderr.contains("/nonexistent/"),
        "{stderr}"
    );
    for args in [&["--config", "a", "--config", "b"][..], &["--frobnicate"]] {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    }
    for args in [&["--config"][..], &["--config="]] {
        let (code, _, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(
            stderr.contains("--config needs a file"),
            "{args:?}: {stderr}"
        );
    }
    // A device that never ends is refused, not read forever (a hang here
    // is the test's timeout).
    let (code, _, stderr) = run(&["--config", "/dev/zero"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("/dev/zero: cannot read the config file: larger than 16 MiB"),
        "{stderr}"
    );
}

/// `example` (serving on `listen` in front of a slow mock) gets `signal`
/// while a stream is in flight: the stream finishes whole, the example
/// exits 0.
async fn a_signal_drains_the_example(example: &str, signal: &str, path: &str) {
    let up = paced_mock("m", 20.0).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let child = run_example(example, &[&listen, &up.base_url()]);
    wait_listening(listen.parse().unwrap()).await;
    let resp = client()
        .request(request(
            Method::POST,
            &format!("http://{listen}{path}"),
            &[
                ("content-type", "application/json"),
                ("x-mock-tokens", "10"),
            ],
            chat("m", true),
        ))
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let status = std::process::Command::new("kill")
        .args([signal, &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (body, broke) = read_stream(resp).await;
    assert!(!broke, "{example}: the in-flight stream finished cleanly");
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));
    let exit = exit_of(child, "the example exited after draining").await;
    assert_eq!(exit.0.code(), Some(0), "{example}: stderr: {}", exit.1);
}

#[tokio::test]
async fn minimal_drains_on_ctrl_c() {
    a_signal_drains_the_example("minimal", "-INT", "/v1/chat/completions").await;
}

#[tokio::test]
async fn axum_embed_drains_on_sigterm() {
    a_signal_drains_the_example("axum_embed", "-TERM", "/llm/v1/chat/completions").await;
}

/// A stream the upstream breaks is logged at the default level once, with
/// the request's id, so that an operator can find the client's request.
#[tokio::test]
async fn a_broken_stream_is_logged_with_its_request_id() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that answers one event, then hangs up mid-stream.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = upstream.accept().await.unwrap();
        let mut buf = vec![0; 64 * 1024];
        let _ = socket.read(&mut buf).await;
        let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
            event.len()
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        // Dropped without the last chunk.
    });
    let (child, addr) = start_proxy(
        "broken-log",
        &format!(
            "drain_timeout_secs = 2\naccess_log = true\n[[upstream]]\nname = \"cut\"\nurl = \"http://{upstream_addr}/v1\"\n"
        ),
        "warn,llm_proxy::access=info,llm_proxy_balance=debug",
    )
    .await;
    let resp = client()
        .request(request(
            Method::POST,
            &format!("http://{addr}/v1/chat/completions"),
            &[
                ("content-type", "application/json"),
                ("x-request-id", "req-broken-7"),
            ],
            chat("any", true),
        ))
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let (body, broke) = read_stream(resp).await;
    assert!(broke, "the stream is cut: {body:?}");
    let stderr = stderr_after_term(child, "proxy exits on SIGTERM").await;
    let lines = lines_with(&stderr, &["response body failed"]);
    assert_eq!(lines.len(), 1, "one line for the failure: {stderr}");
    // At debug, the balancer's attempt is tied to the request too.
    let attempts = lines_with(&stderr, &["balancer attempt"]);
    assert!(
        attempts.len() == 1 && attempts[0].contains("req-broken-7"),
        "{stderr}"
    );
    assert!(
        lines[0].contains("req-broken-7") && lines[0].contains("upstream `cut`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no colour codes in a pipe: {stderr}"
    );
    // Its access line says how it ended.
    let access = lines_with(&stderr, &["llm_proxy::access"]);
    assert_eq!(access.len(), 1, "{stderr}");
    assert!(
        access[0].contains("req-broken-7") && access[0].contains("failed"),
        "{stderr}"
    );
}

/// `access_log = true`: one line per request when its response ends.
#[tokio::test]
async fn the_access_log_has_a_line_per_request() {
    let (child, addr) = start_proxy(
        "access-log",
        "access_log = true\ndrain_timeout_secs = 2\n[[upstream]]\nname = \"m\"\nmock = {}\n\
         websocket = true\n[auth]\n[[auth.keys]]\nname = \"team-a\"\nkey = \"sk-team-a-secret\"\n",
        "warn,llm_proxy::access=info",
    )
    .await;
    for (id, stream) in [("req-plain-1", false), ("req-stream-2", true)] {
        let resp = client()
            .request(request(
                Method::POST,
                &format!("http://{addr}/v1/chat/completions?api-version=x"),
                &[
                    ("content-type", "application/json"),
                    ("x-request-id", id),
                    ("authorization", "Bearer sk-team-a-secret"),
                ],
                chat("any", stream),
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (_, broke) = read_stream(resp).await;
        assert!(!broke);
    }
    let missing = client()
        .request(request(
            Method::GET,
            &format!("http://{addr}/v1/nowhere/../x"),
            &[("x-request-id", "req-404-3")],
            String::new(),
        ))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // The proxy answers the models list itself, after the key.
    let models = client()
        .request(request(
            Method::GET,
            &format!("http://{addr}/v1/models"),
            &[
                ("x-request-id", "req-models-4"),
                ("authorization", "Bearer sk-team-a-secret"),
            ],
            String::new(),
        ))
        .await
        .unwrap();
    assert_eq!(models.status(), 200);
    let _ = read_stream(models).await;
    // A WebSocket session: its line comes when it closes.
    let (mut socket, head) = tests::ws::connect(
        addr,
        &[
            ("x-request-id", "req-ws-5"),
            ("authorization", "Bearer sk-team-a-secret"),
        ],
    )
    .await
    .expect("switched");
    assert_eq!(head.status(), 101);
    let events = tests::ws::turn(
        &mut socket,
        serde_json::json!({"model": "any", "input": "Hi"}),
    )
    .await;
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    futures_util::SinkExt::close(&mut socket).await.unwrap();
    assert!(tests::ws::ends(&mut socket).await);
    // A client that gives up while the upstream works: its line names the
    // upstream it waited on.
    let slow = request(
        Method::POST,
        &format!("http://{addr}/v1/chat/completions"),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "req-gone-6"),
            ("authorization", "Bearer sk-team-a-secret"),
            ("x-mock-latency-ms", "3000"),
        ],
        chat("any", false),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), client().request(slow))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stderr = stderr_after_term(child, "proxy exits on SIGTERM").await;
    let lines = lines_with(&stderr, &["llm_proxy::access"]);
    assert_eq!(lines.len(), 7, "{stderr}");
    let gone = lines.iter().find(|l| l.contains("req-gone-6")).unwrap();
    assert!(
        gone.contains("status=499")
            && gone.contains("upstream=\"m\"")
            && gone.contains("key=\"team-a\""),
        "{gone}"
    );
    // The WebSocket session's own line, when it ended (the client closed).
    let session = lines[5..]
        .iter()
        .find(|l| l.contains("req-ws-5"))
        .expect("a line at the session's end");
    assert!(
        session.contains("status=101")
            && session.contains("upstream=\"m\"")
            && session.contains("key=\"team-a\"")
            && (session.contains("end=\"closed\"") || session.contains("end=closed"))
            && session.contains("turns=1"),
        "{session}"
    );
    // Only the session's end line counts turns.
    assert!(lines.iter().filter(|l| l.contains("turns=")).count() == 1);
    for (line, id, status) in [
        (lines[0], "req-plain-1", "status=200"),
        (lines[1], "req-stream-2", "status=200"),
        (lines[2], "req-404-3", "status=404"),
        (lines[3], "req-models-4", "status=200"),
        (lines[4], "req-ws-5", "status=101"),
    ] {
        assert!(line.contains(id) && line.contains(status), "{line}");
        assert!(
            line.contains("end=\"complete\"") || line.contains("end=complete"),
            "{line}"
        );
        // Milliseconds to the microsecond, not a float's last digits.
        let ms = line
            .split_once("duration_ms=")
            .and_then(|(_, rest)| rest.split(' ').next())
            .expect("duration_ms");
        let (whole, decimals) = ms.split_once('.').unwrap_or((ms, ""));
        assert!(
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && decimals.len() <= 3
                && decimals.bytes().all(|b| b.is_ascii_digit()),
            "{line}"
        );
    }
    assert!(
        lines[0].contains("upstream=\"m\"") && lines[0].contains("path=\"/v1/chat/completions\""),
        "{}",
        lines[0]
    );
    assert!(!lines[0].contains("api-version"), "no query: {}", lines[0]);
    // The key's name, never the key; none for a request without one.
    for line in [lines[0], lines[1], lines[3], lines[4]] {
        assert!(
            line.contains("key=\"team-a\"") || line.contains("key=team-a"),
            "{line}"
        );
        assert!(!line.contains("sk-team-a-secret"), "{line}");
    }
    assert!(
        lines[2].contains("key=\"\"") || lines[2].contains("key= "),
        "{}",
        lines[2]
    );
}

/// A WebSocket session whose turn runs past the drain's timeout is closed
/// under it, and still gets its session-end access line (`end="cut"`).
#[tokio::test]
async fn a_websocket_session_cut_at_the_drain_timeout_is_logged() {
    let (child, addr) = start_proxy(
        "access-log-ws-cut",
        "access_log = true\ndrain_timeout_secs = 1\n[[upstream]]\nname = \"m\"\n\
         mock = { tokens_per_second = 2 }\nwebsocket = true\n",
        "warn,llm_proxy::access=info",
    )
    .await;
    let (mut socket, head) = tests::ws::connect(addr, &[("x-request-id", "req-ws-cut-1")])
        .await
        .expect("switched");
    assert_eq!(head.status(), 101);
    futures_util::SinkExt::send(
        &mut socket,
        tokio_tungstenite::tungstenite::Message::text(
            serde_json::json!({"type": "response.create", "model": "any", "input": "Hi"})
                .to_string(),
        ),
    )
    .await
    .unwrap();
    // The turn is under way (8 tokens at 2 a second: 4 s, past the drain).
    assert_eq!(
        tests::ws::next_event(&mut socket).await["type"],
        "response.created"
    );
    let stderr = stderr_after_term(child, "proxy exits at the drain's timeout").await;
    let lines = lines_with(&stderr, &["llm_proxy::access", "req-ws-cut-1"]);
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[1].contains("status=101")
            && lines[1].contains("upstream=\"m\"")
            && (lines[1].contains("end=\"cut\"") || lines[1].contains("end=cut"))
            && lines[1].contains("turns=1"),
        "{}",
        lines[1]
    );
    drop(socket);
}

/// A request coalesced on an identical one's JSON answer is logged
/// `complete`: hyper drops its body after the last byte of the announced
/// length, and the body says it is at its end then.
#[tokio::test]
async fn a_coalesced_json_answer_is_logged_complete() {
    let (child, addr) = start_proxy(
        "access-log-coalesced",
        "access_log = true\ndrain_timeout_secs = 2\n[[upstream]]\nname = \"m\"\nmock = {}\n\
         [cache]\nbackend = \"memory\"\n",
        "warn,llm_proxy::access=info",
    )
    .await;
    let ask = |id: &'static str| {
        let url = format!("http://{addr}/v1/chat/completions");
        async move {
            let resp = client()
                .request(request(
                    Method::POST,
                    &url,
                    &[
                        ("content-type", "application/json"),
                        ("x-request-id", id),
                        ("x-mock-latency-ms", "300"),
                    ],
                    chat("any", false),
                ))
                .await
                .unwrap();
            let cache = resp.headers()["x-llm-proxy-cache"]
                .to_str()
                .unwrap()
                .to_owned();
            let length = resp.headers().get("content-length").is_some();
            let (_, broke) = read_stream(resp).await;
            assert!(!broke);
            (cache, length)
        }
    };
    let leader = tokio::spawn(ask("req-leader-1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (followed, length) = ask("req-follower-2").await;
    assert_eq!(leader.await.unwrap().0, "miss");
    assert!(followed == "hit" && length, "{followed} {length}");
    let stderr = stderr_after_term(child, "proxy exits on SIGTERM").await;
    let lines = lines_with(&stderr, &["llm_proxy::access"]);
    assert_eq!(lines.len(), 2, "{stderr}");
    for line in lines {
        assert!(
            line.contains("end=\"complete\"") || line.contains("end=complete"),
            "{line}"
        );
    }
}

/// An ejection is logged with how long the upstream rests: its return,
/// which time alone decides, has no line of its own.
#[tokio::test]
async fn an_ejection_is_logged_with_its_rest() {
    // Nothing listens there: every attempt is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let (child, addr) = start_proxy(
        "ejection-log",
        &format!(
            "[[upstream]]\nname = \"dead\"\nurl = \"http://{dead_addr}/v1\"\n\
             [balance]\neject_after_failures = 1\neject_secs = 7\nmax_retries = 0\n"
        ),
        "warn",
    )
    .await;
    let resp = client()
        .request(request(
            Method::POST,
            &format!("http://{addr}/v1/chat/completions"),
            &[("content-type", "application/json")],
            chat("any", false),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    let stderr = stderr_after_term(child, "proxy exits on SIGTERM").await;
    let ejected = lines_with(&stderr, &["ejected"]);
    assert_eq!(ejected.len(), 1, "{stderr}");
    assert!(
        ejected[0].contains("upstream=dead") && ejected[0].contains("rest_secs=7"),
        "{stderr}"
    );
}

/// An HTTP/2 stream the client leaves unread is cut (its upstream request
/// cancelled) with `end="cut"` in its access line and no WARN: a client can
/// cause it at will.
#[tokio::test]
async fn an_unread_h2c_stream_cut_is_logged_as_cut_without_a_warning() {
    let (child, addr) = start_proxy(
        "unread-cut-log",
        "send_timeout_ms = 1000\naccess_log = true\ndrain_timeout_secs = 2\n\
         [[upstream]]\nname = \"m\"\nmock = {}\n",
        "warn,llm_proxy::access=info",
    )
    .await;
    let sender = tests::h2c_small_window(addr).await;
    // A stream waiting for its upstream beside the unread one keeps the
    // connection (one whose every stream stalled is closed): sent first, so
    // that it does even on a machine slow to send the second.
    let waiting = tokio::spawn(sender.clone().send_request(tests::streamed_chat_h2(
        addr,
        &[
            ("x-mock-latency-ms", "3000"),
            ("x-request-id", "req-waits-2"),
        ],
    )));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let unread = sender
        .clone()
        .send_request(tests::streamed_chat_h2(
            addr,
            &[
                ("x-mock-tokens", "1000000"),
                ("x-request-id", "req-unread-1"),
            ],
        ))
        .await
        .expect("a head");
    assert_eq!(unread.status(), 200);
    let waiting = waiting.await.unwrap().expect("a head");
    let (body, broke) = read_stream(waiting).await;
    assert!(!broke && String::from_utf8_lossy(&body).contains("data: [DONE]"));
    let (_, broke) = read_stream(unread).await;
    assert!(broke, "the unread stream was cut");
    let stderr = stderr_after_term(child, "proxy exits on SIGTERM").await;
    assert!(!stderr.contains(" WARN "), "no warning: {stderr}");
    let cut = lines_with(&stderr, &["llm_proxy::access", "req-unread-1"]);
    assert_eq!(cut.len(), 1, "{stderr}");
    assert!(
        cut[0].contains("end=\"cut\"") || cut[0].contains("end=cut"),
        "{stderr}"
    );
}

/// A backend a health check marks down is logged at `warn` with why (a
/// wrong `tls_ca_file` or an expired certificate is found out there, with
/// no request to fail), once, not at every probe; up again at `info`.
#[tokio::test]
async fn a_backend_a_probe_marks_down_is_logged_with_why() {
    let dead = dead_port().await;
    let (child, addr) = start_proxy(
        "probe_down",
        &format!(
            "[[upstream]]\nname = \"gone\"\nurl = \"http://127.0.0.1:{dead}/v1\"\n\
             [balance]\nhealth_check_secs = 0.1\n"
        ),
        "warn",
    )
    .await;
    let readyz = format!("http://{addr}/readyz");
    until_ok("the probe marks the upstream down", || {
        let readyz = readyz.clone();
        async move {
            match send(request(Method::GET, &readyz, &[], "")).await.status {
                http::StatusCode::SERVICE_UNAVAILABLE => Ok(()),
                other => Err(other),
            }
        }
    })
    .await;
    // More probes fail after the first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stderr = stderr_after_term(child, "the proxy stops").await;
    let down = lines_with(
        &stderr,
        &["health check failed: marked down", "upstream=gone"],
    );
    assert_eq!(down.len(), 1, "once: {stderr}");
    // (The port accepts and closes every connection.)
    assert!(
        down[0].contains("reason=upstream `gone` failed: request failed"),
        "{stderr}"
    );
}

/// An https upstream whose certificate the proxy does not trust: the
/// client's 502 says so in a word, and the log says why at `warn` (once
/// per period, not per request), beside the probe's "marked down".
#[tokio::test]
async fn a_tls_failure_is_logged_with_why_at_warn() {
    let (acceptor, _pem) = tls_acceptor();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    let (child, addr) = start_proxy(
        "tls_warn",
        &format!(
            "[[upstream]]\nname = \"untrusted\"\nurl = \"https://localhost:{port}/v1\"\n\
             [balance]\nhealth_check_secs = 0.1\nmax_retries = 0\n"
        ),
        "warn",
    )
    .await;
    let url = format!("http://{addr}/v1/chat/completions");
    for _ in 0..3 {
        let answer = post_json(&url, &chat("m", false)).await;
        assert_eq!(answer.status, 502, "{}", answer.text());
        assert!(
            answer.text().contains("certificate was not accepted"),
            "{}",
            answer.text()
        );
    }
    let stderr = stderr_after_term(child, "the proxy stops").await;
    let tls = lines_with(
        &stderr,
        &["TLS with the upstream failed", "upstream=untrusted"],
    );
    assert_eq!(tls.len(), 1, "once a period: {stderr}");
    assert!(tls[0].contains("UnknownIssuer"), "{stderr}");
    let down = lines_with(
        &stderr,
        &["health check failed: marked down", "upstream=untrusted"],
    );
    assert_eq!(down.len(), 1, "{stderr}");
    server.abort();
}
