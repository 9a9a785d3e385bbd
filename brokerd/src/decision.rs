//! The brokering decision (paper 4.1): who should actively connect.
//!
//! A pure function of the addresses the broker sees, so it is unit-tested
//! without sockets. Vocabulary, for listener L and connector C:
//!
//! * `observed`: the source address of the party's control datagrams as the
//!   broker sees it (its NAT mapping, if any);
//! * `local`: the address the party says it has (L: its registered listening
//!   address; C: `connector_local`);
//! * *un-NATed*: `observed.ip == local.ip`;
//! * *public*: un-NATed and the IP is not private (RFC 1918, 100.64/10 CGNAT,
//!   link-local, loopback, unspecified, IPv6 ULA/link-local).
//!
//! The rules, in order:
//! 1. [`Decision::Direct`] to `L.local` when L and C share a NAT or host
//!    (same observed IP), when L is public, or when both are un-NATed and
//!    private (the broker's own private realm).
//! 2. [`Decision::Reverse`] when C is public and offers a `connector_listen` on its own
//!    observed IP: the listener dials the connector. Never anywhere else: a
//!    `connector_listen` on another IP (a LAN host of the listener, its loopback, a third
//!    party) would make the listener dial it for whoever asked.
//! 3. Otherwise [`Decision::Relay`]: both connect to the broker's relay port.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One side of a brokered connection as the broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Party {
    /// Source address of its control datagrams (its NAT mapping).
    pub observed: SocketAddr,
    /// Its own idea of its address.
    pub local: SocketAddr,
}

impl Party {
    /// `observed.ip == local.ip`: no NAT between the party and the broker.
    pub fn un_nated(&self) -> bool {
        canonical(self.observed.ip()) == canonical(self.local.ip())
    }

    /// Un-NATed with a globally routable IP.
    pub fn public(&self) -> bool {
        self.un_nated() && !is_private(self.observed.ip())
    }
}

/// What the broker tells the connector to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Connect straight to this address (the listener's local address).
    Direct(SocketAddr),
    /// The listener dials the connector at this address.
    Reverse(SocketAddr),
    /// Both connect to the broker's relay port.
    Relay,
}

/// Decides how connector `c` reaches listener `l`.
pub fn decide(l: &Party, c: &Party, connector_listen: Option<SocketAddr>) -> Decision {
    let same_nat_or_host = canonical(l.observed.ip()) == canonical(c.observed.ip());
    let same_private_realm =
        l.un_nated() && c.un_nated() && is_private(l.local.ip()) && is_private(c.local.ip());
    if same_nat_or_host || l.public() || same_private_realm {
        return Decision::Direct(l.local);
    }
    if c.public() {
        if let Some(listen) = connector_listen {
            if canonical(listen.ip()) == canonical(c.observed.ip()) && listen.port() != 0 {
                return Decision::Reverse(listen);
            }
        }
    }
    Decision::Relay
}

/// Maps IPv4-mapped IPv6 addresses to IPv4 so comparisons see one form.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// True for addresses that are not globally routable: RFC 1918, CGNAT
/// 100.64.0.0/10, link-local, loopback, unspecified; IPv6 ULA fc00::/7,
/// link-local fe80::/10, loopback and unspecified.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => is_private_v6(v6),
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
}

fn is_private_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn p(observed: &str, local: &str) -> Party {
        Party {
            observed: a(observed),
            local: a(local),
        }
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.1.1",
            "127.0.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "203.0.113.10",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn same_nat_is_direct() {
        // a1 and a2 behind gwA: both observed as 203.0.113.1.
        let l = p("203.0.113.1:40001", "10.1.0.2:5000");
        let c = p("203.0.113.1:40002", "10.1.0.3:6000");
        assert_eq!(decide(&l, &c, None), Decision::Direct(a("10.1.0.2:5000")));
    }

    #[test]
    fn public_listener_is_direct() {
        let l = p("203.0.113.10:40001", "203.0.113.10:5000");
        let c = p("203.0.113.2:40002", "10.2.0.2:6000");
        assert_eq!(
            decide(&l, &c, None),
            Decision::Direct(a("203.0.113.10:5000"))
        );
    }

    #[test]
    fn both_unnated_private_is_direct() {
        let l = p("10.9.0.2:40001", "10.9.0.2:5000");
        let c = p("10.9.0.3:40002", "10.9.0.3:6000");
        assert_eq!(decide(&l, &c, None), Decision::Direct(a("10.9.0.2:5000")));
        // Loopback: the integration-test situation.
        let l = p("127.0.0.1:40001", "127.0.0.1:5000");
        let c = p("127.0.0.1:40002", "127.0.0.1:6000");
        assert_eq!(decide(&l, &c, None), Decision::Direct(a("127.0.0.1:5000")));
    }

    #[test]
    fn natted_listener_public_connector_is_reverse() {
        let l = p("203.0.113.1:40001", "10.1.0.2:5000");
        let c = p("203.0.113.10:40002", "203.0.113.10:6000");
        let listen = a("203.0.113.10:7000");
        assert_eq!(decide(&l, &c, Some(listen)), Decision::Reverse(listen));
        // Without a dial-back address the connector must use the relay.
        assert_eq!(decide(&l, &c, None), Decision::Relay);
    }

    #[test]
    fn reverse_only_to_the_connectors_own_ip() {
        // The SSRF of issue #10: a public connector names a dial-back address on the
        // listener's LAN, its loopback, or a third party. None is ever dialed.
        let l = p("203.0.113.1:40001", "10.1.0.11:5000");
        let c = p("203.0.113.11:5555", "203.0.113.11:5555");
        for listen in [
            "10.1.0.12:8022",
            "127.0.0.1:8022",
            "203.0.113.99:80",
            "203.0.113.11:0",
        ] {
            assert_eq!(decide(&l, &c, Some(a(listen))), Decision::Relay, "{listen}");
        }
        let own = a("203.0.113.11:7000");
        assert_eq!(decide(&l, &c, Some(own)), Decision::Reverse(own));
    }

    #[test]
    fn two_different_nats_is_relay() {
        let l = p("203.0.113.1:40001", "10.1.0.2:5000");
        let c = p("203.0.113.2:40002", "10.2.0.2:6000");
        assert_eq!(decide(&l, &c, Some(a("10.2.0.2:7000"))), Decision::Relay);
    }

    #[test]
    fn private_unnated_connector_to_natted_listener_is_relay() {
        // C is un-NATed but private (e.g. on the broker's LAN): not public,
        // so the listener cannot be asked to dial it.
        let l = p("203.0.113.1:40001", "10.1.0.2:5000");
        let c = p("192.168.5.5:40002", "192.168.5.5:6000");
        assert_eq!(decide(&l, &c, Some(a("192.168.5.5:7000"))), Decision::Relay);
    }

    #[test]
    fn natted_private_listener_with_public_nat_ip_is_not_public() {
        // Listener behind a NAT whose outside address is public: not public.
        let l = p("198.51.100.7:40001", "10.1.0.2:5000");
        assert!(!l.public());
        assert!(!l.un_nated());
        // A public un-NATed party.
        let c = p("198.51.100.8:1", "198.51.100.8:2");
        assert!(c.public());
    }

    #[test]
    fn mapped_v6_compares_equal() {
        let l = p("[::ffff:203.0.113.1]:40001", "10.1.0.2:5000");
        let c = p("203.0.113.1:40002", "10.1.0.3:6000");
        assert_eq!(decide(&l, &c, None), Decision::Direct(a("10.1.0.2:5000")));
    }
}
