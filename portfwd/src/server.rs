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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gcb_proto::{Body, Endpoint, Event, PoolKey, RequestId};
use ipnet::Ipv4Net;
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

    /// Applies a reload (module docs): `cfg` to the server, `core`'s quota, rate, burst
    /// and probe failures to the core. Says what changed; what needs a restart is
    /// reported and not applied. Never removes a mapping.
    pub fn reconfigure(&mut self, cfg: Config, core: &CoreConfig) -> Changes {
        let mut ch = Changes::default();
        let (old, oc) = (&self.cfg, self.core.config());
        if old.listen != cfg.listen {
            ch.need_restart
                .push(format!("listen {}->{}", old.listen, cfg.listen));
        }
        if oc.public != core.public {
            ch.need_restart
                .push(format!("public {}->{}", oc.public, core.public));
        }
        if oc.private != core.private {
            ch.need_restart
                .push(format!("private {}->{}", oc.private, core.private));
        }
        if oc.ports != core.ports {
            ch.need_restart
                .push(format!("ports {}->{}", oc.ports, core.ports));
        }
        if old.key != cfg.key {
            ch.applied.push(
                match (&old.key, &cfg.key) {
                    (None, Some(_)) => "pool key set (was --insecure)",
                    (Some(_), None) => "pool key removed (--insecure)",
                    _ => "pool key changed",
                }
                .to_owned(),
            );
            self.ep.set_key(cfg.key.clone());
        }
        if old.lan_ifs != cfg.lan_ifs {
            ch.applied.push(format!(
                "lan interfaces {}->{}",
                old.lan_ifs.join(","),
                cfg.lan_ifs.join(",")
            ));
            self.lan_by_index.clear();
            self.warned_ifs.clear();
        }
        let mut diff = |name: &str, a: String, b: String| {
            if a != b {
                ch.applied.push(format!("{name} {a}->{b}"));
            }
        };
        diff(
            "probe_interval",
            format!("{:?}", old.probe_interval),
            format!("{:?}", cfg.probe_interval),
        );
        diff(
            "probe_timeout",
            format!("{:?}", old.probe_timeout),
            format!("{:?}", cfg.probe_timeout),
        );
        diff(
            "probe_concurrency",
            old.probe_concurrency.to_string(),
            cfg.probe_concurrency.to_string(),
        );
        diff(
            "stats_interval",
            format!("{:?}", old.stats_interval),
            format!("{:?}", cfg.stats_interval),
        );
        diff("quota", oc.quota.to_string(), core.quota.to_string());
        diff("rate", oc.rate.to_string(), core.rate.to_string());
        diff("burst", oc.burst.to_string(), core.burst.to_string());
        diff(
            "probe_failures",
            oc.probe_failures.to_string(),
            core.probe_failures.to_string(),
        );
        let t = Instant::now();
        if old.stats_interval != cfg.stats_interval {
            self.next_stats = cfg.stats_interval.map(|d| t + d);
        }
        if old.probe_interval != cfg.probe_interval && self.round.is_none() {
            self.next_round = t + cfg.probe_interval;
        }
        self.core.set_limits(core);
        let listen = self.cfg.listen;
        self.cfg = cfg;
        // The socket stays where it is bound.
        self.cfg.listen = listen;
        ch
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

    /// The stats line's counters and gauges, by name, in its order (the status document's
    /// `counters` and the metrics come from here too).
    pub fn counter_list(&self) -> Vec<(&'static str, u64)> {
        let c = self.core.counters();
        let s = self.ep.stats();
        vec![
            ("mappings", self.core.table().len() as u64),
            ("epoch", self.core.epoch()),
            ("requests", self.counters.requests),
            ("batches", self.counters.batches),
            ("added", c.added),
            ("reused", c.reused),
            ("updated", c.updated),
            ("deleted", c.deleted),
            ("queries", c.queries),
            ("refused", c.refused),
            ("rate_limited", c.rate_limited),
            ("rolled_back", c.rolled_back),
            ("probe_rounds", self.counters.probe_rounds),
            ("probes_ok", c.probes_ok),
            ("probes_refused", c.probes_refused),
            ("probes_failed", c.probes_failed),
            ("removed_by_probe", c.removed_by_probe),
            ("kernel_repairs", c.kernel_repairs),
            ("conntrack_flushed", c.conntrack_flushed),
            ("conntrack_skipped", c.conntrack_skipped),
            ("quarantined", c.quarantined),
            ("mirror_errors", c.mirror_errors),
            ("kernel_errors", c.kernel_errors),
            ("datagrams_received", s.received),
            ("junk_datagrams", s.malformed + s.rejected_total()),
            ("error_replies", s.error_replies),
            (
                "duplicates",
                s.duplicates_answered_from_cache + s.duplicates_pending,
            ),
            (
                "dropped_wrong_interface",
                self.counters.dropped_wrong_interface,
            ),
        ]
    }

    /// Logs the stats line.
    pub fn log_stats(&self) {
        tracing::info!("stats {}", stats_line(&self.counter_list()));
    }

    /// Opens the admin socket at `admin` and the metrics listener on `metrics` (either
    /// optional), served from the event loop from now on.
    pub fn open_ops(
        &mut self,
        admin: Option<&std::path::Path>,
        metrics: Option<SocketAddr>,
    ) -> Result<(), OpsError> {
        self.ops.open(admin, metrics, self.poll.registry())
    }

    /// The operator's sockets, if opened.
    pub fn ops(&self) -> Option<&Ops> {
        self.ops.get()
    }

    /// The status document of this moment ([`crate::status`]).
    pub fn status(&self) -> Status {
        let now = Instant::now();
        let core = &self.core;
        let limit = core.config().probe_failures;
        let public = core.config().public;
        let mappings = core
            .table()
            .iter()
            .map(|(key, e)| {
                let probe = SocketAddrV4::new(e.owner(), e.probe_port);
                let failures = core.probe_failures(probe);
                MappingStatus {
                    proto: match key.0 {
                        gcb_proto::Transport::Tcp => "tcp",
                        gcb_proto::Transport::Udp => "udp",
                    }
                    .to_owned(),
                    public: SocketAddrV4::new(public, key.1).to_string(),
                    private: e.private.to_string(),
                    probe: probe.to_string(),
                    age_secs: core
                        .born(key)
                        .map(|b| now.saturating_duration_since(b).as_secs_f64()),
                    probe_failures: failures,
                    probe_state: if failures == 0 {
                        "ok".to_owned()
                    } else {
                        format!("failing {failures}/{limit}")
                    },
                }
            })
            .collect();
        Status {
            about: DaemonInfo::this_process(
                "gcb-portfwd",
                env!("CARGO_PKG_VERSION"),
                now.saturating_duration_since(self.started),
                self.addr.to_string(),
            ),
            public: public.to_string(),
            epoch: core.epoch(),
            mappings,
            install_seconds: self.installs.clone(),
            counters: counters_json(self.counter_list()),
        }
    }

    fn on_ops(&mut self, t: Token) {
        let mut ops = self.ops.take();
        if let Some(ops) = ops.as_mut() {
            ops.ready(
                t,
                self.poll.registry(),
                Instant::now(),
                &mut |req: Request| {
                    gcb_ops::answer(req, &self.status(), |doc| {
                        crate::metrics::render(doc, &self.install_seconds)
                    })
                },
            );
        }
        self.ops.put(ops);
    }
}

