//! The event loop: one mio `Poll` over the control UDP socket, the relay
//! TCP listener, every proxy listener, connections reading their preamble,
//! and the spliced relays.
//!
//! See the crate documentation for the walk-through of one brokered
//! connection. Everything here is single-threaded; the pure parts live in
//! [`crate::decision`], [`crate::registry`], [`crate::preamble`] and
//! [`crate::relay`].
//!
//! The handlers are `impl Server` blocks, one module per job; they share the state
//! of `state` (which uses only `config`, `counters` and `env`), so no module of `server`
//! imports another's items but those four, and `scripts/modgraph` finds no cycle:
//!
//! * [`config`]: [`Config`] and [`StartError`];
//! * [`env`](mod@env): the clock and the random source, injected so that tests drive timers
//!   with a fake clock ([`Server::bind_with`]);
//! * `state`: [`Server`]'s fields, poll token owners, waiting connections;
//! * `control`: control datagrams, requests and responses;
//! * `tokens`: registration tokens and their presentations;
//! * `register`: registrations, proxy sockets, UDP punch brokering;
//! * `connect`: connect decisions, proxy accepts, relay admission;
//! * `relay_port`: preambles, pairing, relays;
//! * `claims`: standby connections and their claims;
//! * `tcp_punch`: TCP hole punching between a connector's leg and a claimed standby;
//! * `timers`: the sweep; `stats`: the stats line;
//! * `admin`: the status document and the operator's sockets ([`gcb_ops`]);
//! * `lifecycle`: signals, reload ([`Server::reconfigure`]) and the drain on SIGTERM;
//! * `tests`: the handlers driven with a fake clock.
//!
//! This module binds the sockets and runs the loop.

mod admin;
mod claims;
pub mod config;
mod connect;
mod control;
pub mod counters;
pub mod env;
pub mod lifecycle;
mod register;
mod relay_port;
mod state;
mod stats;
mod tcp_punch;
#[cfg(test)]
mod tests;
mod timers;
mod tokens;

pub use config::{Config, PortRange, StartError, DEFAULT_PORT};
pub use counters::Counters;
pub use env::{Clock, OsRandom, Random, SystemClock};
pub use lifecycle::{Changes, RunEnd, Signals};
pub use state::Server;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use gcb_proto::token::OwnerSecret;
use gcb_proto::Endpoint;
use mio::net::{TcpListener, UdpSocket};
use mio::{Interest, Poll, Token};

use crate::iplimits::RateLimiter;
use crate::registry::{Limits, Registry};
use crate::standby::StandbyPool;
use crate::udpproxy::UdpPlane;
use crate::udprules::RuleLimits;
use mio::Events;
use state::{Owner, CONTROL, FIRST_DYNAMIC, RELAY_LISTENER};

/// The control socket's receive buffer asked for (bytes).
const CONTROL_RCVBUF: usize = 1 << 20;

impl Server {
    /// Binds the control UDP socket and the relay TCP listener; the system clock and
    /// the kernel's random bytes.
    pub fn bind(cfg: Config) -> Result<Server, StartError> {
        Server::bind_with(cfg, Box::new(SystemClock), Box::new(OsRandom))
    }

