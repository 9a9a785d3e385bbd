//! Control-plane messages: the JSON envelope and every message body.
//!
//! See the crate documentation for the wire format and the compatibility
//! rules. In short: an [`Envelope`] is `{"v":1,"id":..,"re":..,"body":{..}}`,
//! the body is internally tagged by `"type"`, unknown fields are ignored,
//! an unknown `type` is answered with `error{code: unsupported}` and a
//! newer `v` with `error{code: version}`.

use std::fmt;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

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
    /// TCP hole punching (`crate::tcp_punch`): connect to the broker's relay at `addr`
    /// from a fresh port, present `connect_id`, and read the broker's offer there; the
    /// connection is the relay if the punch does not connect in time.
    Punch {
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
        /// The listener's shim takes TCP punch claims on its standbys.
        #[serde(default, skip_serializing_if = "is_false")]
        punch: bool,
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
        /// The connector can punch a TCP hole (`Route::Punch`).
        #[serde(default, skip_serializing_if = "is_false")]
        punch: bool,
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
        /// The gateway's public IP (what its forwarded ports are reached at), so a client
        /// can report where it can be reached before it forwards anything; absent from
        /// older servers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public_ip: Option<IpAddr>,
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
mod tests;

fn is_false(b: &bool) -> bool {
    !*b
}
