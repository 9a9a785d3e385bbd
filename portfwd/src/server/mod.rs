//! The event loop: one mio `Poll` over the control UDP socket and the
//! probe connections, driving gcb-proto's sans-IO `Endpoint` and the
//! [`Core`].
//!
//! ## Control requests only from the LAN side
//!
//! A source address proves nothing: a host on the WAN side can send a
//! datagram with the source address of a LAN host (a route to the LAN
//! through the gateway is all it takes). So every control datagram is
//! received with the index of the interface it arrived on (`IP_PKTINFO`,
//! or `IPV6_PKTINFO` for an IPv6 control socket) and is dropped, before any
//! parsing, unless that interface is a LAN interface ([`Config::lan_ifs`]:
//! the interface holding the control address, loopback, and any given with
//! `--lan-if`; see [`lan_interfaces`]). Drops are counted
//! (`dropped_wrong_interface` in the stats line); the first from each
//! interface is logged. Interface indexes are resolved by name and cached
//! until the next probe round, so a re-created interface is picked up.
//!
//! ## Signals
//!
//! SIGUSR1 logs the stats line. SIGHUP makes [`Server::run`] return
//! [`RunEnd::Reload`]: `main` resolves the configuration again and applies it with
//! [`Server::reconfigure`] (pool key, LAN interfaces, probe settings, quota, rate,
//! burst, stats interval; `--public`, `--private`, `--ports`, `--listen` and `--state`
//! need a restart). A new key takes over at once: requests sealed with the old one are
//! refused; mappings stay (they carry no key). SIGTERM/SIGINT stop it at the next turn
//! of the loop (a batch in progress is committed and answered first) and keep every
//! mapping: table, mirror file and kernel rules stay, and traffic through the rules
//! flows on while the daemon is down. No drain: the daemon holds no connection of its
//! own (forwarded traffic never passes through it), so there is nothing to wait for.
//!
//! `IP_PKTINFO` rather than `SO_BINDTODEVICE`: one socket then serves
//! several LAN interfaces and loopback (a socket is bound to at most one
//! device), and a datagram from the wrong side reaches us to be counted and
//! logged instead of vanishing in the kernel.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gcb_proto::{Body, Endpoint, Event, PoolKey, RequestId};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use crate::client::{now, random_u64};
use crate::core::{Core, CoreConfig, ProbeOutcome};
use crate::kernel::KernelBackend;
use crate::status::{InstallLatency, MappingStatus, Status};
use gcb_ops::counter_list::{counters_json, stats_line};
use gcb_ops::status_doc::DaemonInfo;
use gcb_ops::{Ops, OpsError, OpsSlot, Request};
use prometheus_client::metrics::histogram::Histogram;

mod admin;
mod iface;
mod lifecycle;

use iface::{enable_pktinfo, recv_with_ifindex};
pub use iface::{
    interface_addrs, interface_exists, interface_name, is_local, lan_interfaces, local_ip_in,
    InterfaceAddr,
};

/// Default control port (UDP).
pub const DEFAULT_PORT: u16 = 9651;

const CONTROL: Token = Token(0);
/// Most requests handled as one batch (one fsync, one nft transaction).
const MAX_BATCH: usize = 512;
/// Longest sleep in `poll`, so a signal is noticed even without EINTR.
const MAX_SLEEP: Duration = Duration::from_millis(250);

/// Server settings (built by `main`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Control UDP address.
    pub listen: SocketAddr,
    /// Pool key for the control protocol.
    pub key: Option<PoolKey>,
    /// Names of the LAN interfaces: control datagrams arriving on any other
    /// interface are dropped (module docs).
    pub lan_ifs: Vec<String>,
    /// Time between probe rounds.
    pub probe_interval: Duration,
    /// Time a probe connection may take.
    pub probe_timeout: Duration,
    /// Probe connections in flight at once.
    pub probe_concurrency: usize,
    /// Period of the stats line (None: only at exit).
    pub stats_interval: Option<Duration>,
}

pub use gcb_ops::lifecycle::{Changes, RunEnd, Signals};

