//! The DPF client (paper section 3.2.1), active when `GCB_DPF_SERVER` is set.
//!
//! * `bind()` of an IPv4 TCP or UDP socket (not loopback) to an explicit port asks
//!   portfwd, the root daemon on the NAT gateway, for a forwarding rule public ip:port ->
//!   the socket's private ip:port. With the rule in place `getsockname()` returns the
//!   public address, the one the program will advertise; packets to it reach the socket
//!   through the NAT.
//! * `bind()` to port 0 (an ephemeral port: clients, `UdpSocket::bind("0.0.0.0:0")`, TCP
//!   clients that bind before connecting) asks nothing: the socket is only marked
//!   *pending*. Its replies come back through the NAT's own connection tracking, so a
//!   socket that only sends or connects never costs a portfwd round trip (each install
//!   takes portfwd ~15-40 ms). The forwarding is requested lazily, at the first sign
//!   that the program wants to be reached at a public address: `getsockname()` (the only
//!   way a program learns the address it would advertise) or, for TCP, `listen()`. From
//!   then on the socket is mapped exactly as if it had been bound to its port. A
//!   `connect()` of a pending socket drops the mark (an active socket keeps no rule, see
//!   below; it then only gets the same-network query). A pending socket handed to an
//!   exec'd image stays pending there (`dpfq=` entries of `GCB_INHERIT`). With a broker
//!   configured as well, GCB does not register a pending socket at bind either; it gets
//!   the socket only if the lazy request is refused (see refusals).
//! * Each mapped socket is coupled to a *probe socket*: a passive TCP socket of the
//!   shim's on the same private IP, created before the request and closed with the
//!   socket's last fd. portfwd connects to it periodically; when it cannot, it removes
//!   the rule. The probe socket's backlog is drained whenever the shim runs for the
//!   socket, and is large enough for hours of probes in between.
//! * `connect()` on a mapped socket makes it active: the rule is deleted first (paper:
//!   only passive sockets keep rules).
//! * `connect()` to a public address first asks portfwd whether it is one of its own
//!   clients; if so the connection goes straight to the private address over the private
//!   network. "Not ours" is remembered per IP for a minute, so a destination costs one
//!   LAN round trip at most once a minute.
//! * A refusal (port range, quota, owner...) fails the program's `bind()` with an errno
//!   and one log line when DPF is the only layer; with a broker configured as well, the
//!   socket is left to GCB (logged at debug level). For a pending socket the refusal
//!   fails the call that asked (`listen()` or `getsockname()`) the same way, once; the
//!   socket is then an ordinary local one. Left to GCB, a pending UDP socket is
//!   registered with the broker there and then, a TCP socket at its `listen()` (as
//!   GCB always does), and `getsockname()` reports GCB's proxy once registered, the
//!   private address before. An unreachable portfwd never fails a call: the program
//!   serves locally (its private address) and the shim logs one line.

use gcb_proto::{Body, ErrorCode, PoolKey, Transport};
use libc::c_int;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{drop_owned, Answer, Channel};
use crate::fdtable::{self, FdEntry, FdKind, ShimFd};
use crate::forklock::ForkMutex;
use crate::inherit::{self, Entry, Owner};
use crate::net;
use crate::sockstate::SockState;

/// Default portfwd control port (UDP).
pub const DEFAULT_DPF_PORT: u16 = 9651;
/// How long bind() waits for portfwd.
const FORWARD_DEADLINE: Duration = Duration::from_secs(3);
/// How long connect() waits for a same-network answer.
const QUERY_DEADLINE: Duration = Duration::from_secs(1);
/// Backlog of a probe socket (capped by net.core.somaxconn).
const PROBE_BACKLOG: c_int = 4096;
const NEGATIVE_TTL: Duration = Duration::from_secs(60);

pub use crate::sockstate::DpfSock;

