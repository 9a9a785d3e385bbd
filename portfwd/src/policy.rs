//! Who may forward what: the private network served (`--private`), the
//! public ports handed out (`--ports`), the quota per client (`--quota`)
//! and the request rate per client (`--rate`, `--burst`).
//!
//! A request passes these checks, in this order, before it may change
//! anything (see [`crate::core`]); the first that fails is the reply:
//!
//! 1. [`Policy::client`]: the datagram's source is an IPv4 (or IPv4-mapped)
//!    address inside `--private` (else `unauthorized`);
//! 2. for forward and delete, [`Policy::owned`]: the named private address
//!    is IPv4 (`bad_request`), is the sender's own (`not_owner`), and has a
//!    port (`bad_request`);
//! 3. [`RateLimiter::allow`]: a token in the client's bucket (`busy`);
//! 4. for forward, [`Policy::forward_ports`] (probe port given, desired
//!    port inside `--ports`) and [`Policy::quota`].
//!
//! The same [`Policy`] is applied to what the mirror file replays at start
//! and at every sync ([`crate::mirror`]), so a mapping written under a
//! wider policy is not installed under a narrower one.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use gcb_proto::{Body, ErrorCode};
use ipnet::Ipv4Net;

/// Why a string is not an IPv4 network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    /// Not `IP/PREFIX` or `IP` (a prefix over 32, a stray character...).
    #[error("invalid IPv4 CIDR {0:?} (want e.g. 10.1.0.0/24)")]
    Invalid(String),
    /// An IPv6 network, which the kernel table (`table ip`) cannot serve yet.
    #[error("{0:?} is an IPv6 network, which is not supported yet; give an IPv4 CIDR (e.g. 10.1.0.0/24)")]
    Ipv6(String),
}

/// Parses an IPv4 network `IP/PREFIX` (host bits cleared: `10.1.0.7/24` is
/// `10.1.0.0/24`) or a bare IP (a /32), as `--private` takes it.
pub fn parse_net(s: &str) -> Result<Ipv4Net, NetError> {
    let parsed = match s.split_once('/') {
        Some(_) => s.parse::<Ipv4Net>().ok(),
        None => s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from),
    };
    match parsed {
        Some(net) => Ok(net.trunc()),
        None if s.parse::<ipnet::Ipv6Net>().is_ok() || s.parse::<std::net::Ipv6Addr>().is_ok() => {
            Err(NetError::Ipv6(s.to_owned()))
        }
        None => Err(NetError::Invalid(s.to_owned())),
    }
}

pub use gcb_proto::addr::{PortRange, PortRangeError};

/// A refused request: the `error{code, reason}` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The protocol's error code.
    pub code: ErrorCode,
    /// One sentence for the client's log.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `code` and `reason`.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

impl From<Refusal> for Body {
    fn from(r: Refusal) -> Body {
        Body::error(r.code, r.reason)
    }
}

/// Today's policy: which clients, which public ports, how many mappings
/// each. Requests are checked against it, and so is every replayed mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Clients (private IPs) allowed.
    pub private: Ipv4Net,
    /// Public ports allowed.
    pub ports: PortRange,
    /// Mappings per client.
    pub quota: usize,
}

