//! A broker pool: which broker a listening socket registers with, and which it moves to
//! when that one fails, by rendezvous (highest-random-weight) hashing.
//!
//! Every broker `b` of the pool gets the weight `H(identity, b)` for a socket's
//! [`identity`]; the socket's order is the brokers by falling weight ([`rank`]). It
//! registers with the first and, when that one stops answering, moves to the next. No
//! coordination is needed: any process computes the same order from the same list (the
//! order of the list does not matter), registrations spread evenly over the brokers, and
//! taking a broker out of the list moves exactly the sockets whose first broker it was
//! (every other socket's first broker keeps the highest weight), each to its own second
//! choice, so the removed broker's share spreads evenly over the rest.
//!
//! The identity hashes the socket's local address as registered (the host's address on
//! the route to the pool and the port) with a host id (`/etc/machine-id` or the host name,
//! read by the caller): stable across restarts of the program and of the host, so a
//! restarted server lands on the same broker (which gives back its previous proxy when
//! asked), and distinct for two hosts behind different NATs that use the same private
//! address and port (private ranges repeat from site to site).
//!
//! Also here: the `GCB_BROKER` list syntax ([`parse_list`]), `IP[:PORT],IP[:PORT],...`.
//! Brokers must have distinct IPs: a proxy address names its broker by IP.

use sha2::{Digest, Sha256};
use std::net::SocketAddrV4;

use crate::addr::{parse_endpoint_v4, AddrError};

/// The stable identity of a listening socket (see the module docs): `local` is the
/// address it registers as, `host_id` what names the host (machine id or host name).
pub fn identity(local: SocketAddrV4, host_id: &[u8]) -> u64 {
    let mut h = Sha256::new();
    h.update(b"gcb-pool-identity\0");
    h.update((host_id.len() as u64).to_be_bytes());
    h.update(host_id);
    h.update(local.ip().octets());
    h.update(local.port().to_be_bytes());
    first_u64(&h.finalize())
}

/// The weight of `broker` for `identity`: the highest weight is the first choice.
pub fn weight(broker: SocketAddrV4, identity: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(b"gcb-pool-weight\0");
    h.update(identity.to_be_bytes());
    h.update(broker.ip().octets());
    h.update(broker.port().to_be_bytes());
    first_u64(&h.finalize())
}

fn first_u64(d: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// The order in which a socket with `identity` tries the `brokers`: by falling
/// [`weight`] (ties, which a 64-bit hash makes vanishingly rare, by address). The order
/// of `brokers` itself does not matter; duplicates appear once.
pub fn rank(brokers: &[SocketAddrV4], identity: u64) -> Vec<SocketAddrV4> {
    let mut v: Vec<(u64, SocketAddrV4)> =
        brokers.iter().map(|b| (weight(*b, identity), *b)).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.dedup_by_key(|x| x.1);
    v.into_iter().map(|(_, b)| b).collect()
}

/// The broker after `current` in `order`, wrapping around (the first broker is tried
/// again after the last); None if `order` has no other broker.
pub fn next_after(order: &[SocketAddrV4], current: SocketAddrV4) -> Option<SocketAddrV4> {
    let i = order.iter().position(|b| *b == current)?;
    (1..order.len())
        .map(|k| order[(i + k) % order.len()])
        .find(|b| *b != current)
}

/// A parsed `GCB_BROKER` value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolList {
    /// The brokers, in the order written, without duplicates.
    pub brokers: Vec<SocketAddrV4>,
    /// The entries that are not `IP[:PORT]`, with why (each to be said once).
    pub bad: Vec<AddrError>,
    /// Entries that repeat the IP of an earlier broker (left out: a proxy address names
    /// its broker by IP, so two brokers cannot share one).
    pub same_ip: Vec<SocketAddrV4>,
}

/// Parses `IP[:PORT],IP[:PORT],...` (whitespace around entries ignored, empty entries
/// skipped; a missing port is `default_port`).
pub fn parse_list(input: &str, default_port: u16) -> PoolList {
    let mut out = PoolList::default();
    for part in input.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match parse_endpoint_v4(part, default_port) {
            Ok(a) if out.brokers.contains(&a) => {}
            Ok(a) if out.brokers.iter().any(|b| b.ip() == a.ip()) => out.same_ip.push(a),
            Ok(a) => out.brokers.push(a),
            Err(e) => out.bad.push(e),
        }
    }
    out
}

