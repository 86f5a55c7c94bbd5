//! A deterministic OpenAI-compatible mock LLM on a port, for the demo config
//! and for benchmarks: `cargo run -p examples --example mock_server --
//! --listen 127.0.0.1:9001 --tokens-per-second 50`.
//!
//! It serves HTTP/1.1 and h2c at `http://ADDR/v1` until Ctrl-C: OpenAI's chat
//! completions, completions, embeddings and Responses APIs and Anthropic's
//! Messages API, or only those named by `--api` (repeatable:
//! `chat-completions`, `completions`, `embeddings`, `responses`, `messages`),
//! to play a server that speaks only some. Requests can ask for failures and
//! latency with `x-mock-*` headers (see the `llm-proxy-mock` crate docs).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use llm_proxy_mock::{Mock, MockApi, MockConfig};

const USAGE: &str = "usage: mock_server [--listen ADDR] [--latency-ms N] [--tokens-per-second F] \
                     [--model NAME]... [--name NAME] [--api API]...\n\
                     APIs: chat-completions, completions, embeddings, responses, messages \
                     (default: all)";

/// The command line, parsed.
struct Args {
    listen: SocketAddr,
    config: MockConfig,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 9001));
    let mut config = MockConfig::default();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        let mut value = || args.next().ok_or_else(|| format!("`{flag}` needs a value"));
        match flag.as_str() {
            "--listen" => {
                let value = value()?;
                listen = value.parse().map_err(|_| {
                    format!("--listen: `{value}` is not an address like 127.0.0.1:9001")
                })?;
            }
            "--latency-ms" => {
                let value = value()?;
                let ms = value
                    .parse()
                    .map_err(|_| format!("--latency-ms: `{value}` is not a whole number"))?;
                config.latency = Duration::from_millis(ms);
            }
            "--tokens-per-second" => {
                let value = value()?;
                let tps: f64 = value
                    .parse()
                    .map_err(|_| format!("--tokens-per-second: `{value}` is not a number"))?;
                if !(tps.is_finite() && tps > 0.0) {
                    return Err(format!("--tokens-per-second: `{value}` must be above 0"));
                }
                config.tokens_per_second = Some(tps);
            }
            "--model" => config.models.push(value()?),
            "--name" => config.name = value()?,
            "--api" => {
                let api: MockApi = value()?.parse().map_err(|e| format!("--api: {e}"))?;
                config.apis.get_or_insert_with(Vec::new).push(api);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Some(Args { listen, config }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("mock_server: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("mock_server: cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    println!("mock LLM listening on http://{addr}/v1");
    tokio::select! {
        () = llm_proxy_mock::serve(listener, Mock::new(args.config)) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    ExitCode::SUCCESS
}
