//! The data-connection preambles, and the standby claim.
//!
//! Every TCP connection to the broker's relay port starts with exactly 45 bytes:
//! * `GCB-CONNECT <32 lowercase hex>\n`: a connector or a dialing-back listener
//!   presents the connect id the broker handed out; the broker pairs the two.
//! * `GCB-STANDBY <32 lowercase hex>\n`: a listener's shim parks a *standby*
//!   connection for its registration, presenting the registration's standby key
//!   (`registered.token` of a TCP registration). When a connection for that proxy
//!   arrives, the broker writes a [`GO_LEN`]-byte claim ([`encode_go`]: the logical
//!   peer) on the standby; the shim answers one [`CLAIM_ACK`] byte and hands the
//!   connection to the program; the broker splices it to the connector once the ack
//!   is in. No `connect_back` round trip and no new TCP handshake on the critical path.
//!
//! The broker reads exactly the preamble (never more, so the payload that follows stays
//! in the kernel buffer until the splice) and rejects a connection as soon as a byte
//! cannot belong to a valid preamble.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The connect preamble's prefix.
pub const PREFIX: &[u8] = b"GCB-CONNECT ";
/// The standby preamble's prefix (same length).
pub const STANDBY_PREFIX: &[u8] = b"GCB-STANDBY ";
/// Total preamble length: prefix + 32 hex chars + `\n`.
pub const LEN: usize = 45;
/// Length of the claim the broker writes on a standby connection.
pub const GO_LEN: usize = 12;
/// The claim's magic.
pub const GO_MAGIC: &[u8; 6] = b"GCB-GO";
/// The byte a shim answers a claim with.
pub const CLAIM_ACK: u8 = b'!';

/// A parsed preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// `GCB-CONNECT`: a connect id.
    Connect([u8; 16]),
    /// `GCB-STANDBY`: a registration's standby key.
    Standby([u8; 16]),
}

/// Why bytes are not a preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    /// A byte at this offset cannot be part of a preamble.
    #[error("invalid preamble byte at offset {0}")]
    BadByte(usize),
    /// Fewer than [`LEN`] bytes.
    #[error("preamble incomplete: {0} of 45 bytes")]
    Incomplete(usize),
}

fn encode_with(prefix: &[u8], id: &[u8; 16]) -> [u8; LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; LEN];
    out[..prefix.len()].copy_from_slice(prefix);
    for (i, b) in id.iter().enumerate() {
        out[prefix.len() + 2 * i] = HEX[usize::from(b >> 4)];
        out[prefix.len() + 2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
    out[LEN - 1] = b'\n';
    out
}

/// Formats the connect preamble for a connect id.
pub fn encode(id: &[u8; 16]) -> [u8; LEN] {
    encode_with(PREFIX, id)
}

/// Formats the standby preamble for a standby key.
pub fn encode_standby(key: &[u8; 16]) -> [u8; LEN] {
    encode_with(STANDBY_PREFIX, key)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// The prefix `buf` is heading for (decided by its fifth byte), if any yet.
fn prefix_of(buf: &[u8]) -> &'static [u8] {
    match buf.get(4) {
        Some(b'S') => STANDBY_PREFIX,
        _ => PREFIX,
    }
}

/// Checks a (possibly partial) preamble: `Err(BadByte)` as soon as any byte
/// so far is wrong, so junk is rejected without waiting for 45 bytes.
pub fn check_prefix(buf: &[u8]) -> Result<(), PreambleError> {
    let prefix = prefix_of(buf);
    for (i, &c) in buf.iter().enumerate().take(LEN) {
        let ok = if i < prefix.len() {
            c == prefix[i]
        } else if i < LEN - 1 {
            hex_val(c).is_some()
        } else {
            c == b'\n'
        };
        if !ok {
            return Err(PreambleError::BadByte(i));
        }
    }
    Ok(())
}

/// Parses a complete preamble.
pub fn parse_any(buf: &[u8]) -> Result<Preamble, PreambleError> {
    check_prefix(buf)?;
    if buf.len() < LEN {
        return Err(PreambleError::Incomplete(buf.len()));
    }
    let prefix = prefix_of(buf);
    let mut id = [0u8; 16];
    let hex = &buf[prefix.len()..LEN - 1];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        // check_prefix validated every hex char.
        let hi = hex_val(pair[0]).ok_or(PreambleError::BadByte(prefix.len() + 2 * i))?;
        let lo = hex_val(pair[1]).ok_or(PreambleError::BadByte(prefix.len() + 2 * i + 1))?;
        id[i] = (hi << 4) | lo;
    }
    Ok(if prefix == STANDBY_PREFIX {
        Preamble::Standby(id)
    } else {
        Preamble::Connect(id)
    })
}

