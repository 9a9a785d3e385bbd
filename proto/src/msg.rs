//! Control-plane messages: the JSON envelope and every message body.
//!
//! See the crate documentation for the wire format and the compatibility
//! rules. In short: an [`Envelope`] is `{"v":1,"id":..,"re":..,"body":{..}}`,
//! the body is internally tagged by `"type"`, unknown fields are ignored,
//! an unknown `type` is answered with `error{code: unsupported}` and a
//! newer `v` with `error{code: version}`.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks (the envelope's `v`).
pub const PROTOCOL_VERSION: u64 = 1;

/// Hard limit on one encoded datagram (auth frame included).
///
/// 1200 bytes fits in any path MTU an IPv6 path guarantees (1280) after IP and
/// UDP headers, so control datagrams are never fragmented.
pub const MAX_DATAGRAM: usize = 1200;

/// Limit on the JSON envelope alone: [`MAX_DATAGRAM`] minus the largest auth
/// frame overhead ([`crate::auth::KEYED_OVERHEAD`]). [`Envelope::encode`]
/// refuses anything bigger, so every encoded envelope fits in any frame.
pub const MAX_ENVELOPE: usize = MAX_DATAGRAM - crate::auth::KEYED_OVERHEAD;

/// Longest `reason` text [`Body::error`] keeps (longer text is truncated).
pub const MAX_REASON: usize = 256;

/// Transport of the socket a message is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A TCP (stream) socket.
    Tcp,
    /// A UDP (datagram) socket.
    Udp,
}

/// Error codes carried by [`Body::Error`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was understood but its fields are invalid.
    BadRequest,
    /// The request `type` is unknown to the receiver.
    Unsupported,
    /// The request's `v` is newer than the receiver speaks.
    Version,
    /// The sender is not allowed to make this request.
    Unauthorized,
    /// The sender's quota (registrations, mappings) is exhausted.
    Quota,
    /// The requested port is outside the configured range or unavailable.
    PortRange,
    /// The sender does not own the registration or mapping it names.
    NotOwner,
    /// The named registration (proxy, connect id, mapping) does not exist.
    NoSuchRegistration,
    /// The receiver is overloaded; try again later.
    Busy,
    /// The receiver failed internally.
    Internal,
    /// A code a newer peer sent that this version does not know.
    /// Decoding maps every unknown code here; never send it.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Version => "version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Quota => "quota",
            ErrorCode::PortRange => "port_range",
            ErrorCode::NotOwner => "not_owner",
            ErrorCode::NoSuchRegistration => "no_such_registration",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        };
        f.write_str(s)
    }
}

/// A single-use connection id: 128 random bits, on the wire exactly 32
/// lowercase hex characters.
///
/// The caller generates the bits (proto has no randomness source) and hands
/// them to [`ConnectId::from_bytes`]; ids from the wire go through the checked
/// parser [`ConnectId::parse`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConnectId([u8; 16]);

/// Why a string is not a [`ConnectId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectIdError {
    /// Not exactly 32 characters.
    #[error("connect id must be 32 hex characters, got {0}")]
    Length(usize),
    /// A character other than `0-9a-f`.
    #[error("connect id must be lowercase hex")]
    NotLowerHex,
}

impl ConnectId {
    /// Wraps 16 bytes from the caller's random source.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        ConnectId(bytes)
    }

    /// The 16 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses exactly 32 lowercase hex characters. Never panics.
    pub fn parse(s: &str) -> Result<Self, ConnectIdError> {
        let b = s.as_bytes();
        if b.len() != 32 {
            return Err(ConnectIdError::Length(b.len()));
        }
        let mut out = [0u8; 16];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or(ConnectIdError::NotLowerHex)?;
            let lo = hex_val(pair[1]).ok_or(ConnectIdError::NotLowerHex)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(ConnectId(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for ConnectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ConnectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectId({self})")
    }
}

impl std::str::FromStr for ConnectId {
    type Err = ConnectIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConnectId::parse(s)
    }
}

impl TryFrom<String> for ConnectId {
    type Error = ConnectIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ConnectId::parse(&s)
    }
}

impl From<ConnectId> for String {
    fn from(id: ConnectId) -> String {
        id.to_string()
    }
}

/// How a brokered connection is to be made (the broker's decision, paper 4.1).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Route {
    /// The listener is reachable: connect straight to `addr`.
    Direct {
        /// Address to connect to.
        addr: SocketAddr,
    },
    /// The listener will dial the connector's `connector_listen` address and
    /// present `connect_id`; the connector waits for that connection.
    Reverse {
        /// Id the listener's dial-back presents.
        connect_id: ConnectId,
    },
    /// Both sides connect to the broker's relay at `addr` and present
    /// `connect_id`; the broker splices the two connections.
    Relay {
        /// The broker's relay address.
        addr: SocketAddr,
        /// Id to present to the relay.
        connect_id: ConnectId,
    },
}

