//! The broker's state, shared by the handler modules: the [`Server`] itself, what
//! each poll token belongs to, and the connections waiting in each phase (reading a
//! preamble, waiting for their pair, a claimed standby waiting for its ack).

use std::collections::{HashMap, HashSet};
use std::io::{self};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use gcb_proto::token::OwnerSecret;
use gcb_proto::{ConnectId, Endpoint, Now, RequestId, Transport};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Poll, Token};
use tracing::warn;

use crate::relay::Relay;
use gcb_proto::preamble;

use crate::iplimits::RateLimiter;
use crate::punchmemo::PunchMemo;
use crate::registry::Registry;
use crate::standby::StandbyPool;
use crate::udpproxy::{RateLimit, UdpPlane};

use super::config::Config;
use super::counters::Counters;
use super::env::{Clock, Random};

/// The control socket's poll token.
pub(super) const CONTROL: Token = Token(0);
/// The relay port's poll token.
pub(super) const RELAY_LISTENER: Token = Token(1);
/// The first token handed to proxies, preambles, standbys and relays.
pub(super) const FIRST_DYNAMIC: usize = 2;

/// How often timers (leases, deadlines) are swept at most.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Longest sleep in `poll`, so a signal is noticed even without EINTR.
pub(super) const MAX_SLEEP: Duration = Duration::from_millis(250);

/// A relay-port connection still reading its 45-byte preamble.
pub(super) struct PreambleConn {
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) buf: [u8; preamble::LEN],
    pub(super) got: usize,
    pub(super) deadline: Instant,
}

/// A connect id waiting for (the rest of) its pair. Keyed in `Server::pending` by the
/// id's presentation ([`Use::Connect`]), which is what the relay port reads.
pub(super) struct Pending {
    /// The connect id itself (what `connect_back` and `connect_decision` carry).
    pub(super) raw: [u8; 16],
    pub(super) proxy: SocketAddr,
    /// The IPs allowed to present the id: the listener's observed IP, and for a
    /// connect_request the connector's.
    pub(super) allowed: Vec<IpAddr>,
    /// An unauthenticated connect_request's listener side, started only when the
    /// connector's own connection has presented the id from its observed IP (a spoofed
    /// datagram then costs the listener nothing).
    pub(super) deferred: Option<Deferred>,
    /// The connection that arrived first (a proxy connector, or the first of
    /// two relay-port arrivals).
    pub(super) waiting: Option<(TcpStream, SocketAddr)>,
    pub(super) deadline: Instant,
    pub(super) connect_back: Option<RequestId>,
    /// A `Route::Punch` decision: the connector's leg starts the punch
    /// ([`PunchPair`]) instead of waiting for its partner.
    pub(super) punch: bool,
}

/// What an unauthenticated relay decision still has to do once its connector arrives.
pub(super) struct Deferred {
    pub(super) connector_ip: IpAddr,
    /// The registration's control address (where a connect_back goes).
    pub(super) listener: SocketAddr,
    /// The connector as the program will see it.
    pub(super) logical_peer: SocketAddr,
}

pub(super) struct RelayEntry {
    pub(super) relay: Relay,
    pub(super) tokens: [Token; 2],
    pub(super) label: String,
    /// The connector's IP, which the relay counts against (--max-relays-per-ip).
    pub(super) connector: Option<IpAddr>,
    /// When it started (for `status`).
    pub(super) started: Instant,
}

pub(super) enum Owner {
    Proxy(SocketAddr),
    /// A parked standby connection.
    Standby,
    /// A standby with a claim written, waiting for the shim's ack.
    Claim,
    UdpProxy(SocketAddr),
    Preamble,
    Relay(usize),
    /// Either connection of a TCP punch in progress (keyed by the pairing's id).
    Punch([u8; 16]),
}