/// What `on_bound` did with a socket DPF serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// portfwd forwards it (now, or it already did).
    Mapped,
    /// Port 0: marked pending, nothing asked yet.
    Pending,
}

/// Why a bind was not mapped.
pub enum Refusal {
    /// portfwd said no: errno for the program, and the reason.
    Refused(c_int, String),
    /// portfwd could not be asked (fail open).
    Unreachable(String),
    /// Not a socket DPF maps (loopback, not IPv4, not TCP/UDP).
    NotApplicable,
}

/// A live mapping of this process, for the periodic refresh.
struct Live {
    transport: Transport,
    private: SocketAddrV4,
    public: SocketAddrV4,
    probe_port: u16,
    probe: Arc<ShimFd>,
    entry: std::sync::Weak<FdEntry>,
}

struct State {
    chan: Option<Channel<()>>,
    /// portfwd's epoch as last seen (it changes when the daemon restarts).
    epoch: Option<u64>,
    live: Vec<Live>,
    next_drain: Instant,
    next_refresh: Instant,
    local_ip: Option<Ipv4Addr>,
    /// portfwd's public IP, learned from its replies.
    public_ip: Option<Ipv4Addr>,
    /// Destination IPs that are not portfwd's, until the given time.
    negative: HashMap<Ipv4Addr, Instant>,
    /// Public ports of mappings this process released, by (transport, private address).
    recent: HashMap<(Transport, SocketAddrV4), u16>,
}

pub struct DpfClient {
    server: SocketAddrV4,
    key: Option<PoolKey>,
    refresh: Duration,
    state: ForkMutex<State>,
}

/// Parses `GCB_DPF_SERVER` (`IP[:PORT]`, IPv4 only for now).
pub fn parse_server(s: &str) -> Result<SocketAddrV4, gcb_proto::addr::AddrError> {
    gcb_proto::addr::parse_endpoint_v4(s, DEFAULT_DPF_PORT)
}

fn errno_for(code: ErrorCode) -> c_int {
    match code {
        ErrorCode::NotOwner | ErrorCode::Unauthorized => libc::EACCES,
        _ => libc::EADDRNOTAVAIL,
    }
}

/// The transport of a socket DPF can forward: TCP or UDP carrying IPv4 (AF_INET, or a
/// dual-stack AF_INET6 socket; see [`net::carries_ipv4`]).
fn sock_type(fd: c_int) -> Option<Transport> {
    if net::carries_ipv4(fd, libc::SOCK_STREAM) {
        Some(Transport::Tcp)
    } else if net::carries_ipv4(fd, libc::SOCK_DGRAM) {
        Some(Transport::Udp)
    } else {
        None
    }
}

/// The DPF state of a socket entry, if mapped.
pub fn dpf_state(entry: &FdEntry) -> Option<(Transport, SocketAddrV4, SocketAddrV4, u64)> {
    entry
        .with_state(|s| s.dpf().map(|d| (d.transport, d.private, d.public, d.inode)))
        .flatten()
}

/// The transport of a pending socket (bound to port 0, not forwarded yet).
pub fn pending(entry: &FdEntry) -> Option<Transport> {
    entry.with_state(|s| s.dpf_pending()).flatten()
}

/// Clear a socket's pending mark; its transport if it had one.
fn take_pending(entry: &FdEntry) -> Option<Transport> {
    entry.with_state(SockState::take_dpf_pending).flatten()
}

fn mark_pending(entry: &FdEntry, transport: Transport) {
    entry.with_state(|s| s.mark_dpf_pending(transport));
}

fn take_dpf_state(entry: &FdEntry) -> Option<DpfSock> {
    entry.with_state(SockState::take_dpf).flatten()
}

impl DpfClient {
    /// `refresh`: how often a process checks that portfwd still has its mappings.
    pub fn new(server: SocketAddrV4, key: Option<PoolKey>, refresh: Duration) -> DpfClient {
        DpfClient {
            server,
            key,
            refresh,
            state: ForkMutex::new(State {
                chan: None,
                epoch: None,
                live: Vec::new(),
                next_drain: Instant::now(),
                next_refresh: Instant::now() + refresh,
                local_ip: None,
                public_ip: None,
                negative: HashMap::new(),
                recent: HashMap::new(),
            }),
        }
    }

