//! Registration tokens and how they are presented: what binds a data-plane connection or
//! datagram to the registration it claims to belong to, and what proves that a
//! `register{previous_proxy}` or an `unregister` comes from the owner.
//!
//! ## The registration token
//!
//! `registered.token` carries a 128-bit *registration token* `T` for every registration,
//! TCP and UDP. The broker computes it, it does not draw it:
//!
//! ```text
//! T = HMAC-SHA256(owner secret, "gcb-owner" | transport | proxy)[..16]
//! ```
//!
//! The owner secret ([`OwnerSecret`]) is derived from the pool key when the broker has one,
//! so a restarted broker (or another broker of the pool) recomputes the same `T` for the
//! same proxy and can check an old registration's proof without having kept any state.
//! Without a key the broker draws a random secret at start: its tokens do not survive a
//! restart, and neither does a listener's claim on its old proxy address.
//!
//! ## Presentations
//!
//! `T` itself never travels on a data plane. What a shim presents is derived from it per
//! use ([`present`]):
//!
//! ```text
//! keyed:   P = HMAC-SHA256(pool key, label | T)[..16]
//! unkeyed: P = SHA-256(label | T)[..16]
//! ```
//!
//! with `label` one of [`Use`]: the standby preamble (`GCB-STANDBY <hex P>`), the UDP
//! `Dummy` keepalive token (`hex P`, 32 characters), the connect preamble (for a connect
//! id instead of `T`: `GCB-CONNECT <hex P>`), and the ownership proof sent in
//! `register.previous_token` and `unregister.token`. With a pool key, an on-path observer
//! who reads `registered.token` or a `connect_decision` from a control datagram cannot
//! compute any presentation; one who reads a presentation off the wire cannot turn it into
//! another (the proof is not the standby key). Without a key, presentations only keep
//! off-path strangers out (they are 128-bit unguessable values); anyone on the path sees
//! them. The broker also accepts a presentation only from the registration's observed IP
//! address (the connector's, for its side of a connect id).
//!
//! Pure functions: no IO, no clock, no randomness (the unkeyed secret's bytes come in).

use std::fmt::Write as _;
use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::auth::PoolKey;
use crate::msg::Transport;

type HmacSha256 = Hmac<Sha256>;

/// Length of a token or a presentation.
pub const TOKEN_BYTES: usize = 16;

/// What a registration token (or connect id) is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// The standby preamble of a TCP registration.
    Standby,
    /// The `Dummy` / `KeepAlive` token of a UDP registration.
    UdpDummy,
    /// The connect preamble, from a connect id.
    Connect,
    /// The ownership proof in `register.previous_token` and `unregister.token`.
    Ownership,
}

impl Use {
    fn label(self) -> &'static [u8] {
        match self {
            Use::Standby => b"gcb-standby",
            Use::UdpDummy => b"gcb-udp-dummy",
            Use::Connect => b"gcb-connect",
            Use::Ownership => b"gcb-ownership",
        }
    }
}

/// The secret a broker computes registration tokens with. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct OwnerSecret([u8; 32]);

impl OwnerSecret {
    /// The secret of every broker keyed with `key`: stable across restarts.
    pub fn from_pool_key(key: &PoolKey) -> Self {
        let mut m = key.mac();
        m.update(b"gcb-owner-secret");
        OwnerSecret(m.finalize().into_bytes().into())
    }

    /// A secret from random bytes (an unkeyed broker draws them at start).
    pub fn from_random(bytes: [u8; 32]) -> Self {
        OwnerSecret(bytes)
    }

    /// The registration token of the `transport` registration at `proxy`.
    pub fn token(&self, transport: Transport, proxy: SocketAddr) -> [u8; TOKEN_BYTES] {
        // HMAC accepts keys of any length; this cannot fail.
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        m.update(b"gcb-owner");
        m.update(match transport {
            Transport::Tcp => b"tcp",
            Transport::Udp => b"udp",
        });
        m.update(proxy.to_string().as_bytes());
        first16(&m.finalize().into_bytes())
    }
}

impl std::fmt::Debug for OwnerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnerSecret(<32 bytes>)")
    }
}

