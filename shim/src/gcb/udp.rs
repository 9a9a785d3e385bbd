//! GCB over UDP, the listener side (paper 4.2.1: UDP message buffer, receiver list,
//! DUMMY/DUMMY_ACK).
//!
//! A UDP socket the program binds (not loopback) is registered with the broker, which
//! opens a proxy UDP socket and returns its address and a token; `getsockname()` then
//! reports the proxy. A socket bound to port 0 registers later, when needed (see
//! [`SockState::UdpPending`]). The shim sends a `KeepAlive` frame (a Dummy the broker does not
//! acknowledge) carrying the token *from the program's own socket* to the proxy: that
//! opens the NAT mapping the broker relays through, and tells the broker where the socket
//! is; a few quick repeats and then one per heartbeat interval follow (see
//! [`super::client::Client::pump`]). Nothing of the shim's is ever sent *to* the
//! program's socket, so select/poll/epoll readiness is the program's own.
//!
//! Datagrams that senders send to the proxy arrive as `From` frames (11-byte header with
//! the original sender, then the datagram). The interposed receive calls read with one
//! extra 11-byte iovec in front of the program's buffers: a frame's header lands there
//! and its payload lands exactly in the program's buffers, at no extra copy; an ordinary
//! datagram from anyone else is shifted back into place. The program sees the sender's
//! address, unchanged payload and boundaries; Dummy acks and anything else of the
//! shim's never reach it. Senders seen this way form the receiver list; a datagram the
//! program sends to one of them goes back through the proxy as a `To` frame (so the
//! sender sees the reply from the address it sent to). `connect()` to such a sender is
//! virtual (the kernel would otherwise drop the proxy's frames).
//!
//! GCB <-> GCB: a send to another registration's proxy also starts a hole punch in the
//! background ([`super::punch`], [`gcb_proto::punch`]); once the peer answered, datagrams
//! to it go straight to its NAT mapping as `From` frames carrying the logical source, and
//! its direct frames are accepted only from its verified address. Frames from anyone
//! else that is not our proxy are dropped and counted, never unwrapped.
//!
//! fork and exec: a fork child holds the socket and the registration like its parent. A
//! socket that survives exec (no close-on-exec) is handed to the new image in
//! `GCB_INHERIT` (`udp=`, see [`crate::inherit`]) with its proxy, token and channel: the
//! new image keeps the proxy address, strips frames, replies through the relay and sends
//! keepalives and heartbeats; its receiver list starts empty (it refills from the next
//! `From` frames) and punched peers punch again. Whichever holder runs the AEH keeps the
//! registration alive; the last one to close the socket unregisters it.

use libc::{c_int, c_void, iovec, msghdr};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use super::core::GcbLayer;
use crate::fdtable::{self, FdEntry, FdKind};
use crate::inherit::{self, Entry};
use crate::layer::Outcome;
use crate::net;
use crate::sockaddr::SockAddrBuf;
use crate::sockstate::SockState;

pub use crate::sockstate::UdpSock;

fn is_state(entry: &FdEntry, f: impl FnOnce(&SockState) -> bool) -> bool {
    entry.with_state(|s| f(s)).unwrap_or(false)
}

pub(super) fn set_state(entry: &FdEntry, new: SockState) {
    entry.with_state(|s| *s = new);
}

/// Ends [`SockState::UdpRegistering`]; true if it was (the AEH's answer applies).
pub fn take_registering(entry: &FdEntry) -> bool {
    entry.with_state(SockState::take_udp_registering) == Some(true)
}

fn is_registering(entry: &FdEntry) -> bool {
    is_state(entry, |s| matches!(s, SockState::UdpRegistering))
}

/// In a fork child: a registration the parent started is the parent's (its answer goes to
/// the parent's pending list); the child's copies of such sockets are pending again.
pub fn registering_to_pending_after_fork() {
    for fd in fdtable::fds_matching(|e| matches!(e.kind, FdKind::Socket(_))) {
        if let Some(e) = fdtable::get(fd) {
            if take_registering(&e) {
                set_state(&e, SockState::UdpPending);
            }
        }
    }
}

pub(super) fn is_pending(entry: &FdEntry) -> bool {
    is_state(entry, |s| matches!(s, SockState::UdpPending))
}

/// Ends [`SockState::UdpPending`]; true if it was.
pub(super) fn take_pending(entry: &FdEntry) -> bool {
    entry.with_state(SockState::take_udp_pending) == Some(true)
}