/// A TCP punch in progress (`tcp_punch`): the connector's leg, which will say
/// `DIRECT` or `RELAY`, and the listener's standby that got the claim.
pub(super) struct PunchPair {
    pub(super) leg: TcpStream,
    pub(super) leg_peer: SocketAddr,
    pub(super) leg_token: Token,
    /// None once it closed (a relay then falls back to `connect_back`).
    pub(super) standby: Option<(TcpStream, Token)>,
    pub(super) standby_peer: SocketAddr,
    pub(super) proxy: SocketAddr,
    /// The registration's control address (a fallback `connect_back` goes there).
    pub(super) listener: SocketAddr,
    pub(super) deadline: Instant,
}

/// A standby connection that was handed a connection: waiting for the shim's ack byte.
pub(super) struct Claim {
    pub(super) stream: TcpStream,
    /// The standby's source address.
    pub(super) peer: SocketAddr,
    /// The pairing it completes once acked.
    pub(super) id: [u8; 16],
    pub(super) proxy: SocketAddr,
    /// Where a fallback connect_back goes (the registration's control address).
    pub(super) listener: SocketAddr,
    /// The connector as the program will see it.
    pub(super) logical_peer: SocketAddr,
    pub(super) deadline: Instant,
}

/// How long a claimed standby's owner has to ack before the broker falls back to
/// `connect_back` (the owner is not running the shim's event handler, e.g. a pre-fork
/// master asleep in waitpid()).
pub(super) const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);

/// What an outstanding request of ours was for.
pub(super) enum Outgoing {
    ConnectBack([u8; 16]),
    Reregister(SocketAddr),
    /// A `punch_back` to a UDP registrant (its answer is only logged).
    PunchBack,
    /// A `punch_end` to a UDP registrant (likewise).
    PunchEnd,
}

/// A drain in progress (see `lifecycle`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Drain {
    /// When it began (relays still open `drain_grace` later are reset).
    pub(super) started: Instant,
    /// SIGTERMs seen when it began.
    pub(super) terms: usize,
}

/// The broker.
pub struct Server {
    pub(super) cfg: Config,
    pub(super) poll: Poll,
    pub(super) control: UdpSocket,
    /// The relay port (None once draining).
    pub(super) relay_listener: Option<TcpListener>,
    /// The advertised IP and the bound control port (UDP control == TCP relay): what
    /// clients are told, and the IP of every proxy address.
    pub(super) addr: SocketAddr,
    pub(super) ep: Endpoint,
    pub(super) registry: Registry,
    pub(super) owners: HashMap<Token, Owner>,
    pub(super) next_token: usize,
    pub(super) proxies: HashMap<SocketAddr, (Token, TcpListener)>,
    /// UDP proxy sockets, relay rules and their counters.
    pub(super) udp: UdpPlane,
    /// UDP proxies whose drain budget ran out: served again next turn.
    pub(super) udp_backlog: Vec<SocketAddr>,
    pub(super) preambles: HashMap<Token, PreambleConn>,
    pub(super) pending: HashMap<[u8; 16], Pending>,
    pub(super) relays: HashMap<usize, RelayEntry>,
    pub(super) standby: StandbyPool<Token, TcpStream>,
    pub(super) claims: HashMap<Token, Claim>,
    /// TCP punches in progress, by pairing id.
    pub(super) punches: HashMap<[u8; 16], PunchPair>,
    /// TCP proxies whose listener's shim takes punch claims (`register{punch}`).
    pub(super) punch_listeners: HashSet<SocketAddr>,
    /// Pairs of public IPs whose punch failed lately.
    pub(super) punch_memo: PunchMemo,
    pub(super) outgoing: HashMap<RequestId, Outgoing>,
    pub(super) reregistering: HashSet<SocketAddr>,
    /// Computes registration tokens ([`gcb_proto::token`]).
    pub(super) owner: OwnerSecret,
    /// Freed proxy addresses reserved for their owners, until when (lapsed ones are
    /// dropped at `next_reserved_purge`).
    pub(super) reserved: HashMap<(Transport, SocketAddr), Instant>,
    pub(super) next_reserved_purge: Instant,
    /// Connector IP of each pairing admitted (proxy accepts and relay decisions):
    /// what its pending entry and then its relay count against. Entries whose id
    /// is no longer pending are dropped at the sweep and when the relay starts.
    pub(super) connector_of: HashMap<[u8; 16], IpAddr>,
    /// Per-IP token buckets for control datagrams.
    pub(super) control_rate: RateLimiter,
    /// Rate limits of the "limit reached" log lines, by limit.
    pub(super) limit_logs: HashMap<&'static str, RateLimit>,
    pub(super) counters: Counters,
    pub(super) next_sweep: Instant,
    pub(super) next_stats: Option<Instant>,
    /// An accept failed (EMFILE, ENOBUFS...): the connection stays queued
    /// but edge-triggered readiness will not repeat, so the sweep retries.
    pub(super) retry_accept: bool,
    /// Set by the first SIGTERM ([`super::lifecycle`]).
    pub(super) drain: Option<Drain>,
    /// Where time comes from ([`super::env`]).
    pub(super) clock: Box<dyn Clock>,
    /// Where connect ids and nonces come from.
    pub(super) random: Box<dyn Random>,
    /// The admin socket and the metrics listener ([`gcb_ops`]), once opened.
    pub(super) ops: gcb_ops::OpsSlot,
    /// When the server started (for `status`).
    pub(super) started: Instant,
    /// The bound control/relay address; proxy sockets bind its IP (maybe a wildcard).
    pub(super) bound: SocketAddr,
    /// Per proxy IP (advertised), where the next search of `Config::proxy_ports` for a
    /// free port starts (turns round the range, so a just-freed port is not the first
    /// one handed out again).
    pub(super) next_proxy_port: HashMap<IpAddr, u16>,
    /// Proxy IPs (advertised) found without a free port, until when they are skipped:
    /// with `Config::proxy_ips`, a full IP is not searched again for every registration.
    pub(super) proxy_ip_full: HashMap<IpAddr, Instant>,
}