/// What a holder of `token` presents for `what` (see the module docs).
pub fn present(key: Option<&PoolKey>, what: Use, token: &[u8; TOKEN_BYTES]) -> [u8; TOKEN_BYTES] {
    match key {
        Some(k) => {
            let mut m = k.mac();
            m.update(what.label());
            m.update(b"|");
            m.update(token);
            first16(&m.finalize().into_bytes())
        }
        None => {
            let mut h = Sha256::new();
            h.update(what.label());
            h.update(b"|");
            h.update(token);
            first16(&h.finalize())
        }
    }
}

/// [`present`] as 32 lowercase hex characters (the form on the wire).
pub fn present_hex(key: Option<&PoolKey>, what: Use, token: &[u8; TOKEN_BYTES]) -> String {
    to_hex(&present(key, what, token))
}

/// 32 lowercase hex characters.
pub fn to_hex(b: &[u8; TOKEN_BYTES]) -> String {
    let mut s = String::with_capacity(2 * TOKEN_BYTES);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// Parses 32 lowercase hex characters; `None` for anything else. Never panics.
pub fn from_hex(s: &str) -> Option<[u8; TOKEN_BYTES]> {
    let s = s.as_bytes();
    if s.len() != 2 * TOKEN_BYTES {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; TOKEN_BYTES];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(s[2 * i])? << 4 | nib(s[2 * i + 1])?;
    }
    Some(out)
}

/// Compares two presentations in time independent of where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn first16(b: &[u8]) -> [u8; TOKEN_BYTES] {
    let mut out = [0u8; TOKEN_BYTES];
    out.copy_from_slice(&b[..TOKEN_BYTES]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> PoolKey {
        PoolKey::from_file_contents(s.as_bytes()).unwrap()
    }

    #[test]
    fn tokens_are_stable_per_key_and_distinct_per_registration() {
        let k = key("pool-key-for-tests-0001");
        let a = OwnerSecret::from_pool_key(&k);
        let b = OwnerSecret::from_pool_key(&k);
        let p: SocketAddr = "203.0.113.10:40001".parse().unwrap();
        let q: SocketAddr = "203.0.113.10:40002".parse().unwrap();
        assert_eq!(a.token(Transport::Tcp, p), b.token(Transport::Tcp, p));
        assert_ne!(a.token(Transport::Tcp, p), a.token(Transport::Udp, p));
        assert_ne!(a.token(Transport::Tcp, p), a.token(Transport::Tcp, q));
        let other = OwnerSecret::from_pool_key(&key("another-pool-key-0002"));
        assert_ne!(a.token(Transport::Tcp, p), other.token(Transport::Tcp, p));
    }

    #[test]
    fn presentations_differ_per_use_and_need_the_key() {
        let k = key("pool-key-for-tests-0001");
        let t = [7u8; 16];
        let uses = [Use::Standby, Use::UdpDummy, Use::Connect, Use::Ownership];
        let keyed: Vec<_> = uses.iter().map(|u| present(Some(&k), *u, &t)).collect();
        let unkeyed: Vec<_> = uses.iter().map(|u| present(None, *u, &t)).collect();
        for i in 0..uses.len() {
            assert_ne!(keyed[i], t, "a presentation is not the token");
            assert_ne!(keyed[i], unkeyed[i]);
            for j in 0..i {
                assert_ne!(keyed[i], keyed[j]);
                assert_ne!(unkeyed[i], unkeyed[j]);
            }
        }
        let other = key("another-pool-key-0002");
        assert_ne!(present(Some(&other), Use::Standby, &t), keyed[0]);
    }

    #[test]
    fn hex_round_trip_and_junk() {
        let t = [0xab; 16];
        assert_eq!(from_hex(&to_hex(&t)), Some(t));
        assert_eq!(to_hex(&t).len(), 32);
        for junk in [
            "",
            "ab",
            &"A".repeat(32),
            &"g".repeat(32),
            &"a".repeat(33),
            "é",
        ] {
            assert_eq!(from_hex(junk), None, "{junk:?}");
        }
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
