//! Standby connections: relay-port connections a listener's shim dials *before* anyone
//! connects, so that a connection to its proxy is spliced at once.
//!
//! Without a standby, a connection to a proxy costs a `connect_back` datagram to the
//! listener, a TCP handshake from the listener to the relay port and the connect
//! preamble before the broker can splice (paper 4.1.1, the relayed pattern). With one,
//! the broker writes a 12-byte claim (`GCB-GO` + the logical peer, see
//! [`gcb_proto::preamble::encode_go`]) on the parked connection; the shim answers one
//! ack byte and hands the connection to the program; the broker splices once the ack
//! is in. A claim that is not acked in time (the owning process is not running the
//! shim's event handler) is abandoned and the broker falls back to `connect_back`.
//!
//! Each TCP registration's standby key is its registration token presented for
//! standbys ([`gcb_proto::token`]: keyed with the pool key when there is one, so the
//! `registered.token` an observer reads is not the key); a standby presents it in its
//! preamble (`GCB-STANDBY <32 hex>\n`), and is parked only when it comes from the
//! registration's observed IP. This module is the bookkeeping only (keys, parked
//! connections per proxy, bounded), generic over the stream so it is unit-tested
//! without sockets; the event loop in [`crate::server`] owns the I/O.

use std::collections::HashMap;
use std::net::SocketAddr;

/// Standbys parked per proxy at most (a shim keeps one; two covers a re-dial overlap).
pub const MAX_PER_PROXY: usize = 4;

/// A parked standby connection.
#[derive(Debug)]
pub struct Parked<S> {
    /// The connection.
    pub stream: S,
    /// Its source address (the listener host's NAT-observed address).
    pub peer: SocketAddr,
    /// The proxy it serves.
    pub proxy: SocketAddr,
}

/// Why a standby was not parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParkError {
    /// The key belongs to no live TCP registration.
    #[error("unknown standby key")]
    UnknownKey,
    /// The proxy has [`MAX_PER_PROXY`] standbys already.
    #[error("proxy has {MAX_PER_PROXY} standby connections already")]
    Full,
}

/// Keys and parked standbys. `T` identifies a parked connection (the poll token).
#[derive(Debug)]
pub struct StandbyPool<T, S> {
    key_proxy: HashMap<[u8; 16], SocketAddr>,
    proxy_key: HashMap<SocketAddr, [u8; 16]>,
    parked: HashMap<T, Parked<S>>,
    /// Per proxy, most recently parked last.
    by_proxy: HashMap<SocketAddr, Vec<T>>,
}

impl<T: Copy + Eq + std::hash::Hash, S> Default for StandbyPool<T, S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Eq + std::hash::Hash, S> StandbyPool<T, S> {
    /// Every parked connection (for `status`).
    pub fn parked(&self) -> impl Iterator<Item = &Parked<S>> {
        self.parked.values()
    }

    /// An empty pool.
    pub fn new() -> Self {
        StandbyPool {
            key_proxy: HashMap::new(),
            proxy_key: HashMap::new(),
            parked: HashMap::new(),
            by_proxy: HashMap::new(),
        }
    }

    /// The standby key of `proxy`, made with `fresh` the first time.
    pub fn key_for(&mut self, proxy: SocketAddr, fresh: impl FnOnce() -> [u8; 16]) -> [u8; 16] {
        if let Some(k) = self.proxy_key.get(&proxy) {
            return *k;
        }
        let k = fresh();
        self.proxy_key.insert(proxy, k);
        self.key_proxy.insert(k, proxy);
        k
    }

    /// The proxy whose key is `key`, if any.
    pub fn proxy_of(&self, key: &[u8; 16]) -> Option<SocketAddr> {
        self.key_proxy.get(key).copied()
    }

    /// The key of `proxy`, if it has one.
    pub fn key_of(&self, proxy: &SocketAddr) -> Option<[u8; 16]> {
        self.proxy_key.get(proxy).copied()
    }

    /// Parks a standby that presented `key`; gives the stream back on refusal.
    pub fn park(
        &mut self,
        key: &[u8; 16],
        id: T,
        stream: S,
        peer: SocketAddr,
    ) -> Result<SocketAddr, (ParkError, S)> {
        let Some(&proxy) = self.key_proxy.get(key) else {
            return Err((ParkError::UnknownKey, stream));
        };
        let list = self.by_proxy.entry(proxy).or_default();
        if list.len() >= MAX_PER_PROXY {
            return Err((ParkError::Full, stream));
        }
        list.push(id);
        self.parked.insert(
            id,
            Parked {
                stream,
                peer,
                proxy,
            },
        );
        Ok(proxy)
    }

