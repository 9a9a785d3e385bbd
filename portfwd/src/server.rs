//! The event loop: one mio `Poll` over the control UDP socket and the
//! probe connections, driving gcb-proto's sans-IO `Endpoint` and the
//! [`Core`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gcb_proto::{Body, Endpoint, Event, PoolKey, RequestId};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use crate::client::{now, random_u64};
use crate::core::{Core, ProbeOutcome};
use crate::kernel::KernelBackend;

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
    /// Time between probe rounds.
    pub probe_interval: Duration,
    /// Time a probe connection may take.
    pub probe_timeout: Duration,
    /// Probe connections in flight at once.
    pub probe_concurrency: usize,
    /// Period of the stats line (None: only at exit).
    pub stats_interval: Option<Duration>,
}

/// Server counters (the core has its own).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Requests handled.
    pub requests: u64,
    /// Batches committed.
    pub batches: u64,
    /// Probe rounds completed.
    pub probe_rounds: u64,
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
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl<K: KernelBackend> Server<K> {
    /// Binds the control socket.
    pub fn bind(cfg: Config, core: Core<K>) -> io::Result<Server<K>> {
        let mut control = UdpSocket::bind(cfg.listen)?;
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
        let ep = Endpoint::new(ep_cfg, cfg.key.clone(), random_u64());
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

    /// Runs until `stop` becomes true; logs the stats line on the way out.
    pub fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !stop.load(Ordering::Relaxed) {
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
        log!(
            Info,
            "shutting down: {} mappings kept (table, mirror file and kernel)",
            self.core.table().len()
        );
        self.log_stats();
        Ok(())
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
        wake.saturating_duration_since(t)
            .clamp(Duration::from_millis(1), MAX_SLEEP)
    }

    fn on_control(&mut self) {
        let mut buf = [0u8; 2048];
        loop {
            let mut batch: Vec<(SocketAddr, RequestId, Body)> = Vec::new();
            let mut drained = false;
            while batch.len() < MAX_BATCH {
                match self.control.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        self.ep.handle_datagram(now(), from, &buf[..n]);
                        while let Some(ev) = self.ep.poll_event() {
                            if let Event::Request { from, id, body } = ev {
                                log!(Debug, "{from} -> {body:?}");
                                batch.push((from, id, body));
                            }
                        }
                    }
                    Err(e) if would_block(&e) => {
                        drained = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => log!(Debug, "control recv: {e}"),
                }
            }
            if !batch.is_empty() {
                self.counters.requests += batch.len() as u64;
                self.counters.batches += 1;
                let reqs = batch.iter().map(|(f, _, b)| (f.ip(), b.clone())).collect();
                let replies = self.core.handle_batch(Instant::now(), reqs);
                for ((from, id, _), reply) in batch.into_iter().zip(replies) {
                    log!(Debug, "{from} <- {reply:?}");
                    if let Err(e) = self.ep.respond(now(), from, id, reply) {
                        log!(Warn, "cannot answer {from}: {e}");
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
                log!(Debug, "control send to {}: {e}", t.to);
            }
        }
    }

    fn timers(&mut self) {
        let t = Instant::now();
        self.ep.handle_timeout(now());
        // drop requests the endpoint surfaced from timers (none expected)
        while self.ep.poll_event().is_some() {}
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
        log!(Debug, "probe round: {} management sockets", targets.len());
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
                    log!(Debug, "probe {target}: {e}");
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
                log!(Debug, "probe {}: {e}", p.target);
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
        let removed = self.core.apply_probe_results(r.started, &r.results);
        let rep = self.core.sync(Instant::now());
        log!(
            Debug,
            "probe round done: {} probed, {} mappings removed; sync {:?}",
            r.results.len(),
            removed.len(),
            rep
        );
        let t = Instant::now();
        self.next_round = (r.started + self.cfg.probe_interval).max(t + Duration::from_millis(100));
    }

    /// Logs the stats line.
    pub fn log_stats(&self) {
        let c = self.core.counters();
        let s = self.ep.stats();
        log!(
            Info,
            "stats mappings={} epoch={} requests={} batches={} added={} reused={} updated={} deleted={} \
             queries={} refused={} rate_limited={} rolled_back={} probe_rounds={} probes_ok={} \
             probes_refused={} probes_failed={} removed_by_probe={} kernel_repairs={} \
             conntrack_flushed={} conntrack_skipped={} quarantined={} mirror_errors={} kernel_errors={} datagrams_received={} \
             junk_datagrams={} error_replies={} duplicates={}",
            self.core.table().len(),
            self.core.epoch(),
            self.counters.requests,
            self.counters.batches,
            c.added,
            c.reused,
            c.updated,
            c.deleted,
            c.queries,
            c.refused,
            c.rate_limited,
            c.rolled_back,
            self.counters.probe_rounds,
            c.probes_ok,
            c.probes_refused,
            c.probes_failed,
            c.removed_by_probe,
            c.kernel_repairs,
            c.conntrack_flushed,
            c.conntrack_skipped,
            c.quarantined,
            c.mirror_errors,
            c.kernel_errors,
            s.received,
            s.malformed + s.rejected_total(),
            s.error_replies,
            s.duplicates_answered_from_cache + s.duplicates_pending,
        );
    }
}

/// The first address of this host inside `net` (the default `--listen`).
pub fn local_ip_in(net: crate::cidr::Cidr) -> Option<std::net::Ipv4Addr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of family sa_family.
            let fam = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if fam == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if net.contains(ip) && found.is_none() {
                    found = Some(ip);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

/// Is `ip` one of this host's addresses?
pub fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