pub(super) fn hex(id: &[u8; 16]) -> String {
    ConnectId::from_bytes(*id).to_string()
}

pub(super) fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

pub(super) fn v4_of(a: SocketAddr) -> Option<std::net::SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// The keys of `map` whose deadline has passed at `now`.
pub(super) fn due<K: Copy, V>(
    map: &HashMap<K, V>,
    now: Instant,
    deadline: impl Fn(&V) -> Instant,
) -> Vec<K> {
    map.iter()
        .filter(|(_, v)| deadline(v) <= now)
        .map(|(k, _)| *k)
        .collect()
}

pub(super) fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

/// Closes a connection with RST (SO_LINGER 0).
pub(super) fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

pub(super) fn drop_conn(c: Option<(TcpStream, SocketAddr)>) {
    if let Some((s, _)) = c {
        reset(s);
    }
}

impl Server {
    /// The current time, from the injected clock.
    pub(super) fn now(&self) -> Now {
        self.clock.now()
    }

    /// 16 bytes from the injected random source (a connect id, a nonce).
    pub(super) fn random16(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        self.random.fill(&mut b);
        b
    }

    pub(super) fn token(&mut self, owner: Owner) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.owners.insert(t, owner);
        t
    }

    /// Logs a "limit reached" line, at most one per second per limit `kind`
    /// (floods must not flood the log too), saying how many were suppressed.
    pub(super) fn limit_hit(&mut self, kind: &'static str, line: impl FnOnce() -> String) {
        self.limit_hit_every(kind, Duration::from_secs(1), line);
    }

    /// [`Server::limit_hit`] at most once per `every` for `kind`.
    pub(super) fn limit_hit_every(
        &mut self,
        kind: &'static str,
        every: Duration,
        line: impl FnOnce() -> String,
    ) {
        let rl = self
            .limit_logs
            .entry(kind)
            .or_insert_with(|| RateLimit::new(every));
        if let Some(n) = rl.allow(Instant::now()) {
            let more = if n > 0 {
                format!(" ({n} similar lines suppressed)")
            } else {
                String::new()
            };
            warn!("{}{more}", line());
        }
    }
}
