//! The registration table: one record per registered listening socket
//! (paper 4.2.2, "client socket records").
//!
//! Pure bookkeeping: the proxy sockets themselves live in the event loop,
//! keyed by the same proxy address. A registration is identified by the
//! client's *observed* control address (the datagram source, i.e. its NAT
//! mapping) plus the socket's local address and transport (a program may
//! register a TCP and a UDP socket on the same port), and it lives as long
//! as heartbeats renew its lease. Proxy addresses are unique across
//! transports (heartbeats and unregister name only the address), which the
//! event loop ensures when it binds proxy sockets.
//!
//! Quotas: a broker-wide cap, and a cap per client *IP* (not IP:port: a host
//! gets new source ports for free, so a per-address quota is none).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use gcb_proto::Transport;

/// One registered listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Source of the client's control datagrams (where connect_back goes).
    pub observed: SocketAddr,
    /// The listening socket's own address.
    pub local: SocketAddr,
    /// TCP listener or UDP socket.
    pub transport: Transport,
    /// The broker's proxy socket for it.
    pub proxy: SocketAddr,
    /// The lease runs out at this instant unless renewed.
    pub expires: Instant,
    /// When it was registered (for `status`).
    pub since: Instant,
}

/// Why a registry operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The broker-wide registration limit is reached.
    #[error("broker registration limit ({0}) reached")]
    TotalQuota(usize),
    /// The per-IP registration limit is reached.
    #[error("per-IP registration limit ({0}) reached")]
    IpQuota(usize),
    /// No registration has that proxy address.
    #[error("no registration for proxy {0}")]
    NoSuch(SocketAddr),
    /// The registration belongs to another client.
    #[error("proxy {0} belongs to another client")]
    NotOwner(SocketAddr),
}

/// Limits the registry enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Maximum registrations broker-wide.
    pub max_total: usize,
    /// Maximum registrations per client IP (all its source ports together).
    pub max_per_ip: usize,
    /// Lease granted by register and renewed by heartbeats.
    pub lease: Duration,
}