/// Server counters (the core has its own).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Requests handled.
    pub requests: u64,
    /// Batches committed.
    pub batches: u64,
    /// Probe rounds completed.
    pub probe_rounds: u64,
    /// Control datagrams dropped because they arrived on an interface
    /// that is not a LAN interface (or without interface information).
    pub dropped_wrong_interface: u64,
}

struct Probe {
    stream: TcpStream,
    target: SocketAddrV4,
    deadline: Instant,
}

struct Round {
    started: Instant,
    queue: VecDeque<SocketAddrV4>,
    inflight: HashMap<Token, Probe>,
    results: Vec<(SocketAddrV4, ProbeOutcome)>,
}

/// The DPF server.
pub struct Server<K: KernelBackend> {
    cfg: Config,
    poll: Poll,
    control: UdpSocket,
    addr: SocketAddr,
    ep: Endpoint,
    core: Core<K>,
    round: Option<Round>,
    next_round: Instant,
    next_token: usize,
    next_stats: Option<Instant>,
    counters: Counters,
    /// Interface index -> is it a LAN interface (cleared every probe round).
    lan_by_index: HashMap<u32, bool>,
    /// Interfaces whose first dropped datagram was logged.
    warned_ifs: HashSet<Option<u32>>,
    /// The admin socket and the metrics listener ([`gcb_ops`]), once opened.
    ops: OpsSlot,
    /// When the server started (for `status`).
    started: Instant,
    /// Time to handle batches that install rules ([`crate::metrics`]).
    install_seconds: Histogram,
    /// Its count and sum for the status document (the crate reads them only in tests).
    installs: InstallLatency,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl<K: KernelBackend> Server<K> {
    /// Binds the control socket.
    pub fn bind(cfg: Config, core: Core<K>) -> io::Result<Server<K>> {
        let mut control = UdpSocket::bind(cfg.listen)?;
        enable_pktinfo(control.as_raw_fd(), cfg.listen.is_ipv6())?;
        let addr = control.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)?;
        // Every request is remembered for the reply-cache TTL (30 s); a burst
        // of installs (thousands of sockets) must not hit the default cap.
        let ep_cfg = gcb_proto::Config {
            max_cache_entries: 65_536,
            ..gcb_proto::Config::default()
        };
        let mut ep = Endpoint::new(ep_cfg, cfg.key.clone(), random_u64());
        // Keyed frames captured before this start are not accepted after it.
        ep.set_not_before(crate::client::now().unix_ms);
        let t = Instant::now();
        Ok(Server {
            next_round: t + cfg.probe_interval,
            next_stats: cfg.stats_interval.map(|d| t + d),
            cfg,
            poll,
            control,
            addr,
            ep,
            core,
            round: None,
            next_token: 1,
            counters: Counters::default(),
            lan_by_index: HashMap::new(),
            warned_ifs: HashSet::new(),
            ops: OpsSlot::default(),
            started: t,
            install_seconds: crate::metrics::install_histogram(),
            installs: InstallLatency::default(),
        })
    }

    /// The bound control address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The core.
    pub fn core(&self) -> &Core<K> {
        &self.core
    }

    /// The server's counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Is the interface `ifindex` a LAN interface? No index: no.
    fn on_lan(&mut self, ifindex: Option<u32>) -> bool {
        let Some(i) = ifindex else {
            return false;
        };
        if let Some(ok) = self.lan_by_index.get(&i) {
            return *ok;
        }
        let ok = interface_name(i).is_some_and(|n| self.cfg.lan_ifs.contains(&n));
        self.lan_by_index.insert(i, ok);
        ok
    }

    fn drop_wrong_interface(&mut self, from: SocketAddr, ifindex: Option<u32>) {
        self.counters.dropped_wrong_interface += 1;
        if self.warned_ifs.insert(ifindex) {
            let name = ifindex
                .and_then(interface_name)
                .unwrap_or_else(|| "an unknown interface".to_owned());
            tracing::warn!(
                "dropped a control datagram from {from} that arrived on {name}, not on a LAN interface ({}; --lan-if adds one); later ones from there are only counted (dropped_wrong_interface)",
                self.cfg.lan_ifs.join(", ")
            );
        }
    }

