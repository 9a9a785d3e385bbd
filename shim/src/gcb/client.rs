//! The GCB client of one process: its control channels to the broker, the registrations
//! of the listening sockets it holds, the mailbox of brokered connections, and the
//! asynchronous event handler ([`Client::pump`]) that the interposed blocking calls run.
//!
//! ## Channels
//! * A **registration channel** (UDP socket connected to the broker) carries register,
//!   heartbeat and unregister requests, and receives the broker's `connect_back` and
//!   `reregister_request`. Like the paper's management socket it shares the fate of the
//!   registered sockets: it is inherited across fork (and handed across exec), so every
//!   process that holds a registered listener or UDP socket (socat `fork` children,
//!   pre-fork workers, a daemon's exec'd child) can serve the broker's commands, and the
//!   broker sees one client. Any holder sends heartbeats (and, for UDP, keepalives), so
//!   the registration lives while any process runs the AEH; it is removed when the last
//!   holder closes the socket.
//! * A **private channel** per process carries connect requests, so their answers are
//!   never read by a sibling process.
//!
//! ## The mailbox
//! A brokered connection is dialed by whichever family member read the `connect_back`,
//! but any member may accept the placeholder. So the dialer posts the connection's fd
//! into the family's mailbox (an inherited `AF_UNIX` datagram socketpair, `SCM_RIGHTS`)
//! keyed by the placeholder's source port *before* the placeholder connects, then closes
//! its copies. The accepting process takes the fd out of the mailbox; messages for other
//! keys are posted back. Unaccepted entries expire.
//!
//! ## What the AEH never does
//! It never waits for the network inside the program's call: a `connect_back` dial is
//! started and finished later ([`super::dial`]; only a dial to the broker's relay port
//! may take up to `RELAY_DIAL_QUICK` at once), and a listener the broker did not
//! register at listen() is registered again by requests it does not wait for
//! (`RegisterRetry`). It dials only public addresses and the broker's own
//! ([`net::dial_refusal`]): a fooled or spoofed broker cannot point it at the host's
//! loopback or its LAN.
//!
//! All methods run with the re-entrancy guard set and the client lock held.

use gcb_proto::token::{self, Use};
use gcb_proto::{Body, ConnectId, Event, PoolKey, Ticker, Transport};
use libc::c_int;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::dial::{DialEvent, Dials};
use super::inherit::{self, Entry, UdpEntry};
use super::standby::{Standby, StandbyEvent, StandbySlot, Watch};
pub use crate::control::Answer;
use crate::control::{self, drop_owned, getpid, now};
use crate::fdtable::{self, FdEntry, ShimFd};
use crate::net;
use crate::sockstate::GcbSock;
use crate::sockstate::{SockState, UdpSock};

/// How long listen() waits for the broker before serving locally only.
pub const REGISTER_DEADLINE: Duration = Duration::from_secs(3);
/// How long connect() waits for a brokering decision.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// Dial-backs and relay connections must be set up within this.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(8);
/// A brokered connection nobody accepts is dropped after this.
const READY_TTL_SECS: u64 = 60;
const READY_TTL: Duration = Duration::from_secs(READY_TTL_SECS);
/// A new dial attempt is started this often until one connects (see `connect_race`).
pub const DIAL_SPACING: Duration = Duration::from_millis(250);
/// How long a dial-back to the broker's relay port may hold the AEH before it continues
/// in the background (on a LAN it completes well within this; see [`super::dial`]).
const RELAY_DIAL_QUICK: Duration = Duration::from_millis(2);
/// First pause before registering again a listener the broker did not register at
/// listen(), doubled after each failure up to [`REGISTER_RETRY_MAX`].
const REGISTER_RETRY_FIRST: Duration = Duration::from_secs(1);
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(30);
/// Listeners waiting for a registration retry at most (more are served locally only).
const MAX_REGISTER_RETRIES: usize = 256;
/// How many listeners of this process wait for a registration retry: lets accept() and
/// listen() on ordinary sockets skip the client lock (see [`awaiting_registration`]).
static RETRIES_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// May some listener of this process be waiting for a registration retry? (No lock: false
/// means certainly not.)
pub fn awaiting_registration() -> bool {
    RETRIES_PENDING.load(std::sync::atomic::Ordering::Relaxed) > 0
}
/// A destination the broker does not know (or an unreachable broker) is not asked again
/// for this long.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Source address of placeholder connections to wildcard-bound listeners: a loopback
/// address no ordinary client uses, so accept() knows a placeholder when it sees one.
pub const PLACEHOLDER_IP: Ipv4Addr = Ipv4Addr::new(127, 71, 66, 1);

/// Length of the dial-back / relay preamble: `GCB-CONNECT <32 hex>\n`.
pub const PREAMBLE_LEN: usize = 45;

/// The connect preamble for connect id `id`: the id presented for connects
/// ([`gcb_proto::token`]), so that an id read off a control datagram is not enough to
/// take the connection where the pool has a key.
pub fn preamble(key: Option<&PoolKey>, id: &ConnectId) -> Vec<u8> {
    let p = token::present_hex(key, Use::Connect, id.as_bytes());
    format!("GCB-CONNECT {p}\n").into_bytes()
}

use crate::net::errstr;
pub use crate::procid::{held_elsewhere, inode};

/// Whether `fd` stays open across exec (no close-on-exec).
fn survives_exec(fd: c_int) -> bool {
    crate::sys::fcntl_raw(fd, libc::F_GETFD, 0).is_ok_and(|f| f & libc::FD_CLOEXEC == 0)
}

/// One registered listening socket held by this process.
struct Registration {
    /// The address registered as the socket's real local address.
    local: SocketAddrV4,
    /// Where a placeholder connection reaches the listening socket.
    listen_at: SocketAddrV4,
    /// The socket's inode (to know whether other processes still hold it).
    inode: u64,
    /// Id of the registration channel it was registered on.
    chan: u64,
    /// The socket's table entry (to update its proxy after a re-registration).
    entry: Weak<FdEntry>,
    /// For a UDP socket: its keepalive state.
    udp: Option<UdpReg>,
    /// For a TCP listener this process registered: its standby connection.
    standby: Option<StandbySlot>,
}

/// A registered UDP socket's token and Dummy schedule.
struct UdpReg {
    /// Every socket of this process bound to the registered local address (a program
    /// may bind several with SO_REUSEADDR: iperf3 -u binds the next one while the first
    /// serves a test); the registration ends with the last.
    holders: Vec<Weak<FdEntry>>,
    token: Vec<u8>,
    /// Quick repeats still to send after registering (a lost first keepalive would
    /// otherwise leave the socket unreachable for a whole interval).
    quick_left: u8,
    next_dummy: Instant,
}

/// What a request in flight is for, when nobody blocks on it.
enum Pending {
    Heartbeat,
    Reregister {
        old: RegKey,
    },
    Unregister,
    /// A caller is blocked in [`Client::request`]; its answer goes to `answers`.
    Waiter,
    /// A registration retry of a listener (see [`RegisterRetry`]), by its id.
    RegisterRetry {
        id: u64,
    },
    /// A UDP hole punch toward `dest` asked for by the socket `entry` (see `punch`).
    Punch {
        entry: Weak<FdEntry>,
        dest: SocketAddrV4,
    },
    /// The registration of the UDP socket `entry` (fd `fd`, bound to `local`), started by
    /// its first datagram to `dest` on the broker (see [`Client::register_udp_start`]).
    RegisterUdp {
        entry: Weak<FdEntry>,
        local: SocketAddrV4,
        fd: c_int,
        dest: SocketAddrV4,
    },
}

/// A listening socket the broker did not register at listen() (unreachable, refused):
/// it serves as a plain socket meanwhile, and the AEH asks again with back-off, so it
/// gets its proxy once the broker answers.
struct RegisterRetry {
    id: u64,
    local: SocketAddrV4,
    listen_at: SocketAddrV4,
    entry: Weak<FdEntry>,
    next: Instant,
    backoff: Duration,
    /// A register request for it is in flight.
    asking: bool,
}

impl RegisterRetry {
    /// No registration this time: the next try after the back-off, which doubles.
    fn failed(&mut self, now: Instant) {
        self.asking = false;
        self.next = now + self.backoff;
        self.backoff = (self.backoff * 2).min(REGISTER_RETRY_MAX);
    }
}

/// What a dial-back in flight is for: the connection `id` to our listener registered
/// as `proxy` (reached at `listen_at`), from the logical peer `peer`.
struct DialFor {
    id: ConnectId,
    proxy: SocketAddrV4,
    listen_at: SocketAddrV4,
    peer: SocketAddrV4,
}

/// A registration's identity: its transport and proxy address.
type RegKey = (Transport, SocketAddrV4);

/// A control channel of the GCB client.
type Channel = control::Channel<Pending>;

/// The family's mailbox of brokered connections: an inherited datagram socketpair.
struct Mailbox {
    tx: Arc<ShimFd>,
    rx: Arc<ShimFd>,
}

/// A mailbox message: placeholder source port, logical peer, expiry (unix seconds).
const MAIL_LEN: usize = 2 + 4 + 2 + 8;