/// `udpq=` entries of `GCB_INHERIT` for the [`SockState::UdpPending`] sockets that survive an
/// exec (not close-on-exec): the new image marks them pending again.
pub fn pending_handoff() -> Vec<String> {
    // (The sockets' own locks are taken outside the table scan.)
    fdtable::fds_matching(|e| matches!(e.kind, FdKind::Socket(_)))
        .into_iter()
        .filter(|&fd| fdtable::get(fd).is_some_and(|e| is_pending(&e) || is_registering(&e)))
        .filter(|&fd| {
            crate::sys::fcntl_raw(fd, libc::F_GETFD, 0).is_ok_and(|f| f & libc::FD_CLOEXEC == 0)
        })
        .filter_map(|fd| {
            let ino = crate::procid::inode(fd)?;
            Some(Entry::UdpPending { fd, ino }.format())
        })
        .collect()
}

/// In an exec'd image: mark the `udpq=` sockets of `spec` pending again, each if its fd
/// still is that UDP socket (inode checked). (Malformed entries are reported by the
/// client's adopt.)
pub fn adopt_pending(spec: &str) {
    for e in inherit::parse(spec).0 {
        let Entry::UdpPending { fd, ino } = e else {
            continue;
        };
        if crate::procid::inode(fd) != Some(ino) || !net::is_udp4(fd) {
            continue;
        }
        let entry = fdtable::get(fd);
        if entry.as_ref().is_some_and(|e| state(e).is_some()) {
            continue;
        }
        if let Some(entry) = fdtable::socket_entry(fd, entry.as_ref()) {
            set_state(&entry, SockState::UdpPending);
            crate::debug!("inherited pending udp fd {}", fd);
        }
    }
}

/// What the GCB UDP layer holds for a managed socket, read under one lock (the receive and
/// send hooks ask this for every managed socket, brokered TCP connections included).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum UdpView {
    /// Registered: its proxy and its virtual peer.
    Registered(SocketAddrV4, Option<SocketAddrV4>),
    /// Its registration is on its way ([`SockState::UdpRegistering`]).
    Registering,
    /// Anything else (pending, a TCP socket...).
    Other,
}

pub(super) fn view(entry: &FdEntry) -> UdpView {
    entry
        .with_state(|s| match s {
            SockState::UdpRegistering => UdpView::Registering,
            SockState::UdpRegistered(u) => UdpView::Registered(u.proxy, u.peer),
            _ => UdpView::Other,
        })
        .unwrap_or(UdpView::Other)
}

/// A registered UDP socket's proxy and virtual peer.
pub fn state(entry: &FdEntry) -> Option<(SocketAddrV4, Option<SocketAddrV4>)> {
    entry
        .with_state(|s| s.udp().map(|u| (u.proxy, u.peer)))
        .flatten()
}

/// Runs `f` on a registered UDP socket's state.
pub fn with_state<R>(entry: &FdEntry, f: impl FnOnce(&mut UdpSock) -> R) -> Option<R> {
    entry.with_state(|s| s.udp_mut().map(f)).flatten()
}

pub use super::punch::send_keepalive;

impl GcbLayer {
    /// After a successful bind of a UDP socket: register it, and punch the NAT mapping.
    /// bind() of a socket succeeded; `requested` is the address the program asked for.
    /// A UDP socket bound to a port registers now; one bound to port 0 is marked
    /// [`SockState::UdpPending`].
    pub fn on_bound_udp_lazy(
        &self,
        fd: c_int,
        entry: Option<&Arc<FdEntry>>,
        requested: Option<SocketAddrV4>,
    ) {
        let lazy = requested.is_some_and(|a| a.port() == 0 && !a.ip().is_loopback());
        if !lazy || !net::is_udp4(fd) || entry.is_some_and(|e| state(e).is_some()) {
            return self.on_bound_udp(fd, entry);
        }
        let Some(entry) = fdtable::socket_entry(fd, entry) else {
            return;
        };
        set_state(&entry, SockState::UdpPending);
        crate::debug!("udp fd {}: bound to port 0, registers when needed", fd);
    }