    fn request(&self, st: &mut State, body: Body, deadline: Duration) -> Result<Answer, c_int> {
        if st.chan.is_none() {
            let (c, ip) = Channel::<()>::open(self.server, &self.key)?;
            st.chan = Some(c);
            if st.local_ip.is_none() {
                st.local_ip = ip;
            }
        }
        let chan = st.chan.as_mut().ok_or(libc::EBADF)?;
        chan.request(self.server, body, deadline)
    }

    /// Housekeeping, run from the program's waits (cheap when nothing is due): accept
    /// and close the probes queued on our probe sockets (at most once a second), and
    /// every `refresh` check that portfwd still has our mappings: a daemon that lost
    /// its state (new epoch, or the mapping is gone) gets them forwarded again, with the
    /// same public ports.
    pub fn maintain(&self) {
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.live.is_empty() || now < st.next_drain.min(st.next_refresh) {
            return;
        }
        if now >= st.next_drain {
            st.next_drain = now + Duration::from_secs(1);
            for l in &st.live {
                drain(l.probe.fd());
            }
        }
        if now >= st.next_refresh {
            st.next_refresh = now + self.refresh;
            self.refresh_locked(&mut st);
        }
    }

    fn refresh_locked(&self, st: &mut State) {
        // Sockets closed behind our back (e.g. close_range): close their probes too.
        st.live.retain(|l| {
            let alive = l.entry.strong_count() > 0;
            if !alive {
                drop_owned(&l.probe);
            }
            alive
        });
        let live: Vec<(Transport, SocketAddrV4, SocketAddrV4, u16)> = st
            .live
            .iter()
            .map(|l| (l.transport, l.private, l.public, l.probe_port))
            .collect();
        for (transport, private, public, probe_port) in live {
            let body = Body::Query {
                transport,
                public: SocketAddr::V4(public),
            };
            let lost = match self.request(st, body, Duration::from_millis(500)) {
                Ok(Answer::Body(Body::QueryResult {
                    private: p, epoch, ..
                })) => {
                    let restarted = st.epoch.is_some_and(|e| e != epoch);
                    st.epoch = Some(epoch);
                    p.and_then(net::v4) != Some(private) || restarted
                }
                // Unreachable now: try again next time.
                _ => return,
            };
            if !lost {
                continue;
            }
            let body = Body::Forward {
                transport,
                private: SocketAddr::V4(private),
                desired_public_port: Some(public.port()),
                probe_port,
            };
            match self.request(st, body, FORWARD_DEADLINE) {
                Ok(Answer::Body(Body::Forwarded { public: p, epoch })) => {
                    st.epoch = Some(epoch);
                    if net::v4(p) == Some(public) {
                        crate::info!(
                            "DPF: portfwd had lost {} -> {}; forwarded again",
                            public,
                            private
                        );
                    } else {
                        crate::warn!(
                            "DPF: portfwd had lost {} -> {}; it is now {:?} (the old public port was taken)",
                            public,
                            private,
                            p
                        );
                    }
                }
                other => crate::warn!(
                    "DPF: portfwd lost {} -> {} and refused it again: {}",
                    public,
                    private,
                    match other {
                        Ok(Answer::Body(b)) => format!("{b:?}"),
                        _ => "no answer".into(),
                    }
                ),
            }
        }
    }

