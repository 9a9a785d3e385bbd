//! `--allow CIDR`: which sources may send control datagrams.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::decision::canonical;

/// One `ip/prefix` network (a bare IP means a host route). An IPv4-mapped IPv6
/// network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps, as sources are
/// compared in their canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

/// Why a string is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {0:?} (want e.g. 10.0.0.0/8, 127.0.0.1 or ::1/128)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let net = match s.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) if !s.contains('/') => IpNet::from(s.parse::<IpAddr>().map_err(|_| err())?),
            Err(_) => return Err(err()),
        };
        let net = match net {
            IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
                Some(v4) => IpNet::new(v4.into(), n.prefix_len() - 96).map_err(|_| err())?,
                None => net,
            },
            _ => net,
        };
        Ok(Cidr(net))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Cidr {
    /// True if `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

/// An allow list; empty means "everything".
#[derive(Debug, Clone, Default)]
pub struct AllowList(pub Vec<Cidr>);

impl AllowList {
    /// True if `ip` may talk to the broker.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.0.is_empty() || self.0.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(c.contains(ip("::ffff:10.1.0.1")));
        let h: Cidr = "127.0.0.1".parse().unwrap();
        assert!(h.contains(ip("127.0.0.1")));
        assert!(!h.contains(ip("127.0.0.2")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!(!all.contains(ip("::1")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        let mapped: Cidr = "::ffff:10.1.0.0/112".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.1.0.0/16");
        assert!(mapped.contains(ip("10.1.9.9")));
        assert_eq!(
            "10.1.0.5/16".parse::<Cidr>().unwrap().to_string(),
            "10.1.0.5/16"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
        assert!("/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn empty_allows_all() {
        assert!(AllowList::default().allows(ip("8.8.8.8")));
        let l = AllowList(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(l.allows(ip("127.0.0.5")));
        assert!(!l.allows(ip("8.8.8.8")));
    }
}
