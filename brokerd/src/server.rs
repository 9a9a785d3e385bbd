//! The event loop: one mio `Poll` over the control UDP socket, the relay
//! TCP listener, every proxy listener, connections reading their preamble,
//! and the spliced relays.
//!
//! See the crate documentation for the walk-through of one brokered
//! connection. Everything here is single-threaded; the pure parts live in
//! [`crate::decision`], [`crate::registry`], [`crate::preamble`] and
//! [`crate::relay`].

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, error, info, warn};

use gcb_proto::token::{self, OwnerSecret, Use};
use gcb_proto::{
    Body, ConnectId, Endpoint, ErrorCode, Event, Now, PoolKey, RequestId, Route, Transport,
};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use crate::allow::AllowList;
use crate::decision::{canonical, decide, Decision, Party};
use crate::iplimits::RateLimiter;
use crate::preamble::{self, Preamble};
use crate::registry::{Limits, Registry, RegistryError};
use crate::relay::{Relay, RelayState};
use crate::standby::{ParkError, StandbyPool};
use crate::udpproxy::{PunchEnd, RateLimit, UdpPlane, UdpProxy};
use crate::udprules::RuleLimits;

/// Default control (UDP) and relay (TCP) port.
pub const DEFAULT_PORT: u16 = 9650;

const CONTROL: Token = Token(0);
const RELAY_LISTENER: Token = Token(1);
const FIRST_DYNAMIC: usize = 2;

/// How often timers (leases, deadlines) are swept at most.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Longest sleep in `poll`, so a signal is noticed even without EINTR.
const MAX_SLEEP: Duration = Duration::from_millis(250);

/// Daemon configuration (built by `main` from the command line).
#[derive(Debug)]
pub struct Config {
    /// Control UDP address; the relay TCP listener uses the same IP:port and
    /// proxy listeners the same IP.
    pub listen: SocketAddr,
    /// Pool key: authenticate every control datagram.
    pub key: Option<PoolKey>,
    /// Sources allowed to send control datagrams (empty: all).
    pub allow: AllowList,
    /// Maximum registrations broker-wide.
    pub max_registrations: usize,
    /// Maximum registrations per client IP (all its source ports together).
    pub max_registrations_per_ip: usize,
    /// Maximum concurrent relays, counting pairings still waiting for their
    /// second connection.
    pub max_relays: usize,
    /// Maximum relays plus pairings waiting, per connector IP (the proxy
    /// client's IP, or the IP that sent the `connect_request`).
    pub max_relays_per_ip: usize,
    /// Maximum pairings waiting for their listener, per proxy.
    pub max_pending_per_proxy: usize,
    /// Maximum pairings waiting for their listener, per connector IP.
    pub max_pending_per_ip: usize,
    /// Maximum relay-port connections still reading their preamble.
    pub max_preambles: usize,
    /// Maximum relay-port connections still reading their preamble, per source IP.
    pub max_preambles_per_ip: usize,
    /// Control datagrams per second per source IP (token bucket; 0: no limit).
    pub control_rate_per_ip: u32,
    /// Token bucket size of `control_rate_per_ip`.
    pub control_burst_per_ip: u32,
    /// A relay that moved no byte either way for this long is reset (None: never).
    pub relay_idle: Option<Duration>,
    /// Registration lease.
    pub lease: Duration,
    /// How long a connect id waits for its partner connection.
    pub connect_timeout: Duration,
    /// How long a relay-port connection may take to send its preamble.
    pub preamble_timeout: Duration,
    /// Period of the stats log line (None: only at exit).
    pub stats_interval: Option<Duration>,
    /// A UDP relay rule unused for this long expires.
    pub udp_rule_idle: Duration,
    /// Maximum UDP relay rules broker-wide.
    pub max_udp_rules: usize,
    /// Maximum UDP relay rules per proxy.
    pub max_udp_rules_per_proxy: usize,
    /// How long a freed proxy address stays reserved for its owner (only a
    /// `register{previous_proxy}` with the ownership proof gets it back meanwhile).
    pub proxy_reserve: Duration,
    /// Maximum UDP relay rules per proxy from one sender IP.
    pub max_udp_rules_per_sender_ip: usize,
}

/// Errors that stop the daemon at startup.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address is unusable.
    #[error("--listen {0}: the broker needs a specific IP (proxy addresses are advertised), not a wildcard")]
    Unspecified(SocketAddr),
    /// A socket could not be set up.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The poller failed.
    #[error("poll: {0}")]
    Poll(#[from] io::Error),
}

/// Counters, printed by the stats line.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Control datagrams dropped by `--allow`.
    pub not_allowed: u64,
    /// Registrations created.
    pub registered: u64,
    /// Registrations dropped because their lease ran out.
    pub expired: u64,
    /// Requests refused for quota/busy.
    pub refused: u64,
    /// Connections accepted on proxy sockets.
    pub proxy_accepts: u64,
    /// Connections refused on proxy or relay sockets (limits).
    pub conns_refused: u64,
    /// Relays started / finished cleanly / reset.
    pub relays_started: u64,
    /// Relays that finished cleanly.
    pub relays_done: u64,
    /// Relays that ended in a reset.
    pub relays_reset: u64,
    /// Bytes relayed by finished relays (the stats line adds running ones).
    pub relay_bytes: u64,
    /// Relay-port connections with a bad preamble, EOF or unknown id.
    pub bad_preambles: u64,
    /// Relay-port connections that did not send a preamble in time.
    pub preamble_timeouts: u64,
    /// Connect ids whose partner never arrived.
    pub pairing_timeouts: u64,
    /// Standby connections parked (see [`crate::standby`]).
    pub standby_parked: u64,
    /// Standby connections refused (unknown key, proxy full).
    pub standby_refused: u64,
    /// Proxy connections served by a standby.
    pub standby_claimed: u64,
    /// Claims not acked in time (fell back to connect_back).
    pub standby_fallbacks: u64,
    /// connect_back requests the listener never answered.
    pub connect_back_failures: u64,
    /// Decisions by route.
    pub direct: u64,
    /// Reverse decisions.
    pub reverse: u64,
    /// Relay decisions.
    pub relay: u64,
    /// reregister_request messages sent.
    pub reregister_sent: u64,
    /// `previous_proxy` or `unregister` requests without a valid ownership proof.
    pub ownership_refused: u64,
    /// Standby or connect presentations from an IP they are not bound to.
    pub foreign_presentations: u64,
    /// Control datagrams dropped by the per-IP rate limit.
    pub control_rate_limited: u64,
    /// Proxy connections and relay decisions refused by a relay limit (global,
    /// per proxy or per IP; also counted in `conns_refused` / `refused`).
    pub relay_limit_refusals: u64,
    /// Relay-port connections refused by the per-IP preamble limit.
    pub preamble_limit_refusals: u64,
    /// Relays reset for moving no byte for --relay-idle-secs.
    pub relays_idle_closed: u64,
}

/// A relay-port connection still reading its 45-byte preamble.
struct PreambleConn {
    stream: TcpStream,
    peer: SocketAddr,
    buf: [u8; preamble::LEN],
    got: usize,
    deadline: Instant,
}

/// A connect id waiting for (the rest of) its pair. Keyed in `Server::pending` by the
/// id's presentation ([`Use::Connect`]), which is what the relay port reads.
struct Pending {
    /// The connect id itself (what `connect_back` and `connect_decision` carry).
    raw: [u8; 16],
    proxy: SocketAddr,
    /// The IPs allowed to present the id: the listener's observed IP, and for a
    /// connect_request the connector's.
    allowed: Vec<IpAddr>,
    /// An unauthenticated connect_request's listener side, started only when the
    /// connector's own connection has presented the id from its observed IP (a spoofed
    /// datagram then costs the listener nothing).
    deferred: Option<Deferred>,
    /// The connection that arrived first (a proxy connector, or the first of
    /// two relay-port arrivals).
    waiting: Option<(TcpStream, SocketAddr)>,
    deadline: Instant,
    connect_back: Option<RequestId>,
}

/// What an unauthenticated relay decision still has to do once its connector arrives.
struct Deferred {
    connector_ip: IpAddr,
    /// The registration's control address (where a connect_back goes).
    listener: SocketAddr,
    /// The connector as the program will see it.
    logical_peer: SocketAddr,
}

struct RelayEntry {
    relay: Relay,
    tokens: [Token; 2],
    label: String,
    /// The connector's IP, which the relay counts against (--max-relays-per-ip).
    connector: Option<IpAddr>,
}

enum Owner {
    Proxy(SocketAddr),
    /// A parked standby connection.
    Standby,
    /// A standby with a claim written, waiting for the shim's ack.
    Claim,
    UdpProxy(SocketAddr),
    Preamble,
    Relay(usize),
}

