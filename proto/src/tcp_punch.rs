//! TCP hole punching between two GCB programs behind different NATs: the in-band
//! messages on the relay-port connections, and the proofs on the punched connection.
//!
//! ## The exchange
//! 1. The connector's shim asks `connect_request { punch: true }`; a broker that sees
//!    both sides behind NATs (and no recent failure between their public IPs) answers
//!    `Route::Punch { addr, connect_id }` instead of `Relay`.
//! 2. The connector opens its *leg*: a TCP connection from a fresh local port, with
//!    `SO_REUSEADDR`, to the broker's relay port, presenting the connect id (the usual
//!    `GCB-CONNECT` preamble). The broker now knows the NAT mapping of that very port.
//! 3. The broker takes one of the listener's standby connections (whose mapping it
//!    knows the same way) and writes, at once:
//!    * on the standby a [`Kind::Claim`] naming the connector's leg endpoint;
//!    * on the leg a [`Kind::Offer`] naming the standby's endpoint;
//!
//!    both with one fresh random nonce, each MACed with the pool key and bound to the
//!    secret that connection presented (the standby key's or the connect id's
//!    presentation), so only the broker can write them and they fit one connection only.
//!    Without a standby it writes [`encode_no_punch`] on the leg: the leg is a plain relay.
//! 4. Both shims connect, from the local port of their connection to the broker, to the
//!    other's endpoint (a simultaneous open through both NATs).
//! 5. Once the punched connection is up, the connector's shim writes its [`proof`] on it
//!    (the *commit*), writes [`DIRECT`] on its leg and hands the connection to the program.
//!    The listener's shim hands it over when the proof checks. The connector needs no
//!    proof back: the kernel completed its connect with the one endpoint the (MACed) offer
//!    named, and waiting for one would cost a wake-up of the listener's process and half a
//!    round trip on every connection.
//! 6. If there is no punched connection in time, the connector writes [`RELAY`] on its
//!    leg; the broker passes it on to the standby, the listener's shim answers the
//!    standby claim's ack byte, and the broker splices the two: one ordinary relay.
//!
//! The connector alone decides (it writes either its proof or `RELAY`, never both), so
//! the two sides cannot end on different paths. A third party cannot take the hole: each
//! punched socket is connected to the one endpoint the broker named (the kernel completes
//! no other), and the connector must prove to the listener that it holds the pool key and
//! this punch's nonce; a nonce serves one punch ([`NonceLog`]), so a replayed claim or
//! proof is refused.
//!
//! Pure encodings; no IO, no clock, no randomness (the nonce comes in).

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};

use hmac::Mac;

use crate::auth::PoolKey;

/// Length of a claim, an offer, or the no-punch message.
pub const MSG_LEN: usize = 44;
/// The claim's magic (broker -> the listener's standby).
pub const CLAIM_MAGIC: &[u8; 6] = b"GCB-PC";
/// The offer's magic (broker -> the connector's leg).
pub const OFFER_MAGIC: &[u8; 6] = b"GCB-PO";
/// The no-punch magic (broker -> the connector's leg: it is a relay).
pub const NONE_MAGIC: &[u8; 6] = b"GCB-PN";
/// Length of a proof on the punched connection.
pub const PROOF_LEN: usize = 16;
/// Nonce length.
pub const NONCE_LEN: usize = 16;
/// Connector -> broker (passed on to the listener): the punched connection is in use.
pub const DIRECT: u8 = b'D';
/// Connector -> broker (passed on to the listener): splice the two, use the relay.
pub const RELAY: u8 = b'R';

/// Which message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// To the listener's standby: punch to the connector's endpoint.
    Claim,
    /// To the connector's leg: punch to the listener's endpoint.
    Offer,
}

impl Kind {
    fn magic(self) -> &'static [u8; 6] {
        match self {
            Kind::Claim => CLAIM_MAGIC,
            Kind::Offer => OFFER_MAGIC,
        }
    }
}

/// A claim or an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PunchMsg {
    /// Which message.
    pub kind: Kind,
    /// The endpoint to connect to (as the broker observed it).
    pub peer: SocketAddrV4,
    /// The punch's nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// What a connector's leg reads first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegMessage {
    /// Punch with these parameters.
    Punch(PunchMsg),
    /// No punch: the leg is a relay.
    NoPunch,
}

