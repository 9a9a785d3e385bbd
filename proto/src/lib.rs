//! # gcb-proto: the libgcb control-plane protocol
//!
//! The shim (`libgcb.so`), the GCB broker (`brokerd`) and the DPF daemon
//! (`portfwd`) talk request/response over UDP. This crate is that protocol
//! and nothing else: message types ([`msg`]), framing and pool-key
//! authentication ([`auth`]), a sans-IO reliable request/response state
//! machine ([`rudp`]), and the GCB UDP data-plane frame between a UDP
//! listener and its proxy on the broker ([`udp`]). It opens no sockets, starts no threads, reads no clock
//! and draws no randomness: time and random session ids come in as arguments,
//! datagrams and timers go out (the quinn-proto shape). Behind the `conf` feature it also
//! holds the daemons' shared configuration layering ([`conf`]: TOML file, environment,
//! command line), the one format besides the wire protocol that several binaries share;
//! it too takes its file reader and environment as arguments.
//!
//! ## Modules
//!
//! Sans-IO: no sockets, no clock reads (time comes in as arguments). Floors,
//! checked by `scripts/modgraph --check proto/src`:
//!
//! - **Floor 0, encodings**: `addr`, `auth`, `conf`, `preamble`, `udp`
//! - **Floor 1, messages**: `msg`, `punch`, `pool`
//! - **Floor 2, state machines and tokens**: `rudp`, `token`, `tcp_punch`
//!
//! ## Wire format
//!
//! One UDP datagram is one *frame* holding one JSON *envelope*; a frame is at
//! most [`MAX_DATAGRAM`] (1200) bytes.
//!
//! ```text
//! unkeyed frame: "GCB1" | 0x00 | json
//! keyed frame:   "GCB1" | 0x01 | ts u64 BE (unix ms) | session u64 BE | counter u64 BE
//!                       | HMAC-SHA256(pool key, all other bytes) [32] | json
//! ```
//!
//! The envelope:
//!
//! ```json
//! {"v":1,"id":7301,"body":{"type":"register","transport":"tcp","local":"10.1.0.5:9618"}}
//! {"v":1,"id":55,"re":7301,"body":{"type":"registered","proxy":"203.0.113.10:40001","lease_ms":60000}}
//! ```
//!
//! - `v`: protocol version ([`PROTOCOL_VERSION`]).
//! - `id`: the sender's message id, unique per sender session.
//! - `re`: present exactly on responses; the request id answered.
//! - `body`: a [`Body`], tagged by `type` (snake_case); socket addresses are
//!   strings (`"1.2.3.4:5"`, `"[::1]:5"`), connect ids 32 lowercase hex
//!   characters, optional fields are omitted when absent.
//!
//! ## Versioning and compatibility
//!
//! - Unknown fields (in the envelope, the body, or a route) are ignored, so a
//!   newer peer may add optional fields without bumping `v`.
//! - A request whose `type` is unknown is answered `error{code: unsupported}`,
//!   so a newer peer can probe for features and fall back.
//! - A message whose `v` is greater than ours is answered
//!   `error{code: version}` (we always send `v: 1`). `v: 0` is `bad_request`.
//! - A known `type` with invalid fields is answered `error{code: bad_request}`.
//! - An unknown error code decodes as [`ErrorCode::Unknown`]; an unknown route
//!   kind or malformed response completes the request with a locally made
//!   `error` body, so the requester never waits out its deadline.
//! - Incompatible changes bump `v`; the frame magic `GCB1` and the flags byte
//!   (reserved bits must be zero) version the framing separately.
//!
//! ## Authentication
//!
//! With a pool key (`PoolKey::from_file_contents`), every frame carries a
//! timestamp, a nonce `(session, counter)` and an HMAC; receivers reject
//! missing or bad MACs, timestamps more than 30 s off their clock, and
//! replayed nonces ([`RejectReason`]). Without a key, frames carry no MAC and
//! a keyless receiver rejects keyed frames (`unexpected_mac`) rather than
//! silently accept a misconfigured peer. The daemons refuse to start without a
//! key unless told `--insecure`, and then restrict by source address and
//! interface themselves (docs/THREAT-MODEL.md). What registrations present on
//! the data planes is derived from their tokens with the key ([`token`]).
//!
//! ## One request, end to end
//!
//! A program in a private network calls `listen()`; the shim registers it.
//!
//! 1. Shim: `ep.send_request(now, broker, Body::Register { transport: Tcp,
//!    local, previous_proxy: None, previous_token: None })` returns `RequestId(7301)` and queues a frame. The shim sends
//!    each [`Transmit`] from `ep.poll_transmit()` on its UDP socket and sleeps
//!    until `ep.poll_timeout()` or socket readability.
//! 2. The datagram is lost. At the timeout the shim calls
//!    `ep.handle_timeout(now)`, which re-seals the same JSON (same `id`, fresh
//!    nonce and timestamp) and queues it again; the next retransmission is
//!    400 ms later, doubling to 2 s.
//! 3. Broker: `ep.handle_datagram(now, from, bytes)` checks the frame (MAC,
//!    timestamp, nonce), decodes the envelope, finds `(from, 7301)` new, and
//!    `ep.poll_event()` yields `Event::Request { from, id: RequestId(7301),
//!    body: Register{..} }`. The broker opens a proxy socket and calls
//!    `ep.respond(now, from, RequestId(7301), Body::Registered { proxy,
//!    lease_ms, token: None })`, which queues the reply and caches it for 30 s.
//! 4. The reply is lost too; the shim retransmits. The broker's endpoint
//!    sees `(from, 7301)` answered and re-sends the cached reply without
//!    surfacing anything: the registration happens once.
//! 5. Shim: `handle_datagram` matches `re: 7301` to the outstanding request
//!    from the same peer, and `poll_event()` yields `Event::Response { from,
//!    request: RequestId(7301), body: Registered{..} }`. `getsockname()` now
//!    answers the proxy address. Had nothing come back within 10 s,
//!    `Event::Timeout` would have been reported instead, exactly once.
//!
//! The same exchange in code (no loss here; see `tests/lossy_link.rs` for
//! the lossy version):
//!
//! ```
//! use std::time::Instant;
//! use gcb_proto::{Body, Config, Endpoint, Event, Now, PoolKey, Transport};
//!
//! let key = PoolKey::from_file_contents(b"example-pool-key-16+\n").unwrap();
//! let (shim_addr, broker_addr) = ("10.1.0.5:4000".parse().unwrap(), "203.0.113.10:9618".parse().unwrap());
//! let mut shim = Endpoint::new(Config::default(), Some(key.clone()), 0x5eed_0001);
//! let mut broker = Endpoint::new(Config::default(), Some(key), 0x5eed_0002);
//! let now = Now { mono: Instant::now(), unix_ms: 1_700_000_000_000 };
//!
//! let req = shim
//!     .send_request(now, broker_addr, Body::Register {
//!         transport: Transport::Tcp,
//!         local: shim_addr,
//!         previous_proxy: None,
//!         previous_token: None,
//!         punch: false,
//!     })
//!     .unwrap();
//! let tx = shim.poll_transmit().unwrap();            // send on the UDP socket
//! broker.handle_datagram(now, shim_addr, &tx.payload); // received by the broker
//! let Some(Event::Request { from, id, .. }) = broker.poll_event() else { panic!() };
//! let proxy = "203.0.113.10:40001".parse().unwrap();
//! broker.respond(now, from, id, Body::Registered { proxy, lease_ms: 60_000, token: None }).unwrap();
//! let tx = broker.poll_transmit().unwrap();
//! shim.handle_datagram(now, broker_addr, &tx.payload);
//! assert_eq!(
//!     shim.poll_event(),
//!     Some(Event::Response { from: broker_addr, request: req, body: Body::Registered { proxy, lease_ms: 60_000, token: None } })
//! );
//! assert_eq!(shim.poll_timeout(), None); // nothing left to retransmit
//! ```
//!
//! Heartbeats are ordinary `heartbeat` requests sent every
//! [`rudp::HEARTBEAT_INTERVAL`] (see [`rudp::Ticker`] and
//! [`msg::heartbeat_batches`]); the broker answers `heartbeat_ack { unknown }`
//! and the shim re-registers the unknown proxies. A broker that gets a
//! heartbeat from a client it does not know at all may also send it
//! `reregister_request` (paper 4.2.2).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod auth;
#[cfg(feature = "conf")]
pub mod conf;
pub mod msg;
pub mod pool;
pub mod preamble;
pub mod punch;
pub mod rudp;
pub mod tcp_punch;
pub mod token;
pub mod udp;

