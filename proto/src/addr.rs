//! `IP[:PORT]` parsing shared by every binary and the shim, so that one address written
//! in a flag, an environment variable or a config file means the same thing everywhere and
//! a mistake gets the same clear error.
//!
//! Accepted forms: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `[::1]:80` (surrounding
//! whitespace ignored). Host names are not resolved: the daemons and the shim must not
//! block on DNS, and an administrator should see which address is used. Where IPv6 is not
//! supported yet, [`parse_endpoint_v4`] says so instead of calling the input malformed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::str::FromStr;

/// Why a string is not a usable `IP[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Nothing but whitespace.
    #[error("empty address (expected IP or IP:PORT)")]
    Empty,
    /// The part after the last `:` is not a port.
    #[error("{input:?}: port {port:?} is not a number from 0 to 65535")]
    BadPort {
        /// The whole input.
        input: String,
        /// The port as written.
        port: String,
    },
    /// A port number above 65535.
    #[error("{input:?}: port {port} is out of range (the largest port is 65535)")]
    PortOutOfRange {
        /// The whole input.
        input: String,
        /// The port as written.
        port: String,
    },
    /// Neither `IP` nor `IP:PORT` (a host name, a typo).
    #[error("{input:?} is not IP or IP:PORT (host names are not resolved; IPv6 as [ADDR]:PORT)")]
    NotAnAddress {
        /// The whole input.
        input: String,
    },
    /// An IPv6 address where only IPv4 is supported.
    #[error("{input:?} is an IPv6 address, which is not supported here yet; give an IPv4 address")]
    Ipv6Unsupported {
        /// The whole input.
        input: String,
    },
}

/// Parses `IP[:PORT]`, IPv4 or IPv6; a missing port is `default_port`.
pub fn parse_endpoint(input: &str, default_port: u16) -> Result<SocketAddr, AddrError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(AddrError::Empty);
    }
    let not_addr = || AddrError::NotAnAddress {
        input: input.to_string(),
    };
    let port_of = |p: &str| {
        p.parse::<u16>().map_err(|_| {
            let numeric = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            if numeric {
                AddrError::PortOutOfRange {
                    input: input.to_string(),
                    port: p.to_string(),
                }
            } else {
                AddrError::BadPort {
                    input: input.to_string(),
                    port: p.to_string(),
                }
            }
        })
    };
    if let Some(rest) = s.strip_prefix('[') {
        // [v6] or [v6]:port
        let (host, after) = rest.split_once(']').ok_or_else(not_addr)?;
        let ip: Ipv6Addr = host.parse().map_err(|_| not_addr())?;
        let port = match after {
            "" => default_port,
            p => port_of(p.strip_prefix(':').ok_or_else(not_addr)?)?,
        };
        return Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)));
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        // A bare IPv4 or IPv6 address (a bare v6 address cannot carry a port).
        return Ok(SocketAddr::new(ip, default_port));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(not_addr)?;
    let ip: Ipv4Addr = host.parse().map_err(|_| not_addr())?;
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, port_of(port)?)))
}

/// Parses `IP[:PORT]` where only IPv4 is supported; an IPv6 address is
/// [`AddrError::Ipv6Unsupported`], not "malformed".
pub fn parse_endpoint_v4(input: &str, default_port: u16) -> Result<SocketAddrV4, AddrError> {
    match parse_endpoint(input, default_port)? {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(AddrError::Ipv6Unsupported {
            input: input.to_string(),
        }),
    }
}

/// A `clap` `value_parser` for `IP[:PORT]` with `DEFAULT` as the port.
pub fn endpoint_arg<const DEFAULT: u16>(s: &str) -> Result<SocketAddr, AddrError> {
    parse_endpoint(s, DEFAULT)
}

/// A `clap` `value_parser` for an IPv4-only `IP[:PORT]` with `DEFAULT` as the port.
pub fn endpoint_v4_arg<const DEFAULT: u16>(s: &str) -> Result<SocketAddrV4, AddrError> {
    parse_endpoint_v4(s, DEFAULT)
}

/// An inclusive range of ports, `LO-HI` (or one port `N`): portfwd's `--ports`, the
/// broker's `--proxy-ports`.
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

    fn ok(s: &str) -> SocketAddr {
        parse_endpoint(s, 9650).unwrap()
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(ok("1.2.3.4"), "1.2.3.4:9650".parse().unwrap());
        assert_eq!(ok(" 1.2.3.4:7 "), "1.2.3.4:7".parse().unwrap());
        assert_eq!(ok("1.2.3.4:0"), "1.2.3.4:0".parse().unwrap());
        assert_eq!(ok("::1"), "[::1]:9650".parse().unwrap());
        assert_eq!(ok("[::1]"), "[::1]:9650".parse().unwrap());
        assert_eq!(ok("[::1]:8"), "[::1]:8".parse().unwrap());
        assert_eq!(
            ok("::ffff:10.0.0.1"),
            "[::ffff:10.0.0.1]:9650".parse().unwrap()
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(parse_endpoint("", 1), Err(AddrError::Empty));
        assert_eq!(parse_endpoint("  ", 1), Err(AddrError::Empty));
        assert!(matches!(
            parse_endpoint("127.0.0.1:99999", 1),
            Err(AddrError::PortOutOfRange { ref port, .. }) if port == "99999"
        ));
        assert!(matches!(
            parse_endpoint("[::1]:65536", 1),
            Err(AddrError::PortOutOfRange { .. })
        ));
        assert!(matches!(
            parse_endpoint("127.0.0.1:", 1),
            Err(AddrError::BadPort { .. })
        ));
        assert!(matches!(
            parse_endpoint("[::1]:x", 1),
            Err(AddrError::BadPort { .. })
        ));
        for bad in [
            "nope",
            "host:80",
            "1.2.3:4",
            "[::1",
            "[::1]x",
            "[1.2.3.4]:5",
            "1.2.3.4:5:6",
        ] {
            assert!(
                matches!(parse_endpoint(bad, 1), Err(AddrError::NotAnAddress { .. })),
                "{bad}"
            );
        }
        let e = parse_endpoint("127.0.0.1:99999", 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("99999") && e.contains("out of range") && e.contains("65535"),
            "{e}"
        );
    }

    #[test]
    fn v4_only_names_ipv6() {
        assert_eq!(
            parse_endpoint_v4("10.0.0.1", 5).unwrap(),
            "10.0.0.1:5".parse().unwrap()
        );
        let e = parse_endpoint_v4("[::1]:41203", 5).unwrap_err();
        assert!(matches!(e, AddrError::Ipv6Unsupported { .. }));
        assert!(e.to_string().contains("IPv6"), "{e}");
    }
}
