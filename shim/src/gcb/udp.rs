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
//! `GCB_INHERIT` (`udp=`, see [`super::inherit`]) with its proxy, token and channel: the
//! new image keeps the proxy address, strips frames, replies through the relay and sends
//! keepalives and heartbeats; its receiver list starts empty (it refills from the next
//! `From` frames) and punched peers punch again. Whichever holder runs the AEH keeps the
//! registration alive; the last one to close the socket unregisters it.

use gcb_proto::punch::Verdict;
use gcb_proto::udp::{self, UdpKind};
use gcb_proto::UDP_HEADER_LEN;
use libc::{c_int, c_void, iovec, msghdr, sockaddr_in, socklen_t, ssize_t};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use super::core::GcbLayer;
use crate::fdtable::{self, FdEntry, FdKind};
use crate::layer::{AddrOut, IoCall, Outcome};
use crate::net;
use crate::sockstate::SockState;

/// Most senders a socket remembers for replies (a new one beyond it replaces the list).
const MAX_RECEIVERS: usize = 4096;

pub use crate::sockstate::UdpSock;

fn is_state(entry: &FdEntry, f: impl FnOnce(&SockState) -> bool) -> bool {
    entry.with_state(|s| f(s)).unwrap_or(false)
}

fn set_state(entry: &FdEntry, new: SockState) {
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

fn is_pending(entry: &FdEntry) -> bool {
    is_state(entry, |s| matches!(s, SockState::UdpPending))
}

/// Ends [`SockState::UdpPending`]; true if it was.
fn take_pending(entry: &FdEntry) -> bool {
    entry.with_state(SockState::take_udp_pending) == Some(true)
}

/// `udpq=FD:INO` entries of `GCB_INHERIT` for the [`SockState::UdpPending`] sockets that survive an
/// exec (not close-on-exec): the new image marks them pending again.
pub fn pending_handoff() -> Vec<String> {
    // (The sockets' own locks are taken outside the table scan.)
    fdtable::fds_matching(|e| matches!(e.kind, FdKind::Socket(_)))
        .into_iter()
        .filter(|&fd| fdtable::get(fd).is_some_and(|e| is_pending(&e) || is_registering(&e)))
        .filter(|&fd| {
            crate::sys::fcntl_raw(fd, libc::F_GETFD, 0).is_ok_and(|f| f & libc::FD_CLOEXEC == 0)
        })
        .filter_map(|fd| Some(format!("udpq={fd}:{}", crate::procid::inode(fd)?)))
        .collect()
}

/// In an exec'd image: mark the `udpq=` sockets of `spec` pending again, each if its fd
/// still is that UDP socket (inode checked); malformed entries are skipped.
pub fn adopt_pending(spec: &str) {
    for v in spec.split(';').filter_map(|p| p.strip_prefix("udpq=")) {
        let Some((fd, ino)) = v
            .split_once(':')
            .and_then(|(fd, ino)| Some((fd.parse::<c_int>().ok()?, ino.parse::<u64>().ok()?)))
        else {
            crate::warn!("GCB_INHERIT: ignored malformed udpq= entry");
            continue;
        };
        if ino == 0 || crate::procid::inode(fd) != Some(ino) || !net::is_udp4(fd) {
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

/// Where a send call goes (None: the kernel-connected peer).
fn send_dest(call: &IoCall) -> Option<SocketAddrV4> {
    match *call {
        IoCall::Send { to, .. } => net::addr_in(to),
        IoCall::SendMsg { msg, .. } if !msg.is_null() => {
            // SAFETY: the program's msghdr, valid for the call.
            let m = unsafe { &*msg };
            net::addr_in(crate::layer::AddrIn {
                ptr: m.msg_name as *const libc::sockaddr,
                len: m.msg_namelen,
            })
        }
        _ => None,
    }
}

/// What the GCB UDP layer holds for a managed socket, read under one lock (the receive and
/// send hooks ask this for every managed socket, brokered TCP connections included).
#[derive(Clone, Copy, PartialEq, Eq)]
enum UdpView {
    /// Registered: its proxy and its virtual peer.
    Registered(SocketAddrV4, Option<SocketAddrV4>),
    /// Its registration is on its way ([`SockState::UdpRegistering`]).
    Registering,
    /// Anything else (pending, a TCP socket...).
    Other,
}

fn view(entry: &FdEntry) -> UdpView {
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

fn errno() -> c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
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
    fn registration_local(&self, fd: c_int) -> Option<SocketAddrV4> {
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
            Err(why) => crate::warn!("bind udp {}: {}; serving locally only", reg_local, why),
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
            Some(proxy) => match net::connect_raw(fd, proxy) {
                Ok(()) => Outcome::Handled(0),
                Err(e) => Outcome::Error(e),
            },
            None => Outcome::Bypass("no proxy: a plain UDP connect"),
        }
    }

    /// recv/recvfrom/recvmsg/read on a registered UDP socket.
    pub fn udp_recv(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        let (proxy, vpeer) = match view(entry) {
            UdpView::Registered(p, v) => (p, v),
            UdpView::Registering => match self.poll_registering(entry) {
                Some(pv) => pv,
                None => return Outcome::Bypass("registration not answered: plain socket"),
            },
            UdpView::Other => return Outcome::Bypass("not a registered UDP socket"),
        };
        // The program's buffers and result slots.
        let (prog_iov, flags, msg, from): (Vec<iovec>, c_int, *mut msghdr, AddrOut) = match call {
            IoCall::Recv {
                buf,
                len,
                flags,
                from,
            } => (
                vec![iovec {
                    iov_base: buf,
                    iov_len: len,
                }],
                flags,
                std::ptr::null_mut(),
                from,
            ),
            IoCall::RecvMsg { msg, flags } => {
                if msg.is_null() {
                    return Outcome::Bypass("null msghdr: the kernel reports the error");
                }
                // SAFETY: the program's msghdr, valid for the call (recvmsg's contract).
                let m = unsafe { &*msg };
                let iov = if m.msg_iov.is_null() || m.msg_iovlen == 0 {
                    Vec::new()
                } else {
                    // SAFETY: msg_iov holds msg_iovlen iovecs (recvmsg's contract).
                    unsafe { std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen) }.to_vec()
                };
                (
                    iov,
                    flags,
                    msg,
                    AddrOut {
                        ptr: std::ptr::null_mut(),
                        len: std::ptr::null_mut(),
                    },
                )
            }
            _ => return Outcome::Bypass("not a receive call"),
        };
        if flags & libc::MSG_ERRQUEUE != 0 {
            return Outcome::Bypass("MSG_ERRQUEUE: kernel error queue, no relay framing");
        }
        let cap: usize = prog_iov.iter().map(|v| v.iov_len).sum();
        let peek = flags & libc::MSG_PEEK != 0;
        let blocking = flags & libc::MSG_DONTWAIT == 0 && !net::is_nonblocking(fd);
        let deadline = blocking
            .then(|| net::rcv_timeout(fd))
            .flatten()
            .and_then(|t| Instant::now().checked_add(t));
        loop {
            if blocking {
                match self.wait_readable(fd, deadline) {
                    Ok(true) => {}
                    Ok(false) if deadline.is_some_and(|d| Instant::now() >= d) => {
                        return Outcome::Error(libc::EAGAIN);
                    }
                    Ok(false) => continue,
                    Err(e) => return Outcome::Error(e),
                }
            }
            let mut hdr = [0u8; UDP_HEADER_LEN];
            let mut iov = Vec::with_capacity(prog_iov.len() + 1);
            iov.push(iovec {
                iov_base: hdr.as_mut_ptr() as *mut c_void,
                iov_len: hdr.len(),
            });
            iov.extend_from_slice(&prog_iov);
            // SAFETY: zeroed sockaddr_in is valid; the kernel fills it.
            let mut name: sockaddr_in = unsafe { std::mem::zeroed() };
            let mut mh = framed_msghdr(&mut name, &mut iov, msg);
            // MSG_TRUNC: the kernel returns the datagram's real length.
            let real_flags = (flags | libc::MSG_DONTWAIT | libc::MSG_TRUNC) & !libc::MSG_WAITALL;
            // SAFETY: mh describes buffers valid for the call: ours and the program's.
            let n = unsafe { libc::recvmsg(fd, &mut mh, real_flags) };
            if n < 0 {
                let e = errno();
                if (e == libc::EAGAIN || e == libc::EINTR) && blocking {
                    if e == libc::EINTR {
                        return Outcome::Error(e);
                    }
                    continue;
                }
                return Outcome::Error(e);
            }
            let total = n as usize;
            let got = total.min(UDP_HEADER_LEN + cap);
            let src =
                (name.sin_family as c_int == libc::AF_INET).then(|| net::from_sockaddr_in(&name));
            let frame = (src == Some(proxy) && got >= UDP_HEADER_LEN)
                .then(|| udp::parse(&hdr))
                .flatten();
            if src == Some(proxy) {
                match frame {
                    Some((UdpKind::From, sender, _)) => {
                        if vpeer.is_some_and(|p| p != sender) {
                            // A virtually connected socket hears only its peer.
                            discard_peeked(fd, peek);
                            self.count_stray();
                            continue;
                        }
                        let relayed = with_state(entry, |u| {
                            if u.receivers.len() >= MAX_RECEIVERS && !u.receivers.contains(&sender)
                            {
                                u.receivers.clear();
                            }
                            u.receivers.insert(sender);
                            // A direct peer that uses the relay lost its side of the punch
                            // (e.g. another program on its address): answer via the relay.
                            !u.punch.is_empty() && u.punch.on_relayed(sender, Instant::now())
                        });
                        if relayed == Some(true) {
                            crate::debug!("punch {}: heard through the relay: relay", sender);
                        }
                        let payload = total - UDP_HEADER_LEN;
                        let delivered = payload.min(cap);
                        net::write_addr_out(from, sender);
                        self.finish_msg(msg, sender, payload > cap, &mh);
                        let ret = if flags & libc::MSG_TRUNC != 0 {
                            payload
                        } else {
                            delivered
                        };
                        return Outcome::Handled(ret as ssize_t);
                    }
                    _ => {
                        discard_peeked(fd, peek);
                        self.count_stray();
                        continue;
                    }
                }
            }
            if let (Some(s), Some((kind, addr, _))) = (src, frame_hdr(&hdr, got)) {
                // Not from our proxy: a punched peer's frame (see `punch`), or forged.
                let nonce = match kind {
                    UdpKind::Dummy | UdpKind::DummyAck => gather(&prog_iov, got - UDP_HEADER_LEN),
                    _ => Vec::new(),
                };
                let now = Instant::now();
                let verdict = with_state(entry, |u| u.punch.on_frame(s, kind, addr, &nonce, now))
                    .unwrap_or(Verdict::Forged);
                match verdict {
                    Verdict::Deliver(sender) if vpeer.is_none_or(|p| p == sender) => {
                        let payload = total - UDP_HEADER_LEN;
                        net::write_addr_out(from, sender);
                        self.finish_msg(msg, sender, payload > cap, &mh);
                        let ret = if flags & libc::MSG_TRUNC != 0 {
                            payload
                        } else {
                            payload.min(cap)
                        };
                        return Outcome::Handled(ret as ssize_t);
                    }
                    v => {
                        self.consume_punch_frame(fd, peek, s, v);
                        continue;
                    }
                }
            }
            if vpeer.is_some() {
                // A virtually connected socket hears only its peer (via the proxy).
                discard_peeked(fd, peek);
                continue;
            }
            // An ordinary datagram: put its first bytes back in front.
            unshift(
                &prog_iov,
                &hdr[..got.min(UDP_HEADER_LEN)],
                got.saturating_sub(UDP_HEADER_LEN),
            );
            if let Some(s) = src {
                net::write_addr_out(from, s);
                self.finish_msg(msg, s, total > cap, &mh);
                // A punched destination answering through its proxy has lost its side.
                let relayed = with_state(entry, |u| {
                    !u.punch.is_empty() && u.punch.on_relayed(s, Instant::now())
                });
                if relayed == Some(true) {
                    crate::debug!("punch {}: heard through the relay: relay", s);
                }
            }
            let ret = if flags & libc::MSG_TRUNC != 0 {
                total
            } else {
                total.min(cap)
            };
            return Outcome::Handled(ret as ssize_t);
        }
    }

    /// send/sendto/sendmsg/write on a registered UDP socket: to a relayed sender, as a
    /// `To` frame through the proxy; to anyone else, as is.
    pub fn udp_send(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        // Other managed sockets (e.g. brokered TCP connections) pass straight through,
        // before anything is allocated.
        match view(entry) {
            UdpView::Registered(..) => {}
            UdpView::Registering if self.poll_registering(entry).is_some() => {}
            _ => return self.first_send_of_pending(fd, entry, call),
        }
        let (prog_iov, flags, to, msg): (Vec<iovec>, c_int, Option<SocketAddrV4>, *const msghdr) =
            match call {
                IoCall::Send {
                    buf,
                    len,
                    flags,
                    to,
                } => (
                    vec![iovec {
                        iov_base: buf as *mut c_void,
                        iov_len: len,
                    }],
                    flags,
                    net::addr_in(to),
                    std::ptr::null(),
                ),
                IoCall::SendMsg { msg, flags } => {
                    if msg.is_null() {
                        return Outcome::Bypass("null msghdr: the kernel reports the error");
                    }
                    // SAFETY: the program's msghdr, valid for the call.
                    let m = unsafe { &*msg };
                    let iov = if m.msg_iov.is_null() || m.msg_iovlen == 0 {
                        Vec::new()
                    } else {
                        // SAFETY: msg_iov holds msg_iovlen iovecs.
                        unsafe { std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen) }.to_vec()
                    };
                    let to = net::addr_in(crate::layer::AddrIn {
                        ptr: m.msg_name as *const libc::sockaddr,
                        len: m.msg_namelen,
                    });
                    (iov, flags, to, msg)
                }
                _ => return Outcome::Bypass("not a send call"),
            };
        let len: usize = prog_iov.iter().map(|v| v.iov_len).sum();
        let now = Instant::now();
        let plan = with_state(entry, |u| {
            let dest = to.or(u.peer)?;
            if u.peer.is_none() && len <= gcb_proto::MAX_UDP_PAYLOAD {
                if let Some((direct, me)) = u.punch.route(dest, now) {
                    return Some(Plan::Direct { dest, direct, me });
                }
            }
            if u.receivers.contains(&dest) {
                return Some(Plan::Relay(u.proxy, dest));
            }
            (u.peer.is_none()
                && *dest.ip() == u.broker
                && dest != u.proxy
                && u.punch.should_ask(dest, now))
            .then_some(Plan::Ask(u.proxy, dest))
        })
        .flatten();
        let (proxy, dest) = match plan {
            None => return Outcome::Bypass("destination not through the proxy"),
            Some(Plan::Ask(mine, dest)) => {
                // This datagram goes through the relay; the punch is set up meanwhile.
                self.client().lock().request_punch(mine, dest, entry);
                return Outcome::Bypass("relayed through the proxy while the punch is set up");
            }
            Some(Plan::Relay(proxy, dest)) => (proxy, dest),
            Some(Plan::Direct { dest, direct, me }) => {
                match send_framed(fd, UdpKind::From, me, direct, &prog_iov, msg, flags) {
                    Ok(n) => return Outcome::Handled(n as ssize_t),
                    Err(e)
                        if matches!(
                            e,
                            libc::EAGAIN | libc::EINTR | libc::ENOBUFS | libc::EMSGSIZE
                        ) =>
                    {
                        return Outcome::Error(e)
                    }
                    Err(e) => {
                        // The direct path broke: relay from now on (and this datagram).
                        crate::debug!(
                            "punch: direct send to {} ({}) failed: errno {}; relay",
                            dest,
                            direct,
                            e
                        );
                        let relay = with_state(entry, |u| {
                            u.punch.on_send_error(dest, now);
                            u.receivers.contains(&dest).then_some(u.proxy)
                        })
                        .flatten();
                        match relay {
                            Some(proxy) => (proxy, dest),
                            None => return Outcome::Bypass("no relay for this destination"),
                        }
                    }
                }
            }
        };
        match send_framed(fd, UdpKind::To, dest, proxy, &prog_iov, msg, flags) {
            Ok(n) => Outcome::Handled(n as ssize_t),
            Err(e) => Outcome::Error(e),
        }
    }

    /// A send on a managed but unregistered UDP socket. A [`SockState::UdpPending`] socket's first
    /// datagram to the broker's host (another registration's proxy) registers it, so the
    /// exchange can punch. The datagram goes first, as is (to that proxy, exactly what the
    /// registered path sends first), and the registration round trip runs while it is on
    /// its way; an answer that arrives meanwhile waits in the socket's queue.
    fn first_send_of_pending(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        call: IoCall,
    ) -> Outcome<ssize_t> {
        let Some(dest) = send_dest(&call) else {
            return Outcome::Bypass("no destination address");
        };
        if !is_pending(entry) || dest.ip() != self.client().lock().broker.ip() {
            return Outcome::Bypass("not a pending socket sending to the broker's host");
        }
        let sent = match call {
            // SAFETY: the program's own arguments, under sendto's contract.
            IoCall::Send {
                buf,
                len,
                flags,
                to,
            } => unsafe { libc::sendto(fd, buf, len, flags, to.ptr, to.len) },
            // SAFETY: the program's own msghdr, under sendmsg's contract.
            IoCall::SendMsg { msg, flags } => unsafe { libc::sendmsg(fd, msg, flags) },
            _ => return Outcome::Bypass("not a send call"),
        };
        if sent < 0 {
            return Outcome::Error(errno());
        }
        if !take_pending(entry) {
            return Outcome::Handled(sent);
        }
        let Some(local) = self.registration_local(fd) else {
            return Outcome::Handled(sent);
        };
        let mut c = self.client().lock();
        match c.register_udp_start(local, entry, fd, dest) {
            // The marker is set under the client lock, before the AEH can see the answer.
            Ok(None) => set_state(entry, SockState::UdpRegistering),
            Ok(Some((proxy, token))) => {
                set_state(
                    entry,
                    SockState::UdpRegistered(UdpSock::new(proxy, *c.broker.ip())),
                );
                send_keepalive(fd, proxy, &token);
                if with_state(entry, |u| u.punch.should_ask(dest, Instant::now())) == Some(true) {
                    c.request_punch(proxy, dest, entry);
                }
            }
            Err(why) => crate::warn!("bind udp {}: {}; serving locally only", local, why),
        }
        Outcome::Handled(sent)
    }

    /// A socket whose registration is on its way: run the AEH once, so the answer is taken
    /// as early as the program's next call on the socket. Its proxy and virtual peer if
    /// that made it a registered socket.
    fn poll_registering(
        &self,
        entry: &Arc<FdEntry>,
    ) -> Option<(SocketAddrV4, Option<SocketAddrV4>)> {
        let _ = self.pump();
        state(entry)
    }

    /// For recvmsg: the program's msg_name (the logical sender), msg_flags, controllen.
    fn finish_msg(&self, msg: *mut msghdr, sender: SocketAddrV4, truncated: bool, mh: &msghdr) {
        if msg.is_null() {
            return;
        }
        // SAFETY: the program's msghdr, valid and writable for recvmsg.
        let m = unsafe { &mut *msg };
        if !m.msg_name.is_null() {
            let mut len = m.msg_namelen;
            net::write_addr_out(
                AddrOut {
                    ptr: m.msg_name as *mut libc::sockaddr,
                    len: &mut len,
                },
                sender,
            );
            m.msg_namelen = len;
        }
        m.msg_controllen = mh.msg_controllen;
        m.msg_flags =
            (mh.msg_flags & !libc::MSG_TRUNC) | if truncated { libc::MSG_TRUNC } else { 0 };
    }

    /// Before a wait tells the program that registered UDP socket `fd` is readable: take
    /// the shim's own datagrams (punch Dummies and acks, strays) off the head of its queue
    /// and act on them, as the recv path would. True if a datagram for the program is
    /// queued. Without this, a peer's Dummy made select()/poll() report the socket ready and
    /// the program's following blocking recv() waited for real data that might never come.
    pub fn udp_has_program_data(&self, fd: c_int) -> bool {
        let Some(entry) = crate::fdtable::get(fd) else {
            return true;
        };
        let Some((proxy, _)) = state(&entry) else {
            return true;
        };
        loop {
            // Header plus the start of the payload (a Dummy's nonce).
            let mut buf = [0u8; UDP_HEADER_LEN + 64];
            // SAFETY: zeroed sockaddr_in is valid; len describes it.
            let mut name: sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<sockaddr_in>() as socklen_t;
            // SAFETY: buf, name and len are valid for the call; MSG_PEEK leaves the queue.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr() as *mut c_void,
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                    &mut name as *mut sockaddr_in as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                // EAGAIN: nothing queued (an error is the recv call's to report).
                return std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN);
            }
            let got = n as usize;
            let Some(src) =
                (name.sin_family as c_int == libc::AF_INET).then(|| net::from_sockaddr_in(&name))
            else {
                return true;
            };
            let mut hdr = [0u8; UDP_HEADER_LEN];
            hdr.copy_from_slice(&buf[..UDP_HEADER_LEN]);
            let Some((kind, addr, _)) = frame_hdr(&hdr, got) else {
                return true; // an ordinary datagram: the program's
            };
            if src == proxy {
                if kind == UdpKind::From {
                    return true;
                }
            } else {
                let payload = &buf[UDP_HEADER_LEN..got.min(buf.len())];
                let nonce = match kind {
                    UdpKind::Dummy | UdpKind::DummyAck => payload.to_vec(),
                    _ => Vec::new(),
                };
                // A From frame from a verified peer is the program's: classify without
                // consuming anything else (on_frame only updates the record's timers).
                let verdict = with_state(&entry, |u| {
                    u.punch.on_frame(src, kind, addr, &nonce, Instant::now())
                })
                .unwrap_or(Verdict::Forged);
                match verdict {
                    Verdict::Deliver(_) => return true,
                    v => {
                        self.consume_punch_frame(fd, true, src, v);
                        continue;
                    }
                }
            }
            discard_peeked(fd, true);
            self.count_stray();
        }
    }

    /// A peeked punch-path frame from `src` that is not the program's: take it off the
    /// queue and act on `verdict` (answer a Dummy, note an ack; anything else, e.g. a
    /// relay frame not from our proxy or a verified peer, is forged: dropped and counted).
    fn consume_punch_frame(&self, fd: c_int, peek: bool, src: SocketAddrV4, verdict: Verdict) {
        discard_peeked(fd, peek);
        match verdict {
            Verdict::Ack(to, n) => super::punch::send_frame(
                fd,
                to,
                UdpKind::DummyAck,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                &n,
            ),
            Verdict::Consumed => crate::debug!("punch: DummyAck from {}: direct", src),
            _ => self.count_stray(),
        }
    }

    fn count_stray(&self) {
        let n = self.client().lock().count_udp_stray();
        if n.is_power_of_two() {
            crate::info!("dropped {} stray datagram(s) on GCB UDP sockets", n);
        }
    }

    /// Block until `fd` is readable, running the AEH meanwhile (heartbeats, keepalive
    /// Dummies, broker commands). Ok(false): woke for the AEH only.
    /// Wait until `fd` is readable (true), the AEH ran, or `deadline` passed (false).
    fn wait_readable(&self, fd: c_int, deadline: Option<Instant>) -> Result<bool, c_int> {
        // The AEH runs only when its sockets have something or a timer is due, so a
        // datagram ping-pong costs one poll and one recvmsg per datagram.
        let (ours, wake) = self.aeh().unwrap_or_default();
        let mut set = vec![libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        set.extend(ours.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let until = match (wake, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let ms = until.map_or(-1, |w| {
            net::ms_ceil(w.saturating_duration_since(Instant::now()))
        });
        // SAFETY: set is a valid pollfd array of its length.
        let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, ms) };
        if r < 0 {
            return Err(errno());
        }
        let timer_due = wake.is_some_and(|w| Instant::now() >= w);
        if timer_due || set[1..].iter().any(|p| p.revents != 0) {
            self.pump();
        }
        Ok(set[0].revents != 0)
    }
}

