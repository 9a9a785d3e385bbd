//! `fleet`: many shim-like clients on one broker, for the 100,000-registration figures
//! and the re-registration storm after a broker restart (issue 16).
//!
//! Each client is one process's control channel as the shim has it: its own UDP socket
//! (so its own NAT mapping, the broker's `observed` address), its own `Endpoint` with the
//! shim's retransmission settings (first retransmission after 100 ms, backoff to 500 ms,
//! 5 s deadline), `--per-client` TCP listeners registered on it. Clients heartbeat every
//! `--heartbeat-ms` (the shim's 10 s), each at its own phase (drawn at random within
//! `--phase-spread-ms`, by default the interval: processes of a pool start at unrelated
//! times; the shim itself adds no jitter), one `heartbeat` per batch of proxies. On broker
//! loss they do what the shim does, no more: a heartbeat unanswered is only counted and
//! the next tick tries again; a `heartbeat_ack` naming unknown proxies, or a
//! `reregister_request`, makes the client re-register each of those (one request each,
//! `previous_proxy` with the ownership proof, none while one is in flight); a refused or
//! unanswered re-registration waits for the next heartbeat. No pacing besides that.
//! With `--standby`, every listener also parks a standby connection at the relay port
//! (`GCB-STANDBY <key>`), dialed again after each (re-)registration and, when the broker
//! refuses or resets it, after the shim's backoff (200 ms doubling to 30 s).
//!
//! Output, one JSON line each on stdout: `{"phase":"registered",...}` once every
//! listener is registered (registration rate, errors), `{"phase":"standbys",...}` once
//! every standby is parked (with `--standby`), then `{"phase":"recovered",...}`
//! each time the registrations the broker had forgotten are all registered again (all of
//! them after a restart; after a partial loss, none came back for 2.5 heartbeat
//! intervals): when the first was found unknown and the last came back, as unix ms, how many kept their
//! proxy address, the requests, retransmissions and errors it took, and how many came
//! back in each second). Runs until killed or `--max-secs`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gcb_examples::{die, random_bytes, say};
use gcb_proto::msg::heartbeat_batches;
use gcb_proto::preamble;
use gcb_proto::token::{self, Use};
use gcb_proto::{Body, Config, Endpoint, Event, Now, PoolKey, RequestId, Transport};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use super::PROG;

/// What `fleet` is asked to do.
pub struct FleetArgs {
    pub broker: SocketAddr,
    pub bind: IpAddr,
    pub key: Option<PoolKey>,
    pub clients: usize,
    pub per_client: usize,
    pub window: usize,
    pub heartbeat: Duration,
    /// Heartbeat phases are drawn from [0, this) (the heartbeat interval: processes
    /// started at unrelated times; 0: all in step, as a pool started at once).
    pub phase_spread: Duration,
    /// Park a standby connection per listener, as the shim does unless GCB_STANDBY=0.
    pub standby: bool,
    pub max_secs: u64,
}

/// Poll tokens of standby connections start here (below: the clients' sockets).
const STANDBY_BASE: usize = 1 << 32;
/// The shim's standby redial backoff (shim/src/gcb/standby.rs).
const STANDBY_RETRY_MIN: Duration = Duration::from_millis(200);
const STANDBY_RETRY_MAX: Duration = Duration::from_secs(30);

/// One standby connection of a listener.
struct Standby {
    stream: TcpStream,
    /// The preamble went out.
    written: bool,
    /// Which dial of the generator it is (a confirmation names it).
    serial: u64,
    /// Open `STANDBY_CONFIRM` after its preamble went out: the broker parked it (a
    /// refusal closes it at once; the protocol has no acknowledgement).
    parked: bool,
}

/// How long a standby must stay open after its preamble to count as parked.
const STANDBY_CONFIRM: Duration = Duration::from_millis(500);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: unix_ms(),
    }
}

/// One registered listener of a client.
struct Reg {
    local: SocketAddr,
    proxy: Option<SocketAddr>,
    /// The ownership proof for `proxy` (as the shim keeps it).
    proof: Option<String>,
    /// A register request for it is in flight.
    asking: bool,
    /// The broker said it does not know it (since when).
    down_since: Option<Instant>,
    /// The standby key of its registration (`Use::Standby` presentation of the token).
    standby_key: Option<[u8; token::TOKEN_BYTES]>,
    standby: Option<Standby>,
    standby_backoff: Duration,
}

