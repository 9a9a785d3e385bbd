//! The GCB UDP data-plane frame (paper 4.2.1 / 4.2.2): what a UDP
//! listener's shim and the broker's proxy UDP socket for that registration
//! exchange.
//!
//! A UDP socket registered with the broker (`register{transport: udp}`)
//! gets a *proxy UDP socket* on the broker and a random `token`
//! ([`Body::Registered`](crate::Body::Registered)). Regular senders send
//! plain datagrams to the proxy; the broker wraps each one in a frame and
//! forwards it to the listener, and unwraps the listener's replies. The
//! shim sends its frames **from the program's own UDP socket**, so the
//! broker learns that socket's NAT mapping.
//!
//! ```text
//! frame: "GCBU" | kind u8 | IPv4 [4] | port u16 BE | payload
//!        <------------- UDP_HEADER_LEN = 11 ------->
//! ```
//!
//! | kind | byte | direction | address | payload |
//! |---|---|---|---|---|
//! | [`Dummy`](UdpKind::Dummy) | `D` | listener -> proxy | `0.0.0.0:0` | the Dummy token: the registration token presented for Dummy frames ([`crate::token`]), 32 ASCII hex chars |
//! | [`KeepAlive`](UdpKind::KeepAlive) | `K` | listener -> proxy | `0.0.0.0:0` | the token; like `Dummy` but never acknowledged |
//! | [`DummyAck`](UdpKind::DummyAck) | `A` | proxy -> listener | the Dummy's source as the broker saw it | the token |
//! | [`From`](UdpKind::From) | `F` | proxy -> listener | the original sender | the sender's datagram, unchanged |
//! | [`To`](UdpKind::To) | `T` | listener -> proxy | the destination | the datagram to send, unchanged |
//!
//! * **Dummy** (the paper's DUMMY): sent right after registering and every
//!   10-15 s as a keepalive of the NAT mapping. A Dummy with the right
//!   token, from the registration's observed IP, makes its source address
//!   the listener's *data address* (a later one from another source port
//!   moves it: the NAT remapped); the broker answers DummyAck. Wrong or
//!   missing token, or another IP: dropped and counted.
//! * **From**: every datagram a sender sends to the proxy, wrapped, sent to
//!   the data address from the proxy socket.
//! * **To**: accepted only from the data address and only to a destination
//!   that has a live relay rule on that proxy (it sent to the proxy
//!   recently); the broker sends the payload from the proxy socket, so the
//!   sender sees the reply come from the address it sent to. The broker
//!   never sends to an arbitrary address.
//!
//! Sender datagrams larger than [`MAX_UDP_PAYLOAD`] cannot be wrapped into
//! one IPv4 datagram and are dropped by the broker.
//!
//! Pure functions, no IO, no allocation; [`parse`] never panics.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The 4 magic bytes that start every frame.
pub const UDP_MAGIC: [u8; 4] = *b"GCBU";

/// Frame header length: magic (4) + kind (1) + IPv4 (4) + port (2).
pub const UDP_HEADER_LEN: usize = 11;

/// Length of a registration token: 128 bits as lowercase hex.
pub const UDP_TOKEN_LEN: usize = 32;

/// The largest UDP payload an IPv4 datagram can carry (65535 - 20 - 8).
pub const MAX_IPV4_UDP: usize = 65_507;

/// The largest sender datagram that still fits in one frame
/// (`MAX_IPV4_UDP - UDP_HEADER_LEN` = 65496 bytes).
pub const MAX_UDP_PAYLOAD: usize = MAX_IPV4_UDP - UDP_HEADER_LEN;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UdpKind {
    /// Listener -> proxy: token, keeps the NAT mapping open (`b'D'`).
    Dummy,
    /// Listener -> proxy: like `Dummy`, but the broker sends no `DummyAck` (`b'K'`).
    /// The shim's keepalive: an ack would land in the program's socket and make it
    /// readable for select/poll/epoll with nothing there for the program.
    KeepAlive,
    /// Proxy -> listener: answer to a good Dummy (`b'A'`).
    DummyAck,
    /// Proxy -> listener: a sender's datagram (`b'F'`).
    From,
    /// Listener -> proxy: a datagram for a sender (`b'T'`).
    To,
}

