//! A TCP relay on 127.0.0.1 that can go silent: what a client sees when the
//! far end vanishes without closing (a host gone, a NAT or firewall that
//! dropped the connection's state). Frozen connections stay open and pass
//! nothing, in either direction; connections made after the freeze pass
//! data as usual.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A relay to one target; stops (closing everything) when dropped.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bumped by [`Relay::freeze`]: a connection accepted in an earlier
    /// epoch passes nothing it reads from then on.
    epoch: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    target: Arc<Mutex<SocketAddr>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relay every connection to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (epoch, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(Mutex::new(target));
        let task = tokio::spawn({
            let epoch = epoch.clone();
            let accepted = accepted.clone();
            let target = target.clone();
            async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let epoch = epoch.subscribe();
                    let to = *target.lock().expect("not poisoned");
                    conns.spawn(relay_one(client, to, epoch));
                }
            }
        });
        Relay {
            addr,
            epoch,
            accepted,
            target,
            task,
        }
    }

    /// Freeze every connection open now: they stay open and pass nothing.
    pub fn freeze(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Relay connections made from now on to `target` (an address that
    /// moved, as a failover moves a DNS name); open ones stay where they are.
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().expect("not poisoned") = target;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// `redis://` URL of the relay.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_one(mut client: TcpStream, target: SocketAddr, epoch: watch::Receiver<u64>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let born = *epoch.borrow();
    // Checked after every read, before its bytes are passed on: nothing read
    // after `freeze` returned goes through.
    let frozen = || *epoch.borrow() != born;
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    tokio::join!(
        pipe(&mut cr, &mut sw, &frozen),
        pipe(&mut sr, &mut cw, &frozen)
    );
}

async fn pipe(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    frozen: &impl Fn() -> bool,
) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(_) if frozen() => {
                // Silent for good: hold both sockets open, pass nothing.
                std::future::pending::<()>().await;
            }
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