/// What a request in flight was for.
enum Pend {
    Register(usize),
    Reregister(usize),
    Heartbeat,
}

struct Client {
    sock: UdpSocket,
    ep: Endpoint,
    regs: Vec<Reg>,
    by_proxy: HashMap<SocketAddr, usize>,
    pending: HashMap<RequestId, Pend>,
    next_heartbeat: Option<Instant>,
}

/// Counts of one storm (from the first registration found unknown to the last back).
#[derive(Default)]
struct Storm {
    first_down: Option<(Instant, u64)>,
    down: usize,
    same_proxy: u64,
    new_proxy: u64,
    requests: u64,
    refused: BTreeMap<String, u64>,
    unanswered: u64,
    heartbeat_timeouts: u64,
    back_per_s: BTreeMap<u64, u64>,
    retransmits_at_start: u64,
    last_back: Option<Instant>,
    /// The listeners registered again, each once.
    back: HashSet<(usize, usize)>,
    /// The listeners whose standby was parked again after the first was found unknown.
    standby_back: HashSet<(usize, usize)>,
    standby_last: Option<u64>,
}

/// A small xorshift for heartbeat phases (no dependency for a load generator).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

struct Fleet {
    a: FleetArgs,
    poll: Poll,
    clients: Vec<Client>,
    rng: Rng,
    storm: Storm,
    /// Registrations answered (first registration phase).
    registered: usize,
    connect_backs: u64,
    /// Standbys to dial, when.
    dials: BinaryHeap<Reverse<(Instant, usize, usize)>>,
    standby_failures: u64,
    standby_claims: u64,
    /// Preambles sent, to be confirmed (when, client, listener, dial serial).
    confirm: VecDeque<(Instant, usize, usize, u64)>,
    serial: u64,
    /// Standbys parked now.
    parked: usize,
}

fn code_of(body: &Body) -> String {
    match body {
        Body::Error { code, .. } => code.to_string(),
        other => other.type_name().to_owned(),
    }
}

impl Fleet {
    fn new(a: FleetArgs) -> io::Result<Fleet> {
        let poll = Poll::new()?;
        let seed = random_bytes(8)?;
        let mut rng = Rng(u64::from_le_bytes(seed.try_into().unwrap_or([9; 8])) | 1);
        let mut clients = Vec::with_capacity(a.clients);
        for i in 0..a.clients {
            let mut sock = UdpSocket::bind(SocketAddr::new(a.bind, 0))?;
            poll.registry()
                .register(&mut sock, Token(i), Interest::READABLE)?;
            // The shim's control endpoint (shim/src/control.rs).
            let cfg = Config {
                initial_rto: Duration::from_millis(100),
                max_rto: Duration::from_millis(500),
                request_deadline: Duration::from_secs(5),
                ..Config::default()
            };
            let session = rng.below(u64::MAX);
            let regs = (0..a.per_client)
                .map(|j| Reg {
                    local: SocketAddr::new(a.bind, 1024 + (j % 60_000) as u16),
                    proxy: None,
                    proof: None,
                    asking: false,
                    down_since: None,
                    standby_key: None,
                    standby: None,
                    standby_backoff: STANDBY_RETRY_MIN,
                })
                .collect();
            clients.push(Client {
                sock,
                ep: Endpoint::new(cfg, a.key.clone(), session),
                regs,
                by_proxy: HashMap::new(),
                pending: HashMap::new(),
                next_heartbeat: None,
            });
        }
        Ok(Fleet {
            a,
            poll,
            clients,
            rng,
            storm: Storm::default(),
            registered: 0,
            connect_backs: 0,
            dials: BinaryHeap::new(),
            standby_failures: 0,
            standby_claims: 0,
            confirm: VecDeque::new(),
            serial: 0,
            parked: 0,
        })
    }

    fn register_body(&self, ci: usize, j: usize) -> Body {
        let r = &self.clients[ci].regs[j];
        Body::Register {
            transport: Transport::Tcp,
            local: r.local,
            previous_proxy: r.proxy,
            previous_token: r.proof.clone(),
            punch: false,
        }
    }

