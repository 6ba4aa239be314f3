//! Connection caps: TCP in all and per client address, and a budget of the unix
//! socket's own. A connection over its cap is closed as soon as it is accepted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::fd_limit::ConnectionCaps;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// All TCP connections together are at the cap.
    Total,
    /// This client address is at its cap.
    PerClient,
}

#[derive(Default)]
struct TcpCounts {
    total: u32,
    by_client: HashMap<IpAddr, u32>,
}

/// Counts the open connections against their caps.
pub struct ConnectionLimits {
    caps: ConnectionCaps,
    tcp: Mutex<TcpCounts>,
    unix: AtomicU32,
}

/// One open TCP connection; dropping it gives the place back.
pub struct TcpPermit {
    limits: Arc<ConnectionLimits>,
    client: IpAddr,
}

/// One open unix socket connection; dropping it gives the place back.
pub struct UnixPermit {
    limits: Arc<ConnectionLimits>,
}

/// IPv4 clients that reach an IPv6 listener count under their IPv4 address.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl ConnectionLimits {
    pub fn new(caps: ConnectionCaps) -> Arc<Self> {
        Arc::new(ConnectionLimits {
            caps,
            tcp: Mutex::default(),
            unix: AtomicU32::new(0),
        })
    }

    pub fn caps(&self) -> ConnectionCaps {
        self.caps
    }

    /// Takes a place for a TCP connection from `client`, or says why there is none.
    pub fn try_tcp(self: &Arc<Self>, client: IpAddr) -> Result<TcpPermit, Refused> {
        let client = client_key(client);
        let mut tcp = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
        if tcp.total >= self.caps.tcp_total {
            return Err(Refused::Total);
        }
        let mine = tcp.by_client.entry(client).or_insert(0);
        if *mine >= self.caps.tcp_per_client {
            return Err(Refused::PerClient);
        }
        *mine += 1;
        tcp.total += 1;
        Ok(TcpPermit {
            limits: self.clone(),
            client,
        })
    }

    /// Takes a place for a unix socket connection, if one is free.
    pub fn try_unix(self: &Arc<Self>) -> Option<UnixPermit> {
        self.unix
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.caps.unix).then_some(n + 1)
            })
            .ok()
            .map(|_| UnixPermit {
                limits: self.clone(),
            })
    }

    /// Open TCP connections in all, for tests and the log.
    pub fn tcp_open(&self) -> u32 {
        self.tcp.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for TcpPermit {
    fn drop(&mut self) {
        let mut tcp = self.limits.tcp.lock().unwrap_or_else(|p| p.into_inner());
        tcp.total = tcp.total.saturating_sub(1);
        if let Some(n) = tcp.by_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                tcp.by_client.remove(&self.client);
            }
        }
    }
}

impl Drop for UnixPermit {
    fn drop(&mut self) {
        self.limits.unix.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Arc<ConnectionLimits> {
        ConnectionLimits::new(ConnectionCaps {
            tcp_total: 3,
            tcp_per_client: 2,
            unix: 1,
        })
    }

    #[test]
    fn one_client_is_held_to_its_share_and_others_still_get_in() {
        let l = limits();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let _a1 = l.try_tcp(a).unwrap();
        let a2 = l.try_tcp(a).unwrap();
        assert_eq!(l.try_tcp(a).err(), Some(Refused::PerClient));
        let _b1 = l.try_tcp(b).unwrap();
        assert_eq!(l.try_tcp(b).err(), Some(Refused::Total));
        drop(a2);
        assert!(l.try_tcp(b).is_ok());
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_the_ipv4_client() {
        let l = limits();
        let _p1 = l.try_tcp("10.0.0.1".parse().unwrap()).unwrap();
        let _p2 = l.try_tcp("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(
            l.try_tcp("10.0.0.1".parse().unwrap()).err(),
            Some(Refused::PerClient)
        );
    }

    #[test]
    fn the_unix_budget_is_apart_from_tcp() {
        let l = limits();
        let _t: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
            .iter()
            .map(|a| l.try_tcp(a.parse().unwrap()).unwrap())
            .collect();
        let u = l.try_unix().expect("the unix socket keeps its own place");
        assert!(l.try_unix().is_none());
        drop(u);
        assert!(l.try_unix().is_some());
    }
}