/// The table.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    /// Keyed by (transport, proxy): a TCP and a UDP proxy may share a port (HTCondor
    /// and iperf3 -u use one port number for both).
    by_proxy: HashMap<(Transport, SocketAddr), Registration>,
    by_key: HashMap<(SocketAddr, SocketAddr, Transport), SocketAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Registry {
    /// An empty table.
    pub fn new(limits: Limits) -> Self {
        Registry {
            limits,
            by_proxy: HashMap::new(),
            by_key: HashMap::new(),
            per_ip: HashMap::new(),
        }
    }

    /// Applies new limits (a reload): they bind new registrations and renewals;
    /// registrations beyond a lowered cap are kept until they end.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The configured lease.
    pub fn lease(&self) -> Duration {
        self.limits.lease
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.by_proxy.len()
    }

    /// True when there are no registrations.
    pub fn is_empty(&self) -> bool {
        self.by_proxy.is_empty()
    }

    /// The registration behind a proxy address of a transport.
    pub fn get(&self, transport: Transport, proxy: &SocketAddr) -> Option<&Registration> {
        self.by_proxy.get(&(transport, *proxy))
    }

    /// The proxy already registered for (client, local, transport), if any:
    /// a duplicate register is idempotent. Renews its lease.
    pub fn existing(
        &mut self,
        observed: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        now: Instant,
    ) -> Option<SocketAddr> {
        let proxy = *self.by_key.get(&(observed, local, transport))?;
        if let Some(r) = self.by_proxy.get_mut(&(transport, proxy)) {
            r.expires = now + self.limits.lease;
        }
        Some(proxy)
    }

    /// Whether a new registration from `observed` fits the limits.
    pub fn check_quota(&self, observed: SocketAddr) -> Result<(), RegistryError> {
        if self.by_proxy.len() >= self.limits.max_total {
            return Err(RegistryError::TotalQuota(self.limits.max_total));
        }
        if self.per_ip.get(&observed.ip()).copied().unwrap_or(0) >= self.limits.max_per_ip {
            return Err(RegistryError::IpQuota(self.limits.max_per_ip));
        }
        Ok(())
    }

    /// Records a new registration (the caller bound `proxy` and checked the
    /// quota).
    pub fn insert(
        &mut self,
        observed: SocketAddr,
        local: SocketAddr,
        transport: Transport,
        proxy: SocketAddr,
        now: Instant,
    ) -> &Registration {
        self.by_key.insert((observed, local, transport), proxy);
        *self.per_ip.entry(observed.ip()).or_insert(0) += 1;
        self.by_proxy
            .entry((transport, proxy))
            .or_insert(Registration {
                observed,
                local,
                transport,
                proxy,
                expires: now + self.limits.lease,
                since: now,
            })
    }

    /// Renews the registrations (of either transport) at `proxy` that `observed` owns;
    /// false if none is known to this client. Heartbeats name proxies by address only.
    pub fn renew(&mut self, observed: SocketAddr, proxy: SocketAddr, now: Instant) -> bool {
        let mut any = false;
        for t in [Transport::Tcp, Transport::Udp] {
            if let Some(r) = self.by_proxy.get_mut(&(t, proxy)) {
                if r.observed == observed {
                    r.expires = now + self.limits.lease;
                    any = true;
                }
            }
        }
        any
    }

    /// Removes the registration at `proxy` on behalf of `observed`: of `transport`, or
    /// (None, from an older client) of the transport registered there (TCP first).
    pub fn remove(
        &mut self,
        observed: SocketAddr,
        transport: Option<Transport>,
        proxy: SocketAddr,
    ) -> Result<Registration, RegistryError> {
        let t = match transport {
            Some(t) => t,
            None => [Transport::Tcp, Transport::Udp]
                .into_iter()
                .find(|t| self.by_proxy.contains_key(&(*t, proxy)))
                .ok_or(RegistryError::NoSuch(proxy))?,
        };
        match self.by_proxy.get(&(t, proxy)) {
            None => Err(RegistryError::NoSuch(proxy)),
            Some(r) if r.observed != observed => Err(RegistryError::NotOwner(proxy)),
            Some(_) => Ok(self.take((t, proxy)).expect("present")),
        }
    }

    fn take(&mut self, key: (Transport, SocketAddr)) -> Option<Registration> {
        let r = self.by_proxy.remove(&key)?;
        self.by_key.remove(&(r.observed, r.local, r.transport));
        if let Some(n) = self.per_ip.get_mut(&r.observed.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&r.observed.ip());
            }
        }
        Some(r)
    }

    /// Removes and returns every registration whose lease ran out.
    pub fn expire(&mut self, now: Instant) -> Vec<Registration> {
        let dead: Vec<(Transport, SocketAddr)> = self
            .by_proxy
            .values()
            .filter(|r| r.expires <= now)
            .map(|r| (r.transport, r.proxy))
            .collect();
        dead.into_iter().filter_map(|p| self.take(p)).collect()
    }

    /// Every registration (for the shutdown log).
    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.by_proxy.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gcb_proto::Transport::{Tcp, Udp};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn reg(max_total: usize, max_per_ip: usize) -> Registry {
        Registry::new(Limits {
            max_total,
            max_per_ip,
            lease: Duration::from_secs(35),
        })
    }

    #[test]
    fn idempotent_register() {
        let mut r = reg(10, 10);
        let t = Instant::now();
        let (c, l, p) = (a("1.2.3.4:1000"), a("10.0.0.2:80"), a("5.6.7.8:40000"));
        assert_eq!(r.existing(c, l, Tcp, t), None);
        r.insert(c, l, Tcp, p, t);
        assert_eq!(r.existing(c, l, Tcp, t), Some(p));
        // Another client with the same local address is a different key.
        assert_eq!(r.existing(a("1.2.3.4:1001"), l, Tcp, t), None);
        // So is a UDP socket on the same port.
        assert_eq!(r.existing(c, l, Udp, t), None);
        let pu = a("5.6.7.8:40001");
        r.insert(c, l, Udp, pu, t);
        assert_eq!(r.existing(c, l, Udp, t), Some(pu));
        assert_eq!(r.existing(c, l, Tcp, t), Some(p));
        assert_eq!(r.get(Udp, &pu).unwrap().transport, Udp);
        assert_eq!(r.len(), 2);
        r.remove(c, Some(Udp), pu).unwrap();
        assert_eq!(r.existing(c, l, Udp, t), None);
        assert_eq!(r.existing(c, l, Tcp, t), Some(p));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn lease_expiry_and_renewal() {
        let mut r = reg(10, 10);
        let t0 = Instant::now();
        let c = a("1.2.3.4:1000");
        let p1 = a("5.6.7.8:40001");
        let p2 = a("5.6.7.8:40002");
        r.insert(c, a("10.0.0.2:80"), Tcp, p1, t0);
        r.insert(c, a("10.0.0.2:81"), Tcp, p2, t0);
        // Heartbeat at +30 s renews p1 only.
        assert!(r.renew(c, p1, t0 + Duration::from_secs(30)));
        assert!(r.expire(t0 + Duration::from_secs(34)).is_empty());
        let dead = r.expire(t0 + Duration::from_secs(35));
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].proxy, p2);
        assert!(r.get(Tcp, &p2).is_none());
        assert!(r.get(Tcp, &p1).is_some());
        let dead = r.expire(t0 + Duration::from_secs(65));
        assert_eq!(dead.len(), 1);
        assert!(r.is_empty());
        // Counters went back to zero: the client may register again.
        assert_eq!(r.check_quota(c), Ok(()));
    }

    #[test]
    fn tcp_and_udp_share_a_proxy_port() {
        let mut r = reg(10, 10);
        let t = Instant::now();
        let (c, l, p) = (a("1.2.3.4:1000"), a("10.0.0.2:5201"), a("5.6.7.8:40000"));
        r.insert(c, l, Tcp, p, t);
        r.insert(c, l, Udp, p, t);
        assert_eq!(r.len(), 2);
        assert!(r.renew(c, p, t + Duration::from_secs(30)));
        assert!(
            r.expire(t + Duration::from_secs(40)).is_empty(),
            "both renewed"
        );
        // Closing the TCP listener leaves the UDP socket registered.
        assert_eq!(r.remove(c, Some(Tcp), p).unwrap().transport, Tcp);
        assert!(r.get(Udp, &p).is_some());
        // An older client's unregister without a transport takes what is there.
        assert_eq!(r.remove(c, None, p).unwrap().transport, Udp);
        assert!(r.is_empty());
    }

    #[test]
    fn renew_needs_owner() {
        let mut r = reg(10, 10);
        let t = Instant::now();
        let p = a("5.6.7.8:40001");
        r.insert(a("1.2.3.4:1000"), a("10.0.0.2:80"), Tcp, p, t);
        assert!(!r.renew(a("9.9.9.9:1000"), p, t));
        assert!(!r.renew(a("1.2.3.4:1000"), a("5.6.7.8:1"), t));
    }

    #[test]
    fn quotas() {
        let mut r = reg(3, 2);
        let t = Instant::now();
        let c1 = a("1.1.1.1:1");
        let c2 = a("2.2.2.2:2");
        r.insert(c1, a("10.0.0.1:1"), Tcp, a("9.9.9.9:1"), t);
        r.insert(c1, a("10.0.0.1:2"), Tcp, a("9.9.9.9:2"), t);
        assert_eq!(r.check_quota(c1), Err(RegistryError::IpQuota(2)));
        // Another source port of the same host shares the quota.
        assert_eq!(
            r.check_quota(a("1.1.1.1:9")),
            Err(RegistryError::IpQuota(2))
        );
        assert_eq!(r.check_quota(c2), Ok(()));
        r.insert(c2, a("10.0.0.2:1"), Tcp, a("9.9.9.9:3"), t);
        assert_eq!(r.check_quota(c2), Err(RegistryError::TotalQuota(3)));
    }

    #[test]
    fn remove_checks_owner() {
        let mut r = reg(10, 10);
        let t = Instant::now();
        let c = a("1.1.1.1:1");
        let p = a("9.9.9.9:1");
        r.insert(c, a("10.0.0.1:1"), Tcp, p, t);
        assert_eq!(
            r.remove(a("2.2.2.2:2"), Some(Tcp), p),
            Err(RegistryError::NotOwner(p))
        );
        assert_eq!(
            r.remove(c, Some(Tcp), a("9.9.9.9:2")),
            Err(RegistryError::NoSuch(a("9.9.9.9:2")))
        );
        assert_eq!(r.remove(c, None, p).unwrap().proxy, p);
        assert!(r.is_empty());
        assert_eq!(r.existing(c, a("10.0.0.1:1"), Tcp, t), None);
    }
}