    /// Sends a request on client `ci`; false if its endpoint refused it.
    fn send(&mut self, ci: usize, body: Body, what: Pend) -> bool {
        let broker = self.a.broker;
        let c = &mut self.clients[ci];
        match c.ep.send_request(now(), broker, body) {
            Ok(id) => {
                c.pending.insert(id, what);
                true
            }
            Err(_) => false,
        }
    }

    /// The shim's re-registration of one listener (`Client::reregister`).
    fn reregister(&mut self, ci: usize, j: usize) {
        if self.clients[ci].regs[j].down_since.is_none() {
            self.clients[ci].regs[j].down_since = Some(Instant::now());
            if self.storm.down == 0 && self.storm.first_down.is_none() {
                self.storm.first_down = Some((Instant::now(), unix_ms()));
                self.storm.retransmits_at_start = self.retransmits();
            }
            self.storm.down += 1;
        }
        if self.clients[ci].regs[j].asking {
            return;
        }
        let body = self.register_body(ci, j);
        if self.send(ci, body, Pend::Reregister(j)) {
            self.clients[ci].regs[j].asking = true;
            self.storm.requests += 1;
        }
    }

    fn retransmits(&self) -> u64 {
        self.clients.iter().map(|c| c.ep.stats().retransmits).sum()
    }

    fn granted(&mut self, ci: usize, j: usize, proxy: SocketAddr, tok: Option<&str>) {
        let key = self.a.key.clone();
        let c = &mut self.clients[ci];
        let r = &mut c.regs[j];
        r.asking = false;
        if let Some(old) = r.proxy {
            c.by_proxy.remove(&old);
        }
        let moved = r.proxy.is_some_and(|old| old != proxy);
        r.proxy = Some(proxy);
        r.proof = tok
            .and_then(token::from_hex)
            .map(|t| token::present_hex(key.as_ref(), Use::Ownership, &t));
        c.by_proxy.insert(proxy, j);
        if self.a.standby {
            // A (re-)registration's standby key; the old standby is dropped and a new one
            // dialed at once (the shim's `on_reregistered`).
            let k = tok
                .and_then(token::from_hex)
                .map(|t| token::present(key.as_ref(), Use::Standby, &t));
            if k.is_some() {
                if let Some(mut old) = r.standby.take() {
                    self.parked -= usize::from(old.parked);
                    let _ = self.poll.registry().deregister(&mut old.stream);
                }
                r.standby_key = k;
                self.dials.push(Reverse((Instant::now(), ci, j)));
            }
        }
        if r.down_since.take().is_some() {
            let s = &mut self.storm;
            s.down -= 1;
            // A listener found unknown again (a heartbeat answered before its
            // re-registration was) counts once.
            if !s.back.insert((ci, j)) {
                return;
            }
            if moved {
                s.new_proxy += 1;
            } else {
                s.same_proxy += 1;
            }
            let since = s.first_down.map_or(0, |(t, _)| t.elapsed().as_secs());
            *s.back_per_s.entry(since).or_default() += 1;
            s.last_back = Some(Instant::now());
        }
    }