/// A standby connection that was handed a connection: waiting for the shim's ack byte.
struct Claim {
    stream: TcpStream,
    /// The standby's source address.
    peer: SocketAddr,
    /// The pairing it completes once acked.
    id: [u8; 16],
    proxy: SocketAddr,
    /// Where a fallback connect_back goes (the registration's control address).
    listener: SocketAddr,
    /// The connector as the program will see it.
    logical_peer: SocketAddr,
    deadline: Instant,
}

/// How long a claimed standby's owner has to ack before the broker falls back to
/// `connect_back` (the owner is not running the shim's event handler, e.g. a pre-fork
/// master asleep in waitpid()).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(1);

/// What an outstanding request of ours was for.
enum Outgoing {
    ConnectBack([u8; 16]),
    Reregister(SocketAddr),
    /// A `punch_back` to a UDP registrant (its answer is only logged).
    PunchBack,
    /// A `punch_end` to a UDP registrant (likewise).
    PunchEnd,
}

/// The broker.
pub struct Server {
    cfg: Config,
    poll: Poll,
    control: UdpSocket,
    relay_listener: TcpListener,
    /// listen IP:port (UDP control == TCP relay).
    addr: SocketAddr,
    ep: Endpoint,
    registry: Registry,
    owners: HashMap<Token, Owner>,
    next_token: usize,
    proxies: HashMap<SocketAddr, (Token, TcpListener)>,
    /// UDP proxy sockets, relay rules and their counters.
    udp: UdpPlane,
    /// UDP proxies whose drain budget ran out: served again next turn.
    udp_backlog: Vec<SocketAddr>,
    preambles: HashMap<Token, PreambleConn>,
    pending: HashMap<[u8; 16], Pending>,
    relays: HashMap<usize, RelayEntry>,
    standby: StandbyPool<Token, TcpStream>,
    claims: HashMap<Token, Claim>,
    outgoing: HashMap<RequestId, Outgoing>,
    reregistering: HashSet<SocketAddr>,
    /// Computes registration tokens ([`gcb_proto::token`]).
    owner: OwnerSecret,
    /// Freed proxy addresses reserved for their owners, until when.
    reserved: HashMap<(Transport, SocketAddr), Instant>,
    /// Connector IP of each pairing admitted (proxy accepts and relay decisions):
    /// what its pending entry and then its relay count against. Entries whose id
    /// is no longer pending are dropped at the sweep and when the relay starts.
    connector_of: HashMap<[u8; 16], IpAddr>,
    /// Per-IP token buckets for control datagrams.
    control_rate: RateLimiter,
    /// Rate limits of the "limit reached" log lines, by limit.
    limit_logs: HashMap<&'static str, RateLimit>,
    counters: Counters,
    next_sweep: Instant,
    next_stats: Option<Instant>,
    /// An accept failed (EMFILE, ENOBUFS...): the connection stays queued
    /// but edge-triggered readiness will not repeat, so the sweep retries.
    retry_accept: bool,
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// 16 random bytes from the kernel (getrandom(2)).
pub fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`,
        // which is valid writable memory for the whole call.
        let n = unsafe { libc::getrandom(b[filled..].as_mut_ptr().cast(), b.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // getrandom without flags only fails before the pool is
            // initialised or on EFAULT; neither happens here. Never hand out
            // a predictable id: abort.
            panic!("getrandom failed: {}", io::Error::last_os_error());
        }
    }
    b
}

fn hex(id: &[u8; 16]) -> String {
    ConnectId::from_bytes(*id).to_string()
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Server {
    /// Binds the control UDP socket and the relay TCP listener.
    pub fn bind(cfg: Config) -> Result<Server, StartError> {
        if cfg.listen.ip().is_unspecified() {
            return Err(StartError::Unspecified(cfg.listen));
        }
        // Port 0: pick a free UDP port and use the same number for TCP
        // (retrying if that TCP port happens to be taken).
        let mut attempts = if cfg.listen.port() == 0 { 20 } else { 1 };
        let (control, relay_listener) = loop {
            attempts -= 1;
            let control = UdpSocket::bind(cfg.listen).map_err(|source| StartError::Bind {
                what: "control udp",
                addr: cfg.listen,
                source,
            })?;
            let addr = control.local_addr()?;
            match TcpListener::bind(addr) {
                Ok(l) => break (control, l),
                Err(source) if attempts == 0 => {
                    return Err(StartError::Bind {
                        what: "relay tcp",
                        addr,
                        source,
                    })
                }
                Err(_) => continue,
            }
        };
        let addr = control.local_addr()?;
        // Bursts of heartbeats must not overflow the default receive buffer
        // (best effort: the kernel caps it at net.core.rmem_max).
        let _ = socket2::SockRef::from(&control).set_recv_buffer_size(1 << 20);
        let poll = Poll::new()?;
        let mut control = control;
        let mut relay_listener = relay_listener;
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)?;
        poll.registry()
            .register(&mut relay_listener, RELAY_LISTENER, Interest::READABLE)?;
        let session = u64::from_le_bytes(random_bytes()[..8].try_into().unwrap_or([1; 8]));
        // The reply cache bounds the request rate: an entry lives `reply_cache_ttl`
        // (longer than any client's retransmission deadline, 10 s at most), and a full
        // cache answers `busy`. 131072 entries over 12 s sustain ~10,000 requests/s, at
        // a few hundred bytes each.
        let ep_cfg = gcb_proto::Config {
            reply_cache_ttl: Duration::from_secs(12),
            max_cache_entries: 131_072,
            ..gcb_proto::Config::default()
        };
        let mut ep = Endpoint::new(ep_cfg, cfg.key.clone(), session);
        // Keyed frames captured before this start are not accepted after it.
        ep.set_not_before(now().unix_ms);
        // Keyed: every broker of the pool computes the same tokens, before and after a
        // restart. Unkeyed: a secret of this run only (see gcb_proto::token).
        let owner = match &cfg.key {
            Some(k) => OwnerSecret::from_pool_key(k),
            None => {
                let mut b = [0u8; 32];
                b[..16].copy_from_slice(&random_bytes());
                b[16..].copy_from_slice(&random_bytes());
                OwnerSecret::from_random(b)
            }
        };
        let registry = Registry::new(Limits {
            max_total: cfg.max_registrations,
            max_per_ip: cfg.max_registrations_per_ip,
            lease: cfg.lease,
        });
        let udp = UdpPlane::new(
            RuleLimits {
                idle: cfg.udp_rule_idle,
                max_total: cfg.max_udp_rules,
                max_per_proxy: cfg.max_udp_rules_per_proxy,
                max_per_sender_ip: cfg.max_udp_rules_per_sender_ip,
            },
            addr,
        );
        // 65,536 tracked IPs: a few MB at most (see iplimits).
        let control_rate =
            RateLimiter::new(cfg.control_rate_per_ip, cfg.control_burst_per_ip, 65_536);
        let t = Instant::now();
        Ok(Server {
            next_stats: cfg.stats_interval.map(|d| t + d),
            cfg,
            poll,
            control,
            relay_listener,
            addr,
            ep,
            registry,
            owners: HashMap::new(),
            next_token: FIRST_DYNAMIC,
            proxies: HashMap::new(),
            udp,
            udp_backlog: Vec::new(),
            preambles: HashMap::new(),
            pending: HashMap::new(),
            relays: HashMap::new(),
            standby: StandbyPool::new(),
            claims: HashMap::new(),
            outgoing: HashMap::new(),
            reregistering: HashSet::new(),
            owner,
            reserved: HashMap::new(),
            connector_of: HashMap::new(),
            control_rate,
            limit_logs: HashMap::new(),
            counters: Counters::default(),
            next_sweep: t,
            retry_accept: false,
        })
    }

    /// The bound control/relay address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until `stop` becomes true. Logs the stats line on the way out.
    pub fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
            let timeout = self.sleep_time();
            crate::logging::flush();
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            // In the kernel's order: a UDP registration's first keepalive (proxy socket)
            // must be seen before a punch request (control socket) that follows it.
            for ev in events.iter() {
                self.dispatch(ev.token());
            }
            for p in std::mem::take(&mut self.udp_backlog) {
                self.on_udp_proxy(p);
            }
            self.timers();
            self.flush_control();
        }
        info!(
            "shutting down: {} registrations, {} relays",
            self.registry.len(),
            self.relays.len()
        );
        self.log_stats();
        crate::logging::flush();
        Ok(())
    }

    fn sleep_time(&self) -> Duration {
        if !self.udp_backlog.is_empty() {
            return Duration::ZERO;
        }
        let t = Instant::now();
        let mut wake = self.next_sweep.max(t + Duration::from_millis(1));
        // Retransmissions and deadlines only: cached replies are forgotten at the sweep
        // (waking for each one's expiry woke the broker every millisecond for 12 s after
        // a burst of requests, on machines where every wake-up competes with the relays).
        if let Some(w) = self.ep.poll_request_timeout() {
            wake = wake.min(w.max(t));
        }
        wake.saturating_duration_since(t).min(MAX_SLEEP)
    }

    fn token(&mut self, owner: Owner) -> Token {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.owners.insert(t, owner);
        t
    }

    fn dispatch(&mut self, token: Token) {
        match token {
            CONTROL => self.on_control(),
            RELAY_LISTENER => self.on_relay_accept(),
            t => match self.owners.get(&t) {
                Some(Owner::Proxy(p)) => {
                    let p = *p;
                    self.on_proxy_accept(p);
                }
                Some(Owner::UdpProxy(p)) => {
                    let p = *p;
                    self.on_udp_proxy(p);
                }
                Some(Owner::Preamble) => self.on_preamble(t),
                Some(Owner::Standby) => self.on_standby_event(t),
                Some(Owner::Claim) => self.on_claim_event(t),
                Some(Owner::Relay(id)) => {
                    let id = *id;
                    self.pump_relay(id);
                }
                None => {}
            },
        }
    }

    // ------------------------------------------------------------------
    // Control plane
    // ------------------------------------------------------------------

    fn on_control(&mut self) {
        let mut buf = [0u8; 2048];
        loop {
            match self.control.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if !self.cfg.allow.allows(from.ip()) {
                        self.counters.not_allowed += 1;
                        debug!("dropped datagram from {from}: not in --allow");
                        continue;
                    }
                    if !self.control_rate.allow(from.ip(), Instant::now()) {
                        self.counters.control_rate_limited += 1;
                        let (rate, burst) =
                            (self.cfg.control_rate_per_ip, self.cfg.control_burst_per_ip);
                        self.limit_hit("control-rate", || {
                            format!("control datagrams from {} over the per-IP rate limit ({rate}/s, burst {burst}): dropped", from.ip())
                        });
                        continue;
                    }
                    self.ep.handle_datagram(now(), from, &buf[..n]);
                    self.handle_events();
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors (ECONNREFUSED) surface here on Linux.
                    debug!("control recv: {e}");
                }
            }
        }
    }

    fn flush_control(&mut self) {
        while let Some(t) = self.ep.poll_transmit() {
            match self.control.send_to(&t.payload, t.to) {
                Ok(_) => {}
                // Dropped: the reliable layer retransmits requests, and peers
                // retransmit their requests to get our replies again.
                Err(e) => debug!("control send to {}: {e}", t.to),
            }
        }
    }

    fn handle_events(&mut self) {
        while let Some(ev) = self.ep.poll_event() {
            match ev {
                Event::Request { from, id, body } => {
                    debug!("{from} -> {}", body.type_name());
                    let reply = self.on_request(from, body);
                    if let Err(e) = self.ep.respond(now(), from, id, reply) {
                        warn!("cannot answer {from}: {e}");
                    }
                }
                Event::Response {
                    from,
                    request,
                    body,
                } => self.on_response(from, request, Some(body)),
                Event::Timeout { to, request } => self.on_response(to, request, None),
            }
        }
    }

    fn send(&mut self, to: SocketAddr, body: Body, what: Outgoing) -> Option<RequestId> {
        match self.ep.send_request(now(), to, body) {
            Ok(id) => {
                self.outgoing.insert(id, what);
                Some(id)
            }
            Err(e) => {
                warn!("cannot send to {to}: {e}");
                None
            }
        }
    }

    fn refuse(&mut self, from: SocketAddr, code: ErrorCode, reason: String) -> Body {
        self.counters.refused += 1;
        // Rate-limited: a flood of refused requests must not flood the log.
        self.limit_hit("refused", || format!("refused {from}: {code}: {reason}"));
        Body::error(code, reason)
    }

    fn on_request(&mut self, from: SocketAddr, body: Body) -> Body {
        match body {
            Body::Register {
                transport,
                local,
                previous_proxy,
                previous_token,
            } => self.on_register(
                from,
                transport,
                local,
                previous_proxy,
                previous_token.as_deref(),
            ),
            Body::Unregister {
                proxy,
                transport,
                token,
            } => {
                let owned = [Transport::Tcp, Transport::Udp]
                    .into_iter()
                    .filter(|t| transport.is_none_or(|want| want == *t))
                    .find(|t| self.registry.get(*t, &proxy).is_some());
                if let Some(t) = owned {
                    if !self.ownership_proven(t, proxy, token.as_deref()) {
                        self.counters.ownership_refused += 1;
                        info!(
                            "refused unregister of {proxy} from {from}: no valid ownership proof"
                        );
                        return Body::error(
                            ErrorCode::NotOwner,
                            "unregister needs the registration's ownership proof",
                        );
                    }
                }
                match self.registry.remove(from, transport, proxy) {
                    Ok(r) => {
                        self.close_proxy(r.transport, r.proxy);
                        info!(
                            "unregistered proxy {} (local {}, client {from}, {})",
                            r.proxy,
                            r.local,
                            transport_name(r.transport)
                        );
                        Body::Ack {}
                    }
                    Err(e @ RegistryError::NotOwner(_)) => {
                        Body::error(ErrorCode::NotOwner, e.to_string())
                    }
                    Err(e) => Body::error(ErrorCode::NoSuchRegistration, e.to_string()),
                }
            }
            Body::Heartbeat { proxies } => {
                let t = Instant::now();
                let unknown: Vec<SocketAddr> = proxies
                    .into_iter()
                    .filter(|p| !self.registry.renew(from, *p, t))
                    .collect();
                // Only to authenticated clients: an unkeyed heartbeat's source may be
                // spoofed, and a retransmitted request would multiply what a victim gets
                // (heartbeat_ack's `unknown` already makes the shim re-register).
                if self.cfg.key.is_some()
                    && !unknown.is_empty()
                    && !self.reregistering.contains(&from)
                {
                    info!("heartbeat from unknown client {from} ({} unknown proxies): sending reregister_request", unknown.len());
                    if self
                        .send(from, Body::ReregisterRequest {}, Outgoing::Reregister(from))
                        .is_some()
                    {
                        self.reregistering.insert(from);
                        self.counters.reregister_sent += 1;
                    }
                }
                Body::HeartbeatAck { unknown }
            }
            Body::ConnectRequest {
                proxy,
                transport,
                connector_local,
                connector_listen,
            } => {
                if transport == Transport::Tcp {
                    if let Err(why) = self.relay_admission(from.ip(), proxy) {
                        self.counters.relay_limit_refusals += 1;
                        return self.refuse(from, ErrorCode::Busy, why);
                    }
                }
                let reply = self.on_connect_request(
                    from,
                    proxy,
                    transport,
                    connector_local,
                    connector_listen,
                );
                self.note_connector(&reply, from.ip());
                reply
            }
            Body::PunchRequest {
                proxy,
                from_proxy,
                token,
            } => self.on_punch_request(from, proxy, from_proxy, &token),
            other => Body::error(
                ErrorCode::BadRequest,
                format!("{} is not a request the broker serves", other.type_name()),
            ),
        }
    }

    /// The registration token of the `transport` registration at `proxy`, as hex.
    fn token_hex(&self, transport: Transport, proxy: SocketAddr) -> String {
        token::to_hex(&self.owner.token(transport, proxy))
    }

    /// What a holder of the registration at `proxy` presents for `what`.
    fn presentation(&self, what: Use, transport: Transport, proxy: SocketAddr) -> [u8; 16] {
        token::present(
            self.cfg.key.as_ref(),
            what,
            &self.owner.token(transport, proxy),
        )
    }

    /// The presentation of connect id `raw` on the relay port.
    fn connect_presentation(&self, raw: &[u8; 16]) -> [u8; 16] {
        token::present(self.cfg.key.as_ref(), Use::Connect, raw)
    }

    /// Whether `proof` proves ownership of the `transport` registration at `proxy` (see
    /// [`gcb_proto::token`]): its token presented for [`Use::Ownership`].
    fn ownership_proven(
        &self,
        transport: Transport,
        proxy: SocketAddr,
        proof: Option<&str>,
    ) -> bool {
        let want = token::to_hex(&self.presentation(Use::Ownership, transport, proxy));
        proof.is_some_and(|p| token::same(p.as_bytes(), want.as_bytes()))
    }

    fn on_register(
        &mut self,
        from: SocketAddr,
        transport: Transport,
        local: SocketAddr,
        previous_proxy: Option<SocketAddr>,
        previous_token: Option<&str>,
    ) -> Body {
        let lease_ms = self.registry.lease().as_millis() as u64;
        if transport == Transport::Udp && !self.addr.is_ipv4() {
            return Body::error(
                ErrorCode::Unsupported,
                "udp registrations need a broker listening on IPv4",
            );
        }
        if let Some(proxy) = self
            .registry
            .existing(from, local, transport, Instant::now())
        {
            debug!(
                "duplicate register from {from} for {} {local}: proxy {proxy}",
                transport_name(transport)
            );
            return Body::Registered {
                proxy,
                lease_ms,
                token: Some(self.token_hex(transport, proxy)),
            };
        }
        if let Err(e) = self.registry.check_quota(from) {
            return self.refuse(from, ErrorCode::Quota, e.to_string());
        }
        let t = Instant::now();
        self.reserved.retain(|_, until| *until > t);
        // The old address only with the old registration's proof: otherwise whoever asks
        // first after a broker restart or an unregister would take over its clients.
        let previous_proxy = match previous_proxy {
            // The other transport's proof counts too: a program keeps one port number
            // for TCP and UDP (the shim asks for its sibling registration's proxy).
            Some(p)
                if self.ownership_proven(Transport::Tcp, p, previous_token)
                    || self.ownership_proven(Transport::Udp, p, previous_token) =>
            {
                Some(p)
            }
            Some(p) => {
                self.counters.ownership_refused += 1;
                info!("register from {from}: no valid ownership proof for previous proxy {p}; assigning a new one"
                );
                None
            }
            None => None,
        };
        let bound = match transport {
            Transport::Tcp => self.bind_tcp_proxy(from, previous_proxy),
            Transport::Udp => self.bind_udp_proxy(from, local, previous_proxy),
        };
        let proxy = match bound {
            Ok((proxy, _)) => {
                self.reserved.remove(&(transport, proxy));
                if transport == Transport::Tcp {
                    let key = self.presentation(Use::Standby, Transport::Tcp, proxy);
                    self.standby.key_for(proxy, || key);
                }
                proxy
            }
            Err(e) => {
                error!("cannot bind a proxy socket: {e}");
                return Body::error(
                    ErrorCode::Internal,
                    format!("cannot bind a proxy socket: {e}"),
                );
            }
        };
        self.registry
            .insert(from, local, transport, proxy, Instant::now());
        self.counters.registered += 1;
        match transport {
            Transport::Tcp => {
                info!("registered tcp listener local {local} client {from} -> proxy {proxy}")
            }
            Transport::Udp => {
                info!("registered udp socket local {local} client {from} -> proxy {proxy}")
            }
        }
        Body::Registered {
            proxy,
            lease_ms,
            token: Some(self.token_hex(transport, proxy)),
        }
    }

    /// Whether `prev` can be asked for again for `transport`: on our IP, not the
    /// control / relay port, and not another registration's proxy of that transport.
    /// (The other transport's proxy on the same port is fine: a program that uses one
    /// port number for TCP and UDP keeps one number through the broker too.)
    fn previous_usable(
        &self,
        transport: Transport,
        prev: Option<SocketAddr>,
    ) -> Option<SocketAddr> {
        prev.filter(|p| {
            p.ip() == self.addr.ip()
                && p.port() != 0
                && p.port() != self.addr.port()
                && self.registry.get(transport, p).is_none()
        })
    }

    /// Binds a socket on our IP with `bind`, at `prev` if usable, else at an
    /// ephemeral port not already some registration's proxy address.
    fn bind_proxy_socket<S>(
        &self,
        transport: Transport,
        from: SocketAddr,
        prev: Option<SocketAddr>,
        bind: impl Fn(SocketAddr) -> io::Result<S>,
        addr_of: impl Fn(&S) -> io::Result<SocketAddr>,
    ) -> io::Result<(S, SocketAddr)> {
        if let Some(prev) = prev {
            if let Some(p) = self.previous_usable(transport, Some(prev)) {
                match bind(p) {
                    Ok(s) => return Ok((s, p)),
                    Err(e) => info!(
                        "previous proxy {p} for {from} unavailable ({e}); assigning a new one"
                    ),
                }
            } else {
                info!("previous proxy {prev} for {from} unavailable (not ours or in use); assigning a new one"
                );
            }
        }
        // TCP and UDP ephemeral ports are drawn independently: a port the
        // other transport's proxy already has is skipped (held open while
        // drawing again so the kernel picks another).
        let mut skipped = Vec::new();
        for _ in 0..16 {
            let s = bind(SocketAddr::new(self.addr.ip(), 0))?;
            let a = addr_of(&s)?;
            // A fresh port is kept free of the other transport's proxies too, so
            // that a later registration can ask for the same number.
            if self.registry.get(Transport::Tcp, &a).is_none()
                && self.registry.get(Transport::Udp, &a).is_none()
                && !self.reserved.contains_key(&(Transport::Tcp, a))
                && !self.reserved.contains_key(&(Transport::Udp, a))
            {
                return Ok((s, a));
            }
            skipped.push(s);
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no proxy port free of other registrations",
        ))
    }

    fn bind_tcp_proxy(
        &mut self,
        from: SocketAddr,
        previous_proxy: Option<SocketAddr>,
    ) -> io::Result<(SocketAddr, Option<String>)> {
        let (mut listener, proxy) = self.bind_proxy_socket(
            Transport::Tcp,
            from,
            previous_proxy,
            TcpListener::bind,
            |l| l.local_addr(),
        )?;
        let token = self.token(Owner::Proxy(proxy));
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut listener, token, Interest::READABLE)
        {
            self.owners.remove(&token);
            return Err(e);
        }
        self.proxies.insert(proxy, (token, listener));
        Ok((proxy, None))
    }

    fn bind_udp_proxy(
        &mut self,
        from: SocketAddr,
        local: SocketAddr,
        previous_proxy: Option<SocketAddr>,
    ) -> io::Result<(SocketAddr, Option<String>)> {
        let (mut sock, proxy) =
            self.bind_proxy_socket(Transport::Udp, from, previous_proxy, UdpSocket::bind, |s| {
                s.local_addr()
            })?;
        // Bursts (iperf3 -u) must not overflow the default buffers (best
        // effort: the kernel caps them at net.core.{r,w}mem_max).
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(1 << 20);
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(1 << 20);
        let token = self.token(Owner::UdpProxy(proxy));
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)
        {
            self.owners.remove(&token);
            return Err(e);
        }
        let mut secret = [0u8; gcb_proto::UDP_TOKEN_LEN];
        secret.copy_from_slice(
            token::to_hex(&self.presentation(Use::UdpDummy, Transport::Udp, proxy)).as_bytes(),
        );
        let p = UdpProxy {
            sock,
            token,
            secret,
            owner_ip: canonical(from.ip()),
            data: None,
            local,
            punched: Vec::new(),
        };
        let t = p.token_string();
        self.udp.insert(proxy, p);
        Ok((proxy, Some(t)))
    }

    fn on_udp_proxy(&mut self, proxy: SocketAddr) {
        if self.udp.on_readable(proxy) && !self.udp_backlog.contains(&proxy) {
            self.udp_backlog.push(proxy);
        }
    }

    fn on_connect_request(
        &mut self,
        from: SocketAddr,
        proxy: SocketAddr,
        transport: Transport,
        connector_local: SocketAddr,
        connector_listen: Option<SocketAddr>,
    ) -> Body {
        if transport != Transport::Tcp {
            // GCB UDP senders send to the proxy like any sender: the
            // broker relays (paper 4.2.2). Hole punching is not brokered yet.
            return Body::error(
                ErrorCode::Unsupported,
                "udp connect_request is not supported: send to the proxy address",
            );
        }
        let Some(reg) = self.registry.get(Transport::Tcp, &proxy).cloned() else {
            return Body::error(
                ErrorCode::NoSuchRegistration,
                format!("no registration for {proxy}"),
            );
        };
        let l = Party {
            observed: reg.observed,
            local: reg.local,
        };
        let c = Party {
            observed: from,
            local: connector_local,
        };
        // Without a pool key nothing proves the request came from `from`: the listener is
        // not asked to dial anything for it (no reverse, no claim, no connect_back) until
        // the connector's own TCP connection shows up at the relay port.
        let authenticated = self.cfg.key.is_some();
        let decision = match decide(&l, &c, connector_listen) {
            Decision::Reverse(_) if !authenticated => Decision::Relay,
            d => d,
        };
        let route = match decision {
            Decision::Direct(addr) => {
                self.counters.direct += 1;
                Route::Direct { addr }
            }
            Decision::Reverse(dial) => {
                self.counters.reverse += 1;
                let raw = random_bytes();
                let body = Body::ConnectBack {
                    connect_id: ConnectId::from_bytes(raw),
                    dial,
                    proxy,
                    logical_peer: dial,
                };
                let pid = self.connect_presentation(&raw);
                if self
                    .send(reg.observed, body, Outgoing::ConnectBack(pid))
                    .is_none()
                {
                    return Body::error(ErrorCode::Busy, "cannot reach the listener now");
                }
                Route::Reverse {
                    connect_id: ConnectId::from_bytes(raw),
                }
            }
            Decision::Relay => {
                if self.relay_load() >= self.cfg.max_relays {
                    return self.refuse(
                        from,
                        ErrorCode::Busy,
                        format!("relay limit ({}) reached", self.cfg.max_relays),
                    );
                }
                self.counters.relay += 1;
                let raw = random_bytes();
                let pid = self.connect_presentation(&raw);
                // The program sees the connector's dial-back address only when it is the
                // connector's own (as for a reverse); else its observed address.
                let peer = connector_listen
                    .filter(|a| canonical(a.ip()) == canonical(from.ip()))
                    .unwrap_or(from);
                let mut deferred = None;
                let connect_back = if !authenticated {
                    deferred = Some(Deferred {
                        connector_ip: canonical(from.ip()),
                        listener: reg.observed,
                        logical_peer: peer,
                    });
                    None
                } else if self.claim_standby(proxy, pid, reg.observed, peer) {
                    None
                } else {
                    let Some(req) = self.send_connect_back(&reg.observed, raw, proxy, peer) else {
                        return Body::error(ErrorCode::Busy, "cannot reach the listener now");
                    };
                    Some(req)
                };
                self.pending.insert(
                    pid,
                    Pending {
                        raw,
                        proxy,
                        allowed: vec![canonical(from.ip()), canonical(reg.observed.ip())],
                        deferred,
                        waiting: None,
                        deadline: Instant::now() + self.cfg.connect_timeout,
                        connect_back,
                    },
                );
                Route::Relay {
                    addr: self.addr,
                    connect_id: ConnectId::from_bytes(raw),
                }
            }
        };
        info!("connect {from} (local {connector_local}) -> proxy {proxy} (listener {} local {}): {route:?}", reg.observed, reg.local);
        Body::ConnectDecision { route }
    }

    /// Asks the listener to dial the relay port with connect id `raw` (its pairing is
    /// `pending[presentation of raw]`).
    fn send_connect_back(
        &mut self,
        listener: &SocketAddr,
        raw: [u8; 16],
        proxy: SocketAddr,
        logical_peer: SocketAddr,
    ) -> Option<RequestId> {
        let body = Body::ConnectBack {
            connect_id: ConnectId::from_bytes(raw),
            dial: self.addr,
            proxy,
            logical_peer,
        };
        let pid = self.connect_presentation(&raw);
        self.send(*listener, body, Outgoing::ConnectBack(pid))
    }

    fn on_response(&mut self, peer: SocketAddr, request: RequestId, body: Option<Body>) {
        match self.outgoing.remove(&request) {
            Some(Outgoing::Reregister(c)) => {
                self.reregistering.remove(&c);
            }
            Some(Outgoing::ConnectBack(id)) => match body {
                Some(Body::Ack {}) => {
                    debug!("connect_back {} acked by {peer}", hex(&id));
                }
                other => {
                    self.counters.connect_back_failures += 1;
                    let why = match other {
                        None => "no answer".to_owned(),
                        Some(b) => format!("{b:?}"),
                    };
                    warn!("connect_back {} to listener {peer} failed: {why}", hex(&id));
                    if let Some(p) = self.pending.remove(&id) {
                        drop_conn(p.waiting);
                    }
                }
            },
            Some(Outgoing::PunchBack) if !matches!(body, Some(Body::Ack {})) => {
                self.udp.counters.punch_back_failures += 1;
                info!("punch_back to {peer} failed: {body:?}");
            }
            Some(Outgoing::PunchBack) => {}
            Some(Outgoing::PunchEnd) if !matches!(body, Some(Body::Ack {})) => {
                self.udp.counters.punch_end_failures += 1;
                info!("punch_end to {peer} failed: {body:?}");
            }
            Some(Outgoing::PunchEnd) => {}
            None => {}
        }
    }

    // ------------------------------------------------------------------
    // Proxy sockets and the relay port
    // ------------------------------------------------------------------

    /// Relays running plus pairings waiting: the --max-relays budget.
    fn relay_load(&self) -> usize {
        self.relays.len() + self.pending.len()
    }

    /// Whether a new pairing for `proxy` whose connector is `ip` fits the limits:
    /// broker-wide relays, pairings waiting per proxy and per connector IP, and
    /// relays plus waiting pairings per connector IP. Err: why not.
    fn relay_admission(&self, ip: IpAddr, proxy: SocketAddr) -> Result<(), String> {
        if self.relay_load() >= self.cfg.max_relays {
            return Err(format!("relay limit ({}) reached", self.cfg.max_relays));
        }
        let for_proxy = self.pending.values().filter(|p| p.proxy == proxy).count();
        if for_proxy >= self.cfg.max_pending_per_proxy {
            return Err(format!(
                "{for_proxy} connections already wait for this listener (--max-pending-per-proxy)"
            ));
        }
        let waiting = self
            .connector_of
            .iter()
            .filter(|(id, c)| **c == ip && self.pending.contains_key(*id))
            .count();
        if waiting >= self.cfg.max_pending_per_ip {
            return Err(format!(
                "{waiting} connections from {ip} already wait for a listener (--max-pending-per-ip)"
            ));
        }
        let running = self
            .relays
            .values()
            .filter(|e| e.connector == Some(ip))
            .count();
        if running + waiting >= self.cfg.max_relays_per_ip {
            return Err(format!(
                "{} relays from {ip} (--max-relays-per-ip)",
                running + waiting
            ));
        }
        Ok(())
    }

    /// Records the connector IP of a relay or reverse decision's pairing.
    fn note_connector(&mut self, reply: &Body, ip: IpAddr) {
        if let Body::ConnectDecision {
            route: Route::Relay { connect_id, .. } | Route::Reverse { connect_id },
        } = reply
        {
            // Pairings are keyed by the id's presentation (what the relay port reads).
            let id = self.connect_presentation(connect_id.as_bytes());
            self.connector_of.insert(id, ip);
        }
    }

    /// Logs a "limit reached" line, at most one per second per limit `kind`
    /// (floods must not flood the log too), saying how many were suppressed.
    fn limit_hit(&mut self, kind: &'static str, line: impl FnOnce() -> String) {
        let rl = self
            .limit_logs
            .entry(kind)
            .or_insert_with(|| RateLimit::new(Duration::from_secs(1)));
        if let Some(n) = rl.allow(Instant::now()) {
            let more = if n > 0 {
                format!(" ({n} similar lines suppressed)")
            } else {
                String::new()
            };
            warn!("{}{more}", line());
        }
    }

    fn close_proxy(&mut self, transport: Transport, proxy: SocketAddr) {
        // Kept from other registrations for a while: its owner may be re-registering
        // (a restarted program, a lost lease) and its clients still know the address.
        self.reserved
            .insert((transport, proxy), Instant::now() + self.cfg.proxy_reserve);
        if transport == Transport::Tcp {
            if let Some((token, mut l)) = self.proxies.remove(&proxy) {
                let _ = self.poll.registry().deregister(&mut l);
                self.owners.remove(&token);
            }
            for (tok, mut p) in self.standby.drop_proxy(&proxy) {
                let _ = self.poll.registry().deregister(&mut p.stream);
                self.owners.remove(&tok);
            }
            return;
        }
        if let Some((mut p, ends)) = self.udp.remove(&proxy) {
            let _ = self.poll.registry().deregister(&mut p.sock);
            self.owners.remove(&p.token);
            self.udp_backlog.retain(|b| *b != proxy);
            for end in ends {
                self.send_punch_end(end);
            }
        }
    }

    /// Tells a registrant that a registration it was paired with for a hole punch is
    /// gone, so its shim stops sending direct frames to an address another program may
    /// take next (see [`gcb_proto::punch`]). Nothing if the partner is gone too.
    fn send_punch_end(&mut self, end: PunchEnd) {
        let Some(observed) = self
            .registry
            .get(Transport::Udp, &end.to)
            .map(|r| r.observed)
        else {
            return;
        };
        let body = Body::PunchEnd {
            proxy: end.to,
            peer: end.peer,
            peer_proxy: end.peer_proxy,
        };
        if self.send(observed, body, Outgoing::PunchEnd).is_some() {
            self.udp.counters.punch_ends += 1;
            debug!(
                "punch_end to {} (client {observed}): {} (data {}) is gone",
                end.to, end.peer_proxy, end.peer
            );
        }
    }

    fn on_proxy_accept(&mut self, proxy: SocketAddr) {
        loop {
            let Some((_, l)) = self.proxies.get(&proxy) else {
                return;
            };
            let (stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays queued; the
                    // sweep retries.
                    warn!("accept on proxy {proxy}: {e}");
                    self.retry_accept = true;
                    return;
                }
            };
            self.counters.proxy_accepts += 1;
            let Some(reg) = self.registry.get(Transport::Tcp, &proxy).cloned() else {
                return;
            };
            if let Err(why) = self.relay_admission(peer.ip(), proxy) {
                self.counters.conns_refused += 1;
                self.counters.relay_limit_refusals += 1;
                self.limit_hit("proxy-accept", || {
                    format!("refused connection from {peer} to proxy {proxy}: {why}")
                });
                reset(stream);
                continue;
            }
            let raw = random_bytes();
            let id = self.connect_presentation(&raw);
            self.connector_of.insert(id, peer.ip());
            if self.claim_standby(proxy, id, reg.observed, peer) {
                // The connector's stream waits unread in the kernel until the splice.
                self.pending.insert(
                    id,
                    Pending {
                        raw,
                        proxy,
                        allowed: vec![canonical(reg.observed.ip())],
                        deferred: None,
                        waiting: Some((stream, peer)),
                        deadline: Instant::now() + self.cfg.connect_timeout,
                        connect_back: None,
                    },
                );
                info!(
                    "connection from {peer} to proxy {proxy}: standby claimed ({})",
                    hex(&id)
                );
                continue;
            }
            let Some(req) = self.send_connect_back(&reg.observed, raw, proxy, peer) else {
                self.counters.conns_refused += 1;
                reset(stream);
                continue;
            };
            info!(
                "connection from {peer} to proxy {proxy}: connect_back {} sent to {}",
                hex(&id),
                reg.observed
            );
            // The connector's stream is not registered with the poller and
            // not read: its bytes wait in the kernel until the splice.
            self.pending.insert(
                id,
                Pending {
                    raw,
                    proxy,
                    allowed: vec![canonical(reg.observed.ip())],
                    deferred: None,
                    waiting: Some((stream, peer)),
                    deadline: Instant::now() + self.cfg.connect_timeout,
                    connect_back: Some(req),
                },
            );
        }
    }

    fn on_relay_accept(&mut self) {
        loop {
            let (mut stream, peer) = match self.relay_listener.accept() {
                Ok(x) => x,
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("accept on relay port: {e}");
                    self.retry_accept = true;
                    return;
                }
            };
            if self.preambles.len() >= self.cfg.max_preambles {
                self.counters.conns_refused += 1;
                let n = self.preambles.len();
                self.limit_hit("preambles", || {
                    format!("refused relay-port connection from {peer}: {n} connections already reading a preamble")
                });
                reset(stream);
                continue;
            }
            let from_ip = self
                .preambles
                .values()
                .filter(|c| c.peer.ip() == peer.ip())
                .count();
            if from_ip >= self.cfg.max_preambles_per_ip {
                self.counters.conns_refused += 1;
                self.counters.preamble_limit_refusals += 1;
                let cap = self.cfg.max_preambles_per_ip;
                self.limit_hit("preambles-per-ip", || {
                    format!("refused relay-port connection from {peer}: per-IP preamble limit ({cap}) reached")
                });
                reset(stream);
                continue;
            }
            let token = match self.watch_readable(&mut stream, Owner::Preamble) {
                Ok(t) => t,
                Err(e) => {
                    warn!("register relay-port connection: {e}");
                    continue;
                }
            };
            self.preambles.insert(
                token,
                PreambleConn {
                    stream,
                    peer,
                    buf: [0; preamble::LEN],
                    got: 0,
                    deadline: Instant::now() + self.cfg.preamble_timeout,
                },
            );
            self.on_preamble(token);
        }
    }

    /// Registers `stream` for readability under a new token owned by `owner`.
    fn watch_readable(&mut self, stream: &mut TcpStream, owner: Owner) -> io::Result<Token> {
        let tok = self.token(owner);
        if let Err(e) = self
            .poll
            .registry()
            .register(stream, tok, Interest::READABLE)
        {
            self.owners.remove(&tok);
            return Err(e);
        }
        Ok(tok)
    }

    fn drop_preamble(&mut self, token: Token) -> Option<PreambleConn> {
        let mut c = self.preambles.remove(&token)?;
        self.owners.remove(&token);
        let _ = self.poll.registry().deregister(&mut c.stream);
        Some(c)
    }

    fn on_preamble(&mut self, token: Token) {
        let Some(c) = self.preambles.get_mut(&token) else {
            return;
        };
        // Read exactly the preamble, never past it.
        let result = loop {
            if c.got == preamble::LEN {
                break Ok(true);
            }
            match c.stream.read(&mut c.buf[c.got..]) {
                Ok(0) if c.got == 0 => break Err(String::new()),
                Ok(0) => break Err("connection closed before the preamble".to_owned()),
                Ok(n) => {
                    c.got += n;
                    if let Err(e) = preamble::check_prefix(&c.buf[..c.got]) {
                        break Err(e.to_string());
                    }
                }
                Err(e) if would_block(&e) => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        match result {
            Ok(false) => {}
            Err(why) if why.is_empty() => {
                // Closed before sending anything: a connector's speculative dial that
                // its decision did not need. Not an error.
                if let Some(c) = self.drop_preamble(token) {
                    debug!("relay port: {} closed without a preamble", c.peer);
                }
            }
            Err(why) => {
                let c = self.drop_preamble(token);
                self.counters.bad_preambles += 1;
                if let Some(c) = c {
                    warn!("relay port: dropped {}: {why}", c.peer);
                    reset(c.stream);
                }
            }
            Ok(true) => {
                let Some(c) = self.drop_preamble(token) else {
                    return;
                };
                match preamble::parse_any(&c.buf) {
                    Ok(Preamble::Connect(id)) => self.on_arrival(id, c.stream, c.peer),
                    Ok(Preamble::Standby(key)) => self.on_standby(key, c.stream, c.peer),
                    Err(e) => {
                        self.counters.bad_preambles += 1;
                        warn!("relay port: dropped {}: {e}", c.peer);
                        reset(c.stream);
                    }
                }
            }
        }
    }

    /// A relay-port connection presented a standby key: park it for its proxy.
    fn on_standby(&mut self, key: [u8; 16], mut stream: TcpStream, peer: SocketAddr) {
        // A standby key is valid only from its registration's observed IP: one read off
        // the wire and replayed from elsewhere would get that proxy's next client.
        let owner_ip = self
            .standby
            .proxy_of(&key)
            .and_then(|p| self.registry.get(Transport::Tcp, &p))
            .map(|r| canonical(r.observed.ip()));
        if owner_ip.is_some_and(|ip| ip != canonical(peer.ip())) {
            self.counters.standby_refused += 1;
            self.counters.foreign_presentations += 1;
            warn!(
                "standby from {peer} refused: its key belongs to a registration at another address"
            );
            reset(stream);
            return;
        }
        let tok = match self.watch_readable(&mut stream, Owner::Standby) {
            Ok(t) => t,
            Err(e) => {
                warn!("register standby from {peer}: {e}");
                return;
            }
        };
        match self.standby.park(&key, tok, stream, peer) {
            Ok(proxy) => {
                self.counters.standby_parked += 1;
                debug!("standby from {peer} parked for proxy {proxy}");
            }
            Err((why, mut stream)) => {
                self.counters.standby_refused += 1;
                let _ = self.poll.registry().deregister(&mut stream);
                self.owners.remove(&tok);
                match why {
                    ParkError::UnknownKey => {
                        debug!("standby from {peer} refused: {why}")
                    }
                    ParkError::Full => warn!("standby from {peer} refused: {why}"),
                }
                // A plain close: the shim re-dials after a back-off (after a broker
                // restart it registers again first and gets a new key).
                drop(stream);
            }
        }
    }

    /// A parked standby became readable: it closed, or sent bytes it must not send.
    fn on_standby_event(&mut self, tok: Token) {
        let Some(p) = self.standby.remove(&tok) else {
            return;
        };
        let mut stream = p.stream;
        let mut buf = [0u8; 64];
        let keep = loop {
            match stream.read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => {
                    warn!("standby from {} sent data before a claim; closed", p.peer);
                    break false;
                }
                Err(e) if would_block(&e) => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if keep {
            // Spurious wake-up: park it again.
            if let Some(k) = self.standby.key_of(&p.proxy) {
                match self.standby.park(&k, tok, stream, p.peer) {
                    Ok(_) => return,
                    Err((_, s)) => stream = s,
                }
            }
        }
        debug!("standby from {} for proxy {} closed", p.peer, p.proxy);
        let _ = self.poll.registry().deregister(&mut stream);
        self.owners.remove(&tok);
    }

    /// Hands the pairing `id` (for `proxy`, seen by the program as `logical_peer`) to a
    /// standby of the proxy, if one takes the claim. False: none could; use connect_back.
    fn claim_standby(
        &mut self,
        proxy: SocketAddr,
        id: [u8; 16],
        listener: SocketAddr,
        logical_peer: SocketAddr,
    ) -> bool {
        use std::io::Write;
        let SocketAddr::V4(logical_v4) = logical_peer else {
            return false;
        };
        let go = preamble::encode_go(logical_v4);
        while let Some((tok, p)) = self.standby.take(&proxy) {
            let mut stream = p.stream;
            // Acknowledge the shim's ack byte at once: a program without TCP_NODELAY
            // writes its first bytes right behind it, and Nagle holds them until then.
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_quickack(true);
            let _ = sock.set_nodelay(true);
            // 12 bytes into an idle connection's empty send buffer: all or nothing.
            match stream.write(&go) {
                Ok(n) if n == go.len() => {
                    self.owners.insert(tok, Owner::Claim);
                    self.claims.insert(
                        tok,
                        Claim {
                            stream,
                            peer: p.peer,
                            id,
                            proxy,
                            listener,
                            logical_peer,
                            deadline: Instant::now() + CLAIM_TIMEOUT,
                        },
                    );
                    debug!(
                        "connect id {} for proxy {proxy}: claimed standby from {}",
                        hex(&id),
                        p.peer
                    );
                    return true;
                }
                _ => {
                    let _ = self.poll.registry().deregister(&mut stream);
                    self.owners.remove(&tok);
                    reset(stream);
                }
            }
        }
        false
    }

    /// A claimed standby became readable: the shim's ack (then pair), or a failure.
    fn on_claim_event(&mut self, tok: Token) {
        let Some(c) = self.claims.get_mut(&tok) else {
            return;
        };
        let mut b = [0u8; 1];
        let acked = loop {
            match c.stream.read(&mut b) {
                Ok(1) if b[0] == preamble::CLAIM_ACK => break Some(true),
                Ok(_) => break Some(false),
                Err(e) if would_block(&e) => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Some(false),
            }
        };
        match acked {
            None => {}
            Some(true) => {
                let Some(mut c) = self.claims.remove(&tok) else {
                    return;
                };
                let _ = self.poll.registry().deregister(&mut c.stream);
                self.owners.remove(&tok);
                self.counters.standby_claimed += 1;
                self.on_arrival(c.id, c.stream, c.peer);
            }
            Some(false) => self.claim_failed(tok, "closed or answered junk"),
        }
    }

    /// A claim failed or timed out: close the standby and fall back to connect_back.
    fn claim_failed(&mut self, tok: Token, why: &str) {
        let Some(mut c) = self.claims.remove(&tok) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.owners.remove(&tok);
        reset(c.stream);
        self.counters.standby_fallbacks += 1;
        warn!(
            "standby from {} for proxy {} {why}; falling back to connect_back",
            c.peer, c.proxy
        );
        let Some(raw) = self.pending.get(&c.id).map(|p| p.raw) else {
            return;
        };
        match self.send_connect_back(&c.listener, raw, c.proxy, c.logical_peer) {
            Some(req) => {
                if let Some(p) = self.pending.get_mut(&c.id) {
                    p.connect_back = Some(req);
                    p.deadline = Instant::now() + self.cfg.connect_timeout;
                }
            }
            None => {
                if let Some(p) = self.pending.remove(&c.id) {
                    drop_conn(p.waiting);
                }
            }
        }
    }

    /// A relay-port connection presented connect id `id` (its presentation, the key of
    /// `pending`).
    fn on_arrival(&mut self, id: [u8; 16], stream: TcpStream, peer: SocketAddr) {
        let Some(p) = self.pending.get_mut(&id) else {
            self.counters.bad_preambles += 1;
            warn!(
                "relay port: {peer} presented unknown or used connect id {}",
                hex(&id)
            );
            reset(stream);
            return;
        };
        let ip = canonical(peer.ip());
        if !p.allowed.contains(&ip) {
            // The pairing stays: its real parties may still come.
            self.counters.bad_preambles += 1;
            self.counters.foreign_presentations += 1;
            warn!(
                "relay port: {peer} presented connect id {} bound to other addresses",
                hex(&id)
            );
            reset(stream);
            return;
        }
        if p.deferred.as_ref().is_some_and(|d| d.connector_ip == ip) {
            // An unauthenticated relay decision: its connector is real. Now ask the
            // listener's side (a standby claim, else a connect_back).
            let d = p.deferred.take().expect("checked");
            let (raw, proxy) = (p.raw, p.proxy);
            p.waiting = Some((stream, peer));
            if !self.claim_standby(proxy, id, d.listener, d.logical_peer) {
                let req = self.send_connect_back(&d.listener, raw, proxy, d.logical_peer);
                match (req, self.pending.get_mut(&id)) {
                    (Some(req), Some(p)) => p.connect_back = Some(req),
                    (None, _) => {
                        if let Some(p) = self.pending.remove(&id) {
                            drop_conn(p.waiting);
                        }
                    }
                    _ => {}
                }
            }
            debug!("relay port: connector {peer} is first for {}", hex(&id));
            return;
        }
        if p.deferred.is_some() && p.waiting.is_none() {
            // The listener side before its connector: impossible unless forged.
            self.counters.bad_preambles += 1;
            warn!(
                "relay port: {peer} came before its connector for {}",
                hex(&id)
            );
            reset(stream);
            return;
        }
        match p.waiting.take() {
            None => {
                debug!("relay port: {peer} is first for {}", hex(&id));
                p.waiting = Some((stream, peer));
            }
            Some((first, first_peer)) => {
                let p = self.pending.remove(&id).expect("present");
                if let Some(req) = p.connect_back {
                    // The listener evidently got the message.
                    if self.outgoing.remove(&req).is_some() {
                        self.ep.cancel(req);
                    }
                }
                let label = format!(
                    "{first_peer} <-> {peer} (proxy {}, id {})",
                    p.proxy,
                    hex(&id)
                );
                self.start_relay(first, stream, label, id);
            }
        }
    }

    fn start_relay(&mut self, a: TcpStream, b: TcpStream, label: String, id: [u8; 16]) {
        let connector = self.connector_of.remove(&id);
        let mut relay = match Relay::new(a, b) {
            Ok(r) => r,
            Err(e) => {
                error!("cannot start relay {label}: {e}");
                return;
            }
        };
        let rid = self.next_token;
        let ta = self.token(Owner::Relay(rid));
        let tb = self.token(Owner::Relay(rid));
        let both = Interest::READABLE | Interest::WRITABLE;
        let reg = self.poll.registry();
        if let Err(e) = reg
            .register(relay.a_mut(), ta, both)
            .and_then(|()| reg.register(relay.b_mut(), tb, both))
        {
            error!("cannot register relay {label}: {e}");
            relay.abort();
            self.owners.remove(&ta);
            self.owners.remove(&tb);
            return;
        }
        self.counters.relays_started += 1;
        info!("relay started: {label}");
        self.relays.insert(
            rid,
            RelayEntry {
                relay,
                tokens: [ta, tb],
                label,
                connector,
            },
        );
        self.pump_relay(rid);
    }

    fn pump_relay(&mut self, rid: usize) {
        let Some(e) = self.relays.get_mut(&rid) else {
            return;
        };
        let state = e.relay.pump();
        if state == RelayState::Open {
            return;
        }
        self.finish_relay(rid, state);
    }

    /// Drops a relay that ended (`state` is not Open) and counts it.
    fn finish_relay(&mut self, rid: usize, state: RelayState) {
        let Some(mut e) = self.relays.remove(&rid) else {
            return;
        };
        for t in e.tokens {
            self.owners.remove(&t);
        }
        let _ = self.poll.registry().deregister(e.relay.a_mut());
        let _ = self.poll.registry().deregister(e.relay.b_mut());
        let (ab, ba) = e.relay.bytes();
        self.counters.relay_bytes += ab + ba;
        match state {
            RelayState::Done => {
                self.counters.relays_done += 1;
                info!("relay closed: {} ({ab} + {ba} bytes)", e.label);
            }
            RelayState::Reset(why) => {
                self.counters.relays_reset += 1;
                info!("relay reset: {} ({ab} + {ba} bytes): {why}", e.label);
            }
            RelayState::Open => {}
        }
    }

    // ------------------------------------------------------------------
    // Timers
    // ------------------------------------------------------------------

    fn timers(&mut self) {
        let t = now();
        let sweep = t.mono >= self.next_sweep;
        if sweep || self.ep.poll_request_timeout().is_some_and(|w| w <= t.mono) {
            self.ep.handle_timeout(t);
            self.handle_events();
        }
        if !sweep {
            return;
        }
        self.next_sweep = t.mono + SWEEP_INTERVAL;

        if std::mem::take(&mut self.retry_accept) {
            self.on_relay_accept();
            let proxies: Vec<SocketAddr> = self.proxies.keys().copied().collect();
            for p in proxies {
                self.on_proxy_accept(p);
            }
        }

        self.udp.sweep(t.mono);

        if let Some(idle) = self.cfg.relay_idle {
            let idle_rids: Vec<usize> = self
                .relays
                .iter()
                .filter(|(_, e)| e.relay.last_moved() + idle <= t.mono)
                .map(|(rid, _)| *rid)
                .collect();
            for rid in idle_rids {
                if let Some(e) = self.relays.get_mut(&rid) {
                    e.relay.abort();
                    self.counters.relays_idle_closed += 1;
                    let why = format!("no byte moved for {} s", idle.as_secs());
                    self.finish_relay(rid, RelayState::Reset(why));
                }
            }
        }
        let pending = &self.pending;
        self.connector_of.retain(|id, _| pending.contains_key(id));

        for r in self.registry.expire(t.mono) {
            self.counters.expired += 1;
            self.close_proxy(r.transport, r.proxy);
            info!(
                "lease expired: proxy {} (local {}, client {}, {})",
                r.proxy,
                r.local,
                r.observed,
                transport_name(r.transport)
            );
        }

        let late = due(&self.preambles, t.mono, |c| c.deadline);
        for tok in late {
            if let Some(c) = self.drop_preamble(tok) {
                self.counters.preamble_timeouts += 1;
                warn!("relay port: {} sent no preamble in time", c.peer);
                reset(c.stream);
            }
        }

        let late = due(&self.claims, t.mono, |c| c.deadline);
        for tok in late {
            self.claim_failed(tok, "was not acked in time");
        }

        let late = due(&self.pending, t.mono, |p| p.deadline);
        for id in late {
            if let Some(p) = self.pending.remove(&id) {
                self.counters.pairing_timeouts += 1;
                let who = p.waiting.as_ref().map(|(_, a)| a.to_string());
                warn!(
                    "connect id {} for proxy {} expired; closing waiting side {}",
                    hex(&id),
                    p.proxy,
                    who.as_deref().unwrap_or("(none)")
                );
                if let Some(req) = p.connect_back {
                    if self.outgoing.remove(&req).is_some() {
                        self.ep.cancel(req);
                    }
                }
                drop_conn(p.waiting);
            }
        }

        if let Some(next) = self.next_stats {
            if next <= t.mono {
                self.log_stats();
                self.next_stats = self.cfg.stats_interval.map(|d| t.mono + d);
            }
        }
    }

    /// Current counters (including the control endpoint's).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counters of the UDP data plane.
    pub fn udp_counters(&self) -> &crate::udpproxy::UdpCounters {
        &self.udp.counters
    }

    /// Logs the one-line stats summary.
    pub fn log_stats(&self) {
        let c = &self.counters;
        let u = &self.udp.counters;
        let s = self.ep.stats();
        let junk = s.malformed + s.rejected_total();
        let active_bytes: u64 = self
            .relays
            .values()
            .map(|e| {
                let (ab, ba) = e.relay.bytes();
                ab + ba
            })
            .sum();
        info!("stats registrations={} relays_active={} pending={} registered={} expired={} refused={} \
             proxy_accepts={} conns_refused={} relays_started={} relays_done={} relays_reset={} \
             relay_bytes={} bad_preambles={} preamble_timeouts={} pairing_timeouts={} \
             connect_back_failures={} direct={} reverse={} relay={} reregister_sent={} \
             datagrams_received={} junk_datagrams={} not_allowed={} error_replies={} \
             udp_proxies={} udp_rules={} udp_rules_created={} udp_rules_expired={} \
             udp_to_listener={} udp_to_listener_bytes={} udp_from_listener={} \
             udp_from_listener_bytes={} udp_dummies={} udp_drop_bad_token={} \
             udp_drop_no_listener={} udp_drop_no_rule={} udp_drop_table_full={} \
             udp_drop_not_frame={} udp_drop_stray={} udp_drop_too_big={} udp_send_errors={} \
                          standbys={} standby_parked={} standby_refused={} standby_claimed={} \
             standby_fallbacks={} \
             udp_punches={} udp_punch_refused={} udp_punch_back_failures={} \
             udp_punch_ends={} udp_punch_end_failures={} \
             control_rate_limited={} relay_limit_refusals={} preamble_limit_refusals={} \
             relays_idle_closed={} udp_drop_sender_ip_full={} replies_shrunk={} \
             replies_withheld={}",
            self.registry.len(),
            self.relays.len(),
            self.pending.len(),
            c.registered,
            c.expired,
            c.refused,
            c.proxy_accepts,
            c.conns_refused,
            c.relays_started,
            c.relays_done,
            c.relays_reset,
            c.relay_bytes + active_bytes,
            c.bad_preambles,
            c.preamble_timeouts,
            c.pairing_timeouts,
            c.connect_back_failures,
            c.direct,
            c.reverse,
            c.relay,
            c.reregister_sent,
            s.received,
            junk,
            c.not_allowed,
            s.error_replies,
            self.udp.len(),
            self.udp.rules.len(),
            self.udp.rules.created,
            self.udp.rules.expired,
            u.to_listener,
            u.to_listener_bytes,
            u.from_listener,
            u.from_listener_bytes,
            u.dummies,
            u.drop_bad_token,
            u.drop_no_listener,
            u.drop_no_rule,
            u.drop_table_full,
            u.drop_not_frame,
            u.drop_stray,
            u.drop_too_big,
            u.send_errors,
            self.standby.len(),
            c.standby_parked,
            c.standby_refused,
            c.standby_claimed,
            c.standby_fallbacks,
            u.punches,
            u.punch_refused,
            u.punch_back_failures,
            u.punch_ends,
            u.punch_end_failures,
            c.control_rate_limited,
            c.relay_limit_refusals,
            c.preamble_limit_refusals,
            c.relays_idle_closed,
            u.drop_sender_ip_full,
            s.replies_shrunk,
            s.replies_withheld,
        );
    }

    /// `punch_request` (GCB <-> GCB UDP hole punching, paper 4.2.1; see
    /// [`gcb_proto::punch`]): hands both registrants the other's data
    /// address and one fresh nonce. The broker only sends control messages
    /// here; the punch itself is between the two shims.
    fn on_punch_request(
        &mut self,
        from: SocketAddr,
        proxy: SocketAddr,
        from_proxy: SocketAddr,
        token: &str,
    ) -> Body {
        let (dest_data, src_data) = match self.udp.punch_pair(&proxy, &from_proxy, token) {
            Ok(x) => x,
            Err((code, why)) => {
                info!("punch {from_proxy} -> {proxy} (client {from}) refused: {why}");
                return Body::error(code, why);
            }
        };
        let (Some(dest), Some(src)) = (
            self.registry.get(Transport::Udp, &proxy).cloned(),
            self.registry.get(Transport::Udp, &from_proxy).cloned(),
        ) else {
            self.udp.counters.punch_refused += 1;
            return Body::error(ErrorCode::NoSuchRegistration, "no such udp registration");
        };
        // Same public IP: both behind one NAT, which may not hairpin; the
        // private addresses are tried too.
        let same_nat = dest_data.ip() == src_data.ip();
        let nonce = hex(&random_bytes());
        let back = Body::PunchBack {
            proxy,
            peer: src_data,
            peer_local: same_nat.then_some(src.local).and_then(v4_of),
            nonce: nonce.clone(),
        };
        if self
            .send(dest.observed, back, Outgoing::PunchBack)
            .is_none()
        {
            self.udp.counters.punch_refused += 1;
            return Body::error(ErrorCode::Busy, "cannot reach the destination now");
        }
        self.udp.counters.punches += 1;
        info!(
            "punch {from_proxy} (data {src_data}) <-> {proxy} (data {dest_data}){}",
            if same_nat { ", same NAT" } else { "" }
        );
        Body::Punch {
            peer: dest_data,
            peer_local: same_nat.then_some(dest.local).and_then(v4_of),
            me: src_data,
            nonce,
        }
    }
}

fn v4_of(a: SocketAddr) -> Option<std::net::SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// The keys of `map` whose deadline has passed at `now`.
fn due<K: Copy, V>(map: &HashMap<K, V>, now: Instant, deadline: impl Fn(&V) -> Instant) -> Vec<K> {
    map.iter()
        .filter(|(_, v)| deadline(v) <= now)
        .map(|(k, _)| *k)
        .collect()
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Udp => "udp",
    }
}

/// Closes a connection with RST (SO_LINGER 0).
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

fn drop_conn(c: Option<(TcpStream, SocketAddr)>) {
    if let Some((s, _)) = c {
        reset(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random() {
        assert_ne!(random_bytes(), random_bytes());
    }
}