pub use auth::{KeyError, Opener, PoolKey, RejectReason, Sealer};
pub use msg::{
    Body, ConnectId, ConnectIdError, DecodeError, EncodeError, Envelope, ErrorCode, Route,
    Transport, MAX_DATAGRAM, MAX_ENVELOPE, PROTOCOL_VERSION,
};
pub use rudp::{Config, Endpoint, Event, Now, RequestId, SendError, Stats, Ticker, Transmit};
pub use udp::{UdpKind, MAX_UDP_PAYLOAD, UDP_HEADER_LEN, UDP_TOKEN_LEN};

/// One line for an error and its causes, `outer: cause: root`, for the daemons' fatal
/// errors. A cause whose text the line already ends with is skipped (an error whose message
/// shows its source, as the daemons' `thiserror` types do for their log lines, would
/// otherwise print it twice).
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod error_line_tests {
    use super::error_line;
    use std::fmt;

    #[derive(Debug)]
    struct Wrap(&'static str, Option<Box<Wrap>>);
    impl fmt::Display for Wrap {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|w| w as _)
        }
    }

    #[test]
    fn chains_causes_once() {
        let root = Wrap("permission denied", None);
        let shows_source = Wrap("bind 1.2.3.4:5: permission denied", Some(Box::new(root)));
        let top = Wrap("starting", Some(Box::new(shows_source)));
        assert_eq!(
            error_line(&top),
            "starting: bind 1.2.3.4:5: permission denied"
        );
        let plain = Wrap("a", Some(Box::new(Wrap("b", None))));
        assert_eq!(error_line(&plain), "a: b");
    }
}
