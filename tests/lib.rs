//! Shared helpers for the end-to-end tests: spawn mock upstreams and a proxy
//! on 127.0.0.1, send requests over real sockets, read streams chunk by chunk,
//! run the example binaries.
#![forbid(unsafe_code)]

pub mod redis_server;
pub mod relay;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
pub use llm_proxy_mock::{Failure, Mock, MockConfig, MockServer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An HTTP/2 (prior knowledge, h2c) client connection to `addr`, its
/// connection driven by a spawned task (returned, for tests that watch it
/// end).
pub async fn h2c<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    (sender, tokio::spawn(conn))
}

/// An h2c connection to `addr` whose streams' windows are HTTP/2's
/// default (64 KiB): a stream the client does not read fills it soon.
pub async fn h2c_small_window(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

/// A streamed chat request to the proxy at `addr`, with `headers` (the
/// mock's knobs).
pub fn streamed_chat_h2(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(http_body_util::Full::new(bytes::Bytes::from(chat(
        "m", true,
    ))))
    .unwrap()
}

/// Generous bound for anything that should happen "now": catches hangs only.
pub const HANG: Duration = Duration::from_secs(10);

/// Spawn a mock upstream with `config` on 127.0.0.1.
pub async fn mock(config: MockConfig) -> MockServer {
    llm_proxy_mock::spawn(Mock::new(config))
        .await
        .expect("bind a mock upstream on 127.0.0.1")
}

/// Spawn a mock upstream named `name` that streams `tokens_per_second`.
pub async fn paced_mock(name: &str, tokens_per_second: f64) -> MockServer {
    mock(MockConfig {
        name: name.to_owned(),
        tokens_per_second: Some(tokens_per_second),
        ..MockConfig::default()
    })
    .await
}

/// Spawn a default mock upstream named `name`.
pub async fn mock_named(name: &str) -> MockServer {
    mock(MockConfig {
        name: name.to_owned(),
        ..MockConfig::default()
    })
    .await
}

/// A proxy running on 127.0.0.1 for one test.
pub struct TestProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The proxy's service, to call in-process beside the server.
    pub service: llm_proxy::ProxyService,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestProxy {
    /// `http://127.0.0.1:port` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let answer = send(request(Method::GET, &self.url("/metrics"), &[], "")).await;
        assert_eq!(answer.status, 200, "GET /metrics: {}", answer.text());
        answer.text()
    }

    /// Start the graceful shutdown (as SIGTERM would) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Whether `serve` is still running (a drain waits for connections).
    pub fn is_serving(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Shut down and wait for `serve` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.begin_shutdown();
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(HANG, task)
            .await
            .expect("proxy stopped in time")
            .expect("proxy task did not panic")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Start a proxy from config text (its `listen` is ignored: the proxy gets a
/// free port on 127.0.0.1).
pub async fn proxy(toml: &str) -> TestProxy {
    let settings = llm_proxy::config::Settings::from_str(Path::new("test.toml"), toml)
        .unwrap_or_else(|e| panic!("test config is valid: {e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let proxy = llm_proxy::Proxy::build(settings)
        .await
        .expect("proxy builds");
    let service = proxy.service();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(listener, async move {
        let _ = rx.await;
    }));
    TestProxy {
        addr,
        service,
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// Config text for one upstream at `url`, plus extra top-level lines.
pub fn one_upstream(url: &str, extra_upstream_keys: &str) -> String {
    format!("[[upstream]]\nname = \"up\"\nurl = \"{url}\"\n{extra_upstream_keys}\n")
}

/// A plain HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A whole response.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is JSON ({e}): {:?}", self.body))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert an OpenAI-style error with this status, type and code.
    pub fn assert_error(&self, status: u16, kind: &str, code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            self.text()
        );
        let json = self.json();
        assert_eq!(json["error"]["type"], kind, "type; body: {json}");
        assert_eq!(json["error"]["code"], code, "code; body: {json}");
        assert!(
            json["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert!(
            json["error"].get("param").is_some(),
            "param present (may be null)"
        );
    }
}

/// Build a request.
pub fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).expect("valid test request")
}

/// Send and read the whole answer (bounded by [`HANG`]).
pub async fn send(req: Request<Full<Bytes>>) -> Answer {
    tokio::time::timeout(HANG, async {
        let resp = client().request(req).await.expect("request sent");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body read").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    })
    .await
    .expect("answer in time")
}

/// POST JSON to `url`.
pub async fn post_json(url: &str, body: &str) -> Answer {
    send(request(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body.to_owned(),
    ))
    .await
}

/// A chat request body for `model`.
pub fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say something deterministic."}],
    })
    .to_string()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("data:")
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                })
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Wait until `cond` holds, polling; panics after [`HANG`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Call `attempt` until it succeeds (every 50 ms); the test fails, naming
/// `what` and the last error, after `HANG`.
pub async fn until_ok<T, E, F, Fut>(what: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + HANG;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what} after {HANG:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The path of an example binary, built (debug) if needed.
pub fn example_binary(name: &str) -> PathBuf {
    let root = workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let path = target.join("debug").join("examples").join(name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "-p", "examples", "--example", name])
        .current_dir(&root)
        .status()
        .expect("run cargo build for the example");
    assert!(status.success(), "cargo build --example {name} failed");
    assert!(path.exists(), "example binary at {}", path.display());
    path
}

/// A free port on 127.0.0.1 (bound and released: a tiny race, fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Wait until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chat completion for model `m` through the proxy `p`: its answer's
/// head, the body still to read (with [`read_stream`] when it may break).
pub async fn chat_through(p: &TestProxy, stream: bool) -> http::Response<hyper::body::Incoming> {
    client()
        .request(request(
            http::Method::POST,
            &p.url("/v1/chat/completions"),
            &[("content-type", "application/json")],
            chat("m", stream),
        ))
        .await
        .expect("response head")
}

/// Send `req`, whose answer must be a `200` stream that breaks (its
/// connection closed before a clean end, as a cut stream must): the bytes
/// the client got.
pub async fn a_broken_stream(req: Request<Full<Bytes>>) -> Bytes {
    let uri = req.uri().clone();
    let resp = client().request(req).await.expect("response head");
    assert_eq!(resp.status(), 200, "{uri}");
    let (bytes, broke) = read_stream(resp).await;
    assert!(
        broke,
        "{uri}: the connection is closed, never a clean end: {}",
        String::from_utf8_lossy(&bytes)
    );
    bytes
}

/// Read a streamed body to its end: the bytes received, and whether it ended
/// with an error (a broken connection) rather than cleanly.
pub async fn read_stream(resp: http::Response<hyper::body::Incoming>) -> (Bytes, bool) {
    read_stream_within(resp, HANG).await
}

/// [`read_stream`] with its own bound, for a body too big to be read by
/// [`HANG`] on a loaded machine.
pub async fn read_stream_within(
    resp: http::Response<hyper::body::Incoming>,
    within: Duration,
) -> (Bytes, bool) {
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let broke = tokio::time::timeout(within, async {
        loop {
            match body.frame().await {
                None => return false,
                Some(Err(_)) => return true,
                Some(Ok(frame)) => {
                    if let Some(d) = frame.data_ref() {
                        data.extend_from_slice(d);
                    }
                }
            }
        }
    })
    .await
    .expect("the stream ended in time");
    (Bytes::from(data), broke)
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start an example binary with `args`, stdout and stderr captured.
pub fn run_example(name: &str, args: &[&str]) -> Child {
    run_example_logging(name, args, "warn")
}

/// [`run_example`] with `RUST_LOG` set to `log`.
pub fn run_example_logging(name: &str, args: &[&str], log: &str) -> Child {
    let child = std::process::Command::new(example_binary(name))
        .args(args)
        .env("RUST_LOG", log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the example");
    Child(child)
}

/// A scratch directory under the system temp dir, unique to this test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llm-proxy-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The SDK tests' Python (`.venv` at the workspace root, made by
/// `scripts/test`), or a failure that says how to make it.
pub fn venv_python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "the Python SDK tests need the virtualenv: run `scripts/test`, or \
         `python3 -m venv .venv && .venv/bin/pip install -r tests/python/requirements.txt`"
    );
    python
}

/// Run `tests/python/<script> <arg>` with the venv's Python; fail with its
/// output when it fails.
pub async fn run_python(script: &str, arg: String) {
    let python = venv_python();
    let script = workspace_root().join("tests/python").join(script);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(&script)
            .arg(arg)
            .output()
            .expect("run python")
    })
    .await
    .expect("the python task did not panic");
    assert!(
        out.status.success(),
        "SDK checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Everything the proxy sends until it closes the connection (EOF or
/// reset); `None` if it is still open after [`HANG`].
pub async fn read_until_closed(conn: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(HANG, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| answer)
}

/// [`read_until_closed`] as text, which must come.
pub async fn answer_text(conn: &mut tokio::net::TcpStream) -> String {
    let answer = read_until_closed(conn).await.expect("answered and closed");
    String::from_utf8_lossy(&answer).into_owned()
}

/// An HTTP/1.1 answer with a JSON `body`, as a raw upstream writes it:
/// `status` (`"200 OK"`), then `headers` (each line ending in `\r\n`).
pub fn json_answer(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{headers}\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A raw HTTP/1.1 `POST /v1/chat/completions` of the JSON `body`, with its
/// length, as a client writes it on a socket.
pub fn raw_chat_post(body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// With the proxy `p` (one upstream, ejected after one failure, two
/// retries) out of file descriptors, a chat request is a 503
/// `server_overloaded` with `retry-after: 1`, and no failure of the
/// upstream's: `/readyz` stays 200 and the next request, with descriptors
/// free again, is served. Lowers this process's `RLIMIT_NOFILE` for a
/// moment (each test runs in its own process under nextest).
pub async fn out_of_descriptors_is_503_and_no_failure(p: &TestProxy) {
    use tokio::io::AsyncWriteExt;
    async fn read_answer(conn: &mut tokio::net::TcpStream) -> String {
        let (head, body) = read_request(conn).await.expect("an answer");
        format!("{head}{}", String::from_utf8_lossy(&body))
    }
    // A connection made before the limit, with a request on it: the
    // proxy's side of it is open.
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    conn.write_all(get("/healthz").as_bytes()).await.unwrap();
    assert!(read_answer(&mut conn).await.starts_with("HTTP/1.1 200"));

    // Take every descriptor left under a limit just above the highest one
    // open: the next socket the proxy asks for is refused (EMFILE).
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, highest + 1, hard).unwrap();
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
    }
    let chat_request = raw_chat_post(&chat("m", false));
    conn.write_all(chat_request.as_bytes()).await.unwrap();
    let refused = read_answer(&mut conn).await;
    drop(held);
    rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard).unwrap();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("retry-after: 1"), "{refused}");
    assert!(
        refused.contains("\"code\":\"server_overloaded\""),
        "{refused}"
    );

    // Descriptors free again: the upstream was never out.
    conn.write_all(get("/readyz").as_bytes()).await.unwrap();
    let ready = read_answer(&mut conn).await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    conn.write_all(chat_request.as_bytes()).await.unwrap();
    let served = read_answer(&mut conn).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let metrics = p.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("llm_proxy_upstream_failures_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// Read a request's head off `conn`; `false` if the connection ends first.
pub async fn read_request_head(conn: &mut tokio::net::TcpStream) -> bool {
    let mut buf = vec![0u8; 8192];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(conn, &mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// The value of header `name` (any case) in a raw request or response
/// `head`, trimmed.
pub fn head_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Read one request off `conn`: its head, and its body by its
/// `content-length` (none: empty); `None` if the connection ends first.
pub async fn read_request(conn: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = vec![0u8; 8192];
    let mut seen = Vec::new();
    let head_end = loop {
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match tokio::io::AsyncReadExt::read(conn, &mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).into_owned();
    let length: usize = head_value(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = seen[head_end..].to_vec();
    while body.len() < length {
        match tokio::io::AsyncReadExt::read(conn, &mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    Some((head, body))
}

/// An upstream answering every request with `answer(body)`: status and
/// body, written an event at a time (closing the connection after). A
/// `200` is an event stream, unless its body is a JSON object.
pub async fn sse_upstream(
    answer: impl Fn(&[u8]) -> (u16, String) + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let answer = std::sync::Arc::new(answer);
    raw_upstream(move |mut conn| {
        let answer = answer.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let Some((_, body)) = read_request(&mut conn).await else {
                return;
            };
            let (status, text) = answer(&body);
            let kind = if status == 200 && !text.starts_with('{') {
                "text/event-stream"
            } else {
                "application/json"
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                text.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            // An event at a time, as a server streams them.
            for event in text.split_inclusive("\n\n") {
                let _ = conn.write_all(event.as_bytes()).await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    })
    .await
}

/// The port of an upstream that is down: every connection it accepts is
/// closed at once, unanswered. Unlike a port found free and left unbound, no
/// other test's server can take it meanwhile.
pub async fn dead_port() -> u16 {
    raw_upstream(|conn| async move { drop(conn) }).await.port()
}

/// An upstream on 127.0.0.1 that hands each connection to `serve`, raw.
pub async fn raw_upstream<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(conn));
        }
    });
    addr
}

/// A WebSocket client for `/v1/responses`, as Codex uses it.
pub mod ws {
    use std::net::SocketAddr;

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpStream;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};

    use crate::HANG;

    /// A client's WebSocket.
    pub type Socket = WebSocketStream<TcpStream>;

    /// Open a WebSocket to the proxy at `addr`: `/v1/responses` with extra headers: the
    /// socket and the `101` head, or the refusal's status and body.
    pub async fn connect(
        addr: SocketAddr,
        headers: &[(&str, &str)],
    ) -> Result<(Socket, http::Response<Option<Vec<u8>>>), (u16, String)> {
        let mut req = format!("ws://{addr}/v1/responses")
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        let opened = tokio::time::timeout(HANG, tokio_tungstenite::client_async(req, tcp))
            .await
            .expect("the upgrade is answered");
        match opened {
            Ok((socket, head)) => Ok((socket, head)),
            Err(WsError::Http(resp)) => {
                let body = resp.body().clone().unwrap_or_default();
                Err((
                    resp.status().as_u16(),
                    String::from_utf8_lossy(&body).into(),
                ))
            }
            Err(e) => panic!("unexpected handshake error: {e}"),
        }
    }

    /// The next text message, as JSON (other messages skipped).
    pub async fn next_event(socket: &mut Socket) -> serde_json::Value {
        loop {
            let next = tokio::time::timeout(HANG, socket.next())
                .await
                .expect("a message in time")
                .expect("the socket stays open")
                .expect("a readable message");
            if let Message::Text(text) = next {
                return serde_json::from_str(text.as_str()).expect("a JSON message");
            }
        }
    }

    /// Send one `response.create` turn and read its events up to the last
    /// (`response.completed`, or an `error`).
    pub async fn turn(socket: &mut Socket, body: serde_json::Value) -> Vec<serde_json::Value> {
        let mut message = body;
        message["type"] = "response.create".into();
        socket
            .send(Message::text(message.to_string()))
            .await
            .unwrap();
        let mut events = Vec::new();
        loop {
            let event = next_event(socket).await;
            let last = matches!(event["type"].as_str(), Some("response.completed" | "error"));
            events.push(event);
            if last {
                return events;
            }
        }
    }

    /// Whether the socket ends (a close, an error, or the end) within `HANG`.
    pub async fn ends(socket: &mut Socket) -> bool {
        let reading = async {
            loop {
                match socket.next().await {
                    None | Some(Err(_) | Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        };
        tokio::time::timeout(HANG, reading).await.is_ok()
    }
}

/// A TLS acceptor with a self-signed certificate for `localhost` that
/// offers h2 and http/1.1 by ALPN, and the certificate's PEM.
pub fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let pem = cert.cert.pem();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let chain = vec![CertificateDer::from(cert.cert.der().to_vec())];
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
        pem,
    )
}