/// Is `input` (trimmed) a single DNS name rather than a list of addresses? Letters,
/// digits, `-` and `.`, with at least one letter, and an optional `:PORT`.
pub fn looks_like_name(input: &str) -> Option<(&str, Option<&str>)> {
    let s = input.trim();
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) => (h, Some(p)),
        _ => (s, None),
    };
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        && host.bytes().any(|c| c.is_ascii_alphabetic())
        && !host.starts_with(['-', '.']);
    ok.then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn pool(n: u8) -> Vec<SocketAddrV4> {
        (0..n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10 + i), 9650))
            .collect()
    }

    /// 3,000 listeners of 300 hosts (10.x addresses, ports from 20000), 10 each.
    fn identities() -> Vec<u64> {
        (0..3000u32)
            .map(|i| {
                let host = i / 10;
                let local = SocketAddrV4::new(
                    Ipv4Addr::new(10, 1, (host / 250) as u8, (host % 250) as u8 + 2),
                    20000 + (i % 10) as u16,
                );
                identity(local, format!("host-{host}").as_bytes())
            })
            .collect()
    }

    #[test]
    fn spreads_evenly_within_ten_percent() {
        for n in [2u8, 3, 5] {
            let brokers = pool(n);
            let ids = identities();
            let mut count = vec![0usize; brokers.len()];
            for id in &ids {
                let first = rank(&brokers, *id)[0];
                count[brokers.iter().position(|b| *b == first).unwrap()] += 1;
            }
            let even = ids.len() as f64 / n as f64;
            for c in &count {
                let off = (*c as f64 - even).abs() / even;
                assert!(
                    off <= 0.10,
                    "{n} brokers: counts {count:?}, {c} is {off:.3} off even"
                );
            }
        }
    }

    #[test]
    fn removing_a_broker_moves_only_its_share() {
        let all = pool(3);
        let gone = all[1];
        let rest: Vec<_> = all.iter().copied().filter(|b| *b != gone).collect();
        let mut moved = 0;
        let mut to = [0usize; 2];
        for id in identities() {
            let before = rank(&all, id);
            let after = rank(&rest, id);
            if before[0] == gone {
                moved += 1;
                // It moves to its own second choice.
                assert_eq!(after[0], before[1]);
                to[rest.iter().position(|b| *b == after[0]).unwrap()] += 1;
            } else {
                assert_eq!(after[0], before[0], "a socket not on {gone} moved");
            }
        }
        assert!(moved > 800 && moved < 1200, "moved {moved}");
        // The removed share spreads over the rest, not onto one broker.
        for t in to {
            assert!(t as f64 > moved as f64 * 0.4, "{to:?}");
        }
    }

    #[test]
    fn order_independent_of_list_order_and_stable() {
        let mut a = pool(4);
        let id = identity(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080), b"m1");
        let r1 = rank(&a, id);
        a.reverse();
        assert_eq!(rank(&a, id), r1);
        assert_eq!(r1.len(), 4);
        // Another host with the same private address and port: an independent order.
        let other = identity(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080), b"m2");
        assert_ne!(id, other);
    }

    #[test]
    fn next_after_wraps_and_skips_current() {
        let p = pool(3);
        assert_eq!(next_after(&p, p[0]), Some(p[1]));
        assert_eq!(next_after(&p, p[2]), Some(p[0]));
        assert_eq!(next_after(&p[..1], p[0]), None);
        let stranger = SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 1);
        assert_eq!(next_after(&p, stranger), None);
    }

    #[test]
    fn parses_lists() {
        let l = parse_list(
            " 203.0.113.10, 203.0.113.12:7000,,bogus, 203.0.113.10:9650,203.0.113.12:7001",
            9650,
        );
        assert_eq!(
            l.brokers,
            vec![
                "203.0.113.10:9650".parse().unwrap(),
                "203.0.113.12:7000".parse().unwrap()
            ]
        );
        assert_eq!(l.bad.len(), 1);
        assert_eq!(l.same_ip, vec!["203.0.113.12:7001".parse().unwrap()]);
        assert_eq!(
            looks_like_name("brokers.example.org:9650"),
            Some(("brokers.example.org", Some("9650")))
        );
        assert_eq!(looks_like_name("pool"), Some(("pool", None)));
        assert_eq!(looks_like_name("203.0.113.10"), None);
        assert_eq!(looks_like_name("a,b"), None);
    }
}