    /// After a successful bind of `fd` to `requested` (the program's address; None if
    /// not IPv4): ask portfwd for a mapping, or for port 0 only mark the socket pending.
    pub fn on_bound(
        &self,
        fd: c_int,
        entry: Option<&Arc<FdEntry>>,
        requested: Option<SocketAddrV4>,
    ) -> Result<Bound, Refusal> {
        if let Some(req) = requested.filter(|a| a.port() == 0) {
            // The cheap path, taken by every client that binds: the bind of an AF_INET
            // address succeeded, so the socket is AF_INET; only its type is asked.
            if req.ip().is_loopback() {
                return Err(Refusal::NotApplicable);
            }
            let transport = match net::sock_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) {
                Some(libc::SOCK_STREAM) => Transport::Tcp,
                Some(libc::SOCK_DGRAM) => Transport::Udp,
                _ => return Err(Refusal::NotApplicable),
            };
            let entry = fdtable::socket_entry(fd, entry).ok_or(Refusal::NotApplicable)?;
            mark_pending(&entry, transport);
            crate::debug!(
                "DPF: {:?} socket fd {} bound to port 0; forwarded at getsockname()/listen() only",
                transport,
                fd
            );
            return Ok(Bound::Pending);
        }
        let transport = sock_type(fd).ok_or(Refusal::NotApplicable)?;
        let local = net::sock_name(fd, false).ok_or(Refusal::NotApplicable)?;
        if local.ip().is_loopback() || local.port() == 0 {
            return Err(Refusal::NotApplicable);
        }
        if entry.is_some_and(|e| dpf_state(e).is_some()) {
            return Ok(Bound::Mapped);
        }
        self.forward(fd, entry, transport, local)
            .map(|()| Bound::Mapped)
    }

    /// The first `getsockname()` or `listen()` of a pending socket: forward it now (and
    /// clear the mark, whatever the answer). NotApplicable if it is not pending.
    pub fn settle(&self, fd: c_int, entry: &Arc<FdEntry>) -> Result<(), Refusal> {
        let transport = take_pending(entry).ok_or(Refusal::NotApplicable)?;
        let local = net::sock_name(fd, false).ok_or(Refusal::NotApplicable)?;
        if local.port() == 0 {
            return Err(Refusal::NotApplicable);
        }
        self.forward(fd, Some(entry), transport, local)
    }

    /// Ask portfwd to forward a public port to `fd`, bound to `local`.
    fn forward(
        &self,
        fd: c_int,
        entry: Option<&Arc<FdEntry>>,
        transport: Transport,
        local: SocketAddrV4,
    ) -> Result<(), Refusal> {
        let mut st = self.state.lock();
        let ip = if local.ip().is_unspecified() {
            if st.local_ip.is_none() {
                st.local_ip = net::route_ip(self.server);
            }
            st.local_ip
                .ok_or_else(|| Refusal::Unreachable("no route to portfwd".into()))?
        } else {
            *local.ip()
        };
        let private = SocketAddrV4::new(ip, local.port());
        let probe = open_probe(ip).map_err(|e| {
            Refusal::Unreachable(format!(
                "probe socket: {}",
                std::io::Error::from_raw_os_error(e)
            ))
        })?;
        let probe_port = net::sock_name(probe.fd(), false).map_or(0, |a| a.port());
        // Ask for the public port this private address had (a program that re-creates its
        // socket, as iperf3 does after each test, keeps its advertised address) or that
        // the other protocol has on it (iperf3 -u uses TCP and UDP on one port).
        let desired = st
            .recent
            .get(&(transport, private))
            .copied()
            .or_else(|| {
                st.live
                    .iter()
                    .find(|l| l.private == private)
                    .map(|l| l.public.port())
            })
            .or_else(|| {
                st.recent
                    .iter()
                    .find(|((_, p), _)| *p == private)
                    .map(|(_, port)| *port)
            });
        let forward = |desired_public_port| Body::Forward {
            transport,
            private: SocketAddr::V4(private),
            desired_public_port,
            probe_port,
        };
        let mut answer = self.request(&mut st, forward(desired), FORWARD_DEADLINE);
        if desired.is_some()
            && matches!(&answer, Ok(Answer::Body(Body::Error { code, .. })) if *code == ErrorCode::PortRange)
        {
            // Our old port went to someone else: take any.
            answer = self.request(&mut st, forward(None), FORWARD_DEADLINE);
        }
        let fail = |r: Refusal| {
            drop_owned(&probe);
            Err(r)
        };
        match answer {
            Ok(Answer::Body(Body::Forwarded { public, epoch })) => {
                let Some(public) = net::v4(public) else {
                    return fail(Refusal::Unreachable("IPv6 public address".into()));
                };
                let Some(entry) = fdtable::socket_entry(fd, entry) else {
                    return fail(Refusal::NotApplicable);
                };
                st.public_ip = Some(*public.ip());
                st.epoch = Some(epoch);
                st.live.push(Live {
                    transport,
                    private,
                    public,
                    probe_port,
                    probe: probe.clone(),
                    entry: Arc::downgrade(&entry),
                });
                drop(st);
                entry.with_state(|s| {
                    *s = SockState::DpfMapped(DpfSock {
                        transport,
                        private,
                        public,
                        probe,
                        inode: crate::procid::inode(fd).unwrap_or(0),
                    });
                });
                crate::info!(
                    "DPF mapped {:?} {} -> public {} (portfwd {})",
                    transport,
                    private,
                    public,
                    self.server
                );
                Ok(())
            }
            Ok(Answer::Body(Body::Error { code, reason })) => fail(Refusal::Refused(
                errno_for(code),
                format!(
                    "portfwd {} refused {:?} {}: {:?}: {}",
                    self.server, transport, private, code, reason
                ),
            )),
            Ok(Answer::Body(other)) => fail(Refusal::Unreachable(format!(
                "unexpected answer {} from portfwd",
                other.type_name()
            ))),
            Ok(Answer::Timeout) => fail(Refusal::Unreachable(format!(
                "portfwd {} did not answer within {:?}",
                self.server, FORWARD_DEADLINE
            ))),
            Err(e) => fail(Refusal::Unreachable(format!(
                "cannot reach portfwd {}: {}",
                self.server,
                std::io::Error::from_raw_os_error(e)
            ))),
        }
    }

    /// The socket is becoming active (connect) or its last fd here is closing: drop the
    /// mapping (unless another process still holds the socket) and the probe socket.
    /// A pending socket just loses its mark.
    pub fn release(&self, entry: &Arc<FdEntry>, closing: bool) {
        let Some(d) = take_dpf_state(entry) else {
            take_pending(entry);
            return;
        };
        let mut st = self.state.lock();
        st.live.retain(|l| !Arc::ptr_eq(&l.probe, &d.probe));
        if st.recent.len() >= 256 {
            st.recent.clear();
        }
        st.recent.insert((d.transport, d.private), d.public.port());
        drop_owned(&d.probe);
        if closing && d.inode != 0 && crate::procid::held_elsewhere(d.inode) {
            return;
        }
        let body = Body::Delete {
            transport: d.transport,
            private: SocketAddr::V4(d.private),
        };
        // Closing: don't make close() wait; the probe would remove it anyway.
        let deadline = if closing {
            Duration::from_millis(300)
        } else {
            FORWARD_DEADLINE
        };
        match self.request(&mut st, body, deadline) {
            Ok(Answer::Body(Body::Deleted { .. })) => {
                crate::info!("DPF mapping {} -> {} deleted", d.public, d.private)
            }
            _ => crate::debug!(
                "DPF delete of {} not confirmed; portfwd's probe will remove it",
                d.private
            ),
        }
    }

    /// The gateway's public IP, once portfwd told it (a forward or a query).
    pub fn public_ip(&self) -> Option<Ipv4Addr> {
        self.state.lock().public_ip
    }

    /// The public address of the mapping for the private address `local` (a connection
    /// accepted on a forwarded listener has the listener's address), if one is live.
    pub fn public_for(&self, local: SocketAddrV4) -> Option<SocketAddrV4> {
        let st = self.state.lock();
        st.live
            .iter()
            .find(|l| l.private == local)
            .map(|l| l.public)
    }

    /// Same-network shortcut: the private address behind `dest`, if `dest` is one of
    /// portfwd's public addresses.
    pub fn lookup(&self, fd: c_int, dest: SocketAddrV4) -> Option<SocketAddrV4> {
        if net::is_private(*dest.ip()) || net::never_brokered(*dest.ip()) {
            return None;
        }
        let mut st = self.state.lock();
        let known_public = st.public_ip == Some(*dest.ip());
        if !known_public {
            if let Some(&until) = st.negative.get(dest.ip()) {
                if until > Instant::now() {
                    return None;
                }
            }
        }
        let transport = sock_type(fd)?;
        let body = Body::Query {
            transport,
            public: SocketAddr::V4(dest),
        };
        match self.request(&mut st, body, QUERY_DEADLINE) {
            Ok(Answer::Body(Body::QueryResult {
                private, public_ip, ..
            })) => {
                if let Some(std::net::IpAddr::V4(ip)) = public_ip {
                    st.public_ip = Some(ip);
                }
                match private.and_then(net::v4) {
                    Some(p) => {
                        st.public_ip = Some(*dest.ip());
                        crate::debug!("DPF: {} is our neighbour {}; connecting directly", dest, p);
                        Some(p)
                    }
                    None => {
                        if !known_public {
                            st.negative
                                .insert(*dest.ip(), Instant::now() + NEGATIVE_TTL);
                        }
                        None
                    }
                }
            }
            _ => {
                st.negative
                    .insert(*dest.ip(), Instant::now() + NEGATIVE_TTL);
                None
            }
        }
    }

    /// `dpf=` entries of `GCB_INHERIT` for the mapped sockets that survive an exec:
    /// `dpf=fd:ino:tcp|udp:privip:port:pubip:port:probefd:probeino`. Clears the probe
    /// sockets' close-on-exec so they keep sharing the sockets' fate. Pending sockets
    /// that survive it: `dpfq=fd:ino:tcp|udp`.
    pub fn handoff(&self) -> Vec<String> {
        let mut out = Vec::new();
        // (The sockets' own locks are taken outside the table scan.)
        for fd in fdtable::fds_matching(|e| matches!(e.kind, FdKind::Socket(_))) {
            let keeps = crate::sys::fcntl_raw(fd, libc::F_GETFD, 0)
                .is_ok_and(|f| f & libc::FD_CLOEXEC == 0);
            let transport = fdtable::get(fd).and_then(|e| pending(&e));
            if let (true, Some(transport), Some(ino)) = (keeps, transport, crate::procid::inode(fd))
            {
                out.push(Entry::DpfPending { fd, ino, transport }.format());
            }
        }
        let st = self.state.lock();
        for l in &st.live {
            let Some(entry) = l.entry.upgrade() else {
                continue;
            };
            let Some((_, _, _, ino)) = dpf_state(&entry) else {
                continue;
            };
            for fd in fdtable::fds_of(&entry) {
                let keeps = crate::sys::fcntl_raw(fd, libc::F_GETFD, 0)
                    .is_ok_and(|f| f & libc::FD_CLOEXEC == 0);
                if !keeps {
                    continue;
                }
                let pfd = l.probe.fd();
                let _ = crate::sys::fcntl_raw(pfd, libc::F_SETFD, 0);
                out.push(
                    Entry::Dpf {
                        fd,
                        ino,
                        transport: l.transport,
                        private: l.private,
                        public: l.public,
                        probe: pfd,
                        probe_ino: crate::procid::inode(pfd).unwrap_or(0),
                    }
                    .format(),
                );
            }
        }
        out
    }

    /// In an exec'd image: adopt the `dpf=` entries of `GCB_INHERIT` whose fds still are
    /// what they were (inodes checked); close probe fds that serve no socket.
    pub fn adopt(&self, spec: &str) {
        let (entries, bad) = inherit::parse(spec);
        for why in bad.iter().filter(|m| m.reported_by(Owner::Dpf)) {
            crate::warn!("GCB_INHERIT: ignored {}", why);
        }
        let inode = crate::procid::inode;
        for e in entries {
            let (fd, ino, transport, private, public, pfd, pino) = match e {
                Entry::DpfPending { fd, ino, transport } => {
                    adopt_pending(fd, ino, transport);
                    continue;
                }
                Entry::Dpf {
                    fd,
                    ino,
                    transport,
                    private,
                    public,
                    probe,
                    probe_ino,
                } => (fd, ino, transport, private, public, probe, probe_ino),
                _ => continue,
            };
            if inode(pfd) != Some(pino) {
                continue;
            }
            if inode(fd) != Some(ino) {
                net::close(pfd);
                continue;
            }
            let Ok(probe) = fdtable::own_fd(pfd, "dpf-probe") else {
                continue;
            };
            let Some(entry) = fdtable::socket_entry(fd, None) else {
                drop_owned(&probe);
                continue;
            };
            let probe_port = net::sock_name(probe.fd(), false).map_or(0, |a| a.port());
            entry.with_state(|s| {
                *s = SockState::DpfMapped(DpfSock {
                    transport,
                    private,
                    public,
                    probe: probe.clone(),
                    inode: ino,
                });
            });
            let mut st = self.state.lock();
            st.public_ip = Some(*public.ip());
            st.live.push(Live {
                transport,
                private,
                public,
                probe_port,
                probe,
                entry: Arc::downgrade(&entry),
            });
            crate::info!(
                "inherited DPF mapping of fd {} ({} -> {})",
                fd,
                public,
                private
            );
        }
    }

    pub fn fork_prepare(&self) {
        self.state.lock_raw();
    }

    pub fn fork_parent(&self) {
        // SAFETY: fork_prepare locked it on this thread.
        unsafe { self.state.unlock_raw() };
    }

    pub fn fork_child_locks(&self) {
        // SAFETY: in the fork child (one thread); fork_prepare held the lock.
        unsafe { self.state.reset_in_child() };
    }

    /// In a fork child: the channel is the parent's; probe sockets are shared like the
    /// mapped sockets they belong to.
    pub fn on_fork_child(&self) {
        if let Some(c) = self.state.lock().chan.take() {
            c.close();
        }
    }
}