/// Why bytes are not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PunchMsgError {
    /// Not [`MSG_LEN`] bytes.
    #[error("punch message is {0} bytes, not {MSG_LEN}")]
    Length(usize),
    /// The magic is not the expected one.
    #[error("not a punch message of the expected kind")]
    Magic,
    /// The MAC does not verify (not from a broker with our pool key, or meant for
    /// another connection).
    #[error("punch message MAC does not verify")]
    Mac,
}

fn mac16(key: &PoolKey, label: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut m = key.mac();
    m.update(label);
    for p in parts {
        m.update(b"|");
        m.update(p);
    }
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

fn msg_mac(key: &PoolKey, kind: Kind, bound: &[u8; 16], body: &[u8]) -> [u8; 16] {
    mac16(key, b"gcb-tcp-punch", &[kind.magic(), bound, body])
}

/// Encodes `msg`, bound to `bound` (the standby key's presentation for a claim, the
/// connect id's presentation for an offer).
pub fn encode(key: &PoolKey, msg: &PunchMsg, bound: &[u8; 16]) -> [u8; MSG_LEN] {
    let mut out = [0u8; MSG_LEN];
    out[..6].copy_from_slice(msg.kind.magic());
    out[6..10].copy_from_slice(&msg.peer.ip().octets());
    out[10..12].copy_from_slice(&msg.peer.port().to_be_bytes());
    out[12..28].copy_from_slice(&msg.nonce);
    let mac = msg_mac(key, msg.kind, bound, &out[6..28]);
    out[28..44].copy_from_slice(&mac);
    out
}

/// The no-punch message (carries nothing secret; the leg is then a plain relay).
pub fn encode_no_punch() -> [u8; MSG_LEN] {
    let mut out = [0u8; MSG_LEN];
    out[..6].copy_from_slice(NONE_MAGIC);
    out
}

/// Parses a message of kind `kind` bound to `bound`. Never panics.
pub fn parse(
    key: &PoolKey,
    kind: Kind,
    bound: &[u8; 16],
    buf: &[u8],
) -> Result<PunchMsg, PunchMsgError> {
    if buf.len() != MSG_LEN {
        return Err(PunchMsgError::Length(buf.len()));
    }
    if &buf[..6] != kind.magic() {
        return Err(PunchMsgError::Magic);
    }
    let want = msg_mac(key, kind, bound, &buf[6..28]);
    if !crate::token::same(&want, &buf[28..44]) {
        return Err(PunchMsgError::Mac);
    }
    let ip = Ipv4Addr::new(buf[6], buf[7], buf[8], buf[9]);
    let port = u16::from_be_bytes([buf[10], buf[11]]);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&buf[12..28]);
    Ok(PunchMsg {
        kind,
        peer: SocketAddrV4::new(ip, port),
        nonce,
    })
}

/// Parses what a connector's leg reads first: an offer or the no-punch message.
pub fn parse_leg(key: &PoolKey, bound: &[u8; 16], buf: &[u8]) -> Result<LegMessage, PunchMsgError> {
    if buf.len() == MSG_LEN && &buf[..6] == NONE_MAGIC {
        return Ok(LegMessage::NoPunch);
    }
    parse(key, Kind::Offer, bound, buf).map(LegMessage::Punch)
}

/// Whether the first bytes of a standby's input start a claim (as opposed to `GCB-GO`).
pub fn is_claim_prefix(buf: &[u8]) -> bool {
    buf.len() >= 6 && &buf[..6] == CLAIM_MAGIC
}

/// The proof the connector writes on the punched connection of the punch `nonce`.
pub fn proof(key: &PoolKey, nonce: &[u8; NONCE_LEN]) -> [u8; PROOF_LEN] {
    mac16(key, b"gcb-tcp-punch-proof", &[nonce])
}

/// Whether `got` is the connector's proof for `nonce`, compared in constant time.
pub fn check_proof(key: &PoolKey, nonce: &[u8; NONCE_LEN], got: &[u8]) -> bool {
    crate::token::same(&proof(key, nonce), got)
}