    /// One event of client `ci`; returns a registration index whose first registration
    /// failed and should be retried (with whether to wait first).
    fn on_event(&mut self, ci: usize, ev: Event) -> Option<(usize, bool)> {
        match ev {
            Event::Request { from, id, body } => {
                if matches!(body, Body::ConnectBack { .. }) {
                    self.connect_backs += 1;
                }
                if matches!(body, Body::ReregisterRequest {}) {
                    for j in 0..self.clients[ci].regs.len() {
                        if self.clients[ci].regs[j].proxy.is_some() {
                            self.reregister(ci, j);
                        }
                    }
                }
                let _ = self.clients[ci].ep.respond(now(), from, id, Body::Ack {});
                None
            }
            Event::Response { request, body, .. } => {
                match self.clients[ci].pending.remove(&request)? {
                    Pend::Heartbeat => {
                        if let Body::HeartbeatAck { unknown } = body {
                            for p in unknown {
                                if let Some(&j) = self.clients[ci].by_proxy.get(&p) {
                                    self.reregister(ci, j);
                                }
                            }
                        }
                        None
                    }
                    Pend::Register(j) => match body {
                        Body::Registered { proxy, token, .. } => {
                            self.granted(ci, j, proxy, token.as_deref());
                            self.registered += 1;
                            let c = &mut self.clients[ci];
                            if c.next_heartbeat.is_none() {
                                let phase = self.rng.below(self.a.phase_spread.as_millis() as u64);
                                c.next_heartbeat =
                                    Some(Instant::now() + Duration::from_millis(phase));
                            }
                            None
                        }
                        other => {
                            self.clients[ci].regs[j].asking = false;
                            *self.storm.refused.entry(code_of(&other)).or_default() += 1;
                            Some((j, true))
                        }
                    },
                    Pend::Reregister(j) => {
                        match body {
                            Body::Registered { proxy, token, .. } => {
                                self.granted(ci, j, proxy, token.as_deref())
                            }
                            other => {
                                self.clients[ci].regs[j].asking = false;
                                *self.storm.refused.entry(code_of(&other)).or_default() += 1;
                            }
                        }
                        None
                    }
                }
            }
            Event::Timeout { request, .. } => match self.clients[ci].pending.remove(&request)? {
                Pend::Heartbeat => {
                    self.storm.heartbeat_timeouts += 1;
                    None
                }
                Pend::Register(j) => {
                    self.clients[ci].regs[j].asking = false;
                    Some((j, false))
                }
                Pend::Reregister(j) => {
                    self.clients[ci].regs[j].asking = false;
                    self.storm.unanswered += 1;
                    None
                }
            },
        }
    }

    /// Dials the standbys that are due (a new registration's at once, a failed one's
    /// after the shim's backoff).
    fn dial_standbys(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((t, ci, j))) = self.dials.peek() {
            if t > now {
                break;
            }
            self.dials.pop();
            let r = &self.clients[ci].regs[j];
            if r.standby.is_some() || r.standby_key.is_none() || r.proxy.is_none() {
                continue;
            }
            let tok = Token(STANDBY_BASE + ci * self.a.per_client + j);
            let dialed = TcpStream::connect(self.a.broker).and_then(|mut stream| {
                self.poll.registry().register(
                    &mut stream,
                    tok,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok(stream)
            });
            match dialed {
                Ok(stream) => {
                    self.serial += 1;
                    self.clients[ci].regs[j].standby = Some(Standby {
                        stream,
                        written: false,
                        serial: self.serial,
                        parked: false,
                    })
                }
                Err(_) => self.standby_failed(ci, j),
            }
        }
    }

    /// A standby was refused or lost: dial again after the backoff.
    fn standby_failed(&mut self, ci: usize, j: usize) {
        self.standby_failures += 1;
        let r = &mut self.clients[ci].regs[j];
        if let Some(mut old) = r.standby.take() {
            self.parked -= usize::from(old.parked);
            let _ = self.poll.registry().deregister(&mut old.stream);
        }
        self.dials
            .push(Reverse((Instant::now() + r.standby_backoff, ci, j)));
        r.standby_backoff = (r.standby_backoff * 2).min(STANDBY_RETRY_MAX);
    }