/// Parses a complete connect preamble into the 16 id bytes.
pub fn parse(buf: &[u8]) -> Result<[u8; 16], PreambleError> {
    match parse_any(buf)? {
        Preamble::Connect(id) => Ok(id),
        Preamble::Standby(_) => Err(PreambleError::BadByte(4)),
    }
}

/// The claim written on a standby connection: magic, then the logical peer.
pub fn encode_go(peer: SocketAddrV4) -> [u8; GO_LEN] {
    let mut out = [0u8; GO_LEN];
    out[..6].copy_from_slice(GO_MAGIC);
    out[6..10].copy_from_slice(&peer.ip().octets());
    out[10..12].copy_from_slice(&peer.port().to_be_bytes());
    out
}

/// Parses a claim; `None` for anything else (a shim then drops the standby).
pub fn parse_go(buf: &[u8]) -> Option<SocketAddrV4> {
    if buf.len() != GO_LEN || &buf[..6] != GO_MAGIC {
        return None;
    }
    let ip = Ipv4Addr::new(buf[6], buf[7], buf[8], buf[9]);
    Some(SocketAddrV4::new(
        ip,
        u16::from_be_bytes([buf[10], buf[11]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let id: [u8; 16] = core::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let p = encode(&id);
        assert_eq!(p.len(), 45);
        assert!(p.starts_with(b"GCB-CONNECT "));
        assert_eq!(p[44], b'\n');
        assert_eq!(parse(&p), Ok(id));
    }

    #[test]
    fn exact_text() {
        let p = encode(&[0xab; 16]);
        assert_eq!(
            &p[..],
            b"GCB-CONNECT abababababababababababababababab\n".as_slice()
        );
    }

    #[test]
    fn partial_prefix_ok_and_incomplete() {
        let p = encode(&[1; 16]);
        for n in 0..LEN {
            assert_eq!(check_prefix(&p[..n]), Ok(()));
            assert_eq!(parse(&p[..n]), Err(PreambleError::Incomplete(n)));
        }
    }

    #[test]
    fn standby_roundtrip_and_kinds_are_distinct() {
        let key = [0x5a; 16];
        let p = encode_standby(&key);
        assert_eq!(&p[..12], b"GCB-STANDBY ");
        assert_eq!(parse_any(&p), Ok(Preamble::Standby(key)));
        assert_eq!(parse_any(&encode(&key)), Ok(Preamble::Connect(key)));
        // a standby is not a connect id
        assert!(parse(&p).is_err());
        for n in 0..LEN {
            assert_eq!(check_prefix(&p[..n]), Ok(()));
        }
        assert_eq!(check_prefix(b"GCB-SX"), Err(PreambleError::BadByte(5)));
    }

    #[test]
    fn go_claim_roundtrip_and_junk() {
        let peer: SocketAddrV4 = "203.0.113.11:40000".parse().unwrap();
        assert_eq!(parse_go(&encode_go(peer)), Some(peer));
        assert_eq!(parse_go(b"GCB-GX\0\0\0\0\0\0"), None);
        assert_eq!(parse_go(b"GCB-GO"), None);
        assert_eq!(parse_go(&[0u8; 40]), None);
    }

    #[test]
    fn junk_rejected_early() {
        assert_eq!(
            check_prefix(b"GET / HTTP/1.1"),
            Err(PreambleError::BadByte(1))
        );
        assert_eq!(
            check_prefix(b"GCB-CONNECX"),
            Err(PreambleError::BadByte(10))
        );
        let mut p = encode(&[0; 16]);
        p[20] = b'A'; // uppercase hex is not allowed
        assert_eq!(parse(&p), Err(PreambleError::BadByte(20)));
        let mut p = encode(&[0; 16]);
        p[44] = b'\r';
        assert_eq!(parse(&p), Err(PreambleError::BadByte(44)));
    }
}