    /// [`Server::bind`] with the clock and the random source given (tests use a
    /// fake clock and predictable ids).
    pub fn bind_with(
        cfg: Config,
        clock: Box<dyn Clock>,
        mut random: Box<dyn Random>,
    ) -> Result<Server, StartError> {
        let advertise = advertised_ip(&cfg)?;
        check_proxy_ips(&cfg, advertise)?;
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
        let bound = control.local_addr()?;
        // What clients are told: the advertised IP with the port actually bound.
        let addr = SocketAddr::new(advertise, bound.port());
        // Bursts of heartbeats (a restart storm: every client within one heartbeat
        // interval) must not overflow the default receive buffer (best effort: the kernel
        // caps it at net.core.rmem_max, and Linux reports twice what it granted).
        let _ = socket2::SockRef::from(&control).set_recv_buffer_size(CONTROL_RCVBUF);
        if let Ok(got) = socket2::SockRef::from(&control).recv_buffer_size() {
            if got < 2 * CONTROL_RCVBUF {
                tracing::info!(
                    "control socket receive buffer {} KiB (asked {} KiB, capped by net.core.rmem_max): \
                     a restart storm of thousands of clients overflows it sooner (dropped \
                     datagrams are retransmitted); raise net.core.rmem_max to {} for large pools",
                    got / 2 / 1024,
                    CONTROL_RCVBUF / 1024,
                    CONTROL_RCVBUF
                );
            }
        }
        let poll = Poll::new()?;
        let mut control = control;
        let mut relay_listener = relay_listener;
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)?;
        poll.registry()
            .register(&mut relay_listener, RELAY_LISTENER, Interest::READABLE)?;
        let mut session = [0u8; 8];
        random.fill(&mut session);
        let session = u64::from_le_bytes(session);
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
        ep.set_not_before(clock.now().unix_ms);
        // Keyed: every broker of the pool computes the same tokens, before and after a
        // restart. Unkeyed: a secret of this run only (see gcb_proto::token).
        let owner = match &cfg.key {
            Some(k) => OwnerSecret::from_pool_key(k),
            None => {
                let mut b = [0u8; 32];
                random.fill(&mut b);
                OwnerSecret::from_random(b)
            }
        };
        let registry = Registry::new(Limits {
            max_total: cfg.max_registrations,
            max_per_ip: cfg.max_registrations_per_ip,
            lease: cfg.lease,
        });
        let mut udp = UdpPlane::new(
            RuleLimits {
                idle: cfg.udp_rule_idle,
                max_total: cfg.max_udp_rules,
                max_per_proxy: cfg.max_udp_rules_per_proxy,
                max_per_sender_ip: cfg.max_udp_rules_per_sender_ip,
            },
            addr,
        );
        let alias = source_ip_towards(bound.ip(), addr).filter(|ip| *ip != advertise);
        if let Some(ip) = alias {
            udp.add_own_alias(ip);
        }
        if addr != bound || cfg.proxy_ports.is_some() {
            tracing::info!(
                "bound on {bound}, advertised as {addr}{}; proxy sockets on {} with {}",
                alias.map_or(String::new(), |ip| format!(" (reached from here via {ip})")),
                bound.ip(),
                match cfg.proxy_ports {
                    Some(r) => format!("ports {r}"),
                    None => "ephemeral ports".to_owned(),
                }
            );
        }
        // 65,536 tracked IPs: a few MB at most (see iplimits).
        let control_rate =
            RateLimiter::new(cfg.control_rate_per_ip, cfg.control_burst_per_ip, 65_536);
        let t = clock.now().mono;
        Ok(Server {
            next_stats: cfg.stats_interval.map(|d| t + d),
            cfg,
            poll,
            control,
            relay_listener: Some(relay_listener),
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
            punches: HashMap::new(),
            punch_listeners: HashSet::new(),
            punch_memo: crate::punchmemo::PunchMemo::new(),
            outgoing: HashMap::new(),
            reregistering: HashSet::new(),
            owner,
            reserved: HashMap::new(),
            next_reserved_purge: t,
            connector_of: HashMap::new(),
            control_rate,
            limit_logs: HashMap::new(),
            counters: Counters::default(),
            next_sweep: t,
            retry_accept: false,
            drain: None,
            clock,
            random,
            ops: gcb_ops::OpsSlot::default(),
            started: t,
            bound,
            next_proxy_port: HashMap::new(),
            proxy_ip_full: HashMap::new(),
        })
    }

    /// The bound control/relay address (its IP may be a wildcard).
    pub fn local_addr(&self) -> SocketAddr {
        self.bound
    }

    /// The control/relay address told to clients: the advertised IP (the bound one
    /// unless `Config::advertise`) and the bound port. Proxy addresses are on this IP.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The event loop of [`Server::run`]: until a signal stops it.
    fn run_loop(&mut self, signals: &lifecycle::Signals) -> io::Result<lifecycle::RunEnd> {
        let mut events = Events::with_capacity(1024);
        loop {
            if let Some(end) = self.on_signals(signals) {
                return Ok(end);
            }
            let timeout = self.sleep_time();
            gcb_ops::logging::flush();
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
    }

    pub(super) fn dispatch(&mut self, token: Token) {
        match token {
            CONTROL => self.on_control(),
            RELAY_LISTENER => self.on_relay_accept(),
            t if gcb_ops::Ops::owns(t) => self.on_ops(t),
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
                Some(Owner::Punch(id)) => {
                    let id = *id;
                    self.on_punch_event(id, t);
                }
                Some(Owner::Relay(id)) => {
                    let id = *id;
                    self.pump_relay(id);
                }
                None => {}
            },
        }
    }
}

/// The IP told to clients: `Config::advertise`, else the bind IP, which must then be
/// specific (clients cannot be told a wildcard).
fn advertised_ip(cfg: &Config) -> Result<IpAddr, StartError> {
    let Some(ip) = cfg.advertise else {
        if cfg.listen.ip().is_unspecified() {
            return Err(StartError::Unspecified(cfg.listen));
        }
        return Ok(cfg.listen.ip());
    };
    let why = if ip.is_unspecified() {
        Some("must be a specific IP (clients are told it), not a wildcard")
    } else if ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        Some("must be a unicast IP")
    } else if ip.is_ipv4() != cfg.listen.is_ipv4() {
        Some("must be of the bind address's family (IPv4 or IPv6)")
    } else {
        None
    };
    match why {
        Some(why) => Err(StartError::Advertise { advertise: ip, why }),
        None => Ok(ip),
    }
}

/// `Config::proxy_ips` must be specific, unicast, of the bind family, other than the
/// advertised IP, and need a specific bind IP (a wildcard-bound proxy port would take that
/// port on every IP, so the port spaces would not be separate).
fn check_proxy_ips(cfg: &Config, advertise: IpAddr) -> Result<(), StartError> {
    for (i, &ip) in cfg.proxy_ips.iter().enumerate() {
        let why = if cfg.listen.ip().is_unspecified() {
            Some("needs a specific --bind/--listen IP (a wildcard-bound proxy takes its port on every IP)")
        } else if ip.is_unspecified() || ip.is_multicast() {
            Some("must be a specific unicast IP of this host")
        } else if ip.is_ipv4() != cfg.listen.is_ipv4() {
            Some("must be of the bind address's family (IPv4 or IPv6)")
        } else if ip == advertise || ip == cfg.listen.ip() || cfg.proxy_ips[..i].contains(&ip) {
            Some("given twice (the bind and advertised IPs take proxies already)")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(StartError::ProxyIp { ip, why });
        }
    }
    Ok(())
}

/// The source IP the kernel picks for a datagram from `bind_ip` to `to` (no packet is
/// sent: a UDP connect only routes). Behind a 1:1 NAT this is the host's private IP,
/// which the broker's own datagrams to its advertised address come back from.
fn source_ip_towards(bind_ip: IpAddr, to: SocketAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind(SocketAddr::new(bind_ip, 0)).ok()?;
    s.connect(to).ok()?;
    Some(s.local_addr().ok()?.ip())
}