/// Every message body. On the wire: `{"type":"<snake_case name>", ..fields}`.
///
/// Requests and their responses (`->`):
///
/// | request | response | direction |
/// |---|---|---|
/// | `register` | `registered` | shim -> broker |
/// | `unregister` | `ack` | shim -> broker |
/// | `heartbeat` | `heartbeat_ack` | shim -> broker |
/// | `reregister_request` | `ack` | broker -> shim |
/// | `connect_request` | `connect_decision` | shim -> broker |
/// | `connect_back` | `ack` | broker -> shim (listener) |
/// | `punch_request` | `punch` | shim (UDP registrant) -> broker |
/// | `punch_back` | `ack` | broker -> shim (UDP registrant) |
/// | `punch_end` | `ack` | broker -> shim (UDP registrant) |
/// | `forward` | `forwarded` | shim -> portfwd |
/// | `delete` | `deleted` | shim -> portfwd |
/// | `query` | `query_result` | shim -> portfwd |
///
/// Any request may instead be answered by `error`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    // ---------------- GCB (paper section 4) ----------------
    /// Register a listening socket; the broker opens a proxy socket for it.
    Register {
        /// Transport of the listening socket.
        transport: Transport,
        /// The socket's real local address.
        local: SocketAddr,
        /// The proxy this socket had before (e.g. before a broker restart):
        /// the broker hands the same address back if it is still free.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_proxy: Option<SocketAddr>,
        /// Proof that the sender owned `previous_proxy`: the old registration's token
        /// presented for [`Use::Ownership`](crate::token::Use::Ownership) (32 lowercase
        /// hex characters). Without a valid proof the broker assigns a new proxy.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_token: Option<String>,
    },
    /// Reply to `register`: the proxy address the program now advertises.
    Registered {
        /// The broker's proxy socket for this listener.
        proxy: SocketAddr,
        /// The registration lapses unless a heartbeat names it within this.
        lease_ms: u64,
        /// The registration token (32 lowercase hex characters, [`crate::token`]): never
        /// sent as is on a data plane; the shim derives from it its standby key (TCP), its
        /// `Dummy` token (UDP, [`crate::udp`]) and the ownership proof that
        /// `unregister` and a later `register{previous_proxy}` carry.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Drop a registration (the last holder of the listening socket closed it).
    Unregister {
        /// The proxy address `registered` returned.
        proxy: SocketAddr,
        /// Which registration at that address (a TCP and a UDP proxy may share a
        /// port); absent from older clients: the one registered there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transport: Option<Transport>,
        /// The ownership proof (see `register.previous_token`); required.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Keep-alive for the listed registrations and the client's NAT hole.
    Heartbeat {
        /// Proxy addresses of the registrations this client holds.
        proxies: Vec<SocketAddr>,
    },
    /// Reply to `heartbeat`.
    HeartbeatAck {
        /// The proxies the broker does not know: re-register them.
        unknown: Vec<SocketAddr>,
    },
    /// Broker -> client: "I do not know you (I restarted); register again"
    /// (paper 4.2.2). Answered by `ack`.
    ReregisterRequest {},
    /// Ask the broker that owns `proxy` to broker a connection to it.
    ConnectRequest {
        /// The listener's proxy address (what the program connect()s to).
        proxy: SocketAddr,
        /// Transport of the connection.
        transport: Transport,
        /// The connector's local address.
        connector_local: SocketAddr,
        /// An address where the connector accepts a dial-back, if it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connector_listen: Option<SocketAddr>,
    },
    /// Reply to `connect_request`.
    ConnectDecision {
        /// How to make the connection.
        route: Route,
    },
    /// Broker -> listener: dial `dial` out, present `connect_id`, then hand the
    /// connection to the program's accept() as coming from `logical_peer`.
    /// Answered by `ack`.
    ConnectBack {
        /// Single-use id to present on the new connection.
        connect_id: ConnectId,
        /// Where to dial.
        dial: SocketAddr,
        /// Which registration (listening socket) the connection is for.
        proxy: SocketAddr,
        /// The address accept()/getpeername() report.
        logical_peer: SocketAddr,
    },
    /// A registered GCB UDP socket sends to `proxy`, another UDP
    /// registration's proxy: the sender's shim asks for a UDP hole punch
    /// (paper 4.2.1, [`crate::punch`]). `from_proxy` is the sender's own
    /// registration and `token` its registration token (proves it is the
    /// registrant). Answered by `punch`, or `error{no_such_registration}`
    /// when `proxy` is not a UDP proxy (the shim caches that).
    PunchRequest {
        /// The destination's proxy (what the program sends to).
        proxy: SocketAddr,
        /// The sender's own UDP registration.
        from_proxy: SocketAddr,
        /// The sender's registration token.
        token: String,
    },
    /// Reply to `punch_request`: send `Dummy` frames carrying `nonce` from
    /// the program's socket to `peer` (and `peer_local`, when both are behind
    /// the same NAT); direct datagrams carry `me` as their logical source.
    Punch {
        /// The destination's observed data address (its NAT mapping).
        peer: SocketAddrV4,
        /// The destination's private address, only when both parties share
        /// a public IP (same NAT; hairpinning may not work).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_local: Option<SocketAddrV4>,
        /// The sender's own observed data address: what the destination's
        /// program sees as the sender (as it does through the relay).
        me: SocketAddrV4,
        /// Random 128-bit punch nonce, 32 lowercase hex characters.
        nonce: String,
    },
    /// Broker -> the destination of a `punch_request`: the registrant whose
    /// data address is `peer` is about to punch toward your UDP socket
    /// registered as `proxy`; send `Dummy` frames with `nonce` to `peer` (and
    /// `peer_local`). `peer` is also the logical peer: the address the
    /// program sees the initiator at (as through the relay). Answered by
    /// `ack`.
    PunchBack {
        /// The registration (UDP socket) concerned.
        proxy: SocketAddr,
        /// The initiator's observed data address.
        peer: SocketAddrV4,
        /// The initiator's private address (same NAT only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_local: Option<SocketAddrV4>,
        /// The punch nonce (same as in the initiator's `punch`).
        nonce: String,
    },
    /// Broker -> a registrant whose UDP socket registered as `proxy` was paired by
    /// `punch_request` with a registration that is now gone (unregistered, lease
    /// expired): forget the punched record for it, whose address another program may
    /// take next. The gone side is named by both addresses a record is keyed by:
    /// `peer`, its data address as the pairing handed it out (a destination's key for
    /// its initiator), and `peer_proxy` (an initiator's key for its destination).
    /// Answered by `ack`.
    PunchEnd {
        /// The registration (UDP socket) concerned.
        proxy: SocketAddr,
        /// The gone registration's data address, as handed out by the pairing.
        peer: SocketAddrV4,
        /// The gone registration's proxy.
        peer_proxy: SocketAddrV4,
    },

    // ---------------- DPF (paper section 3) ----------------
    /// Ask portfwd for a forwarding rule public -> `private`.
    Forward {
        /// Transport of the bound socket.
        transport: Transport,
        /// The socket's private address (must be the sender's own address).
        private: SocketAddr,
        /// A preferred public port, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        desired_public_port: Option<u16>,
        /// Port of the client's management (probe) socket, a passive TCP
        /// socket that lives exactly as long as the forwarded socket.
        probe_port: u16,
    },
    /// Reply to `forward`.
    Forwarded {
        /// The public address the program now advertises.
        public: SocketAddr,
        /// portfwd's mapping-table epoch after the change.
        epoch: u64,
    },
    /// Remove the rule for `private` (the socket became active or closed).
    Delete {
        /// Transport of the rule.
        transport: Transport,
        /// The private address of the rule.
        private: SocketAddr,
    },
    /// Reply to `delete`.
    Deleted {
        /// portfwd's mapping-table epoch after the change.
        epoch: u64,
    },
    /// "Is `public` one of your clients?" (same-network shortcut).
    Query {
        /// Transport of the peer.
        transport: Transport,
        /// The public address the client is about to connect to.
        public: SocketAddr,
    },
    /// Reply to `query`.
    QueryResult {
        /// The private address behind `public`, or absent if not ours.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        private: Option<SocketAddr>,
        /// portfwd's mapping-table epoch.
        epoch: u64,
    },

    // ---------------- generic ----------------
    /// Positive reply without data.
    Ack {},
    /// Negative reply to any request.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail (for logs; do not parse).
        reason: String,
    },
}

