//! IPv4 networks (`--private CIDR`) and port ranges (`--ports LO-HI`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// One IPv4 `ip/prefix` network (a bare IP is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: Ipv4Addr,
    prefix: u8,
}

/// Why a string is not an IPv4 CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv4 CIDR {0:?} (want e.g. 10.1.0.0/24)")]
pub struct CidrError(String);

impl Cidr {
    /// The network `net/prefix` (host bits are cleared).
    pub fn new(net: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        (prefix <= 32).then(|| Cidr {
            net: Ipv4Addr::from(u32::from(net) & Self::mask_of(prefix)),
            prefix,
        })
    }

    fn mask_of(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    /// True if `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.net)
    }

    /// The network address.
    pub fn net(&self) -> Ipv4Addr {
        self.net
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_owned());
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| err())?),
            None => (s, 32),
        };
        Cidr::new(ip.parse().map_err(|_| err())?, prefix).ok_or_else(err)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// An inclusive range of public ports, `LO-HI`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

/// Why a string is not a port range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port range {0:?} (want LO-HI with 1 <= LO <= HI <= 65535, e.g. 20000-29999)")]
pub struct PortRangeError(String);

impl PortRange {
    /// True if `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }

    /// Number of ports in the range.
    pub fn len(&self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }

    /// Never true (a range holds at least one port); for clippy.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortRangeError(s.to_owned());
        let (lo, hi) = s.split_once('-').unwrap_or((s, s));
        let lo: u16 = lo.trim().parse().map_err(|_| err())?;
        let hi: u16 = hi.trim().parse().map_err(|_| err())?;
        if lo == 0 || lo > hi {
            return Err(err());
        }
        Ok(PortRange { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr() {
        let c: Cidr = "10.1.0.7/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/24");
        assert!(c.contains(Ipv4Addr::new(10, 1, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 1, 1, 1)));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let host: Cidr = "10.1.0.11".parse().unwrap();
        assert!(host.contains(Ipv4Addr::new(10, 1, 0, 11)));
        assert!(!host.contains(Ipv4Addr::new(10, 1, 0, 12)));
        for bad in ["10.0.0.0/33", "fd00::/8", "x", "10.0.0.0/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ports() {
        let r: PortRange = "20000-20009".parse().unwrap();
        assert_eq!(r.len(), 10);
        assert!(r.contains(20009) && !r.contains(20010) && !r.contains(19999));
        assert_eq!("5".parse::<PortRange>().unwrap().len(), 1);
        for bad in ["0-10", "10-5", "a-b", "1-70000", ""] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