    /// A [`SockState::UdpPending`] socket registers now (its address is asked for); a
    /// [`SockState::UdpRegistering`] one waits for its registration's answer (bounded by the
    /// registration deadline, after which it is a plain socket).
    pub fn settle_pending_udp(&self, fd: c_int, entry: &Arc<FdEntry>) {
        if take_pending(entry) {
            self.on_bound_udp(fd, Some(entry));
            return;
        }
        let deadline = Instant::now() + super::client::REGISTER_DEADLINE;
        while is_registering(entry) && Instant::now() < deadline {
            let _ = self.pump();
            if is_registering(entry) {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        if take_registering(entry) {
            crate::warn!(
                "udp fd {}: no registration in time; serving locally only",
                fd
            );
        }
    }

    /// The address a UDP socket registers as (its bound address, the route's IP for a
    /// wildcard), or None for a socket that is not registered (loopback, no port).
    pub(super) fn registration_local(&self, fd: c_int) -> Option<SocketAddrV4> {
        let local = net::sock_name(fd, false)?;
        if local.ip().is_loopback() || local.port() == 0 {
            return None;
        }
        if !local.ip().is_unspecified() {
            return Some(local);
        }
        let ip = self
            .client()
            .lock()
            .route_ip()
            .unwrap_or(Ipv4Addr::LOCALHOST);
        Some(SocketAddrV4::new(ip, local.port()))
    }

    pub fn on_bound_udp(&self, fd: c_int, entry: Option<&Arc<FdEntry>>) {
        if !net::is_udp4(fd) || entry.is_some_and(|e| state(e).is_some()) {
            return;
        }
        let Some(reg_local) = self.registration_local(fd) else {
            return;
        };
        let mut c = self.client().lock();
        let Some(entry) = fdtable::socket_entry(fd, entry) else {
            return;
        };
        match c.register_udp(reg_local, &entry, fd) {
            Ok((proxy, token)) => {
                set_state(
                    &entry,
                    SockState::UdpRegistered(UdpSock::new(proxy, *c.broker.ip())),
                );
                send_keepalive(fd, proxy, &token);
                crate::info!(
                    "registered udp {} with broker {}: proxy {}",
                    reg_local,
                    c.broker,
                    proxy
                );
            }
            Err(why) => crate::notice!(
                Warn,
                BrokerUnreachable,
                "bind udp {}: {}; serving locally only (plain socket) (pid {})",
                reg_local,
                why,
                crate::control::getpid()
            ),
        }
    }

    /// `connect()` on a registered UDP socket to a relayed sender: the kernel socket is
    /// connected to the *proxy* (so datagrams from it come here and not to a sibling
    /// socket on the same port, and nothing else does), and the shim keeps the sender as
    /// the logical peer: only its frames are delivered, sends go to it. Any other
    /// destination (or AF_UNSPEC) is a real connect and leaves the relay.
    pub fn udp_connect(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        dest: Option<SocketAddrV4>,
    ) -> Outcome<c_int> {
        let r = with_state(entry, |u| match dest {
            Some(d) if u.receivers.contains(&d) => {
                u.peer = Some(d);
                Some(u.proxy)
            }
            _ => {
                u.peer = None;
                None
            }
        });
        crate::debug!("udp connect fd {} to {:?}: relayed via {:?}", fd, dest, r);
        match r.flatten() {
            Some(proxy) => match net::connect_program(fd, proxy) {
                Ok(()) => Outcome::Handled(0),
                Err(e) => Outcome::Error(e),
            },
            None => Outcome::Bypass("no proxy: a plain UDP connect"),
        }
    }

    /// A socket whose registration is on its way: run the AEH once, so the answer is taken
    /// as early as the program's next call on the socket. Its proxy and virtual peer if
    /// that made it a registered socket.
    pub(super) fn poll_registering(
        &self,
        entry: &Arc<FdEntry>,
    ) -> Option<(SocketAddrV4, Option<SocketAddrV4>)> {
        let _ = self.pump();
        state(entry)
    }
}

/// A msghdr over `name` and `iov` (our header in front of the program's buffers), with the
/// program's ancillary data buffer if it passed a msghdr (null: none). Valid while `name`
/// and `iov` live. (After a receive, the kernel's name length is in `msg_namelen`.)
pub(super) fn framed_msghdr(
    name: &mut SockAddrBuf,
    iov: &mut [iovec],
    msg: *const msghdr,
) -> msghdr {
    // SAFETY: zeroed msghdr is valid; the fields we use are filled below.
    let mut mh: msghdr = unsafe { std::mem::zeroed() };
    mh.msg_namelen = name.len();
    mh.msg_name = name.as_mut_ptr() as *mut c_void;
    mh.msg_iov = iov.as_mut_ptr();
    mh.msg_iovlen = iov.len();
    if !msg.is_null() {
        // SAFETY: the program's msghdr, valid for the call it passed it to.
        let m = unsafe { &*msg };
        mh.msg_control = m.msg_control;
        mh.msg_controllen = m.msg_controllen;
    }
    mh
}

/// The first (up to 64) of the `len` bytes the kernel wrote into the program's buffers
/// (a punch frame's nonce).
pub(super) fn gather(iov: &[iovec], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    let mut left = len.min(64);
    for v in iov {
        if left == 0 {
            break;
        }
        let take = v.iov_len.min(left);
        if take > 0 && !v.iov_base.is_null() {
            // SAFETY: the kernel just wrote at least `take` bytes into this buffer of the
            // program's (take <= iov_len and <= the datagram's received length).
            out.extend_from_slice(unsafe {
                std::slice::from_raw_parts(v.iov_base as *const u8, take)
            });
        }
        left -= take;
    }
    out
}
