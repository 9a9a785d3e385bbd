//! The client's state: the [`Client`] struct, the records of its registrations and of
//! its requests in flight, and the registration tokens and ownership proofs
//! ([`gcb_proto::token`]) it keeps. The behaviour lives in the sibling files, one
//! `impl Client` block each (see [`super`]).

use gcb_proto::token::{self, Use};
use gcb_proto::{ConnectId, PoolKey, Ticker, Transport};
use libc::c_int;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::mailbox::Mailbox;
use crate::control;
use crate::fdtable::FdEntry;
use crate::gcb::dial::Dials;
use crate::gcb::standby::{StandbySlot, Watch};
use crate::net;

/// A new dial attempt is started this often until one connects (see `connect_race`).
pub const DIAL_SPACING: Duration = Duration::from_millis(250);
/// First pause before registering again a listener the broker did not register at
/// listen(), doubled after each failure up to [`REGISTER_RETRY_MAX`].
pub(super) const REGISTER_RETRY_FIRST: Duration = Duration::from_secs(1);
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(30);
/// Spacing of the quick keepalive repeats after a UDP registration.
pub(super) const DUMMY_RETRY: Duration = Duration::from_millis(150);
/// How many quick repeats follow the first keepalive.
pub(super) const DUMMY_REPEATS: u8 = 3;

/// One registered listening socket held by this process.
pub(super) struct Registration {
    /// The address registered as the socket's real local address.
    pub(super) local: SocketAddrV4,
    /// Where a placeholder connection reaches the listening socket.
    pub(super) listen_at: SocketAddrV4,
    /// The socket's inode (to know whether other processes still hold it).
    pub(super) inode: u64,
    /// Id of the registration channel it was registered on.
    pub(super) chan: u64,
    /// The broker of the pool it is registered with (the channel's peer).
    pub(super) broker: SocketAddrV4,
    /// The socket's table entry (to update its proxy after a re-registration).
    pub(super) entry: Weak<FdEntry>,
    /// The listening socket's address family: its brokered connections (standbys and
    /// dial-backs) are dialed in it, so a dual-stack AF_INET6 listener accepts AF_INET6
    /// connections, as from the kernel.
    pub(super) family: c_int,
    /// For a UDP socket: its keepalive state.
    pub(super) udp: Option<UdpReg>,
    /// For a TCP listener this process registered: its standby connection.
    pub(super) standby: Option<StandbySlot>,
}

/// A registered UDP socket's token and Dummy schedule.
pub(super) struct UdpReg {
    /// Every socket of this process bound to the registered local address (a program
    /// may bind several with SO_REUSEADDR: iperf3 -u binds the next one while the first
    /// serves a test); the registration ends with the last.
    pub(super) holders: Vec<Weak<FdEntry>>,
    pub(super) token: Vec<u8>,
    /// Quick repeats still to send after registering (a lost first keepalive would
    /// otherwise leave the socket unreachable for a whole interval).
    pub(super) quick_left: u8,
    pub(super) next_dummy: Instant,
}