    /// Takes the most recently parked standby of `proxy` (its owner most likely still
    /// runs the shim's event handler).
    pub fn take(&mut self, proxy: &SocketAddr) -> Option<(T, Parked<S>)> {
        let list = self.by_proxy.get_mut(proxy)?;
        let id = list.pop()?;
        if list.is_empty() {
            self.by_proxy.remove(proxy);
        }
        let p = self.parked.remove(&id)?;
        Some((id, p))
    }

    /// Removes one parked standby (it closed, or misbehaved).
    pub fn remove(&mut self, id: &T) -> Option<Parked<S>> {
        let p = self.parked.remove(id)?;
        if let Some(list) = self.by_proxy.get_mut(&p.proxy) {
            list.retain(|x| x != id);
            if list.is_empty() {
                self.by_proxy.remove(&p.proxy);
            }
        }
        Some(p)
    }

    /// The registration of `proxy` ended: forget its key, return its standbys to close.
    pub fn drop_proxy(&mut self, proxy: &SocketAddr) -> Vec<(T, Parked<S>)> {
        if let Some(k) = self.proxy_key.remove(proxy) {
            self.key_proxy.remove(&k);
        }
        let ids = self.by_proxy.remove(proxy).unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.parked.remove(&id).map(|p| (id, p)))
            .collect()
    }

    /// Is `id` a parked standby?
    pub fn contains(&self, id: &T) -> bool {
        self.parked.contains_key(id)
    }

    /// Parked standbys in total.
    pub fn len(&self) -> usize {
        self.parked.len()
    }

    /// No standby parked.
    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn park_take_lifo_and_keys() {
        let mut p: StandbyPool<u32, &str> = StandbyPool::new();
        let proxy = a("203.0.113.10:40000");
        let k = p.key_for(proxy, || [7; 16]);
        assert_eq!(p.key_for(proxy, || [9; 16]), k, "a proxy keeps its key");
        assert_eq!(p.key_of(&proxy), Some(k));
        let peer = a("203.0.113.1:5000");
        assert_eq!(p.park(&k, 1, "old", peer).unwrap(), proxy);
        assert_eq!(p.park(&k, 2, "new", peer).unwrap(), proxy);
        let (id, got) = p.take(&proxy).unwrap();
        assert_eq!((id, got.stream), (2, "new"));
        assert_eq!(p.take(&proxy).unwrap().1.stream, "old");
        assert!(p.take(&proxy).is_none());
        assert!(p.is_empty());
    }

    #[test]
    fn unknown_key_and_limit_refused_with_the_stream_back() {
        let mut p: StandbyPool<u32, u32> = StandbyPool::new();
        let proxy = a("203.0.113.10:40000");
        let peer = a("203.0.113.1:5000");
        assert_eq!(
            p.park(&[1; 16], 1, 11, peer).unwrap_err(),
            (ParkError::UnknownKey, 11)
        );
        let k = p.key_for(proxy, || [2; 16]);
        for i in 0..MAX_PER_PROXY as u32 {
            p.park(&k, i, i, peer).unwrap();
        }
        assert_eq!(p.park(&k, 99, 99, peer).unwrap_err(), (ParkError::Full, 99));
        assert_eq!(p.len(), MAX_PER_PROXY);
    }

    #[test]
    fn remove_and_drop_proxy() {
        let mut p: StandbyPool<u32, u32> = StandbyPool::new();
        let (x, y) = (a("203.0.113.10:40000"), a("203.0.113.10:40001"));
        let peer = a("203.0.113.1:5000");
        let kx = p.key_for(x, || [1; 16]);
        let ky = p.key_for(y, || [2; 16]);
        p.park(&kx, 1, 1, peer).unwrap();
        p.park(&kx, 2, 2, peer).unwrap();
        p.park(&ky, 3, 3, peer).unwrap();
        assert_eq!(p.remove(&1).unwrap().stream, 1);
        assert!(!p.contains(&1));
        let gone = p.drop_proxy(&x);
        assert_eq!(gone.len(), 1);
        assert_eq!(p.key_of(&x), None);
        // the dropped proxy's key no longer parks anything
        assert_eq!(
            p.park(&kx, 4, 4, peer).unwrap_err().0,
            ParkError::UnknownKey
        );
        assert!(p.contains(&3));
        assert_eq!(p.take(&y).unwrap().0, 3);
    }
}
