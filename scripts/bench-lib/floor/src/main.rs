//! The floor of a Rust reverse proxy on hyper: what `scripts/bench --floor`
//! runs beside nginx and llm-proxy.
//!
//! Built as llm-proxy's server and upstream pool are (one current-thread
//! runtime per thread, `SO_REUSEPORT` listeners, `TCP_NODELAY`, HTTP/1.1
//! with `writev` off, kept-alive upstream connections per thread, the
//! request body buffered, the response streamed), with nothing else: no
//! parsing of the body, no headers changed, no timeouts, no metrics, no
//! error answers. A failed upstream exchange drops the client's connection.
//!
//! `hyper-floor LISTEN UPSTREAM [THREADS]`, addresses as `127.0.0.1:8080`.
//! SIGINT or SIGTERM ends it with `exit(0)`, so that a build instrumented
//! for PGO (`scripts/build-pgo --floor`) writes its profile.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A thread's idle upstream connections.
type Pool = Rc<RefCell<Vec<SendRequest<Full<Bytes>>>>>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (listen, upstream, threads) = match args.as_slice() {
        [l, u] => (l.parse()?, u.parse()?, 1),
        [l, u, t] => (l.parse()?, u.parse()?, t.parse()?),
        _ => return Err("usage: hyper-floor LISTEN UPSTREAM [THREADS]".into()),
    };
    std::thread::spawn(exit_on_signal);
    let threads: Vec<_> = (0..threads)
        .map(|_| std::thread::spawn(move || shard(listen, upstream)))
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "a thread panicked")??;
    }
    Ok(())
}

/// Exits the process (its `atexit` handlers run) on SIGINT or SIGTERM.
fn exit_on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return;
    };
    let signalled = runtime.block_on(async {
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return false;
        };
        tokio::select! {
            _ = int.recv() => true,
            _ = term.recv() => true,
        }
    });
    if signalled {
        std::process::exit(0);
    }
}

/// One thread: its own listener on the shared port, runtime and pool.
fn shard(listen: SocketAddr, upstream: SocketAddr) -> Result<(), BoxError> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&listen.into())?;
    socket.listen(1024)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        let pool = Pool::default();
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                let service =
                    hyper::service::service_fn(move |req| forward(req, pool.clone(), upstream));
                let _ = hyper::server::conn::http1::Builder::new()
                    .writev(false)
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}

/// Send `req` upstream on an idle connection (or a new one) and answer with
/// the upstream's response, its body streamed.
async fn forward(
    req: Request<Incoming>,
    pool: Pool,
    upstream: SocketAddr,
) -> Result<Response<Incoming>, BoxError> {
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = http::Uri::try_from(path)?;
    let mut sender = checkout(&pool, upstream).await?;
    let response = sender
        .send_request(Request::from_parts(parts, Full::new(body)))
        .await?;
    // Back in the pool at once: it is taken again only once ready, that is
    // once this response's body has been read.
    pool.borrow_mut().push(sender);
    Ok(response)
}

async fn checkout(pool: &Pool, upstream: SocketAddr) -> Result<SendRequest<Full<Bytes>>, BoxError> {
    let ready = {
        let mut idle = pool.borrow_mut();
        idle.retain(|s| !s.is_closed());
        let at = idle.iter().position(SendRequest::is_ready);
        at.map(|i| idle.swap_remove(i))
    };
    if let Some(sender) = ready {
        return Ok(sender);
    }
    let tcp = tokio::net::TcpStream::connect(upstream).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::task::spawn_local(conn);
    Ok(sender)
}