/// Every `type` name this version knows, in declaration order.
pub const KNOWN_TYPES: &[&str] = &[
    "register",
    "registered",
    "unregister",
    "heartbeat",
    "heartbeat_ack",
    "reregister_request",
    "connect_request",
    "connect_decision",
    "connect_back",
    "punch_request",
    "punch",
    "punch_back",
    "punch_end",
    "forward",
    "forwarded",
    "delete",
    "deleted",
    "query",
    "query_result",
    "ack",
    "error",
];

impl Body {
    /// The wire `type` of this body.
    pub fn type_name(&self) -> &'static str {
        match self {
            Body::Register { .. } => "register",
            Body::Registered { .. } => "registered",
            Body::Unregister { .. } => "unregister",
            Body::Heartbeat { .. } => "heartbeat",
            Body::HeartbeatAck { .. } => "heartbeat_ack",
            Body::ReregisterRequest {} => "reregister_request",
            Body::ConnectRequest { .. } => "connect_request",
            Body::ConnectDecision { .. } => "connect_decision",
            Body::ConnectBack { .. } => "connect_back",
            Body::PunchRequest { .. } => "punch_request",
            Body::Punch { .. } => "punch",
            Body::PunchBack { .. } => "punch_back",
            Body::PunchEnd { .. } => "punch_end",
            Body::Forward { .. } => "forward",
            Body::Forwarded { .. } => "forwarded",
            Body::Delete { .. } => "delete",
            Body::Deleted { .. } => "deleted",
            Body::Query { .. } => "query",
            Body::QueryResult { .. } => "query_result",
            Body::Ack {} => "ack",
            Body::Error { .. } => "error",
        }
    }

    /// An `error` body; `reason` is truncated to [`MAX_REASON`] bytes (on a
    /// char boundary) so the reply always fits in a datagram.
    pub fn error(code: ErrorCode, reason: impl Into<String>) -> Body {
        let mut reason = reason.into();
        if reason.len() > MAX_REASON {
            let mut cut = MAX_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        Body::Error { code, reason }
    }

    /// True for `error` bodies.
    pub fn is_error(&self) -> bool {
        matches!(self, Body::Error { .. })
    }
}