/// One address of one interface of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// The interface's name.
    pub name: String,
    /// The address.
    pub ip: IpAddr,
    /// The interface is a loopback interface.
    pub loopback: bool,
}

/// Every IPv4 and IPv6 address of this host's interfaces (getifaddrs).
pub fn interface_addrs() -> Vec<InterfaceAddr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr of family sa_family.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        out.push(InterfaceAddr { name, ip, loopback });
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// The first address of this host inside `net` (the default `--listen`).
pub fn local_ip_in(net: Ipv4Net) -> Option<Ipv4Addr> {
    interface_addrs().into_iter().find_map(|a| match a.ip {
        IpAddr::V4(ip) if net.contains(&ip) => Some(ip),
        _ => None,
    })
}

/// The LAN interfaces for a control socket on `listen` (module docs): the
/// loopback interfaces and the interface holding `listen`, or, for an
/// unspecified `listen`, every interface with an address inside `private`.
/// Sorted, without duplicates; `--lan-if` names are added by the caller.
pub fn lan_interfaces(listen: IpAddr, private: Ipv4Net) -> Vec<String> {
    let mut names: Vec<String> = interface_addrs()
        .into_iter()
        .filter(|a| {
            a.loopback
                || if listen.is_unspecified() {
                    matches!(a.ip, IpAddr::V4(ip) if private.contains(&ip))
                } else {
                    a.ip == listen
                }
        })
        .map(|a| a.name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The name of the interface with index `ifindex`, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Does an interface named `name` exist?
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Asks the kernel to attach the arrival interface to every datagram.
fn enable_pktinfo(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let (level, opt) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which lives across
    // the call; `fd` is our open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram (non-blocking socket) with its source and the index of the
/// interface it arrived on (`None` if the kernel attached no packet info).
fn recv_with_ifindex(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<u32>)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one in_pktinfo or in6_pktinfo message, u64-aligned as cmsghdr needs.
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `msg` points to a live buffer of the stated length.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ifindex = None;
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros stay inside msg_control.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a header inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let h = unsafe { &*c };
        // SAFETY: the data of a header of these types is an in_pktinfo / in6_pktinfo; it may be
        // unaligned, so it is read with read_unaligned.
        unsafe {
            if h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                ifindex = u32::try_from(info.ipi_ifindex).ok();
            } else if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                ifindex = Some(info.ipi6_ifindex);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = match i32::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET source is a sockaddr_in.
            let sin =
                unsafe { &*(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 source is a sockaddr_in6.
            let sin6 =
                unsafe { &*(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ))
        }
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("datagram from address family {f}"),
            ))
        }
    };
    Ok((n as usize, from, ifindex))
}

/// Is `ip` one of this host's addresses?
pub fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