impl Policy {
    /// The client a datagram from `from` speaks for: its IPv4 source, if
    /// inside `--private`.
    pub fn client(&self, from: IpAddr) -> Result<Ipv4Addr, Refusal> {
        let outside = |who: &dyn fmt::Display| {
            Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "source {who} is not in the private network {}",
                    self.private
                ),
            )
        };
        let src = match from {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(v6) => v6.to_ipv4_mapped().ok_or_else(|| outside(&from))?,
        };
        if !self.private.contains(&src) {
            return Err(outside(&src));
        }
        Ok(src)
    }

    /// `private` as a forward or delete names it, if client `src` may name
    /// it: IPv4, the client's own address, a port.
    pub fn owned(&self, src: Ipv4Addr, private: SocketAddr) -> Result<SocketAddrV4, Refusal> {
        let SocketAddr::V4(p) = private else {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("private address {private} is not IPv4"),
            ));
        };
        if *p.ip() != src {
            return Err(Refusal::new(
                ErrorCode::NotOwner,
                format!(
                    "a client may only map its own address: request names {} but comes from {src}",
                    p.ip()
                ),
            ));
        }
        if p.port() == 0 {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "private port 0 (bind before asking)",
            ));
        }
        Ok(p)
    }

    /// A forward's ports: a probe port is required; the desired public port
    /// (0 means none) must be in `--ports`. Returns the desired port.
    pub fn forward_ports(
        &self,
        probe_port: u16,
        desired_public_port: Option<u16>,
    ) -> Result<Option<u16>, Refusal> {
        if probe_port == 0 {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "probe_port 0: a management socket is required",
            ));
        }
        let desired = desired_public_port.filter(|&p| p != 0);
        if let Some(d) = desired.filter(|&d| !self.ports.contains(d)) {
            return Err(Refusal::new(
                ErrorCode::PortRange,
                format!("public port {d} is outside the range {}", self.ports),
            ));
        }
        Ok(desired)
    }

    /// Whether client `src`, which has `have` other mappings, may get one more.
    pub fn quota(&self, src: Ipv4Addr, have: usize) -> Result<(), Refusal> {
        if have >= self.quota {
            return Err(Refusal::new(
                ErrorCode::Quota,
                format!("client {src} has {have} mappings (quota {})", self.quota),
            ));
        }
        Ok(())
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Requests per second per client: a token bucket per client IP, filled
/// at `rate` up to `burst`. The caller's clock drives it.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<Ipv4Addr, Bucket>,
}

impl RateLimiter {
    /// `rate` requests per second (0 or less: unlimited), bursts of `burst`
    /// (at least 1).
    pub fn new(rate: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            buckets: HashMap::new(),
        }
    }

    /// Takes a token from `ip`'s bucket at `now`; false if it has none.
    pub fn allow(&mut self, now: Instant, ip: Ipv4Addr) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets the buckets that are full again at `now` (a new bucket starts
    /// full, so nothing changes for their clients).
    pub fn forget_idle(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + dt * rate < burst
        });
    }

    /// Tokens in `ip`'s bucket as of its last request (tests).
    pub fn tokens(&self, ip: Ipv4Addr) -> Option<f64> {
        self.buckets.get(&ip).map(|b| b.tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nets() {
        let c = parse_net("10.1.0.7/24").unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/24");
        assert!(c.contains(&Ipv4Addr::new(10, 1, 0, 200)));
        assert!(!c.contains(&Ipv4Addr::new(10, 1, 1, 1)));
        let all = parse_net("0.0.0.0/0").unwrap();
        assert!(all.contains(&Ipv4Addr::new(8, 8, 8, 8)));
        let host = parse_net("10.1.0.11").unwrap();
        assert_eq!(host.to_string(), "10.1.0.11/32");
        assert!(host.contains(&Ipv4Addr::new(10, 1, 0, 11)));
        assert!(!host.contains(&Ipv4Addr::new(10, 1, 0, 12)));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "10.0.0/8", ""] {
            assert_eq!(parse_net(bad), Err(NetError::Invalid(bad.into())), "{bad}");
        }
        for v6 in ["fd00::/8", "::1"] {
            let e = parse_net(v6).unwrap_err();
            assert_eq!(e, NetError::Ipv6(v6.into()));
            assert!(e.to_string().contains("IPv6"), "{e}");
        }
        assert_eq!(
            NetError::Invalid("x".into()).to_string(),
            "invalid IPv4 CIDR \"x\" (want e.g. 10.1.0.0/24)"
        );
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

    #[test]
    fn a_bucket_refills_with_the_callers_clock() {
        let ip = Ipv4Addr::new(10, 1, 0, 11);
        let t0 = Instant::now();
        let mut r = RateLimiter::new(2.0, 3.0);
        assert!((0..3).all(|_| r.allow(t0, ip)));
        assert!(!r.allow(t0, ip), "burst used up");
        assert!(
            r.allow(t0 + Duration::from_millis(500), ip),
            "one token in 0.5 s"
        );
        assert!(!r.allow(t0 + Duration::from_millis(500), ip));
        r.forget_idle(t0 + Duration::from_millis(600));
        assert!(r.tokens(ip).is_some(), "not full yet: kept");
        r.forget_idle(t0 + Duration::from_secs(2));
        assert_eq!(r.tokens(ip), None, "full again: forgotten");
        assert!(RateLimiter::new(0.0, 1.0).allow(t0, ip), "0: unlimited");
    }
}