/// What a request in flight is for, when nobody blocks on it.
pub(super) enum Pending {
    Heartbeat,
    Reregister {
        old: RegKey,
    },
    Unregister,
    /// A heartbeat on registration channel `chan` went unanswered: this probe, on the
    /// process's own private channel to the same broker, decides whether the broker is
    /// lost (see `failover`).
    Probe {
        chan: u64,
    },
    /// A caller is blocked in [`Client::request_to`]; its answer goes to `answers`.
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
pub(super) struct RegisterRetry {
    pub(super) id: u64,
    /// The broker asked next: the first of the socket's order, then the next after each
    /// failure (see [`gcb_proto::pool`]).
    pub(super) broker: SocketAddrV4,
    pub(super) local: SocketAddrV4,
    pub(super) listen_at: SocketAddrV4,
    pub(super) entry: Weak<FdEntry>,
    pub(super) next: Instant,
    pub(super) backoff: Duration,
    /// A register request for it is in flight.
    pub(super) asking: bool,
}

impl RegisterRetry {
    /// No registration this time: the next try, with the next broker of `order`, after
    /// the back-off, which doubles.
    pub(super) fn failed(&mut self, now: Instant, order: &[SocketAddrV4]) {
        self.asking = false;
        if let Some(b) = gcb_proto::pool::next_after(order, self.broker) {
            self.broker = b;
        }
        self.next = now + self.backoff;
        self.backoff = (self.backoff * 2).min(REGISTER_RETRY_MAX);
    }
}

/// What a dial-back in flight is for: the connection `id` to our listener registered
/// as `proxy` (reached at `listen_at`), from the logical peer `peer`.
pub(super) struct DialFor {
    pub(super) id: ConnectId,
    pub(super) proxy: SocketAddrV4,
    pub(super) listen_at: SocketAddrV4,
    pub(super) peer: SocketAddrV4,
}

/// A registration's identity: its transport and proxy address.
pub(super) type RegKey = (Transport, SocketAddrV4);

/// A control channel of the GCB client.
pub(super) type Channel = control::Channel<Pending>;

/// The GCB client of one process (see [`super`]).
pub struct Client {
    /// The pool's first broker as configured: UDP sockets register with it, and the
    /// route to it gives our IP.
    pub broker: SocketAddrV4,
    /// Every broker of the pool (`broker` first), distinct IPs: a proxy on one of these
    /// IPs is brokered by that broker.
    pub pool: Vec<SocketAddrV4>,
    /// What names this host in a listener's pool identity ([`gcb_proto::pool::identity`]).
    pub(super) host_id: Vec<u8>,
    pub(super) key: Option<PoolKey>,
    /// Our IP on the route to the broker.
    pub local_ip: Option<Ipv4Addr>,
    /// Registration channels: one per (process, broker) in use.
    pub(super) families: Vec<Channel>,
    /// This process's private channels, one per broker asked (created lazily).
    pub(super) privates: Vec<Channel>,
    pub(super) mailbox: Option<Mailbox>,
    /// Keyed by (transport, proxy): a TCP and a UDP proxy may share a port.
    pub(super) regs: HashMap<RegKey, Registration>,
    pub(super) heartbeat: Ticker,
    /// Destinations (proxy candidates) not to broker, until the given time.
    pub(super) negative: HashMap<SocketAddrV4, Instant>,
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
    pub(super) recent: HashMap<(Transport, SocketAddrV4), (SocketAddrV4, Instant)>,
    /// Placeholder connections still being established (the listener's backlog was full).
    pub(super) placeholders: Vec<(c_int, Instant)>,
    /// The configured heartbeat interval; the broker's lease may ask for more often.
    pub(super) heartbeat_every: Duration,
    /// Stray datagrams dropped on GCB UDP sockets.
    pub(super) udp_stray: u64,
    /// The epoll fd watching this process's parked standby connections.
    pub(super) watch: Option<Watch>,
    /// While the AEH runs inside a blocking accept() on the listener reached at this
    /// address: a brokered connection for it skips the placeholder and goes straight
    /// into `direct` (the accept returns it).
    pub(super) direct_for: Option<SocketAddrV4>,
    pub(super) direct: Option<(c_int, SocketAddrV4)>,
    /// `GCB_STANDBY` is not 0.
    pub(super) standby_enabled: bool,
    /// Ownership proofs ([`gcb_proto::token`]) of our registrations and of recently
    /// closed ones, by (transport, proxy): `unregister` and `register{previous_proxy}`
    /// carry them.
    pub(super) proofs: HashMap<RegKey, String>,
    /// Dial-backs in flight (see [`crate::gcb::dial`]); the AEH never waits for one.
    pub(super) dials: Dials<DialFor>,
    /// Listeners to register again (see [`RegisterRetry`]).
    pub(super) retries: Vec<RegisterRetry>,
    /// TCP hole punching: how long a punch may take (None: `GCB_PUNCH_TCP=0`).
    pub(super) punch_wait: Option<Duration>,
    /// Nonces of the punch claims acted on (a replayed claim is refused).
    pub(super) punch_nonces: gcb_proto::tcp_punch::NonceLog,
    /// Our listeners' TCP punches in progress (see [`crate::gcb::tcp_punch`]).
    pub(super) tcp_punches: Vec<crate::gcb::tcp_punch::ListenerPunch>,
}

impl Client {
    /// A client of the broker pool `pool` (not empty; its first broker is `broker`).
    pub fn new(
        pool: Vec<SocketAddrV4>,
        host_id: Vec<u8>,
        key: Option<PoolKey>,
        heartbeat: Duration,
        standby: bool,
    ) -> Client {
        Client {
            broker: pool
                .first()
                .copied()
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
            pool,
            host_id,
            key,
            local_ip: None,
            families: Vec::new(),
            privates: Vec::new(),
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
            punch_wait: Some(crate::gcb::tcp_punch::DEFAULT_PUNCH_WAIT),
            punch_nonces: gcb_proto::tcp_punch::NonceLog::new(),
            tcp_punches: Vec::new(),
        }
    }

    /// TCP hole punching on (with how long a punch may take) or off.
    pub fn set_punch(&mut self, wait: Option<Duration>) {
        self.punch_wait = wait;
    }

    /// How long a TCP punch may take, if punching is on and the pool is keyed (punch
    /// messages are authenticated with the pool key).
    pub fn punch_wait(&self) -> Option<Duration> {
        self.punch_wait.filter(|_| self.key.is_some())
    }

    /// The pool key, if any.
    pub fn key(&self) -> Option<&PoolKey> {
        self.key.as_ref()
    }

    /// Takes the registration token the broker gave the `transport` registration at
    /// `proxy`: keeps its ownership proof and returns what this registration presents
    /// on its data plane (the standby key of a TCP registration, the Dummy token of a UDP
    /// one), as 32 hex characters. None if the broker gave no valid token.
    pub(super) fn take_token(
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
    pub(super) fn proof_for(&self, transport: Transport, proxy: SocketAddr) -> Option<String> {
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
}