/// Splits a heartbeat's proxy list into `heartbeat` bodies that each fit in
/// one datagram (keyed frame, largest ids). An empty list gives one empty
/// heartbeat (it still keeps the NAT hole open).
pub fn heartbeat_batches(proxies: &[SocketAddr]) -> Vec<Body> {
    // Envelope with worst-case numbers and an empty list.
    let base = Envelope {
        v: PROTOCOL_VERSION,
        id: u64::MAX,
        re: Some(u64::MAX),
        body: Body::Heartbeat {
            proxies: Vec::new(),
        },
    };
    let base_len = serde_json::to_vec(&base).map(|v| v.len()).unwrap_or(64);
    let mut out = Vec::new();
    let mut cur: Vec<SocketAddr> = Vec::new();
    let mut len = base_len;
    for p in proxies {
        // "addr" plus a comma.
        let item = p.to_string().len() + 3;
        if !cur.is_empty() && len + item > MAX_ENVELOPE {
            out.push(Body::Heartbeat {
                proxies: std::mem::take(&mut cur),
            });
            len = base_len;
        }
        cur.push(*p);
        len += item;
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(Body::Heartbeat { proxies: cur });
    }
    out
}

/// One message: protocol version, the sender's message id, the request id it
/// answers (responses only), and the body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Protocol version ([`PROTOCOL_VERSION`] when we send).
    pub v: u64,
    /// The sender's message id (unique per sender session).
    pub id: u64,
    /// On responses: the id of the request answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub re: Option<u64>,
    /// The message.
    pub body: Body,
}

/// Why an envelope could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The JSON is longer than [`MAX_ENVELOPE`].
    #[error("encoded message is {len} bytes, limit {limit}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit ([`MAX_ENVELOPE`]).
        limit: usize,
    },
    /// serde_json failed (should not happen for these types).
    #[error("json encoding failed: {0}")]
    Json(String),
}

/// Why bytes are not an [`Envelope`] this version can act on.
///
/// The variants that carry `id`/`re` came from a well-formed envelope whose
/// body this version cannot use; a receiver answers such a *request* with the
/// matching [`DecodeError::error_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// More than [`MAX_DATAGRAM`] bytes.
    #[error("message of {0} bytes exceeds the datagram limit")]
    TooLarge(usize),
    /// Not JSON, or no `v`/`id`/`body`: nothing to answer.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// `v` is newer than [`PROTOCOL_VERSION`] (answer `error{code: version}`).
    #[error("protocol version {v} is newer than ours ({PROTOCOL_VERSION})")]
    Version {
        /// The sender's version.
        v: u64,
        /// The message id.
        id: u64,
        /// The answered request id, if a response.
        re: Option<u64>,
    },
    /// `type` is not one this version knows (answer `error{code: unsupported}`).
    #[error("unknown message type {type_name:?}")]
    UnknownType {
        /// The unknown type (truncated to 64 bytes).
        type_name: String,
        /// The message id.
        id: u64,
        /// The answered request id, if a response.
        re: Option<u64>,
    },
    /// Known `type` but invalid fields, missing `type`, or `v` of 0
    /// (answer `error{code: bad_request}`).
    #[error("bad message body: {reason}")]
    BadBody {
        /// What is wrong (serde's message).
        reason: String,
        /// The message id.
        id: u64,
        /// The answered request id, if a response.
        re: Option<u64>,
    },
}

impl DecodeError {
    /// `(id, re)` when the envelope header was readable.
    pub fn header(&self) -> Option<(u64, Option<u64>)> {
        match self {
            DecodeError::TooLarge(_) | DecodeError::Malformed(_) => None,
            DecodeError::Version { id, re, .. }
            | DecodeError::UnknownType { id, re, .. }
            | DecodeError::BadBody { id, re, .. } => Some((*id, *re)),
        }
    }