    /// Runs until a signal says otherwise (see [`RunEnd`]; module docs); logs the
    /// stats line before returning [`RunEnd::Exit`].
    pub fn run(&mut self, signals: &Signals) -> io::Result<RunEnd> {
        let mut events = Events::with_capacity(1024);
        loop {
            if signals.stats.swap(false, Ordering::Relaxed) {
                self.log_stats();
            }
            if signals.terminate.load(Ordering::Relaxed) > 0 {
                break;
            }
            if signals.reload.swap(false, Ordering::Relaxed) {
                return Ok(RunEnd::Reload);
            }
            let timeout = self.sleep_time();
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut control_ready = false;
            for ev in events.iter() {
                if ev.token() == CONTROL {
                    control_ready = true;
                } else if Ops::owns(ev.token()) {
                    self.on_ops(ev.token());
                } else {
                    self.on_probe(ev.token());
                }
            }
            if control_ready {
                self.on_control();
            }
            self.timers();
            self.flush_control();
        }
        tracing::info!(
            "shutting down: {} mappings kept (table, mirror file and kernel)",
            self.core.table().len()
        );
        self.log_stats();
        Ok(RunEnd::Exit)
    }

    fn sleep_time(&self) -> Duration {
        let t = Instant::now();
        let mut wake = self.next_round;
        if let Some(w) = self.ep.poll_timeout() {
            wake = wake.min(w);
        }
        if let Some(r) = &self.round {
            if let Some(d) = r.inflight.values().map(|p| p.deadline).min() {
                wake = wake.min(d);
            }
        }
        if let Some(s) = self.next_stats {
            wake = wake.min(s);
        }
        if let Some(d) = self.ops.next_deadline() {
            wake = wake.min(d);
        }
        wake.saturating_duration_since(t)
            .clamp(Duration::from_millis(1), MAX_SLEEP)
    }

    fn on_control(&mut self) {
        let mut buf = [0u8; 2048];
        loop {
            let mut batch: Vec<(SocketAddr, RequestId, Body)> = Vec::new();
            let mut drained = false;
            while batch.len() < MAX_BATCH {
                match recv_with_ifindex(self.control.as_raw_fd(), &mut buf) {
                    Ok((n, from, ifindex)) => {
                        if !self.on_lan(ifindex) {
                            self.drop_wrong_interface(from, ifindex);
                            continue;
                        }
                        self.ep.handle_datagram(now(), from, &buf[..n]);
                        while let Some(ev) = self.ep.poll_event() {
                            if let Event::Request { from, id, body } = ev {
                                tracing::debug!("{from} -> {body:?}");
                                batch.push((from, id, body));
                            }
                        }
                    }
                    Err(e) if would_block(&e) => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => tracing::debug!("control recv: {e}"),
                }
            }
            if !batch.is_empty() {
                self.counters.requests += batch.len() as u64;
                self.counters.batches += 1;
                let reqs = batch.iter().map(|(f, _, b)| (f.ip(), b.clone())).collect();
                let installs = batch
                    .iter()
                    .any(|(_, _, b)| matches!(b, Body::Forward { .. }));
                let t0 = Instant::now();
                let replies = self.core.handle_batch(t0, reqs);
                if installs {
                    let took = t0.elapsed().as_secs_f64();
                    self.install_seconds.observe(took);
                    self.installs.count += 1;
                    self.installs.sum += took;
                }
                for ((from, id, _), reply) in batch.into_iter().zip(replies) {
                    tracing::debug!("{from} <- {reply:?}");
                    if let Err(e) = self.ep.respond(now(), from, id, reply) {
                        tracing::warn!("cannot answer {from}: {e}");
                    }
                }
                self.flush_control();
            }
            if drained {
                break;
            }
        }
    }

    fn flush_control(&mut self) {
        while let Some(t) = self.ep.poll_transmit() {
            if let Err(e) = self.control.send_to(&t.payload, t.to) {
                tracing::debug!("control send to {}: {e}", t.to);
            }
        }
    }

