//! The mapping table: the in-memory representation of the forwarding rules
//! and the clients that own them (paper 3.2.2). Queries are answered from
//! here.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};

use gcb_proto::Transport;

/// A mapping's key: its protocol and public port (the public IP is the
/// daemon's one `--public` address).
pub type Key = (Transport, u16);

/// What a public port forwards to, and who owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The client socket's private address (the dnat target). Its IP is the
    /// owning client.
    pub private: SocketAddrV4,
    /// Port of the client's management socket on `private.ip()`, probed for
    /// liveness.
    pub probe_port: u16,
}

impl Entry {
    /// The owning client (the private IP).
    pub fn owner(&self) -> Ipv4Addr {
        *self.private.ip()
    }
}

/// The mapping table, indexed by public port, by private address and by
/// owner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    by_public: BTreeMap<Key, Entry>,
    by_private: HashMap<(Transport, SocketAddrV4), u16>,
    per_client: HashMap<Ipv4Addr, usize>,
}

impl Table {
    /// An empty table.
    pub fn new() -> Table {
        Table::default()
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.by_public.len()
    }

    /// True if there are no mappings.
    pub fn is_empty(&self) -> bool {
        self.by_public.is_empty()
    }

    /// The mapping of a public port.
    pub fn get(&self, key: Key) -> Option<&Entry> {
        self.by_public.get(&key)
    }

    /// The public port a private address is mapped from.
    pub fn public_of(&self, t: Transport, private: SocketAddrV4) -> Option<u16> {
        self.by_private.get(&(t, private)).copied()
    }

    /// Mappings owned by `client`.
    pub fn count_of(&self, client: Ipv4Addr) -> usize {
        self.per_client.get(&client).copied().unwrap_or(0)
    }

    /// Every mapping, ordered by (transport, public port).
    pub fn iter(&self) -> impl Iterator<Item = (Key, &Entry)> {
        self.by_public.iter().map(|(k, e)| (*k, e))
    }

    /// Sets `key` to `entry`, replacing what was there (and dropping any
    /// other mapping of the same private address, so a private address has
    /// at most one public port per transport). Returns the entries removed.
    pub fn insert(&mut self, key: Key, entry: Entry) -> Vec<(Key, Entry)> {
        let mut removed = Vec::new();
        if let Some(old) = self.remove(key) {
            removed.push((key, old));
        }
        if let Some(other) = self.public_of(key.0, entry.private) {
            let k = (key.0, other);
            if let Some(old) = self.remove(k) {
                removed.push((k, old));
            }
        }
        self.by_private.insert((key.0, entry.private), key.1);
        *self.per_client.entry(entry.owner()).or_default() += 1;
        self.by_public.insert(key, entry);
        removed
    }

    /// Removes the mapping of `key`.
    pub fn remove(&mut self, key: Key) -> Option<Entry> {
        let e = self.by_public.remove(&key)?;
        self.by_private.remove(&(key.0, e.private));
        if let Some(n) = self.per_client.get_mut(&e.owner()) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&e.owner());
            }
        }
        Some(e)
    }

    /// The (key -> private) pairs the kernel table must hold.
    pub fn kernel_elements(&self) -> BTreeMap<Key, SocketAddrV4> {
        self.by_public
            .iter()
            .map(|(k, e)| (*k, e.private))
            .collect()
    }

    /// Distinct management sockets (client ip, probe port) and the mappings
    /// each one keeps alive.
    pub fn probe_targets(&self) -> BTreeMap<SocketAddrV4, Vec<Key>> {
        let mut out: BTreeMap<SocketAddrV4, Vec<Key>> = BTreeMap::new();
        for (k, e) in &self.by_public {
            out.entry(SocketAddrV4::new(e.owner(), e.probe_port))
                .or_default()
                .push(*k);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn indexes_stay_consistent() {
        let mut t = Table::new();
        let e1 = Entry {
            private: sa("10.1.0.11:8080"),
            probe_port: 1,
        };
        assert!(t.insert((Transport::Tcp, 20000), e1).is_empty());
        assert_eq!(t.public_of(Transport::Tcp, e1.private), Some(20000));
        assert_eq!(t.public_of(Transport::Udp, e1.private), None);
        assert_eq!(t.count_of(e1.owner()), 1);
        // same private, other public port: the old mapping goes
        let removed = t.insert((Transport::Tcp, 20001), e1);
        assert_eq!(removed, vec![((Transport::Tcp, 20000), e1)]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.count_of(e1.owner()), 1);
        // same public port, other private: replaced
        let e2 = Entry {
            private: sa("10.1.0.12:80"),
            probe_port: 2,
        };
        t.insert((Transport::Tcp, 20001), e2);
        assert_eq!(t.count_of(e1.owner()), 0);
        assert_eq!(t.count_of(e2.owner()), 1);
        assert_eq!(t.public_of(Transport::Tcp, e1.private), None);
        assert_eq!(t.remove((Transport::Tcp, 20001)), Some(e2));
        assert!(t.is_empty());
        assert!(t.per_client.is_empty() && t.by_private.is_empty());
    }
}