    /// The error code to answer a request that failed this way with, if any.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            DecodeError::TooLarge(_) | DecodeError::Malformed(_) => None,
            DecodeError::Version { .. } => Some(ErrorCode::Version),
            DecodeError::UnknownType { .. } => Some(ErrorCode::Unsupported),
            DecodeError::BadBody { .. } => Some(ErrorCode::BadRequest),
        }
    }
}

/// The envelope with the body not yet interpreted.
#[derive(Deserialize)]
struct RawEnvelope {
    v: u64,
    id: u64,
    #[serde(default)]
    re: Option<u64>,
    body: serde_json::Value,
}

fn truncate_owned(s: &str, max: usize) -> String {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_owned()
}

impl Envelope {
    /// A request envelope (no `re`).
    pub fn request(id: u64, body: Body) -> Self {
        Envelope {
            v: PROTOCOL_VERSION,
            id,
            re: None,
            body,
        }
    }

    /// A response envelope answering request `re`.
    pub fn response(id: u64, re: u64, body: Body) -> Self {
        Envelope {
            v: PROTOCOL_VERSION,
            id,
            re: Some(re),
            body,
        }
    }

    /// Encodes to JSON; fails if longer than [`MAX_ENVELOPE`].
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let bytes = serde_json::to_vec(self).map_err(|e| EncodeError::Json(e.to_string()))?;
        if bytes.len() > MAX_ENVELOPE {
            return Err(EncodeError::TooLarge {
                len: bytes.len(),
                limit: MAX_ENVELOPE,
            });
        }
        Ok(bytes)
    }

    /// Decodes untrusted JSON. Never panics.
    ///
    /// Unknown fields anywhere are ignored. The header (`v`, `id`, `re`) is
    /// read first, so a body this version cannot use still yields the ids
    /// needed to answer it (see [`DecodeError`]).
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let raw: RawEnvelope = serde_json::from_slice(bytes)
            .map_err(|e| DecodeError::Malformed(truncate_owned(&e.to_string(), 128)))?;
        let (id, re) = (raw.id, raw.re);
        if raw.v > PROTOCOL_VERSION {
            return Err(DecodeError::Version { v: raw.v, id, re });
        }
        if raw.v == 0 {
            return Err(DecodeError::BadBody {
                reason: "protocol version 0".into(),
                id,
                re,
            });
        }
        let type_name = match raw.body.get("type") {
            Some(serde_json::Value::String(t)) => t,
            _ => {
                return Err(DecodeError::BadBody {
                    reason: "body has no string `type`".into(),
                    id,
                    re,
                })
            }
        };
        if !KNOWN_TYPES.contains(&type_name.as_str()) {
            return Err(DecodeError::UnknownType {
                type_name: truncate_owned(type_name, 64),
                id,
                re,
            });
        }
        let body: Body = serde_json::from_value(raw.body).map_err(|e| DecodeError::BadBody {
            reason: truncate_owned(&e.to_string(), 128),
            id,
            re,
        })?;
        Ok(Envelope {
            v: raw.v,
            id,
            re,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn v4(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn cid() -> ConnectId {
        ConnectId::from_bytes([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ])
    }

    /// One of every body variant (and every route kind).
    pub(crate) fn all_bodies() -> Vec<Body> {
        vec![
            Body::Register {
                transport: Transport::Tcp,
                local: a("10.1.0.5:9618"),
                previous_proxy: None,
                previous_token: None,
            },
            Body::Register {
                transport: Transport::Tcp,
                local: a("10.1.0.5:9618"),
                previous_proxy: Some(a("203.0.113.10:40001")),
                previous_token: None,
            },
            Body::Registered {
                proxy: a("203.0.113.10:40001"),
                lease_ms: 60_000,
                token: None,
            },
            Body::Registered {
                proxy: a("203.0.113.10:40002"),
                lease_ms: 60_000,
                token: Some("00112233445566778899aabbccddeeff".into()),
            },
            Body::Unregister {
                proxy: a("203.0.113.10:40001"),
                transport: None,
                token: None,
            },
            Body::Unregister {
                proxy: a("203.0.113.10:40001"),
                transport: Some(Transport::Udp),
                token: None,
            },
            Body::Heartbeat {
                proxies: vec![a("203.0.113.10:40001"), a("[2001:db8::1]:7")],
            },
            Body::HeartbeatAck { unknown: vec![] },
            Body::ReregisterRequest {},
            Body::ConnectRequest {
                proxy: a("203.0.113.10:40001"),
                transport: Transport::Udp,
                connector_local: a("10.2.0.7:5000"),
                connector_listen: Some(a("10.2.0.7:5001")),
            },
            Body::ConnectRequest {
                proxy: a("203.0.113.10:40001"),
                transport: Transport::Tcp,
                connector_local: a("10.2.0.7:5000"),
                connector_listen: None,
            },
            Body::ConnectDecision {
                route: Route::Direct {
                    addr: a("203.0.113.20:80"),
                },
            },
            Body::ConnectDecision {
                route: Route::Reverse { connect_id: cid() },
            },
            Body::ConnectDecision {
                route: Route::Relay {
                    addr: a("203.0.113.10:9001"),
                    connect_id: cid(),
                },
            },
            Body::ConnectBack {
                connect_id: cid(),
                dial: a("203.0.113.10:9001"),
                proxy: a("203.0.113.10:40001"),
                logical_peer: a("203.0.113.2:33000"),
            },
            Body::PunchRequest {
                proxy: a("203.0.113.10:40001"),
                from_proxy: a("203.0.113.10:40002"),
                token: "00112233445566778899aabbccddeeff".into(),
            },
            Body::Punch {
                peer: v4("203.0.113.1:9000"),
                peer_local: None,
                me: v4("203.0.113.2:9000"),
                nonce: "00112233445566778899aabbccddeeff".into(),
            },
            Body::Punch {
                peer: v4("203.0.113.1:9000"),
                peer_local: Some(v4("10.1.0.12:9000")),
                me: v4("203.0.113.1:9001"),
                nonce: "00112233445566778899aabbccddeeff".into(),
            },
            Body::PunchBack {
                proxy: a("203.0.113.10:40001"),
                peer: v4("203.0.113.2:9000"),
                peer_local: None,
                nonce: "00112233445566778899aabbccddeeff".into(),
            },
            Body::PunchEnd {
                proxy: a("203.0.113.10:40001"),
                peer: v4("203.0.113.2:9000"),
                peer_proxy: v4("203.0.113.10:40002"),
            },
            Body::Forward {
                transport: Transport::Tcp,
                private: a("10.1.0.5:8080"),
                desired_public_port: Some(8080),
                probe_port: 41000,
            },
            Body::Forward {
                transport: Transport::Udp,
                private: a("10.1.0.5:8080"),
                desired_public_port: None,
                probe_port: 41000,
            },
            Body::Forwarded {
                public: a("203.0.113.1:20000"),
                epoch: 3,
            },
            Body::Delete {
                transport: Transport::Tcp,
                private: a("10.1.0.5:8080"),
            },
            Body::Deleted { epoch: 4 },
            Body::Query {
                transport: Transport::Tcp,
                public: a("203.0.113.1:20000"),
            },
            Body::QueryResult {
                private: Some(a("10.1.0.5:8080")),
                epoch: 4,
            },
            Body::QueryResult {
                private: None,
                epoch: 4,
            },
            Body::Ack {},
            Body::error(ErrorCode::NotOwner, "not yours"),
        ]
    }

    #[test]
    fn every_body_roundtrips_and_fits() {
        let bodies = all_bodies();
        let mut types: Vec<&str> = bodies.iter().map(|b| b.type_name()).collect();
        types.dedup();
        assert_eq!(types, KNOWN_TYPES, "all_bodies covers KNOWN_TYPES in order");
        for (i, b) in bodies.into_iter().enumerate() {
            for env in [
                Envelope::request(u64::MAX, b.clone()),
                Envelope::response(i as u64, u64::MAX - 1, b.clone()),
            ] {
                let bytes = env.encode().unwrap();
                assert!(bytes.len() <= MAX_ENVELOPE);
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                assert_eq!(v["body"]["type"], b.type_name());
                assert_eq!(Envelope::decode(&bytes).unwrap(), env);
            }
        }
    }

    #[test]
    fn register_previous_proxy_is_optional() {
        // Old senders omit it; it decodes as None.
        let old = br#"{"v":1,"id":1,"body":{"type":"register","transport":"tcp","local":"10.1.0.5:9618"}}"#;
        let env = Envelope::decode(old).unwrap();
        assert_eq!(
            env.body,
            Body::Register {
                transport: Transport::Tcp,
                local: a("10.1.0.5:9618"),
                previous_proxy: None,
                previous_token: None,
            }
        );
        let new = Envelope::request(
            2,
            Body::Register {
                transport: Transport::Tcp,
                local: a("10.1.0.5:9618"),
                previous_proxy: Some(a("203.0.113.10:40001")),
                previous_token: None,
            },
        );
        let json = String::from_utf8(new.encode().unwrap()).unwrap();
        assert!(
            json.contains(r#""previous_proxy":"203.0.113.10:40001""#),
            "{json}"
        );
        assert_eq!(Envelope::decode(json.as_bytes()).unwrap(), new);
    }

    #[test]
    fn registered_token_only_for_udp() {
        // TCP registrations: no token on the wire, and old replies without
        // one decode as None.
        let tcp = Envelope::response(
            3,
            1,
            Body::Registered {
                proxy: a("203.0.113.10:40001"),
                lease_ms: 35_000,
                token: None,
            },
        );
        let json = String::from_utf8(tcp.encode().unwrap()).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"id":3,"re":1,"body":{"type":"registered","proxy":"203.0.113.10:40001","lease_ms":35000}}"#
        );
        assert_eq!(Envelope::decode(json.as_bytes()).unwrap(), tcp);
        // UDP registrations carry the 32-hex-char token.
        let udp = Envelope::response(
            4,
            2,
            Body::Registered {
                proxy: a("203.0.113.10:40002"),
                lease_ms: 35_000,
                token: Some("00112233445566778899aabbccddeeff".into()),
            },
        );
        let json = String::from_utf8(udp.encode().unwrap()).unwrap();
        assert!(
            json.contains(r#""token":"00112233445566778899aabbccddeeff""#),
            "{json}"
        );
        assert_eq!(Envelope::decode(json.as_bytes()).unwrap(), udp);
    }

    #[test]
    fn exact_json_of_register_and_connect_decision() {
        let req = Envelope::request(
            7301,
            Body::Register {
                transport: Transport::Tcp,
                local: a("10.1.0.5:9618"),
                previous_proxy: None,
                previous_token: None,
            },
        );
        assert_eq!(
            String::from_utf8(req.encode().unwrap()).unwrap(),
            r#"{"v":1,"id":7301,"body":{"type":"register","transport":"tcp","local":"10.1.0.5:9618"}}"#
        );
        let rep = Envelope::response(
            55,
            7301,
            Body::ConnectDecision {
                route: Route::Relay {
                    addr: a("203.0.113.10:9001"),
                    connect_id: cid(),
                },
            },
        );
        assert_eq!(
            String::from_utf8(rep.encode().unwrap()).unwrap(),
            r#"{"v":1,"id":55,"re":7301,"body":{"type":"connect_decision","route":{"kind":"relay","addr":"203.0.113.10:9001","connect_id":"00112233445566778899aabbccddeeff"}}}"#
        );
        let ack = Envelope::response(1, 2, Body::Ack {});
        assert_eq!(
            String::from_utf8(ack.encode().unwrap()).unwrap(),
            r#"{"v":1,"id":1,"re":2,"body":{"type":"ack"}}"#
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let j = br#"{"v":1,"id":9,"future":[1,2],"body":{"type":"ack","extra":{"x":1}}}"#;
        assert_eq!(
            Envelope::decode(j).unwrap(),
            Envelope::request(9, Body::Ack {})
        );
        let j = br#"{"v":1,"id":9,"re":3,"body":{"type":"connect_decision","route":{"kind":"direct","addr":"1.2.3.4:5","via":"x"},"hint":1}}"#;
        assert_eq!(
            Envelope::decode(j).unwrap().body,
            Body::ConnectDecision {
                route: Route::Direct {
                    addr: a("1.2.3.4:5")
                }
            }
        );
        // unknown error codes map to Unknown
        let j = br#"{"v":1,"id":9,"re":3,"body":{"type":"error","code":"teapot","reason":""}}"#;
        assert_eq!(
            Envelope::decode(j).unwrap().body,
            Body::Error {
                code: ErrorCode::Unknown,
                reason: String::new()
            }
        );
    }

    #[test]
    fn newer_version_and_unknown_type() {
        let j = br#"{"v":2,"id":9,"body":{"type":"teleport"}}"#;
        let e = Envelope::decode(j).unwrap_err();
        assert_eq!(
            e,
            DecodeError::Version {
                v: 2,
                id: 9,
                re: None
            }
        );
        assert_eq!(e.error_code(), Some(ErrorCode::Version));
        let j = br#"{"v":1,"id":9,"body":{"type":"teleport","to":"mars"}}"#;
        let e = Envelope::decode(j).unwrap_err();
        assert!(
            matches!(&e, DecodeError::UnknownType { type_name, id: 9, re: None } if type_name == "teleport")
        );
        assert_eq!(e.error_code(), Some(ErrorCode::Unsupported));
    }

    #[test]
    fn bad_bodies_and_malformed() {
        let bad: &[&[u8]] = &[
            br#"{"v":1,"id":9,"body":{"type":"register","transport":"sctp","local":"1.2.3.4:5"}}"#,
            br#"{"v":1,"id":9,"body":{"type":"register","transport":"tcp"}}"#,
            br#"{"v":1,"id":9,"body":{"type":"register","transport":"tcp","local":"nope"}}"#,
            br#"{"v":1,"id":9,"body":{"type":"connect_back","connect_id":"00112233445566778899AABBCCDDEEFF","dial":"1.2.3.4:5","proxy":"1.2.3.4:5","logical_peer":"1.2.3.4:5"}}"#,
            br#"{"v":1,"id":9,"body":{"type":"connect_decision","route":{"kind":"wormhole"}}}"#,
            br#"{"v":1,"id":9,"body":{"no_type":1}}"#,
            br#"{"v":1,"id":9,"body":[1]}"#,
            br#"{"v":1,"id":9,"body":{"type":7}}"#,
            br#"{"v":0,"id":9,"body":{"type":"ack"}}"#,
            br#"{"v":1,"id":9,"body":{"type":"forward","transport":"tcp","private":"1.2.3.4:5","probe_port":70000}}"#,
            br#"{"v":1,"id":9,"body":{"type":"punch_end","proxy":"1.2.3.4:5","peer":"[::1]:5","peer_proxy":"1.2.3.4:6"}}"#,
            br#"{"v":1,"id":9,"body":{"type":"punch_end","proxy":"1.2.3.4:5","peer":"1.2.3.4:7"}}"#,
        ];
        for j in bad {
            let e = Envelope::decode(j).unwrap_err();
            assert!(
                matches!(
                    e,
                    DecodeError::BadBody {
                        id: 9,
                        re: None,
                        ..
                    }
                ),
                "{}: {e:?}",
                String::from_utf8_lossy(j)
            );
            assert_eq!(e.error_code(), Some(ErrorCode::BadRequest));
        }
        let malformed: &[&[u8]] = &[
            b"",
            b"null",
            b"\xff\xfe",
            br#"{"v":1,"body":{"type":"ack"}}"#,
            br#"{"v":1,"id":-1,"body":{"type":"ack"}}"#,
            br#"{"v":1,"id":1}"#,
            br#"{"v":"1","id":1,"body":{"type":"ack"}}"#,
            br#"{"v":1,"id":1,"body":{"type":"ack"}"#,
        ];
        for j in malformed {
            let e = Envelope::decode(j).unwrap_err();
            assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
            assert_eq!(e.header(), None);
        }
        let deep = "[".repeat(1000);
        assert!(matches!(
            Envelope::decode(deep.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn size_limit() {
        let big = Body::Error {
            code: ErrorCode::Internal,
            reason: "x".repeat(MAX_ENVELOPE),
        };
        assert!(matches!(
            Envelope::request(1, big).encode(),
            Err(EncodeError::TooLarge {
                limit: MAX_ENVELOPE,
                ..
            })
        ));
        // Body::error truncates so it always fits, even with multi-byte chars.
        let e = Body::error(ErrorCode::Internal, "é".repeat(1000));
        let Body::Error { reason, .. } = &e else {
            unreachable!()
        };
        assert!(reason.len() <= MAX_REASON);
        assert!(Envelope::response(u64::MAX, u64::MAX, e).encode().is_ok());
        assert_eq!(
            Envelope::decode(&vec![b' '; MAX_DATAGRAM + 1]),
            Err(DecodeError::TooLarge(MAX_DATAGRAM + 1))
        );
        assert_eq!(MAX_ENVELOPE + crate::auth::KEYED_OVERHEAD, MAX_DATAGRAM);
    }

    #[test]
    fn heartbeat_batches_fit() {
        assert_eq!(
            heartbeat_batches(&[]),
            vec![Body::Heartbeat { proxies: vec![] }]
        );
        let many: Vec<SocketAddr> = (0..500u16)
            .map(|i| {
                if i % 2 == 0 {
                    SocketAddr::from(([203, 0, 113, 200], 60000 + i))
                } else {
                    format!("[2001:db8:ffff:ffff:ffff:ffff:ffff:{i:x}]:65535")
                        .parse()
                        .unwrap()
                }
            })
            .collect();
        let batches = heartbeat_batches(&many);
        assert!(batches.len() > 1);
        let mut back = Vec::new();
        for b in batches {
            let env = Envelope::response(u64::MAX, u64::MAX, b.clone());
            assert!(env.encode().is_ok());
            let Body::Heartbeat { proxies } = b else {
                unreachable!()
            };
            back.extend(proxies);
        }
        assert_eq!(back, many);
    }

    #[test]
    fn connect_id_parser() {
        let s = "00112233445566778899aabbccddeeff";
        assert_eq!(ConnectId::parse(s).unwrap(), cid());
        assert_eq!(cid().to_string(), s);
        assert_eq!(ConnectId::parse(""), Err(ConnectIdError::Length(0)));
        assert_eq!(ConnectId::parse(&s[1..]), Err(ConnectIdError::Length(31)));
        assert_eq!(
            ConnectId::parse("00112233445566778899AABBCCDDEEFF"),
            Err(ConnectIdError::NotLowerHex)
        );
        assert_eq!(
            ConnectId::parse("0011223344556677889 aabbccddeeff"),
            Err(ConnectIdError::NotLowerHex)
        );
        // 32 bytes but multi-byte chars: rejected, no panic
        assert!(ConnectId::parse("éééééééééééééééé").is_err());
        let r: Result<ConnectId, _> = serde_json::from_str("\"00112233445566778899aabbccddeegg\"");
        assert!(r.is_err());
    }
}
