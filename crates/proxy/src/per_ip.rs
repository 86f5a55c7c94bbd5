//! `max_connections_per_ip`: how many connections one client address may
//! hold at once (nginx's `limit_conn` keyed by `$binary_remote_addr`,
//! Envoy's connection limit filter keyed by the peer).
//!
//! `max_connections` bounds all connections together, so without this one
//! client could open all of them (and, over HTTP/2, 128 streams on each)
//! while every other client waited in the accept queue. A connection past
//! its address's limit is closed as soon as it is accepted, before a byte of
//! it is read, as Envoy's filter closes it: answering it over HTTP would
//! mean reading its request (for up to the header timeout) with the very
//! resources the limit protects. The count is taken at accept, before the
//! connection is handed to another server thread, in one map shared by all
//! of them: two short lock holds per connection (its accept and its end),
//! none per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The connections each client address holds, and the limit.
#[derive(Debug)]
pub(crate) struct PerIp {
    limit: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
    /// Connections closed at accept for their address's limit.
    refused: AtomicU64,
}

/// One connection of an address, counted until dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A limit of `limit` connections per address; `None` for `0` (no limit).
    pub(crate) fn new(limit: usize) -> Option<Arc<PerIp>> {
        (limit > 0).then(|| {
            Arc::new(PerIp {
                limit,
                held: Mutex::default(),
                refused: AtomicU64::new(0),
            })
        })
    }

    /// Count a connection from `ip`, or `None` when `ip` holds its limit
    /// already (the connection is then to be closed). An IPv4 address
    /// mapped into IPv6 (a dual-stack socket's `::ffff:a.b.c.d`) counts as
    /// the IPv4 address it is.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(ip).or_insert(0);
        if *count >= self.limit {
            drop(held);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }

    /// Connections closed for their address's limit so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Addresses holding a connection now.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut held = self
            .per_ip
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // An address without connections leaves the map: it holds only
        // the addresses connected now, not every one ever seen.
        if let Some(count) = held.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// `llm_proxy_connections_refused_total{reason="per_ip_limit"}`.
pub(crate) fn metrics(per_ip: Arc<PerIp>) -> crate::metrics::Source {
    Box::new(move || {
        vec![crate::metrics::Series {
            name: "connections_refused",
            help: "Client connections closed as they were accepted",
            counter: true,
            samples: vec![(
                vec![("reason", "per_ip_limit".to_owned())],
                per_ip.refused(),
            )],
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_holds_at_most_its_limit_and_leaves_the_map_when_done() {
        assert!(PerIp::new(0).is_none());
        let per_ip = PerIp::new(2).unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = per_ip.admit(a).unwrap();
        let second = per_ip.admit(a).unwrap();
        assert!(per_ip.admit(a).is_none());
        // The same address through a dual-stack socket.
        assert!(per_ip.admit("::ffff:10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(per_ip.refused(), 2);
        let other = per_ip.admit(b).unwrap();
        drop(first);
        let third = per_ip.admit(a).unwrap();
        assert_eq!(per_ip.addresses(), 2);
        drop((second, third, other));
        assert_eq!(per_ip.addresses(), 0);
        assert_eq!(per_ip.refused(), 2);
    }
}