/// The nonces a shim has acted on, so a replayed claim or offer is refused. Bounded:
/// the oldest are forgotten first (a nonce is random and serves one punch, so a
/// replay long after is refused by the broker's connection having moved on anyway).
#[derive(Debug, Default)]
pub struct NonceLog {
    seen: HashSet<[u8; NONCE_LEN]>,
    order: VecDeque<[u8; NONCE_LEN]>,
}

/// How many nonces a [`NonceLog`] remembers.
pub const NONCE_LOG_CAP: usize = 4096;

impl NonceLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `nonce`; false if it was seen before (a replay).
    pub fn first_use(&mut self, nonce: &[u8; NONCE_LEN]) -> bool {
        if !self.seen.insert(*nonce) {
            return false;
        }
        self.order.push_back(*nonce);
        if self.order.len() > NONCE_LOG_CAP {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> PoolKey {
        PoolKey::from_file_contents(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn msg(kind: Kind) -> PunchMsg {
        PunchMsg {
            kind,
            peer: "203.0.113.2:40123".parse().unwrap(),
            nonce: [7; 16],
        }
    }

    #[test]
    fn roundtrip_and_binding() {
        let k = key();
        let bound = [1u8; 16];
        for kind in [Kind::Claim, Kind::Offer] {
            let m = msg(kind);
            let b = encode(&k, &m, &bound);
            assert_eq!(parse(&k, kind, &bound, &b), Ok(m));
            // Another connection's secret, another key, another kind: refused.
            assert_eq!(parse(&k, kind, &[2; 16], &b), Err(PunchMsgError::Mac));
            let other = PoolKey::from_file_contents(b"another key of 32 bytes.........").unwrap();
            assert_eq!(parse(&other, kind, &bound, &b), Err(PunchMsgError::Mac));
            let wrong = if kind == Kind::Claim {
                Kind::Offer
            } else {
                Kind::Claim
            };
            assert_eq!(parse(&k, wrong, &bound, &b), Err(PunchMsgError::Magic));
        }
        let offer = encode(&k, &msg(Kind::Offer), &bound);
        assert_eq!(
            parse_leg(&k, &bound, &offer),
            Ok(LegMessage::Punch(msg(Kind::Offer)))
        );
        assert_eq!(
            parse_leg(&k, &bound, &encode_no_punch()),
            Ok(LegMessage::NoPunch)
        );
        assert!(is_claim_prefix(&encode(&k, &msg(Kind::Claim), &bound)));
    }

    #[test]
    fn tampered_peer_is_refused() {
        let k = key();
        let mut b = encode(&k, &msg(Kind::Claim), &[1; 16]);
        b[9] ^= 1; // the peer's IP: a forged target
        assert_eq!(
            parse(&k, Kind::Claim, &[1; 16], &b),
            Err(PunchMsgError::Mac)
        );
    }

    #[test]
    fn proofs_are_per_key_and_nonce() {
        let k = key();
        let p = proof(&k, &[3; 16]);
        assert!(check_proof(&k, &[3; 16], &p));
        assert!(!check_proof(&k, &[4; 16], &p));
        assert!(!check_proof(&k, &[3; 16], &p[..15]));
        let other = PoolKey::from_file_contents(b"another key of 32 bytes.........").unwrap();
        assert!(!check_proof(&other, &[3; 16], &p));
    }

    #[test]
    fn nonce_log_refuses_replays_and_stays_bounded() {
        let mut log = NonceLog::new();
        assert!(log.first_use(&[1; 16]));
        assert!(!log.first_use(&[1; 16]));
        for i in 0..(NONCE_LOG_CAP as u32 + 10) {
            let mut n = [0u8; 16];
            n[..4].copy_from_slice(&i.to_be_bytes());
            n[15] = 0xee;
            log.first_use(&n);
        }
        assert!(log.seen.len() <= NONCE_LOG_CAP);
        assert_eq!(log.seen.len(), log.order.len());
    }

    proptest! {
        #[test]
        fn junk_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..64)) {
            let k = key();
            let _ = parse(&k, Kind::Claim, &[0; 16], &buf);
            let _ = parse_leg(&k, &[0; 16], &buf);
            let _ = is_claim_prefix(&buf);
            let _ = check_proof(&k, &[0; 16], &buf);
        }
    }
}