pub struct Client {
    pub broker: SocketAddrV4,
    key: Option<PoolKey>,
    /// Our IP on the route to the broker.
    pub local_ip: Option<Ipv4Addr>,
    families: Vec<Channel>,
    private: Option<Channel>,
    mailbox: Option<Mailbox>,
    /// Keyed by (transport, proxy): a TCP and a UDP proxy may share a port.
    regs: HashMap<RegKey, Registration>,
    heartbeat: Ticker,
    /// Destinations (proxy candidates) not to broker, until the given time.
    negative: HashMap<SocketAddrV4, Instant>,
    /// Proxies whose last connect decision was `relay`, until when that is trusted: a
    /// connect to one goes straight to the proxy address (the broker relays through the
    /// proxy socket, onto the listener's standby), without asking first.
    pub relayed: HashMap<SocketAddrV4, Instant>,
    /// Epoll sets our registration channels have been added to: (epfd, channel fd).
    pub epolls: HashSet<(c_int, c_int)>,
    /// The program's UDP sockets in its epoll sets, as it added them: (epfd, event data)
    /// -> (fd, event mask). A hint for `udp_epoll`, checked against the kernel before use.
    pub udp_epoll: HashMap<(c_int, u64), (c_int, u32)>,
    /// Proxies of listeners this process closed, by local address: a program that
    /// listens again on the same address (iperf3 does after every test) asks for the
    /// same proxy back, so the address it advertised stays valid.
    recent: HashMap<(Transport, SocketAddrV4), (SocketAddrV4, Instant)>,
    /// Placeholder connections still being established (the listener's backlog was full).
    placeholders: Vec<(c_int, Instant)>,
    /// The configured heartbeat interval; the broker's lease may ask for more often.
    heartbeat_every: Duration,
    /// Stray datagrams dropped on GCB UDP sockets.
    udp_stray: u64,
    /// The epoll fd watching this process's parked standby connections.
    watch: Option<Watch>,
    /// While the AEH runs inside a blocking accept() on the listener reached at this
    /// address: a brokered connection for it skips the placeholder and goes straight
    /// into `direct` (the accept returns it).
    direct_for: Option<SocketAddrV4>,
    direct: Option<(c_int, SocketAddrV4)>,
    /// `GCB_STANDBY` is not 0.
    standby_enabled: bool,
    /// Ownership proofs ([`gcb_proto::token`]) of our registrations and of recently
    /// closed ones, by (transport, proxy): `unregister` and `register{previous_proxy}`
    /// carry them.
    proofs: HashMap<RegKey, String>,
    /// Dial-backs in flight (see [`super::dial`]); the AEH never waits for one.
    dials: Dials<DialFor>,
    /// Listeners to register again (see [`RegisterRetry`]).
    retries: Vec<RegisterRetry>,
}

/// Spacing of the quick keepalive repeats after a UDP registration.
const DUMMY_RETRY: Duration = Duration::from_millis(150);
/// How many quick repeats follow the first keepalive.
const DUMMY_REPEATS: u8 = 3;

/// How long a closed listener's proxy is asked for again.
const RECENT_TTL: Duration = Duration::from_secs(600);

impl Client {
    pub fn new(
        broker: SocketAddrV4,
        key: Option<PoolKey>,
        heartbeat: Duration,
        standby: bool,
    ) -> Client {
        Client {
            broker,
            key,
            local_ip: None,
            families: Vec::new(),
            private: None,
            mailbox: None,
            regs: HashMap::new(),
            heartbeat: Ticker::new(heartbeat),
            negative: HashMap::new(),
            relayed: HashMap::new(),
            epolls: HashSet::new(),
            udp_epoll: HashMap::new(),
            recent: HashMap::new(),
            placeholders: Vec::new(),
            heartbeat_every: heartbeat,
            udp_stray: 0,
            watch: None,
            direct_for: None,
            direct: None,
            standby_enabled: standby,
            proofs: HashMap::new(),
            dials: Dials::new(DIAL_SPACING),
            retries: Vec::new(),
        }
    }

    /// The pool key, if any.
    pub fn key(&self) -> Option<&PoolKey> {
        self.key.as_ref()
    }

    /// Takes the registration token the broker gave the `transport` registration at
    /// `proxy`: keeps its ownership proof and returns what this registration presents
    /// on its data plane (the standby key of a TCP registration, the Dummy token of a UDP
    /// one), as 32 hex characters. None if the broker gave no valid token.
    fn take_token(
        &mut self,
        transport: Transport,
        proxy: SocketAddrV4,
        tok: Option<&str>,
    ) -> Option<String> {
        let t = token::from_hex(tok?)?;
        let key = self.key.as_ref();
        if self.proofs.len() >= 4096 {
            let (regs, recent) = (&self.regs, &self.recent);
            self.proofs.retain(|k, _| {
                regs.contains_key(k) || recent.iter().any(|((t, _), (p, _))| (*t, *p) == *k)
            });
        }
        self.proofs.insert(
            (transport, proxy),
            token::present_hex(key, Use::Ownership, &t),
        );
        let what = match transport {
            Transport::Tcp => Use::Standby,
            Transport::Udp => Use::UdpDummy,
        };
        Some(token::present_hex(key, what, &t))
    }

    /// The ownership proof we hold for `proxy` (either transport: a program keeps one
    /// port number for TCP and UDP, and the broker accepts the sibling's proof).
    fn proof_for(&self, transport: Transport, proxy: SocketAddr) -> Option<String> {
        let p = net::v4(proxy)?;
        let other = match transport {
            Transport::Tcp => Transport::Udp,
            Transport::Udp => Transport::Tcp,
        };
        self.proofs
            .get(&(transport, p))
            .or_else(|| self.proofs.get(&(other, p)))
            .cloned()
    }

    /// In a fork child. The child holds the same listening sockets, so it keeps the
    /// registrations, their channels and the mailbox (shared with the parent); requests
    /// in flight belong to the parent's threads, and the private channel to the parent.
    pub fn reset_after_fork(&mut self) {
        if let Some(p) = self.private.take() {
            p.close();
        }
        // Standbys belong to the process that registered (see `standby`): close the
        // copies we inherited; the parent keeps using its own.
        for r in self.regs.values_mut() {
            if let Some(conn) = r.standby.take().and_then(|s| s.conn) {
                conn.forget_in_child();
            }
        }
        // Dials in flight and registration retries are the parent's too.
        self.dials.forget_in_child();
        self.retries.clear();
        self.note_retries();
        if let Some(w) = self.watch.take() {
            w.close();
        }
        for f in &mut self.families {
            f.pending.clear();
            f.answers.clear();
            f.ep = control::endpoint(&self.key);
        }
    }

    /// Run the AEH for a blocking accept() on the listener registered as `proxy`:
    /// returns a brokered connection for it, if one came in (see `direct_for`).
    pub fn pump_for_accept(&mut self, proxy: SocketAddrV4) -> Option<(c_int, SocketAddrV4)> {
        self.direct_for = self.regs.get(&(Transport::Tcp, proxy)).map(|r| r.listen_at);
        self.pump();
        self.direct_for = None;
        self.direct.take()
    }

    /// Does the AEH need to run while the program waits? (Registrations to serve, a
    /// UDP registration on its way, dial-backs in flight, listeners to register again.)
    pub fn needs_aeh(&self) -> bool {
        (!self.families.is_empty()
            && (!self.regs.is_empty()
                || self.families.iter().any(|c| {
                    c.pending
                        .values()
                        .any(|p| matches!(p, Pending::RegisterUdp { .. }))
                })))
            || !self.dials.is_empty()
            || !self.retries.is_empty()
    }

    /// What the AEH waits on: the registration channels' fds (at most 4), then the
    /// standby watch (see [`Client::watch_fd`]).
    pub fn aeh_fds(&self) -> Vec<c_int> {
        let mut v: Vec<c_int> = self.families.iter().take(4).map(|c| c.fd.fd()).collect();
        v.extend(self.watch_fd());
        v
    }

    /// The standby watch's fd: added edge-triggered to a program's epoll sets.
    pub fn watch_fd(&self) -> Option<c_int> {
        self.watch.as_ref().map(|w| w.fd())
    }

    fn ensure_local_ip(&mut self) {
        if self.local_ip.is_none() {
            self.local_ip = net::route_ip(self.broker);
        }
    }

    /// Our IP on the route to the broker.
    pub fn route_ip(&mut self) -> Option<Ipv4Addr> {
        self.ensure_local_ip();
        self.local_ip
    }

    /// This process's own registration channel (and the family mailbox), created on
    /// first use; returns the channel's id.
    fn own_family(&mut self) -> Result<u64, c_int> {
        let me = getpid();
        if let Some(c) = self.families.iter().find(|c| c.creator == me) {
            return Ok(c.id);
        }
        if self.mailbox.is_none() {
            self.mailbox = Some(Mailbox::open()?);
        }
        let (c, ip) = Channel::open(self.broker, &self.key)?;
        if self.local_ip.is_none() {
            self.local_ip = ip;
        }
        let id = c.id;
        self.families.push(c);
        Ok(id)
    }

    fn private_channel(&mut self) -> Result<u64, c_int> {
        if let Some(c) = &self.private {
            return Ok(c.id);
        }
        let (c, ip) = Channel::open(self.broker, &self.key)?;
        if self.local_ip.is_none() {
            self.local_ip = ip;
        }
        let id = c.id;
        self.private = Some(c);
        Ok(id)
    }

    fn chan(&mut self, id: u64) -> Option<&mut Channel> {
        if let Some(p) = self.private.as_mut().filter(|p| p.id == id) {
            return Some(p);
        }
        self.families.iter_mut().find(|c| c.id == id)
    }

    fn negative_hit(&mut self, dest: SocketAddrV4, now: Instant) -> bool {
        match self.negative.get(&dest) {
            Some(&until) if until > now => true,
            Some(_) => {
                self.negative.remove(&dest);
                false
            }
            None => false,
        }
    }

    pub fn is_negative(&mut self, dest: SocketAddrV4) -> bool {
        self.negative_hit(dest, Instant::now())
    }

    pub fn mark_negative(&mut self, dest: SocketAddrV4) {
        if self.negative.len() > 4096 {
            let now = Instant::now();
            self.negative.retain(|_, t| *t > now);
        }
        self.negative.insert(dest, Instant::now() + NEGATIVE_TTL);
    }