impl UdpKind {
    /// The kind byte on the wire.
    pub const fn byte(self) -> u8 {
        match self {
            UdpKind::Dummy => b'D',
            UdpKind::KeepAlive => b'K',
            UdpKind::DummyAck => b'A',
            UdpKind::From => b'F',
            UdpKind::To => b'T',
        }
    }

    /// The kind for a wire byte, if it is one.
    pub const fn from_byte(b: u8) -> Option<UdpKind> {
        match b {
            b'D' => Some(UdpKind::Dummy),
            b'K' => Some(UdpKind::KeepAlive),
            b'A' => Some(UdpKind::DummyAck),
            b'F' => Some(UdpKind::From),
            b'T' => Some(UdpKind::To),
            _ => None,
        }
    }
}

/// The 11-byte header of a frame of `kind` carrying `addr`.
pub fn write_header(kind: UdpKind, addr: SocketAddrV4) -> [u8; UDP_HEADER_LEN] {
    let mut h = [0u8; UDP_HEADER_LEN];
    h[..4].copy_from_slice(&UDP_MAGIC);
    h[4] = kind.byte();
    h[5..9].copy_from_slice(&addr.ip().octets());
    h[9..11].copy_from_slice(&addr.port().to_be_bytes());
    h
}

/// Writes a whole frame (header + `payload`) into `out`; returns its length,
/// or None if `out` is too small.
pub fn write_frame(
    out: &mut [u8],
    kind: UdpKind,
    addr: SocketAddrV4,
    payload: &[u8],
) -> Option<usize> {
    let len = UDP_HEADER_LEN.checked_add(payload.len())?;
    let dst = out.get_mut(..len)?;
    dst[..UDP_HEADER_LEN].copy_from_slice(&write_header(kind, addr));
    dst[UDP_HEADER_LEN..].copy_from_slice(payload);
    Some(len)
}

/// Parses a frame: its kind, address and payload. None if `buf` is not a
/// frame (too short, wrong magic, unknown kind).
pub fn parse(buf: &[u8]) -> Option<(UdpKind, SocketAddrV4, &[u8])> {
    let (h, payload) = buf.split_at_checked(UDP_HEADER_LEN)?;
    if h[..4] != UDP_MAGIC {
        return None;
    }
    let kind = UdpKind::from_byte(h[4])?;
    let ip = Ipv4Addr::new(h[5], h[6], h[7], h[8]);
    let port = u16::from_be_bytes([h[9], h[10]]);
    Some((kind, SocketAddrV4::new(ip, port), payload))
}

