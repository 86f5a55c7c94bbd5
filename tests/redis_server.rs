//! A real `redis-server` per test, on a free loopback port.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A redis-server started for one test; killed when dropped.
pub struct RedisServer {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one (no persistence), waiting until it answers. Fails, naming the
    /// install command, when `redis-server` is not installed.
    ///
    /// The port is found free and then given to redis-server, so another
    /// process may take it in between: then this redis-server exits (and a
    /// PONG on that port may be another test's Redis), and a new port is
    /// tried.
    pub async fn start() -> RedisServer {
        for _ in 0..5 {
            let port = crate::free_port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start redis-server ({e}): install it with `apt-get install redis-server` (scripts/test does)")
                });
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
            let mut server = RedisServer {
                addr,
                child: Some(child),
            };
            if server.wait_ready().await {
                return server;
            }
            server.stop();
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Whether this redis-server answers on its port (false: it exited,
    /// its port taken by another process).
    async fn wait_ready(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.exited() {
                return false;
            }
            if let Ok(mut s) = tokio::net::TcpStream::connect(self.addr).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(n)) if buf[..n].starts_with(b"+PONG"))
                {
                    // The PONG may be from a server that already held the
                    // port; ours then exits soon after its failed bind.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return !self.exited();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on {} did not start",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Start it again on its port, after [`RedisServer::stop`] (a Redis
    /// that comes back), empty; waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.addr.port().to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        assert!(
            self.wait_ready().await,
            "redis-server came back on {}",
            self.addr
        );
    }

    /// Stop it now (to test what happens when Redis goes away).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