    fn timers(&mut self) {
        let t = Instant::now();
        self.ep.handle_timeout(now());
        // drop requests the endpoint surfaced from timers (none expected)
        while self.ep.poll_event().is_some() {}
        self.ops.sweep(self.poll.registry(), t);
        if self.round.is_none() && t >= self.next_round {
            self.start_round(t);
        }
        if self.round.is_some() {
            self.pump_round(t);
        }
        if let Some(s) = self.next_stats {
            if t >= s {
                self.log_stats();
                self.next_stats = self.cfg.stats_interval.map(|d| t + d);
            }
        }
    }

    fn start_round(&mut self, t: Instant) {
        let targets = self.core.probe_targets();
        tracing::debug!("probe round: {} management sockets", targets.len());
        self.round = Some(Round {
            started: t,
            queue: targets.into(),
            inflight: HashMap::new(),
            results: Vec::new(),
        });
    }

    fn pump_round(&mut self, t: Instant) {
        let Some(mut r) = self.round.take() else {
            return;
        };
        // timeouts
        let expired: Vec<Token> = r
            .inflight
            .iter()
            .filter(|(_, p)| p.deadline <= t)
            .map(|(tok, _)| *tok)
            .collect();
        for tok in expired {
            if let Some(mut p) = r.inflight.remove(&tok) {
                let _ = self.poll.registry().deregister(&mut p.stream);
                r.results.push((p.target, ProbeOutcome::Failed));
            }
        }
        while r.inflight.len() < self.cfg.probe_concurrency.max(1) {
            let Some(target) = r.queue.pop_front() else {
                break;
            };
            match TcpStream::connect(SocketAddr::V4(target)) {
                Ok(mut stream) => {
                    let tok = Token(self.next_token);
                    self.next_token = self.next_token.wrapping_add(1).max(1);
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, tok, Interest::WRITABLE)
                        .is_err()
                    {
                        r.results.push((target, ProbeOutcome::Failed));
                        continue;
                    }
                    r.inflight.insert(
                        tok,
                        Probe {
                            stream,
                            target,
                            deadline: t + self.cfg.probe_timeout,
                        },
                    );
                }
                Err(e) => {
                    let o = if e.kind() == io::ErrorKind::ConnectionRefused {
                        ProbeOutcome::Refused
                    } else {
                        ProbeOutcome::Failed
                    };
                    tracing::debug!("probe {target}: {e}");
                    r.results.push((target, o));
                }
            }
        }
        if r.inflight.is_empty() && r.queue.is_empty() {
            self.finish_round(r);
        } else {
            self.round = Some(r);
        }
    }

    fn on_probe(&mut self, tok: Token) {
        let Some(r) = self.round.as_mut() else {
            return;
        };
        let Some(p) = r.inflight.get(&tok) else {
            return;
        };
        let outcome = match p.stream.take_error() {
            Ok(Some(e)) | Err(e) => {
                tracing::debug!("probe {}: {e}", p.target);
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    ProbeOutcome::Refused
                } else {
                    ProbeOutcome::Failed
                }
            }
            Ok(None) => match p.stream.peer_addr() {
                Ok(_) => ProbeOutcome::Alive,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(_) => ProbeOutcome::Failed,
            },
        };
        if let Some(mut p) = r.inflight.remove(&tok) {
            let _ = self.poll.registry().deregister(&mut p.stream);
            r.results.push((p.target, outcome));
        }
        // more probes may start now
        self.pump_round(Instant::now());
    }

    fn finish_round(&mut self, r: Round) {
        self.counters.probe_rounds += 1;
        // Interfaces may have been re-created (new indexes) meanwhile.
        self.lan_by_index.clear();
        let removed = self.core.apply_probe_results(r.started, &r.results);
        let rep = self.core.sync(Instant::now());
        tracing::debug!(
            "probe round done: {} probed, {} mappings removed; sync {:?}",
            r.results.len(),
            removed.len(),
            rep
        );
        let t = Instant::now();
        self.next_round = (r.started + self.cfg.probe_interval).max(t + Duration::from_millis(100));
    }
}