/// Whether `t` has the form of a token: exactly [`UDP_TOKEN_LEN`] lowercase
/// hex characters.
pub fn is_token(t: &[u8]) -> bool {
    t.len() == UDP_TOKEN_LEN && t.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// Compares a received token with the expected one in time independent of
/// where they differ.
pub fn token_eq(got: &[u8], expected: &[u8]) -> bool {
    got.len() == expected.len()
        && got
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn header_layout() {
        let h = write_header(UdpKind::From, v4("203.0.113.7:4660"));
        assert_eq!(&h, b"GCBUF\xcb\x00\x71\x07\x12\x34");
        let h = write_header(UdpKind::Dummy, v4("0.0.0.0:0"));
        assert_eq!(&h, b"GCBUD\0\0\0\0\0\0");
    }

    #[test]
    fn roundtrip_every_kind() {
        let mut buf = [0u8; 64];
        for kind in [
            UdpKind::Dummy,
            UdpKind::KeepAlive,
            UdpKind::DummyAck,
            UdpKind::From,
            UdpKind::To,
        ] {
            assert_eq!(UdpKind::from_byte(kind.byte()), Some(kind));
            let addr = v4("10.1.0.5:65535");
            let n = write_frame(&mut buf, kind, addr, b"hello").unwrap();
            assert_eq!(n, UDP_HEADER_LEN + 5);
            assert_eq!(parse(&buf[..n]), Some((kind, addr, &b"hello"[..])));
        }
        // Empty payload is a valid frame.
        let h = write_header(UdpKind::To, v4("1.2.3.4:5"));
        assert_eq!(parse(&h), Some((UdpKind::To, v4("1.2.3.4:5"), &b""[..])));
    }

    #[test]
    fn not_frames() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"GCBUD\0\0\0\0\0"), None, "10 bytes: too short");
        assert_eq!(parse(b"GCBXD\0\0\0\0\0\0"), None, "bad magic");
        assert_eq!(parse(b"gcbuD\0\0\0\0\0\0"), None, "magic is case sensitive");
        assert_eq!(parse(b"GCBUX\0\0\0\0\0\0"), None, "unknown kind");
        assert_eq!(parse(b"GCB1\0{\"v\":1}"), None, "a control frame");
        assert_eq!(UdpKind::from_byte(b'd'), None);
    }

    #[test]
    fn write_frame_checks_room() {
        let mut small = [0u8; 12];
        assert_eq!(
            write_frame(&mut small, UdpKind::To, v4("1.2.3.4:5"), b"ab"),
            None
        );
        assert_eq!(
            write_frame(&mut small, UdpKind::To, v4("1.2.3.4:5"), b"a"),
            Some(12)
        );
    }

    #[test]
    fn tokens() {
        assert!(is_token(b"00112233445566778899aabbccddeeff"));
        assert!(!is_token(b"00112233445566778899AABBCCDDEEFF"));
        assert!(!is_token(b"00112233445566778899aabbccddeef"));
        assert!(!is_token(b"00112233445566778899aabbccddeeff0"));
        assert!(!is_token(b"0011223344556677889xaabbccddeeff"));
        let t = b"00112233445566778899aabbccddeeff";
        assert!(token_eq(t, t));
        assert!(!token_eq(b"00112233445566778899aabbccddeefe", t));
        assert!(!token_eq(b"", t));
        assert!(!token_eq(&t[..31], t));
    }

    #[test]
    fn limits() {
        assert_eq!(MAX_UDP_PAYLOAD, 65_496);
        assert_eq!(MAX_UDP_PAYLOAD + UDP_HEADER_LEN, MAX_IPV4_UDP);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
                if let Some((kind, addr, payload)) = parse(&bytes) {
                    prop_assert!(bytes.len() >= UDP_HEADER_LEN);
                    prop_assert_eq!(&bytes[..UDP_HEADER_LEN], &write_header(kind, addr)[..]);
                    prop_assert_eq!(payload, &bytes[UDP_HEADER_LEN..]);
                }
                let _ = is_token(&bytes);
            }

            #[test]
            fn frames_with_magic_never_panic(
                kind in any::<u8>(),
                rest in proptest::collection::vec(any::<u8>(), 0..32),
            ) {
                let mut b = UDP_MAGIC.to_vec();
                b.push(kind);
                b.extend_from_slice(&rest);
                let parsed = parse(&b);
                prop_assert_eq!(
                    parsed.is_some(),
                    rest.len() >= 6 && UdpKind::from_byte(kind).is_some()
                );
            }

            #[test]
            fn roundtrip(
                k in 0usize..4,
                ip in any::<u32>(),
                port in any::<u16>(),
                payload in proptest::collection::vec(any::<u8>(), 0..256),
            ) {
                let kind = [UdpKind::Dummy, UdpKind::DummyAck, UdpKind::From, UdpKind::To][k];
                let addr = SocketAddrV4::new(Ipv4Addr::from(ip), port);
                let mut buf = vec![0u8; UDP_HEADER_LEN + payload.len()];
                let n = write_frame(&mut buf, kind, addr, &payload).unwrap();
                prop_assert_eq!(parse(&buf[..n]), Some((kind, addr, &payload[..])));
            }
        }
    }
}