    /// Send a request on channel `chan` and run the AEH until its answer (or deadline).
    fn request_on(&mut self, chan: u64, body: Body, deadline: Duration) -> Result<Answer, c_int> {
        let to = SocketAddr::V4(self.broker);
        let c = self.chan(chan).ok_or(libc::EBADF)?;
        let id =
            c.ep.send_request_with_deadline(now(), to, body, deadline)
                .map_err(|_| libc::ENOBUFS)?;
        c.pending.insert(id, Pending::Waiter);
        loop {
            let c = self.chan(chan).ok_or(libc::EBADF)?;
            c.flush();
            if let Some(a) = c.answers.remove(&id) {
                return Ok(a);
            }
            let fd = c.fd.fd();
            let left = c.ep.poll_timeout().map_or(Duration::from_millis(100), |w| {
                w.saturating_duration_since(Instant::now())
            });
            let _ = net::wait_fd(fd, libc::POLLIN, left.min(Duration::from_millis(100)));
            self.pump();
        }
    }

    /// A connect request on this process's private channel.
    pub fn request(&mut self, body: Body, deadline: Duration) -> Result<Answer, c_int> {
        let chan = self.private_channel()?;
        self.request_on(chan, body, deadline)
    }

    /// When the AEH must run next even if nothing arrives.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut add = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        for c in self.families.iter().chain(self.private.as_ref()) {
            if let Some(x) = c.ep.poll_request_timeout() {
                add(x);
            }
        }
        if !self.regs.is_empty() {
            add(self.heartbeat.next_due().unwrap_or_else(Instant::now));
        }
        if !self.placeholders.is_empty() {
            add(Instant::now() + Duration::from_millis(50));
        }
        for u in self.regs.values().filter_map(|r| r.udp.as_ref()) {
            add(u.next_dummy);
        }
        for s in self.regs.values().filter_map(|r| r.standby.as_ref()) {
            if let Some(x) = s.wakeup() {
                add(x);
            }
        }
        if let Some(x) = self.punch_next_due() {
            add(x);
        }
        if let Some(x) = self.dials.wakeup(self.watch.is_some()) {
            add(x);
        }
        for r in self.retries.iter().filter(|r| !r.asking) {
            add(r.next);
        }
        t
    }

    /// The asynchronous event handler: read the channels, run timers, act on the
    /// broker's commands, send heartbeats when due. Never waits for the network (a
    /// dial-back to the broker's relay port at most `RELAY_DIAL_QUICK`).
    pub fn pump(&mut self) {
        let from = SocketAddr::V4(self.broker);
        let mut work: Vec<(u64, Event)> = Vec::new();
        for c in self.families.iter_mut().chain(self.private.as_mut()) {
            let id = c.id;
            work.extend(c.poll(from).into_iter().map(|e| (id, e)));
        }
        for (chan, ev) in work {
            self.on_event(chan, ev);
        }
        self.service_dials();
        let t = now();
        if !self.regs.is_empty() && self.heartbeat.poll(t.mono) {
            let mut by_chan: HashMap<u64, Vec<SocketAddr>> = HashMap::new();
            for ((_, p), r) in &self.regs {
                let v = by_chan.entry(r.chan).or_default();
                if !v.contains(&SocketAddr::V4(*p)) {
                    v.push(SocketAddr::V4(*p));
                }
            }
            for (chan, proxies) in by_chan {
                let Some(c) = self.chan(chan) else { continue };
                for body in gcb_proto::msg::heartbeat_batches(&proxies) {
                    if let Ok(id) = c.ep.send_request(t, from, body) {
                        c.pending.insert(id, Pending::Heartbeat);
                    }
                }
            }
        }
        if !self.placeholders.is_empty() {
            self.reap_placeholders();
        }
        self.service_standbys();
        self.register_retries(t.mono);
        self.udp_keepalive(t.mono);
        self.punch_tick(t.mono);
        for c in self.families.iter_mut().chain(self.private.as_mut()) {
            c.flush();
        }
    }

    fn on_event(&mut self, chan: u64, ev: Event) {
        match ev {
            Event::Request { from, id, body } => {
                let reply = match body {
                    Body::ConnectBack {
                        connect_id,
                        dial,
                        proxy,
                        logical_peer,
                    } => self.on_connect_back(connect_id, dial, proxy, logical_peer),
                    Body::PunchBack {
                        proxy,
                        peer,
                        peer_local,
                        nonce,
                    } => self.on_punch_back(proxy, peer, peer_local, &nonce),
                    Body::PunchEnd {
                        proxy,
                        peer,
                        peer_proxy,
                    } => self.on_punch_end(proxy, &[peer, peer_proxy]),
                    Body::ReregisterRequest {} => {
                        crate::info!("broker {} asks us to register again", self.broker);
                        let mine: Vec<RegKey> = self
                            .regs
                            .iter()
                            .filter(|(_, r)| r.chan == chan)
                            .map(|(k, _)| *k)
                            .collect();
                        for k in mine {
                            self.reregister(k);
                        }
                        Body::Ack {}
                    }
                    other => Body::error(
                        gcb_proto::ErrorCode::Unsupported,
                        format!("a client does not serve {}", other.type_name()),
                    ),
                };
                if let Some(c) = self.chan(chan) {
                    let _ = c.ep.respond(now(), from, id, reply);
                }
            }
            Event::Response { request, body, .. } => {
                let Some(c) = self.chan(chan) else { return };
                match c.pending.remove(&request) {
                    Some(Pending::Waiter) => {
                        c.answers.insert(request, Answer::Body(body));
                    }
                    Some(Pending::Heartbeat) => {
                        if let Body::HeartbeatAck { unknown } = body {
                            for p in unknown.into_iter().filter_map(net::v4) {
                                for t in [Transport::Tcp, Transport::Udp] {
                                    self.reregister((t, p));
                                }
                            }
                        }
                    }
                    Some(Pending::Reregister { old }) => self.on_reregistered(old, body),
                    Some(Pending::Punch { entry, dest }) => {
                        if let Some(e) = entry.upgrade() {
                            super::punch::on_answer(&e, dest, Some(body));
                        }
                    }
                    Some(Pending::RegisterUdp {
                        entry,
                        local,
                        fd,
                        dest,
                    }) => self.finish_udp_registration(chan, entry, local, fd, dest, Some(body)),
                    Some(Pending::RegisterRetry { id }) => {
                        self.finish_register_retry(chan, id, Some(body))
                    }
                    Some(Pending::Unregister) | None => {}
                }
            }
            Event::Timeout { request, .. } => {
                let Some(c) = self.chan(chan) else { return };
                match c.pending.remove(&request) {
                    Some(Pending::Waiter) => {
                        c.answers.insert(request, Answer::Timeout);
                    }
                    Some(Pending::Heartbeat) => {
                        crate::debug!("heartbeat to broker {} unanswered", self.broker)
                    }
                    Some(Pending::Reregister { old }) => {
                        crate::warn!("re-registration of {} unanswered; will retry", old.1)
                    }
                    Some(Pending::Punch { entry, dest }) => {
                        if let Some(e) = entry.upgrade() {
                            super::punch::on_answer(&e, dest, None);
                        }
                    }
                    Some(Pending::RegisterUdp {
                        entry,
                        local,
                        fd,
                        dest,
                    }) => self.finish_udp_registration(chan, entry, local, fd, dest, None),
                    Some(Pending::RegisterRetry { id }) => {
                        self.finish_register_retry(chan, id, None)
                    }
                    _ => {}
                }
            }
        }
    }

    /// Ask the broker to register `local` for `transport` on this process's own
    /// registration channel; returns the channel, the proxy, the lease and the token.
    fn register_request(
        &mut self,
        transport: Transport,
        local: SocketAddrV4,
    ) -> Result<(u64, SocketAddrV4, Option<String>), String> {
        let chan = self
            .own_family()
            .map_err(|e| format!("no control socket to broker {}: {}", self.broker, errstr(e)))?;
        let previous_proxy = self.previous_for(transport, local);
        let body = Body::Register {
            transport,
            local: SocketAddr::V4(local),
            previous_proxy,
            previous_token: previous_proxy.and_then(|p| self.proof_for(transport, p)),
        };
        match self.request_on(chan, body, REGISTER_DEADLINE) {
            Err(e) => Err(format!(
                "cannot reach broker {}: {}",
                self.broker,
                errstr(e)
            )),
            Ok(Answer::Timeout) => Err(format!(
                "broker {} did not answer within {:?}",
                self.broker, REGISTER_DEADLINE
            )),
            Ok(Answer::Body(Body::Registered {
                proxy,
                lease_ms,
                token,
            })) => {
                let proxy = net::v4(proxy).ok_or("broker gave an IPv6 proxy")?;
                self.fit_heartbeat(lease_ms);
                self.heartbeat.reset(Instant::now());
                Ok((chan, proxy, token))
            }
            Ok(Answer::Body(Body::Error { code, reason })) => {
                Err(format!("broker refused: {code:?}: {reason}"))
            }
            Ok(Answer::Body(other)) => Err(format!(
                "unexpected answer {} to register",
                other.type_name()
            )),
        }
    }

    /// Register a listening socket; returns its proxy address.
    pub fn register(
        &mut self,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) -> Result<SocketAddrV4, String> {
        let (chan, proxy, token) = self.register_request(Transport::Tcp, local)?;
        let standby_key = self.take_token(Transport::Tcp, proxy, token.as_deref());
        self.insert_tcp_registration(
            chan,
            local,
            listen_at,
            proxy,
            standby_key.as_deref(),
            entry,
            fd,
        );
        Ok(proxy)
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_tcp_registration(
        &mut self,
        chan: u64,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        proxy: SocketAddrV4,
        token: Option<&str>,
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) {
        let standby = self.standby_slot(token);
        self.regs.insert(
            (Transport::Tcp, proxy),
            Registration {
                local,
                listen_at,
                inode: inode(fd).unwrap_or(0),
                chan,
                entry: Arc::downgrade(entry),
                udp: None,
                standby,
            },
        );
    }

    /// listen() could not register `entry` (local address `local`, reached at
    /// `listen_at`): it serves as a plain socket, and the AEH registers it later (see
    /// `RegisterRetry`).
    pub fn register_later(
        &mut self,
        local: SocketAddrV4,
        listen_at: SocketAddrV4,
        entry: &Arc<FdEntry>,
    ) {
        self.retries.retain(|r| r.entry.strong_count() > 0);
        if self.retries.len() >= MAX_REGISTER_RETRIES {
            crate::debug!(
                "listen on {}: too many listeners to retry; not retried",
                local
            );
            return;
        }
        self.retries.push(RegisterRetry {
            id: crate::control::random_u64(),
            local,
            listen_at,
            entry: Arc::downgrade(entry),
            next: Instant::now() + REGISTER_RETRY_FIRST,
            backoff: REGISTER_RETRY_FIRST,
            asking: false,
        });
        self.note_retries();
    }

    fn note_retries(&self) {
        RETRIES_PENDING.store(self.retries.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Is `entry` a listener waiting for a registration retry?
    pub fn awaits_registration(&self, entry: &Arc<FdEntry>) -> bool {
        self.retries
            .iter()
            .any(|r| std::ptr::eq(r.entry.as_ptr(), Arc::as_ptr(entry)))
    }

    /// Ask the broker again for the listeners whose retry is due (without waiting: the
    /// answer comes to [`Self::finish_register_retry`]). Closed listeners are forgotten.
    fn register_retries(&mut self, at: Instant) {
        if self.retries.is_empty() {
            return;
        }
        // A closed listener's table entry is gone (we hold it weakly).
        self.retries.retain(|r| r.entry.strong_count() > 0);
        self.note_retries();
        let due: Vec<(u64, SocketAddrV4)> = self
            .retries
            .iter()
            .filter(|r| !r.asking && r.next <= at)
            .map(|r| (r.id, r.local))
            .collect();
        if due.is_empty() {
            self.leave_epolls_if_idle();
            return;
        }
        let chan = self.own_family();
        let to = SocketAddr::V4(self.broker);
        for (id, local) in due {
            let previous_proxy = self.previous_for(Transport::Tcp, local);
            let previous_token = previous_proxy.and_then(|p| self.proof_for(Transport::Tcp, p));
            let sent = chan.ok().and_then(|chan| {
                let c = self.chan(chan)?;
                let body = Body::Register {
                    transport: Transport::Tcp,
                    local: SocketAddr::V4(local),
                    previous_proxy,
                    previous_token,
                };
                let rid =
                    c.ep.send_request_with_deadline(now(), to, body, REGISTER_DEADLINE)
                        .ok()?;
                c.pending.insert(rid, Pending::RegisterRetry { id });
                c.flush();
                Some(())
            });
            if let Some(r) = self.retries.iter_mut().find(|r| r.id == id) {
                match sent {
                    Some(()) => r.asking = true,
                    None => r.failed(at),
                }
            }
            crate::debug!("listen on {}: asking broker {} again", local, self.broker);
        }
    }

    /// The broker's answer (None: none in time) to a registration retry: the listener
    /// gets its proxy (getsockname() reports it from now on), or waits longer.
    fn finish_register_retry(&mut self, chan: u64, id: u64, body: Option<Body>) {
        let Some(i) = self.retries.iter().position(|r| r.id == id) else {
            return;
        };
        let granted = match body {
            Some(Body::Registered {
                proxy,
                lease_ms,
                token,
            }) => net::v4(proxy).map(|p| (p, lease_ms, token)),
            other => {
                let r = &mut self.retries[i];
                r.failed(Instant::now());
                crate::debug!(
                    "listen on {}: broker {} did not register it ({}); next try in {:?}",
                    r.local,
                    self.broker,
                    other.map_or("no answer".to_owned(), |b| format!("{b:?}")),
                    r.next.saturating_duration_since(Instant::now())
                );
                return;
            }
        };
        let Some((proxy, lease_ms, token)) = granted else {
            self.retries[i].failed(Instant::now());
            return;
        };
        let r = self.retries.remove(i);
        self.note_retries();
        self.fit_heartbeat(lease_ms);
        let token = self.take_token(Transport::Tcp, proxy, token.as_deref());
        let live = r.entry.upgrade().and_then(|e| {
            let fd = *fdtable::fds_of(&e).first()?;
            Some((e, fd))
        });
        let Some((entry, fd)) = live else {
            // Closed meanwhile: give the proxy back.
            self.send_unregister(chan, Transport::Tcp, proxy);
            self.leave_epolls_if_idle();
            return;
        };
        if self.regs.is_empty() {
            self.heartbeat.reset(Instant::now());
        }
        self.insert_tcp_registration(
            chan,
            r.local,
            r.listen_at,
            proxy,
            token.as_deref(),
            &entry,
            fd,
        );
        entry.set_gcb(GcbSock::Listener {
            proxy,
            local: r.local,
        });
        crate::info!(
            "registered {} with broker {}: proxy {}",
            r.local,
            self.broker,
            proxy
        );
    }

    /// Register a bound UDP socket; returns its proxy and token.
    pub fn register_udp(
        &mut self,
        local: SocketAddrV4,
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) -> Result<(SocketAddrV4, Vec<u8>), String> {
        if let Some(shared) = self.share_udp(local, entry) {
            return Ok(shared);
        }
        let (chan, proxy, token) = self.register_request(Transport::Udp, local)?;
        let token = self
            .take_token(Transport::Udp, proxy, token.as_deref())
            .ok_or("broker gave no valid token for a udp registration")?
            .into_bytes();
        self.insert_udp_registration(chan, local, proxy, &token, entry, fd);
        Ok((proxy, token))
    }

    /// Another socket of ours on the same address (SO_REUSEADDR) shares its registration:
    /// `entry` becomes one of its holders. Its proxy and token, if there is one.
    fn share_udp(
        &mut self,
        local: SocketAddrV4,
        entry: &Arc<FdEntry>,
    ) -> Option<(SocketAddrV4, Vec<u8>)> {
        let ((_, proxy), u) = self
            .regs
            .iter_mut()
            .filter(|(_, r)| r.local == local)
            .find_map(|(k, r)| r.udp.as_mut().map(|u| (k, u)))?;
        u.holders.retain(|h| h.strong_count() > 0);
        u.holders.push(Arc::downgrade(entry));
        Some((*proxy, u.token.clone()))
    }

    fn insert_udp_registration(
        &mut self,
        chan: u64,
        local: SocketAddrV4,
        proxy: SocketAddrV4,
        token: &[u8],
        entry: &Arc<FdEntry>,
        fd: c_int,
    ) {
        self.regs.insert(
            (Transport::Udp, proxy),
            Registration {
                local,
                listen_at: local,
                inode: inode(fd).unwrap_or(0),
                chan,
                entry: Arc::downgrade(entry),
                udp: Some(UdpReg {
                    holders: vec![Arc::downgrade(entry)],
                    token: token.to_vec(),
                    quick_left: DUMMY_REPEATS,
                    next_dummy: Instant::now() + DUMMY_RETRY,
                }),
                standby: None,
            },
        );
    }

    /// Starts registering the UDP socket `entry` (fd `fd`, bound to `local`) without
    /// waiting for the answer, which the AEH handles ([`Self::finish_udp_registration`],
    /// then a punch toward `dest`). `Ok(Some(..))`: another socket of ours on the same
    /// address already holds a registration, shared at once.
    pub fn register_udp_start(
        &mut self,
        local: SocketAddrV4,
        entry: &Arc<FdEntry>,
        fd: c_int,
        dest: SocketAddrV4,
    ) -> Result<Option<(SocketAddrV4, Vec<u8>)>, String> {
        if let Some(shared) = self.share_udp(local, entry) {
            return Ok(Some(shared));
        }
        let chan = self
            .own_family()
            .map_err(|e| format!("no control socket to broker {}: {}", self.broker, errstr(e)))?;
        let previous_proxy = self.previous_for(Transport::Udp, local);
        let body = Body::Register {
            transport: Transport::Udp,
            local: SocketAddr::V4(local),
            previous_proxy,
            previous_token: previous_proxy.and_then(|p| self.proof_for(Transport::Udp, p)),
        };
        let to = SocketAddr::V4(self.broker);
        let c = self.chan(chan).ok_or("no control channel")?;
        let id =
            c.ep.send_request_with_deadline(now(), to, body, REGISTER_DEADLINE)
                .map_err(|_| "control channel full".to_owned())?;
        c.pending.insert(
            id,
            Pending::RegisterUdp {
                entry: Arc::downgrade(entry),
                local,
                fd,
                dest,
            },
        );
        c.flush();
        Ok(None)
    }

    /// The broker's answer (None: none in time) to a [`Self::register_udp_start`]: the
    /// socket becomes a registered one (keepalive, then the punch it was started for),
    /// or, refused, a plain socket again with one log line. A registration whose socket
    /// was closed meanwhile is given back at once.
    fn finish_udp_registration(
        &mut self,
        chan: u64,
        entry: Weak<FdEntry>,
        local: SocketAddrV4,
        fd: c_int,
        dest: SocketAddrV4,
        body: Option<Body>,
    ) {
        let granted = match body {
            Some(Body::Registered {
                proxy,
                lease_ms,
                token,
            }) => net::v4(proxy).and_then(|p| {
                let dummy = self.take_token(Transport::Udp, p, token.as_deref())?;
                Some((p, lease_ms, dummy.into_bytes()))
            }),
            _ => None,
        };
        let live = entry
            .upgrade()
            .filter(|e| e.with_state(SockState::take_udp_registering) == Some(true));
        let Some((proxy, lease_ms, token)) = granted else {
            if live.is_some() {
                crate::warn!(
                    "bind udp {}: broker {} did not register it; serving locally only",
                    local,
                    self.broker
                );
            }
            self.leave_epolls_if_idle();
            return;
        };
        self.fit_heartbeat(lease_ms);
        let Some(e) = live else {
            // Closed (or taken over) meanwhile: give the proxy back.
            crate::debug!(
                "udp {}: closed before its registration came; unregistering",
                local
            );
            self.send_unregister(chan, Transport::Udp, proxy);
            self.leave_epolls_if_idle();
            return;
        };
        self.insert_udp_registration(chan, local, proxy, &token, &e, fd);
        e.with_state(|s| {
            *s = SockState::UdpRegistered(UdpSock::new(proxy, *self.broker.ip()));
        });
        let fd = fdtable::fds_of(&e).first().copied().unwrap_or(fd);
        super::punch::send_keepalive(fd, proxy, &token);
        crate::info!(
            "registered udp {} with broker {}: proxy {}",
            local,
            self.broker,
            proxy
        );
        let ask = super::punch::with_sock(&e, |u| {
            dest != u.proxy && u.punch.should_ask(dest, Instant::now())
        });
        if ask == Some(true) {
            self.request_punch(proxy, dest, &e);
        }
    }

    /// The proxy to ask for when registering `local` for `transport`: the one it had
    /// before (a re-created socket keeps its advertised address), else the number the
    /// other transport has on the same local address (one port for TCP and UDP).
    fn previous_for(&mut self, transport: Transport, local: SocketAddrV4) -> Option<SocketAddr> {
        let recent = self
            .recent
            .remove(&(transport, local))
            .filter(|(_, at)| at.elapsed() < RECENT_TTL)
            .map(|(p, _)| p);
        let sibling = || {
            self.regs
                .iter()
                .find(|((t, _), r)| *t != transport && r.local == local)
                .map(|((_, p), _)| *p)
        };
        recent.or_else(sibling).map(SocketAddr::V4)
    }

    /// Count a stray datagram dropped on a GCB UDP socket; returns the total.
    pub fn count_udp_stray(&mut self) -> u64 {
        self.udp_stray += 1;
        self.udp_stray
    }

    /// Keepalives from the program's UDP sockets (they keep the NAT mapping toward the
    /// proxy open and tell the broker where the socket is): a few quick repeats after
    /// registering, then one per heartbeat interval. They ask for no ack, so nothing of
    /// the shim's lands in the program's socket.
    fn udp_keepalive(&mut self, now: Instant) {
        let every = self.heartbeat.interval();
        for ((_, proxy), r) in self.regs.iter_mut() {
            let Some(u) = r.udp.as_mut() else { continue };
            if now < u.next_dummy {
                continue;
            }
            let Some(fd) = u
                .holders
                .iter()
                .filter_map(|h| h.upgrade())
                .find_map(|e| fdtable::fds_of(&e).first().copied())
            else {
                continue;
            };
            super::punch::send_keepalive(fd, *proxy, &u.token);
            if u.quick_left > 0 {
                u.quick_left -= 1;
                u.next_dummy = now + DUMMY_RETRY * 2;
            } else {
                u.next_dummy = now + every;
            }
        }
    }

    /// Heartbeat at least three times per lease the broker grants, so one lost
    /// heartbeat never costs the registration.
    fn fit_heartbeat(&mut self, lease_ms: u64) {
        let want = Duration::from_millis(lease_ms / 3).max(Duration::from_millis(50));
        if want < self.heartbeat.interval() {
            crate::debug!("broker lease {} ms: heartbeat every {:?}", lease_ms, want);
            self.heartbeat = Ticker::new(want.min(self.heartbeat_every));
            self.heartbeat.reset(Instant::now());
        }
    }

    /// This process closed its last fd of the listening socket registered as `proxy`.
    /// The registration ends when no other process holds the socket either.
    pub fn release(&mut self, transport: Transport, proxy: SocketAddrV4, entry: &Arc<FdEntry>) {
        if let Some(u) = self
            .regs
            .get_mut(&(transport, proxy))
            .and_then(|r| r.udp.as_mut())
        {
            u.holders
                .retain(|h| h.strong_count() > 0 && !std::ptr::eq(h.as_ptr(), Arc::as_ptr(entry)));
            if !u.holders.is_empty() {
                return; // another socket of ours still holds the address
            }
        }
        let Some(mut reg) = self.regs.remove(&(transport, proxy)) else {
            return;
        };
        if let Some(conn) = reg.standby.take().and_then(|s| s.conn) {
            self.drop_standby(conn);
        }
        self.leave_epolls_if_idle();
        if reg.inode != 0 && held_elsewhere(reg.inode) {
            crate::debug!(
                "closed our copy of {} (proxy {}); another process still holds it",
                reg.local,
                proxy
            );
            return;
        }
        crate::info!("unregistering proxy {} ({})", proxy, reg.local);
        if self.recent.len() >= 256 {
            self.recent.retain(|_, (_, at)| at.elapsed() < RECENT_TTL);
        }
        self.recent
            .insert((transport, reg.local), (proxy, Instant::now()));
        self.send_unregister(reg.chan, transport, proxy);
    }

    /// When the AEH stops running in the program's waits (nothing left to serve), takes
    /// our control sockets out of the program's epoll sets, or their (tagged) events would
    /// reach the program.
    fn leave_epolls_if_idle(&mut self) {
        if self.needs_aeh() {
            return;
        }
        for (epfd, fd) in self.epolls.drain() {
            // SAFETY: plain syscall; a stale pair just fails (ENOENT/EBADF).
            unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
        }
    }

    /// Tells the broker (on channel `chan`) that `proxy` is no longer wanted.
    fn send_unregister(&mut self, chan: u64, transport: Transport, proxy: SocketAddrV4) {
        let to = SocketAddr::V4(self.broker);
        let token = self.proofs.get(&(transport, proxy)).cloned();
        if let Some(c) = self.chan(chan) {
            let body = Body::Unregister {
                proxy: SocketAddr::V4(proxy),
                transport: Some(transport),
                token,
            };
            if let Ok(id) = c.ep.send_request(now(), to, body) {
                c.pending.insert(id, Pending::Unregister);
            }
            c.flush();
        }
    }

    fn reregister(&mut self, old: RegKey) {
        let old_proxy = old.1;
        let Some(reg) = self.regs.get(&old) else {
            return;
        };
        let (local, chan) = (reg.local, reg.chan);
        let transport = if reg.udp.is_some() {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let to = SocketAddr::V4(self.broker);
        let previous_token = self.proof_for(transport, SocketAddr::V4(old_proxy));
        let Some(c) = self.chan(chan) else { return };
        if c.pending
            .values()
            .any(|p| matches!(p, Pending::Reregister { old: o } if *o == old))
        {
            return;
        }
        let body = Body::Register {
            transport,
            local: SocketAddr::V4(local),
            previous_proxy: Some(SocketAddr::V4(old_proxy)),
            previous_token,
        };
        if let Ok(id) = c.ep.send_request(now(), to, body) {
            c.pending.insert(id, Pending::Reregister { old });
        }
    }

    fn on_reregistered(&mut self, old: RegKey, body: Body) {
        let old_proxy = old.1;
        if let Body::Registered { lease_ms, .. } = &body {
            self.fit_heartbeat(*lease_ms);
        }
        let Body::Registered { proxy, token, .. } = body else {
            crate::warn!(
                "re-registration of {} refused: {:?}; will retry",
                old_proxy,
                body
            );
            return;
        };
        let Some(proxy) = net::v4(proxy) else { return };
        if !self.regs.contains_key(&old) {
            return;
        }
        let transport = old.0;
        let token = self.take_token(transport, proxy, token.as_deref());
        let Some(mut reg) = self.regs.remove(&old) else {
            return;
        };
        if reg.udp.is_none() {
            // A new registration has a new standby key: the old standby is refused.
            if let Some(conn) = reg.standby.take().and_then(|s| s.conn) {
                self.drop_standby(conn);
            }
            let mine = self
                .families
                .iter()
                .any(|c| c.id == reg.chan && c.creator == getpid());
            if mine {
                reg.standby = self.standby_slot(token.as_deref());
            }
        }
        if let (Some(u), Some(t)) = (reg.udp.as_mut(), token) {
            // A new registration has a new token: punch again with it.
            u.token = t.into_bytes();
            u.quick_left = DUMMY_REPEATS;
            u.next_dummy = Instant::now();
        }
        if proxy != old_proxy {
            crate::warn!(
                "re-registered {} with a NEW proxy {} (the old {} was taken)",
                reg.local,
                proxy,
                old_proxy
            );
            if let Some(entry) = reg.entry.upgrade() {
                set_listener_proxy(&entry, proxy);
            }
        } else {
            crate::info!("re-registered {} as proxy {}", reg.local, proxy);
        }
        self.regs.insert((old.0, proxy), reg);
    }

    /// The broker asks us to dial out for a connection to our listener at `proxy`. The
    /// dial is started here and finished by the AEH ([`Self::service_dials`]): the
    /// answer goes out at once, and the program's waits never stall on a dead address.
    fn on_connect_back(
        &mut self,
        id: ConnectId,
        dial: SocketAddr,
        proxy: SocketAddr,
        peer: SocketAddr,
    ) -> Body {
        let (Some(dial), Some(proxy), Some(peer)) = (net::v4(dial), net::v4(proxy), net::v4(peer))
        else {
            return Body::error(gcb_proto::ErrorCode::BadRequest, "IPv4 only");
        };
        let Some(listen_at) = self.regs.get(&(Transport::Tcp, proxy)).map(|r| r.listen_at) else {
            return Body::error(
                gcb_proto::ErrorCode::NoSuchRegistration,
                format!("{proxy} is not registered here"),
            );
        };
        if let Some(why) = net::dial_refusal(*dial.ip(), *self.broker.ip()) {
            crate::warn!(
                "connect_back for {} refused: dial target {} is {}",
                proxy,
                dial,
                why
            );
            return Body::error(
                gcb_proto::ErrorCode::BadRequest,
                format!("dial target {dial} is {why}"),
            );
        }
        if self.mailbox.is_none() {
            return Body::error(gcb_proto::ErrorCode::Internal, "no mailbox");
        }
        if self.watch.is_none() {
            match Watch::open() {
                Ok(w) => self.watch = Some(w),
                // The dials are then checked on a short timer (see `Dials::wakeup`).
                Err(e) => crate::debug!("no watch for dial-backs: {}", errstr(e)),
            }
        }
        let quick = if dial.ip() == self.broker.ip() {
            RELAY_DIAL_QUICK
        } else {
            Duration::ZERO
        };
        let what = DialFor {
            id,
            proxy,
            listen_at,
            peer,
        };
        match self
            .dials
            .start(dial, what, DIAL_TIMEOUT, quick, self.watch.as_ref())
        {
            Ok(None) => Body::Ack {},
            Ok(Some((fd, what))) => match self.finish_dial(fd, dial, what) {
                Ok(()) => Body::Ack {},
                Err(why) => Body::error(gcb_proto::ErrorCode::Internal, why),
            },
            Err((libc::EAGAIN, _)) => {
                crate::warn!(
                    "connect_back to {} for {} refused: {} dial-backs in flight",
                    dial,
                    proxy,
                    super::dial::MAX_DIALS
                );
                Body::error(gcb_proto::ErrorCode::Busy, "too many dial-backs in flight")
            }
            Err((e, _)) => {
                crate::warn!(
                    "connect_back to {} for {} failed: dial: {}",
                    dial,
                    proxy,
                    errstr(e)
                );
                Body::error(
                    gcb_proto::ErrorCode::Internal,
                    format!("dial: {}", errstr(e)),
                )
            }
        }
    }

    /// A dial-back connected (`fd`, ours): present the connect id, then hand the
    /// connection to the program. Failures are logged here.
    fn finish_dial(&mut self, fd: c_int, dial: SocketAddrV4, what: DialFor) -> Result<(), String> {
        let live = self
            .regs
            .values()
            .any(|r| r.udp.is_none() && r.listen_at == what.listen_at);
        let handed = if !live {
            net::close(fd);
            Err("the listener is gone".to_owned())
        } else if net::send_some(fd, &preamble(self.key.as_ref(), &what.id)) != Ok(PREAMBLE_LEN) {
            // 45 bytes into a fresh connection's empty send buffer: all or nothing.
            net::close(fd);
            Err("preamble not sent".to_owned())
        } else {
            self.hand_over(fd, what.listen_at, what.peer)
        };
        match handed {
            Ok(key) => {
                crate::debug!(
                    "connect_back for {}: dialed {} for peer {}; placeholder {}",
                    what.proxy,
                    dial,
                    what.peer,
                    key
                );
                Ok(())
            }
            Err(why) => {
                crate::warn!(
                    "connect_back to {} for {} failed: {}",
                    dial,
                    what.proxy,
                    why
                );
                Err(why)
            }
        }
    }

    /// Finish the dial-backs in flight that connected; log the ones that failed.
    fn service_dials(&mut self) {
        if self.dials.is_empty() {
            return;
        }
        for ev in self.dials.poll(Instant::now(), self.watch.as_ref()) {
            match ev {
                DialEvent::Connected(fd, dial, what) => {
                    let _ = self.finish_dial(fd, dial, what);
                }
                DialEvent::Failed(dial, what, why) => crate::warn!(
                    "connect_back to {} for {} failed: dial: {}",
                    dial,
                    what.proxy,
                    why
                ),
            }
        }
        self.leave_epolls_if_idle();
    }

    /// Give brokered connection `fd` (ours; closed here) to the program: post it to
    /// the mailbox and put a placeholder connection into the listening socket's kernel
    /// queue so that accept()/select()/poll()/epoll() see it in arrival order.
    fn hand_over(
        &mut self,
        fd: c_int,
        listen_at: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Result<SocketAddrV4, String> {
        let err = |what: &str, e: c_int| format!("{what}: {}", errstr(e));
        if self.direct.is_none() && self.direct_for == Some(listen_at) {
            // The program is blocked in accept() on this very listener: hand it over
            // directly (no placeholder handshake, no mailbox round trip).
            self.direct = Some((fd, peer));
            return Ok(listen_at);
        }
        let Some(mailbox) = self.mailbox.as_ref() else {
            net::close(fd);
            return Err("no mailbox".into());
        };
        let ph = net::socket(libc::SOCK_STREAM | libc::SOCK_NONBLOCK, false)
            .map_err(|e| err("placeholder socket", e));
        let ph = match ph {
            Ok(ph) => ph,
            Err(e) => {
                net::close(fd);
                return Err(e);
            }
        };
        let src = if listen_at.ip().is_loopback() {
            PLACEHOLDER_IP
        } else {
            *listen_at.ip()
        };
        let key = net::bind(ph, SocketAddrV4::new(src, 0))
            .map_err(|e| err("placeholder bind", e))
            .and_then(|_| net::sock_name(ph, false).ok_or_else(|| "placeholder name".into()))
            .and_then(|key| {
                mailbox
                    .post(key.port(), peer, fd)
                    .map_err(|e| err("mailbox", e))?;
                Ok(key)
            });
        // The mailbox holds its own reference to the connection now (or the post failed).
        net::close(fd);
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                net::close(ph);
                return Err(e);
            }
        };
        // Don't wait for the placeholder here: when the program's backlog is full the
        // kernel drops its SYN and retries later, and the program can only make room if
        // we return. A connected placeholder is closed by `reap_placeholders` (the queued
        // connection stays in the listener's backlog after we close our end).
        match net::connect_raw(ph, listen_at) {
            Ok(()) => net::close(ph),
            Err(libc::EINPROGRESS) => self.placeholders.push((ph, Instant::now() + READY_TTL)),
            Err(e) => {
                net::close(ph);
                return Err(err("placeholder connect", e));
            }
        }
        Ok(key)
    }

    /// A standby slot for a TCP registration whose token is `token` (its standby key),
    /// with the watch opened; None if the broker gave no key or the watch fails.
    fn standby_slot(&mut self, token: Option<&str>) -> Option<StandbySlot> {
        if !self.standby_enabled {
            return None;
        }
        let key = super::standby::parse_key(token?)?;
        if self.watch.is_none() {
            match Watch::open() {
                Ok(w) => self.watch = Some(w),
                Err(e) => {
                    crate::debug!("no standby watch: {}", errstr(e));
                    return None;
                }
            }
        }
        Some(StandbySlot::new(key))
    }

    fn drop_standby(&mut self, conn: Standby) {
        if let Some(w) = &self.watch {
            w.remove(conn.fd());
        }
        conn.close();
    }

    /// Park connected standbys, hand claimed ones to the program, then dial the
    /// missing ones (after the hand-overs: those are on a connection's critical path).
    fn service_standbys(&mut self) {
        let mut claimed: Vec<(c_int, SocketAddrV4, SocketAddrV4)> = Vec::new();
        let watch = self.watch.as_ref();
        for r in self.regs.values_mut() {
            let Some(slot) = r.standby.as_mut() else {
                continue;
            };
            let Some(conn) = slot.conn.as_mut() else {
                continue;
            };
            let (ev, parked) = conn.poll();
            if parked {
                watch.inspect(|w| w.parked(conn.fd()));
            }
            match ev {
                StandbyEvent::Idle => {}
                StandbyEvent::Dead(why) => {
                    if let Some(c) = slot.conn.take() {
                        watch.inspect(|w| w.remove(c.fd()));
                        c.close();
                    }
                    if !why.is_empty() {
                        crate::debug!("standby for {}: {}", r.local, why);
                    }
                    slot.failed(Instant::now());
                }
                StandbyEvent::Claimed(fd, peer) => {
                    watch.inspect(|w| w.remove(fd));
                    slot.worked();
                    let Some(c) = slot.conn.take() else { continue };
                    match c.into_connection() {
                        Ok(cfd) => claimed.push((cfd, r.listen_at, peer)),
                        Err(e) => {
                            crate::warn!("standby connection from {} lost: {}", peer, errstr(e))
                        }
                    }
                }
            }
        }
        for (fd, listen_at, peer) in claimed {
            match self.hand_over(fd, listen_at, peer) {
                Ok(key) => crate::debug!("standby claimed for peer {}: placeholder {}", peer, key),
                Err(why) => crate::warn!("standby connection from {} lost: {}", peer, why),
            }
        }
        if self.direct.is_some() {
            // A blocking accept() returns a connection from this run: dial the next
            // standby on the next run, after the program has its connection.
            return;
        }
        let now = Instant::now();
        let relay = self.broker;
        let watch = self.watch.as_ref();
        for r in self.regs.values_mut() {
            let Some(slot) = r.standby.as_mut().filter(|s| s.due(now)) else {
                continue;
            };
            match Standby::dial(relay, slot.key) {
                Ok(c) => {
                    watch.inspect(|w| w.add_connecting(c.fd()));
                    slot.conn = Some(c);
                }
                Err(e) => {
                    crate::debug!("standby dial to {}: {}", relay, errstr(e));
                    slot.failed(now);
                }
            }
        }
    }

    /// Close placeholders whose connection completed (or failed, or waited too long).
    fn reap_placeholders(&mut self) {
        let now = Instant::now();
        self.placeholders.retain(|&(ph, deadline)| {
            let done = net::wait_fd(ph, libc::POLLOUT, Duration::ZERO).unwrap_or(true);
            if done || now >= deadline {
                let e = net::so_error(ph);
                if e != 0 || !done {
                    crate::warn!(
                        "placeholder for a brokered connection failed: {}",
                        if done { errstr(e) } else { "timed out".into() }
                    );
                }
                net::close(ph);
                return false;
            }
            true
        });
    }

    /// accept() returned a connection from `peer`: if it is a placeholder, take the
    /// brokered connection it stands for from the mailbox.
    pub fn take_ready(&mut self, peer: SocketAddrV4) -> Option<(c_int, SocketAddrV4)> {
        let certain = *peer.ip() == PLACEHOLDER_IP;
        let maybe = self
            .regs
            .values()
            .any(|r| !r.listen_at.ip().is_loopback() && r.listen_at.ip() == peer.ip());
        if !certain && !maybe {
            return None;
        }
        let mailbox = self.mailbox.as_ref()?;
        // The dialer posts before it connects, so the message is there unless a sibling
        // is holding it for a moment while it looks for its own.
        let patience = if certain {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(20)
        };
        let r = mailbox.take(peer.port(), patience);
        if r.is_none() && certain {
            crate::warn!(
                "placeholder {} has no brokered connection in the mailbox",
                peer
            );
        }
        r
    }

    /// The environment entry that hands this process's registrations to an exec'd image
    /// (`GCB_INHERIT`, see [`super::inherit`]), for the registered sockets whose fds
    /// survive exec (close-on-exec ones are left out): TCP listeners (`reg=`) and UDP
    /// sockets (`udp=`, with their token), the channels they are registered on, the
    /// mailbox, and the heartbeat interval (fitted to a lease the new image has not
    /// seen). Clears close-on-exec on the channel and mailbox fds they need.
    pub fn handoff(&self) -> Option<String> {
        let mbox = self.mailbox.as_ref()?;
        let mut regs: Vec<Entry> = Vec::new();
        let mut chans = HashSet::new();
        for ((_, proxy), r) in &self.regs {
            let Some(c) = self.families.iter().find(|c| c.id == r.chan) else {
                continue;
            };
            let ctl = c.fd.fd();
            let before = regs.len();
            match &r.udp {
                None => {
                    let Some(entry) = r.entry.upgrade().filter(|_| r.inode != 0) else {
                        continue;
                    };
                    for fd in fdtable::fds_of(&entry) {
                        if survives_exec(fd) {
                            regs.push(Entry::Reg {
                                fd,
                                ino: r.inode,
                                proxy: *proxy,
                                local: r.local,
                                listen_at: r.listen_at,
                                ctl,
                            });
                        }
                    }
                }
                // Every socket of ours that holds the registration, every fd of each.
                Some(u) => {
                    for entry in u.holders.iter().filter_map(Weak::upgrade) {
                        for fd in fdtable::fds_of(&entry) {
                            let Some(ino) = inode(fd).filter(|_| survives_exec(fd)) else {
                                continue;
                            };
                            regs.push(Entry::Udp(UdpEntry {
                                fd,
                                ino,
                                proxy: *proxy,
                                local: r.local,
                                ctl,
                                token: u.token.clone(),
                            }));
                        }
                    }
                }
            }
            if regs.len() > before {
                chans.insert(ctl);
                let transport = if r.udp.is_some() {
                    Transport::Udp
                } else {
                    Transport::Tcp
                };
                if let Some(proof) = self.proofs.get(&(transport, *proxy)) {
                    regs.push(Entry::Own {
                        transport,
                        proxy: *proxy,
                        proof: proof.clone(),
                    });
                }
            }
        }
        if regs.is_empty() {
            return None;
        }
        let mut parts = vec![inherit::VERSION.to_owned()];
        for fd in chans.iter().copied().chain([mbox.tx.fd(), mbox.rx.fd()]) {
            let _ = crate::sys::fcntl_raw(fd, libc::F_SETFD, 0);
        }
        for fd in chans {
            parts.push(
                Entry::Ctl {
                    fd,
                    ino: inode(fd).unwrap_or(0),
                }
                .format(),
            );
        }
        parts.push(
            Entry::Mbox {
                tx: mbox.tx.fd(),
                tx_ino: inode(mbox.tx.fd()).unwrap_or(0),
                rx: mbox.rx.fd(),
                rx_ino: inode(mbox.rx.fd()).unwrap_or(0),
            }
            .format(),
        );
        parts.extend(regs.iter().map(Entry::format));
        parts.push(Entry::Heartbeat(self.heartbeat.interval()).format());
        Some(parts.join(";"))
    }

    /// In a new image: take over what the exec'ing image handed over in `GCB_INHERIT`.
    /// Every fd is checked against its recorded inode (it must still be that socket);
    /// anything that does not match is ignored, a malformed entry with one log line.
    /// Inherited channel fds that serve no registration are closed. Returns what was
    /// adopted: (fd, transport, local, proxy).
    pub fn adopt(&mut self, spec: &str) -> Vec<(c_int, Transport, SocketAddrV4, SocketAddrV4)> {
        let mut adopted = Vec::new();
        let (entries, bad) = inherit::parse(spec);
        for why in bad {
            crate::warn!("GCB_INHERIT: ignored {}", why);
        }
        let fd_ok = |fd: c_int, ino: u64| inode(fd) == Some(ino);
        let mut ctls: HashSet<c_int> = HashSet::new();
        let mut mbox: Option<(c_int, c_int)> = None;
        let mut regs = Vec::new();
        let mut udps: Vec<UdpEntry> = Vec::new();
        let mut heartbeat = None;
        for e in entries {
            match e {
                Entry::Ctl { fd, ino } if fd_ok(fd, ino) => {
                    ctls.insert(fd);
                }
                Entry::Mbox {
                    tx,
                    tx_ino,
                    rx,
                    rx_ino,
                } if fd_ok(tx, tx_ino) && fd_ok(rx, rx_ino) => mbox = Some((tx, rx)),
                Entry::Reg {
                    fd,
                    ino,
                    proxy,
                    local,
                    listen_at,
                    ctl,
                } if fd_ok(fd, ino) => regs.push((fd, ino, proxy, local, listen_at, ctl)),
                Entry::Udp(u) if fd_ok(u.fd, u.ino) && net::is_udp4(u.fd) => udps.push(u),
                Entry::Own {
                    transport,
                    proxy,
                    proof,
                } => {
                    self.proofs.insert((transport, proxy), proof);
                }
                Entry::Heartbeat(d) => heartbeat = Some(d),
                other => crate::debug!(
                    "GCB_INHERIT: {} is no longer what it was; ignored",
                    inherit::redacted(&other.format())
                ),
            }
        }
        let Some((tx, rx)) = mbox else {
            for fd in ctls {
                net::close(fd);
            }
            return adopted;
        };
        let mut chan_of: HashMap<c_int, u64> = HashMap::new();
        for fd in ctls {
            if !regs.iter().any(|r| r.5 == fd) && !udps.iter().any(|u| u.ctl == fd) {
                net::close(fd);
                continue;
            }
            if let Ok(owned) = fdtable::own_fd(fd, "gcb-control") {
                let c = Channel::adopt(owned, &self.key, 0);
                chan_of.insert(fd, c.id);
                self.families.push(c);
            }
        }
        if chan_of.is_empty() {
            net::close(tx);
            net::close(rx);
            return adopted;
        }
        match (
            fdtable::own_fd(tx, "gcb-mailbox"),
            fdtable::own_fd(rx, "gcb-mailbox"),
        ) {
            (Ok(tx), Ok(rx)) => self.mailbox = Some(Mailbox { tx, rx }),
            _ => return adopted,
        }
        // The exec'ing image's heartbeat may have been fitted to the broker's lease.
        if let Some(d) = heartbeat.filter(|d| *d < self.heartbeat.interval()) {
            crate::debug!("heartbeat every {:?}, as the exec'ing image did", d);
            self.heartbeat = Ticker::new(d);
        }
        for (fd, ino, proxy, local, listen_at, ctl) in regs {
            let Some(&chan) = chan_of.get(&ctl) else {
                continue;
            };
            let Some(entry) = fdtable::socket_entry(fd, None) else {
                continue;
            };
            entry.set_gcb(GcbSock::Listener { proxy, local });
            self.regs.insert(
                (Transport::Tcp, proxy),
                Registration {
                    local,
                    listen_at,
                    inode: ino,
                    chan,
                    entry: Arc::downgrade(&entry),
                    udp: None,
                    standby: None,
                },
            );
            adopted.push((fd, Transport::Tcp, local, proxy));
        }
        self.adopt_udp(udps, &chan_of, &mut adopted);
        if self.local_ip.is_none() {
            self.ensure_local_ip();
        }
        adopted
    }

    /// Adopt inherited registered UDP sockets (fds already checked): each gets its
    /// [`UdpSock`] back with the same proxy (an empty receiver list, no
    /// punch records: peers punch again) and holds the registration with its token; the
    /// first keepalive goes out at the AEH's first run.
    fn adopt_udp(
        &mut self,
        udps: Vec<UdpEntry>,
        chan_of: &HashMap<c_int, u64>,
        adopted: &mut Vec<(c_int, Transport, SocketAddrV4, SocketAddrV4)>,
    ) {
        // dup'd fds of one socket share one table entry, as in the exec'ing image.
        let mut by_ino: HashMap<u64, Arc<FdEntry>> = HashMap::new();
        for u in udps {
            let Some(&chan) = chan_of.get(&u.ctl) else {
                continue;
            };
            let key = (Transport::Udp, u.proxy);
            if self.regs.get(&key).is_some_and(|r| r.local != u.local) {
                crate::warn!(
                    "GCB_INHERIT: udp fd {} claims proxy {} of another local address; ignored",
                    u.fd,
                    u.proxy
                );
                continue;
            }
            if let Some(e) = by_ino.get(&u.ino) {
                if let Ok(displaced) = fdtable::insert(u.fd, e.clone()) {
                    drop(displaced);
                    adopted.push((u.fd, Transport::Udp, u.local, u.proxy));
                }
                continue;
            }
            let Some(entry) = fdtable::socket_entry(u.fd, None) else {
                continue;
            };
            entry.with_state(|s| {
                *s = SockState::UdpRegistered(UdpSock::new(u.proxy, *self.broker.ip()));
            });
            match self.regs.get_mut(&key).and_then(|r| r.udp.as_mut()) {
                // Another socket on the same local address (SO_REUSEADDR) holds it too.
                Some(reg) => reg.holders.push(Arc::downgrade(&entry)),
                None => {
                    self.regs.insert(
                        key,
                        Registration {
                            local: u.local,
                            listen_at: u.local,
                            inode: u.ino,
                            chan,
                            entry: Arc::downgrade(&entry),
                            udp: Some(UdpReg {
                                holders: vec![Arc::downgrade(&entry)],
                                token: u.token,
                                // The NAT mapping and the broker's data address are
                                // the exec'ing image's: one keepalive refreshes them.
                                quick_left: 0,
                                next_dummy: Instant::now(),
                            }),
                            standby: None,
                        },
                    );
                }
            }
            by_ino.insert(u.ino, entry);
            adopted.push((u.fd, Transport::Udp, u.local, u.proxy));
        }
    }

    /// UDP hole punching (see [`super::punch`]): the socket `entry`, registered as
    /// `my_proxy`, sends to `dest`, an address on the broker. Asks the broker on the
    /// registration's channel without waiting; the answer arrives in the AEH.
    pub fn request_punch(
        &mut self,
        my_proxy: SocketAddrV4,
        dest: SocketAddrV4,
        entry: &Arc<FdEntry>,
    ) {
        let Some((chan, token)) = self
            .regs
            .get(&(Transport::Udp, my_proxy))
            .and_then(|r| Some((r.chan, r.udp.as_ref()?.token.clone())))
        else {
            return;
        };
        let to = SocketAddr::V4(self.broker);
        let Some(c) = self.chan(chan) else { return };
        let body = Body::PunchRequest {
            proxy: SocketAddr::V4(dest),
            from_proxy: SocketAddr::V4(my_proxy),
            token: String::from_utf8_lossy(&token).into_owned(),
        };
        match c.ep.send_request(now(), to, body) {
            Ok(id) => {
                c.pending.insert(
                    id,
                    Pending::Punch {
                        entry: Arc::downgrade(entry),
                        dest,
                    },
                );
                c.flush();
                crate::debug!("punch: asked broker about {} (from {})", dest, my_proxy);
            }
            Err(_) => crate::debug!("punch: cannot ask about {}", dest),
        }
    }

    /// The first live socket of each UDP registration (the one that sends keepalives).
    fn punch_entries(&self) -> impl Iterator<Item = Arc<FdEntry>> + '_ {
        self.regs
            .values()
            .filter_map(|r| r.udp.as_ref())
            .filter_map(|u| u.holders.iter().find_map(|h| h.upgrade()))
    }

    fn punch_tick(&mut self, now: Instant) {
        for e in self.punch_entries() {
            super::punch::tick(&e, now);
        }
    }

    fn punch_next_due(&self) -> Option<Instant> {
        self.punch_entries()
            .filter_map(|e| super::punch::next_due(&e))
            .min()
    }

    /// The live sockets of our UDP registration `proxy` (the first one sends keepalives
    /// and punches), or the error to answer the broker with.
    fn udp_holders(&self, proxy: SocketAddr) -> Result<Vec<Arc<FdEntry>>, Body> {
        let Some(proxy) = net::v4(proxy) else {
            return Err(Body::error(gcb_proto::ErrorCode::BadRequest, "IPv4 only"));
        };
        let live: Vec<Arc<FdEntry>> = self
            .regs
            .get(&(Transport::Udp, proxy))
            .and_then(|r| r.udp.as_ref())
            .map(|u| u.holders.iter().filter_map(|h| h.upgrade()).collect())
            .unwrap_or_default();
        if live.is_empty() {
            return Err(Body::error(
                gcb_proto::ErrorCode::NoSuchRegistration,
                format!("{proxy} is not registered here"),
            ));
        }
        Ok(live)
    }

    /// The broker's `punch_back` for our UDP registration `proxy`.
    fn on_punch_back(
        &mut self,
        proxy: SocketAddr,
        peer: SocketAddrV4,
        peer_local: Option<SocketAddrV4>,
        nonce: &str,
    ) -> Body {
        match self.udp_holders(proxy) {
            Ok(live) => super::punch::on_punch_back(&live[0], peer, peer_local, nonce),
            Err(answer) => answer,
        }
    }

    /// The broker's `punch_end` for our UDP registration `proxy`: a registration we
    /// punched with is gone, named by the addresses our records may be keyed by.
    fn on_punch_end(&mut self, proxy: SocketAddr, gone: &[SocketAddrV4]) -> Body {
        match self.udp_holders(proxy) {
            Ok(live) => {
                for e in &live {
                    super::punch::on_punch_end(e, gone);
                }
                Body::Ack {}
            }
            Err(answer) => answer,
        }
    }
}

impl Mailbox {
    fn open() -> Result<Mailbox, c_int> {
        let mut sv = [0 as c_int; 2];
        // SAFETY: sv is a writable array of two ints.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        let tx = fdtable::own_fd(sv[0], "gcb-mailbox").inspect_err(|_| net::close(sv[1]))?;
        let rx = fdtable::own_fd(sv[1], "gcb-mailbox").inspect_err(|_| drop_owned(&tx))?;
        Ok(Mailbox { tx, rx })
    }

    fn encode(key: u16, peer: SocketAddrV4, expires: u64) -> [u8; MAIL_LEN] {
        let mut m = [0u8; MAIL_LEN];
        m[0..2].copy_from_slice(&key.to_be_bytes());
        m[2..6].copy_from_slice(&peer.ip().octets());
        m[6..8].copy_from_slice(&peer.port().to_be_bytes());
        m[8..16].copy_from_slice(&expires.to_be_bytes());
        m
    }

    fn decode(m: &[u8; MAIL_LEN]) -> (u16, SocketAddrV4, u64) {
        let key = u16::from_be_bytes([m[0], m[1]]);
        let ip = Ipv4Addr::new(m[2], m[3], m[4], m[5]);
        let port = u16::from_be_bytes([m[6], m[7]]);
        let exp = u64::from_be_bytes(m[8..16].try_into().unwrap_or([0; 8]));
        (key, SocketAddrV4::new(ip, port), exp)
    }

    /// Post connection `fd` under `key` (the kernel keeps a reference in flight).
    fn post(&self, key: u16, peer: SocketAddrV4, fd: c_int) -> Result<(), c_int> {
        let expires = now().unix_ms / 1000 + READY_TTL_SECS;
        self.send(&Self::encode(key, peer, expires), fd)
    }

    fn send(&self, msg: &[u8; MAIL_LEN], fd: c_int) -> Result<(), c_int> {
        let mut iov = libc::iovec {
            iov_base: msg.as_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: zeroed msghdr is valid; we fill the fields we use.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space;
        // SAFETY: mh points at a control buffer of `space` bytes, enough for one
        // SCM_RIGHTS header carrying one int; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        let r = unsafe {
            let cm = libc::CMSG_FIRSTHDR(&mh);
            (*cm).cmsg_level = libc::SOL_SOCKET;
            (*cm).cmsg_type = libc::SCM_RIGHTS;
            (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cm) as *mut c_int, fd);
            libc::sendmsg(self.tx.fd(), &mh, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if r < 0 {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            Ok(())
        }
    }

    /// One message from the mailbox, if any: (message, fd).
    fn recv(&self) -> Option<([u8; MAIL_LEN], c_int)> {
        let mut msg = [0u8; MAIL_LEN];
        let mut iov = libc::iovec {
            iov_base: msg.as_mut_ptr() as *mut libc::c_void,
            iov_len: msg.len(),
        };
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<c_int>() as u32) } as usize;
        let mut cbuf = vec![0u64; space.div_ceil(8)];
        // SAFETY: zeroed msghdr is valid; we fill the fields we use.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        mh.msg_controllen = space;
        // SAFETY: mh describes valid buffers owned by this frame. MSG_CMSG_CLOEXEC: a
        // received fd is ours until handed to the program.
        let n = unsafe {
            libc::recvmsg(
                self.rx.fd(),
                &mut mh,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n != MAIL_LEN as isize {
            return None;
        }
        // SAFETY: the kernel filled mh's control buffer; CMSG_* walk stays inside it.
        let fd = unsafe {
            let cm = libc::CMSG_FIRSTHDR(&mh);
            if cm.is_null()
                || (*cm).cmsg_level != libc::SOL_SOCKET
                || (*cm).cmsg_type != libc::SCM_RIGHTS
            {
                return None;
            }
            std::ptr::read_unaligned(libc::CMSG_DATA(cm) as *const c_int)
        };
        Some((msg, fd))
    }

    /// Take the connection posted under `key`, waiting up to `patience`. Messages for
    /// other keys are posted back; expired ones are closed.
    fn take(&self, key: u16, patience: Duration) -> Option<(c_int, SocketAddrV4)> {
        let deadline = Instant::now() + patience;
        loop {
            let mut others = Vec::new();
            let mut found = None;
            let now_s = now().unix_ms / 1000;
            while let Some((msg, fd)) = self.recv() {
                let (k, peer, exp) = Self::decode(&msg);
                if k == key && found.is_none() {
                    found = Some((fd, peer));
                } else if exp < now_s {
                    crate::warn!(
                        "brokered connection from {} was never accepted; closed",
                        peer
                    );
                    net::close(fd);
                } else {
                    others.push((msg, fd));
                }
            }
            for (msg, fd) in others {
                if self.send(&msg, fd).is_err() {
                    crate::warn!("mailbox full; dropped a brokered connection");
                }
                net::close(fd);
            }
            if let Some((fd, peer)) = found {
                // The program's connection: inheritable unless accept4 asked otherwise.
                let _ = crate::sys::fcntl_raw(fd, libc::F_SETFD, 0);
                return Some((fd, peer));
            }
            if Instant::now() >= deadline {
                return None;
            }
            let _ = net::wait_fd(self.rx.fd(), libc::POLLIN, Duration::from_millis(5));
        }
    }
}

/// Update the proxy a listening socket reports.
pub fn set_listener_proxy(entry: &Arc<FdEntry>, proxy: SocketAddrV4) {
    entry.with_state(|s| s.set_proxy(proxy));
}