/// After a MSG_PEEK that showed a datagram the program must not see: consume it.
fn discard_peeked(fd: c_int, peek: bool) {
    if peek {
        let mut b = [0u8; 1];
        // SAFETY: b is writable; this discards the peeked datagram.
        unsafe { libc::recv(fd, b.as_mut_ptr() as *mut c_void, 1, libc::MSG_DONTWAIT) };
    }
}

/// The program's buffers got a datagram's bytes from offset 11 on; the first (up to 11)
/// bytes are in `head`. Shift the program's `tail_len` bytes right and put `head` in front,
/// within the buffers' capacity (bytes that no longer fit were beyond it anyway).
fn unshift(iov: &[iovec], head: &[u8], tail_len: usize) {
    let cap: usize = iov.iter().map(|v| v.iov_len).sum();
    let keep = tail_len.min(cap.saturating_sub(head.len()));
    if iov.len() == 1 {
        let base = iov[0].iov_base as *mut u8;
        // SAFETY: the program's buffer holds cap bytes; tail_len <= cap were written by the
        // kernel; keep + head.len() <= cap. ptr::copy handles the overlap.
        unsafe {
            std::ptr::copy(base, base.add(head.len()), keep);
            std::ptr::copy_nonoverlapping(head.as_ptr(), base, head.len().min(cap));
        }
        return;
    }
    // Several buffers: gather, then scatter back.
    let mut linear = Vec::with_capacity(head.len() + keep);
    linear.extend_from_slice(head);
    let mut left = keep;
    for v in iov {
        if left == 0 {
            break;
        }
        let take = v.iov_len.min(left);
        // SAFETY: the kernel wrote these bytes into the program's buffer.
        linear.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, take)
        });
        left -= take;
    }
    let mut off = 0;
    for v in iov {
        if off >= linear.len() {
            break;
        }
        let take = v.iov_len.min(linear.len() - off);
        // SAFETY: writing within the program's buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(linear[off..].as_ptr(), v.iov_base as *mut u8, take)
        };
        off += take;
    }
}