    /// A standby connection is writable (send the preamble) or readable (closed by the
    /// broker: refused or reset; or a claim, which this generator does not take).
    fn on_standby(&mut self, ci: usize, j: usize, writable: bool, readable: bool) {
        let key = self.clients[ci].regs[j].standby_key.unwrap_or_default();
        let Some(sb) = self.clients[ci].regs[j].standby.as_mut() else {
            return;
        };
        let mut dead = false;
        if writable && !sb.written {
            match sb.stream.write(&preamble::encode_standby(&key)) {
                Ok(n) if n == preamble::LEN => {
                    sb.written = true;
                    self.confirm
                        .push_back((Instant::now() + STANDBY_CONFIRM, ci, j, sb.serial));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Not connected (refused) or a short write of 45 bytes: start again.
                _ => dead = true,
            }
        }
        if readable && !dead {
            let sb = self.clients[ci].regs[j].standby.as_mut().expect("present");
            let mut buf = [0u8; 64];
            match sb.stream.read(&mut buf) {
                Ok(0) => dead = true,
                Ok(_) => self.standby_claims += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => dead = true,
            }
        }
        if dead {
            self.standby_failed(ci, j);
        }
    }

    /// Standbys still open `STANDBY_CONFIRM` after their preamble count as parked.
    fn confirm_standbys(&mut self) {
        let now = Instant::now();
        while let Some(&(t, ci, j, serial)) = self.confirm.front() {
            if t > now {
                break;
            }
            self.confirm.pop_front();
            let r = &mut self.clients[ci].regs[j];
            let Some(sb) = r.standby.as_mut().filter(|sb| sb.serial == serial) else {
                continue;
            };
            sb.parked = true;
            self.parked += 1;
            // The shim's `worked()`: a standby that held resets the backoff.
            r.standby_backoff = STANDBY_RETRY_MIN;
            if self.storm.first_down.is_some() && self.storm.standby_back.insert((ci, j)) {
                self.storm.standby_last = Some(unix_ms());
            }
        }
    }

    /// Reads every client's socket that is readable, runs due timers, sends what is
    /// queued; returns first registrations to retry.
    fn turn(&mut self, events: &mut Events, wait: Duration) -> Vec<(usize, usize, bool)> {
        let t = Instant::now();
        let mut wake = t + wait;
        for c in &self.clients {
            if let Some(x) = c.ep.poll_timeout() {
                wake = wake.min(x);
            }
            if let Some(x) = c.next_heartbeat {
                wake = wake.min(x);
            }
        }
        if let Some(Reverse((x, _, _))) = self.dials.peek() {
            wake = wake.min(*x);
        }
        if let Some((x, ..)) = self.confirm.front() {
            wake = wake.min(*x);
        }
        let timeout = wake
            .saturating_duration_since(t)
            .max(Duration::from_micros(200));
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                die(PROG, format!("poll: {e}"));
            }
        }
        let mut buf = [0u8; 2048];
        let mut standby_events = Vec::new();
        for ev in events.iter() {
            if ev.token().0 >= STANDBY_BASE {
                let i = ev.token().0 - STANDBY_BASE;
                let (ci, j) = (i / self.a.per_client, i % self.a.per_client);
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                standby_events.push((ci, j, ev.is_writable(), readable));
                continue;
            }
            let c = &mut self.clients[ev.token().0];
            while let Ok((n, from)) = c.sock.recv_from(&mut buf) {
                c.ep.handle_datagram(now(), from, &buf[..n]);
            }
        }
        for (ci, j, w, r) in standby_events {
            self.on_standby(ci, j, w, r);
        }
        let t = now();
        let mut retry = Vec::new();
        for ci in 0..self.clients.len() {
            if self.clients[ci].next_heartbeat.is_some_and(|h| h <= t.mono) {
                let proxies: Vec<SocketAddr> = self.clients[ci]
                    .regs
                    .iter()
                    .filter_map(|r| r.proxy)
                    .collect();
                for b in heartbeat_batches(&proxies) {
                    self.send(ci, b, Pend::Heartbeat);
                }
                self.clients[ci].next_heartbeat = Some(t.mono + self.a.heartbeat);
            }
            if self.clients[ci]
                .ep
                .poll_timeout()
                .is_some_and(|x| x <= t.mono)
            {
                self.clients[ci].ep.handle_timeout(t);
            }
            while let Some(ev) = self.clients[ci].ep.poll_event() {
                if let Some((j, wait)) = self.on_event(ci, ev) {
                    retry.push((ci, j, wait));
                }
            }
            let c = &mut self.clients[ci];
            while let Some(x) = c.ep.poll_transmit() {
                // A full send buffer drops it: the endpoint retransmits.
                let _ = c.sock.send_to(&x.payload, x.to);
            }
        }
        self.dial_standbys();
        self.confirm_standbys();
        retry
    }

    fn register_all(&mut self, events: &mut Events, deadline: Instant) {
        let total = self.a.clients * self.a.per_client;
        // Client-inner order: one listener of each process, then the next.
        let mut todo: VecDeque<(usize, usize)> = (0..self.a.per_client)
            .flat_map(|j| (0..self.a.clients).map(move |ci| (ci, j)))
            .collect();
        let mut later: VecDeque<(Instant, usize, usize)> = VecDeque::new();
        let mut inflight = 0usize;
        let t0 = Instant::now();
        let mut timeouts = 0u64;
        while self.registered < total && Instant::now() < deadline {
            while let Some(&(t, ci, j)) = later.front() {
                if t > Instant::now() {
                    break;
                }
                later.pop_front();
                todo.push_front((ci, j));
            }
            while inflight < self.a.window {
                let Some((ci, j)) = todo.pop_front() else {
                    break;
                };
                let body = self.register_body(ci, j);
                if self.send(ci, body, Pend::Register(j)) {
                    self.clients[ci].regs[j].asking = true;
                    inflight += 1;
                } else {
                    todo.push_front((ci, j));
                    break;
                }
            }
            let before = self.registered;
            let retry = self.turn(events, Duration::from_millis(2));
            inflight -= (self.registered - before) + retry.len();
            for (ci, j, wait) in retry {
                if wait {
                    later.push_back((Instant::now() + Duration::from_millis(20), ci, j));
                } else {
                    timeouts += 1;
                    todo.push_back((ci, j));
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        say(
            PROG,
            json!({"phase": "registered", "ok": self.registered == total,
                   "requested": total, "registered": self.registered,
                   "clients": self.a.clients, "per_client": self.a.per_client,
                   "elapsed_s": secs, "rate_per_s": self.registered as f64 / secs,
                   "window": self.a.window, "errors": std::mem::take(&mut self.storm.refused),
                   "timeouts": timeouts, "retransmits": self.retransmits(),
                   "unix_ms": unix_ms()}),
        );
    }

    fn report_storm(&mut self) {
        let s = std::mem::take(&mut self.storm);
        let Some((t0, t0_unix)) = s.first_down else {
            return;
        };
        let back: u64 = s.same_proxy + s.new_proxy;
        say(
            PROG,
            json!({"phase": "recovered", "reregistered": back,
                   "same_proxy": s.same_proxy, "new_proxy": s.new_proxy,
                   "first_unknown_unix_ms": t0_unix, "all_back_unix_ms": unix_ms(),
                   "first_unknown_to_all_back_s": t0.elapsed().as_secs_f64(),
                   "register_requests": s.requests, "refused": s.refused,
                   "unanswered": s.unanswered, "heartbeat_timeouts": s.heartbeat_timeouts,
                   "retransmits": self.retransmits() - s.retransmits_at_start,
                   "back_per_s": s.back_per_s.values().collect::<Vec<_>>(),
                   "standbys_parked_again": s.standby_back.len(),
                   "standby_all_back_unix_ms": s.standby_last,
                   "standby_failures": self.standby_failures,
                   "standby_claims": self.standby_claims,
                   "connect_backs": self.connect_backs}),
        );
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let end = Instant::now() + Duration::from_secs(self.a.max_secs);
        self.register_all(&mut events, end);
        if self.a.standby {
            let total = self.a.clients * self.a.per_client;
            let t0 = Instant::now();
            while self.parked < total && Instant::now() < end {
                let _ = self.turn(&mut events, Duration::from_millis(20));
            }
            say(
                PROG,
                json!({"phase": "standbys", "parked": self.parked,
                       "elapsed_s": t0.elapsed().as_secs_f64(),
                       "failures": self.standby_failures, "unix_ms": unix_ms()}),
            );
        }
        while Instant::now() < end {
            let _ = self.turn(&mut events, Duration::from_millis(50));
            // Over when every listener is registered again (a restarted broker forgot
            // them all), or, after a partial loss, when nothing came back for 2.5
            // heartbeat intervals (every client asked at least twice meanwhile).
            let s = &self.storm;
            let total = self.a.clients * self.a.per_client;
            let quiet = s
                .last_back
                .is_some_and(|t| t.elapsed() > self.a.heartbeat * 5 / 2);
            let standbys_back = !self.a.standby || s.standby_back.len() >= total;
            if s.first_down.is_some()
                && s.down == 0
                && ((s.back.len() >= total && standbys_back) || quiet)
            {
                self.report_storm();
            }
        }
    }
}

pub fn fleet(a: FleetArgs) {
    let mut f = Fleet::new(a).unwrap_or_else(|e| die(PROG, format!("fleet: {e}")));
    f.run();
}
