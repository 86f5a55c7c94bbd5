//! The llm-proxy binary: `llm-proxy --config FILE`.
//!
//! `llm-proxy --check --config FILE` (nginx's `-t`, Envoy's
//! `--mode validate`) reads the config and builds the stack as a start
//! would, then exits 0 (`… is valid` on stderr) or 2 with the error,
//! serving nothing and binding no port.
//!
//! Reads the TOML config (DESIGN.md), builds the stack and serves it until
//! SIGTERM/SIGINT, then drains in-flight requests and exits 0 (a second
//! signal during the drain, 100 ms or more after the first, stops at once,
//! exit code 1; SIGHUP is logged and ignored). Requests are
//! served by one thread per CPU (`workers`), each with its own runtime. A config error
//! is one line on stderr and exit code 2. Logs go to stderr; set `RUST_LOG`
//! (e.g. `RUST_LOG=llm_proxy=debug`) for more.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use llm_proxy::Proxy;
use llm_proxy::config::Settings;

// mimalloc: the proxy allocates a few small buffers per request (hyper's read
// buffers, header maps, futures); see docs/BENCHMARKS.md for the A/B. Built
// without transparent huge pages (`no_thp`): with them, idle RSS is 16 MiB
// instead of 7, for no measurable speed. Version 2 of the C library (`v2`):
// the crate's default, version 3, serves every allocation over 1 KiB (a boxed
// future, hyper's buffers) by over-allocating for alignment, a slow path
// that v2 takes only for alignments over 16 (docs/BENCHMARKS.md, session 12).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `eprintln!` that cannot panic: a stderr nobody reads any more (a log
/// pipe whose reader went, a full disk) must not end the process, least of
/// all in the middle of a drain. What cannot be written is lost.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

const USAGE: &str = "usage: llm-proxy [--check] --config FILE   (also --version, --help)";

/// A shutdown signal this soon after the first is the first sent twice,
/// not a second one that stops the drain.
const REPEAT_WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut check = false;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        match flag {
            "--config" | "-c" => {
                if config.is_some() {
                    say!("llm-proxy: --config given twice. {USAGE}");
                    return ExitCode::from(2);
                }
                let Some(value) = inline.or_else(|| args.next()).filter(|v| !v.is_empty()) else {
                    say!("llm-proxy: --config needs a file. {USAGE}");
                    return ExitCode::from(2);
                };
                config = Some(PathBuf::from(value));
            }
            "--check" | "-t" if inline.is_none() => check = true,
            "--help" | "-h" => {
                let _ = writeln!(std::io::stdout(), "{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" | "-V" => {
                let _ = writeln!(std::io::stdout(), "llm-proxy {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => {
                say!("llm-proxy: unknown argument `{other}`. {USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(config) = config else {
        say!("llm-proxy: --config FILE is required. {USAGE}");
        return ExitCode::from(2);
    };
    let settings = match Settings::from_file(&config) {
        Ok(s) => s,
        Err(e) => {
            say!("llm-proxy: config error: {e}");
            return ExitCode::from(2);
        }
    };
    if check {
        return check_build(settings, &config);
    }
    init_logs("info");
    // Each request in flight holds a client and an upstream connection
    // (and an HTTP/2 connection may carry 128 requests): the usual soft
    // limit of 1024 descriptors is a few hundred requests. As nginx's
    // `worker_rlimit_nofile`, take what the hard limit allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }

    // The main thread's runtime runs the signal handler, `metrics_listen`,
    // and what the build spawns; requests are served by `workers` shard
    // threads, each with its own runtime (Proxy::serve_sharded).
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        // Listening for SIGTERM/SIGINT before anything is served: a signal
        // that comes early is kept, and does not kill the process.
        let mut signals = match llm_proxy::ShutdownSignals::new() {
            Ok(s) => s,
            Err(e) => {
                say!("llm-proxy: cannot listen for signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = settings.listen;
        let listener = match llm_proxy::listen(addr) {
            Ok(l) => l,
            Err(e) => {
                say!("llm-proxy: cannot listen on {addr} (`listen`): {e}");
                return ExitCode::FAILURE;
            }
        };
        // Both ports before anything is served: a replacement started
        // while the old process drains (which keeps `metrics_listen` open
        // to the end, for its readiness probe) fails here, at once.
        let mut metrics_listener = None;
        if let Some(at) = settings.metrics_listen {
            match llm_proxy::listen(at) {
                Ok(l) => metrics_listener = Some(l),
                Err(e) => {
                    say!("llm-proxy: cannot listen on {at} (`metrics_listen`): {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let mut proxy = match Proxy::build(settings).await {
            Ok(p) => p,
            Err(e) => {
                say!("llm-proxy: {e}");
                return ExitCode::from(2);
            }
        };
        if let Some(metrics_listener) = metrics_listener {
            proxy = proxy.with_metrics_listener(metrics_listener);
        }
        // The port bound (a configured port 0 is the system's pick).
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, workers = proxy.settings().workers, "llm-proxy listening");
        // The first SIGTERM/SIGINT drains; a second one stops at once (as
        // nginx's fast shutdown), for an operator who will not wait.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let drain = async move {
            let _ = first_rx.await;
        };
        let second = async move {
            signals.recv().await;
            let first = tokio::time::Instant::now();
            let _ = first_tx.send(());
            // One signal sent twice (GNU `timeout` signals the process,
            // then its process group; systemd's `KillMode=mixed` too) is
            // not an operator's second: only one that comes later counts.
            loop {
                signals.recv().await;
                if first.elapsed() >= REPEAT_WINDOW {
                    break;
                }
                tracing::info!("the same signal again at once: still draining");
            }
        };
        tokio::select! {
            served = proxy.serve_sharded(listener, drain) => match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    say!("llm-proxy: {e}");
                    ExitCode::FAILURE
                }
            },
            () = second => {
                say!("llm-proxy: a second signal: stopping without finishing the drain");
                // Not a return: the runtime's drop would wait for its
                // blocking threads.
                std::process::exit(1);
            }
        }
    })
}

/// `--check`: the stack built as a start builds it (TLS roots, keys,
/// stores; a Redis that refuses the proxy is an error, one that does not
/// answer only a warning, as at a start), then dropped. Logs only warnings:
/// nothing is served.
fn check_build(settings: Settings, config: &std::path::Path) -> ExitCode {
    init_logs("warn");
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        match Proxy::build(settings).await {
            Ok(_) => {
                say!("llm-proxy: config {} is valid", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                say!("llm-proxy: {e}");
                ExitCode::from(2)
            }
        }
    })
}

/// Logs to stderr, at `default` unless `RUST_LOG` says otherwise.
fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written is lost, not reported with
        // `eprintln!`, which would panic on the same broken stderr (a log
        // pipe whose reader went) and end the process.
        .log_internal_errors(false)
        // Colour only for a terminal: escape codes in a log file or a
        // collector's stream are noise to grep and to parsers.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The main thread's runtime.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            say!("llm-proxy: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}