/// A `dpfq=` entry: mark the fd pending again if it still is that socket.
fn adopt_pending(fd: c_int, ino: u64, transport: Transport) {
    if crate::procid::inode(fd) != Some(ino) {
        return;
    }
    if let Some(entry) = fdtable::socket_entry(fd, fdtable::get(fd).as_ref()) {
        mark_pending(&entry, transport);
        crate::debug!("inherited pending DPF socket fd {}", fd);
    }
}

/// Accept and close every queued connection of a (non-blocking) probe socket.
fn drain(fd: c_int) {
    loop {
        // SAFETY: null address arguments are allowed; the fd is ours.
        let c = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            break;
        }
        net::close(c);
    }
}

/// A passive TCP socket on `ip`, shim-owned (fd >= the shim's floor, close-on-exec).
fn open_probe(ip: Ipv4Addr) -> Result<Arc<ShimFd>, c_int> {
    let s = net::socket(libc::SOCK_STREAM | libc::SOCK_NONBLOCK, false)?;
    let r = net::bind(s, SocketAddrV4::new(ip, 0)).and_then(|_| {
        // SAFETY: s is our socket.
        if unsafe { libc::listen(s, PROBE_BACKLOG) } == 0 {
            Ok(())
        } else {
            Err(crate::sys::errno())
        }
    });
    if let Err(e) = r {
        net::close(s);
        return Err(e);
    }
    fdtable::own_fd(s, "dpf-probe").inspect_err(|_| net::close(s))
}