/// Where a datagram the program sends on a registered socket goes.
enum Plan {
    /// To a punched peer: a `From` frame carrying `me` straight to `direct`.
    Direct {
        dest: SocketAddrV4,
        direct: SocketAddrV4,
        me: SocketAddrV4,
    },
    /// To a relayed sender: a `To` frame through our proxy.
    Relay(SocketAddrV4, SocketAddrV4),
    /// To another registration's proxy: as is (the broker relays it), and ask for a
    /// punch (our proxy, the destination).
    Ask(SocketAddrV4, SocketAddrV4),
}

/// A msghdr over `name` and `iov` (our header in front of the program's buffers), with the
/// program's ancillary data buffer if it passed a msghdr (null: none). Valid while `name`
/// and `iov` live.
fn framed_msghdr(name: &mut sockaddr_in, iov: &mut [iovec], msg: *const msghdr) -> msghdr {
    // SAFETY: zeroed msghdr is valid; the fields we use are filled below.
    let mut mh: msghdr = unsafe { std::mem::zeroed() };
    mh.msg_name = name as *mut sockaddr_in as *mut c_void;
    mh.msg_namelen = std::mem::size_of::<sockaddr_in>() as socklen_t;
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

/// The GCBU header of a received datagram of `got` bytes (header included), if it has one.
fn frame_hdr(hdr: &[u8; UDP_HEADER_LEN], got: usize) -> Option<(UdpKind, SocketAddrV4, &[u8])> {
    (got >= UDP_HEADER_LEN).then(|| udp::parse(hdr)).flatten()
}

/// The first (up to 64) of the `len` bytes the kernel wrote into the program's buffers
/// (a punch frame's nonce).
fn gather(iov: &[iovec], len: usize) -> Vec<u8> {
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

/// Sends the program's datagram (`prog_iov`, its msghdr's control data if any) from
/// `fd` to `to`, behind a `kind` header carrying `addr`; returns the program's bytes
/// sent, or errno.
fn send_framed(
    fd: c_int,
    kind: UdpKind,
    addr: SocketAddrV4,
    to: SocketAddrV4,
    prog_iov: &[iovec],
    msg: *const msghdr,
    flags: c_int,
) -> Result<usize, c_int> {
    let hdr = udp::write_header(kind, addr);
    let mut iov = Vec::with_capacity(prog_iov.len() + 1);
    iov.push(iovec {
        iov_base: hdr.as_ptr() as *mut c_void,
        iov_len: hdr.len(),
    });
    iov.extend_from_slice(prog_iov);
    let mut name = net::to_sockaddr_in(to);
    let mh = framed_msghdr(&mut name, &mut iov, msg);
    // SAFETY: mh describes buffers valid for the call (ours and the program's).
    let n = unsafe { libc::sendmsg(fd, &mh, flags | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(errno());
    }
    Ok((n as usize).saturating_sub(UDP_HEADER_LEN))
}
