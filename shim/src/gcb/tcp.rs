//! GCB over TCP: `listen()` registers the socket with the broker, `getsockname()` and
//! `getpeername()` report the proxy and the logical peer, `accept()` returns brokered
//! connections in arrival order, and `connect()` to a proxy asks the broker for the route
//! (direct, reverse or relay) and makes that connection on the program's socket.
//!
//! A brokered connection reads like one the kernel accepted on the listener: it is dialed
//! in the listener's family, gets the options a kernel-accepted socket inherits from its
//! listener ([`super::accepted_opts`]), and its IP_PKTOPTIONS reports the arrival
//! interface (`GcbLayer::tcp_getsockopt`).

use gcb_proto::{Body, Route, Transport};
use libc::c_int;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abi::{AddrIn, AddrOut, OptOut, Outcome};
use crate::fdtable::{self, FdEntry};
use crate::net;
use crate::sockaddr::{self, SockAddrBuf};
use crate::sockstate::GcbSock;
use crate::sockstate::SockState;

use super::accepted_opts::{inherit_listener_options, mend_pktinfo};
use super::client::{self, Answer};
use super::core::{expired, gcb_state, slice_ms, GcbLayer};
use super::udp;

/// How long a `relay` decision for a proxy is reused without asking the broker again.
const RELAYED_TTL: Duration = Duration::from_secs(60);

impl GcbLayer {
    /// Return brokered connection `rfd` from accept4() with `flags`, as from `logical`,
    /// accepted on the listener `listener` (its proxy is the address the peer dialed; its
    /// family is the form the program expects addresses in).
    pub(super) fn accepted(
        &self,
        rfd: c_int,
        logical: SocketAddrV4,
        listener_fd: c_int,
        listener: &FdEntry,
        addr: AddrOut,
        flags: c_int,
    ) -> c_int {
        let family = listener.domain();
        inherit_listener_options(listener_fd, rfd, family);
        let proxy = match gcb_state(listener) {
            Some(GcbSock::Listener { proxy, .. }) => proxy,
            _ => SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0),
        };
        if flags & libc::SOCK_NONBLOCK != 0 {
            let _ = net::set_nonblocking(rfd, true);
        }
        // Inheritable unless accept4 asked otherwise.
        let cloexec = if flags & libc::SOCK_CLOEXEC != 0 {
            libc::FD_CLOEXEC as libc::c_ulong
        } else {
            0
        };
        let _ = crate::sys::fcntl_raw(rfd, libc::F_SETFD, cloexec);
        if let Some(e) = fdtable::socket_entry(rfd, None) {
            e.set_gcb(GcbSock::Accepted {
                peer: logical,
                proxy,
                family,
            });
        }
        sockaddr::write_out(addr, logical, family);
        crate::debug!("accept: brokered connection from {} as fd {}", logical, rfd);
        rfd
    }

    /// getsockopt on a managed TCP socket: a brokered connection's IP_PKTOPTIONS (and its
    /// IPv6 twin IPV6_2292PKTOPTIONS) with the arrival interface a connection the kernel
    /// accepted on the listener would report.
    ///
    /// Linux gives a socket it accepts the interface its SYN arrived on as its multicast
    /// interface (`tcp_v4_syn_recv_sock`/`tcp_v6_syn_recv_sock`: `mc_index`/`mcast_oif =
    /// inet_iif(skb)`), and these options, on a socket with IP_PKTINFO (or
    /// IPV6_RECVPKTINFO) set, report that as `ipi_ifindex` (`ip_sock_glue.c`,
    /// `ipv6_sockglue.c`); servers read it to know which interface a connection came in on.
    /// A dialed socket reports 0, and the kernel refuses to set the multicast interface of
    /// a stream socket (IP_MULTICAST_IF: EINVAL, IPV6_MULTICAST_IF: ENOPROTOOPT), so the
    /// answer is mended here: the interface that holds the connection's local address (the
    /// `ipi_addr` the kernel reports), which is where a connection to the listener's
    /// address arrives. The PKTINFO flag itself came from the listener
    /// ([`inherit_listener_options`]), so only programs that asked for it pay for this.
    pub(super) fn tcp_getsockopt(
        &self,
        fd: c_int,
        entry: &FdEntry,
        call: OptOut,
    ) -> Outcome<c_int> {
        let pktoptions = matches!(
            (call.level, call.opt),
            (libc::IPPROTO_IP, libc::IP_PKTOPTIONS)
                | (libc::IPPROTO_IPV6, libc::IPV6_2292PKTOPTIONS)
        );
        if !pktoptions || !matches!(gcb_state(entry), Some(GcbSock::Accepted { .. })) {
            return Outcome::Bypass("nothing to mend in this option");
        }
        if call.ptr.is_null() || call.len.is_null() {
            return Outcome::Bypass("no result buffer");
        }
        // SAFETY: the program's arguments, as it passed them (the guard sends our call to
        // the real function).
        if unsafe { libc::getsockopt(fd, call.level, call.opt, call.ptr, call.len) } != 0 {
            return Outcome::Error(net::errno());
        }
        // SAFETY: the kernel wrote `*call.len` bytes of control messages at `call.ptr`.
        unsafe { mend_pktinfo(call.ptr, *call.len) };
        Outcome::Handled(0)
    }

    /// Swap the connection `newfd` into the program's `fd`, keeping the program's
    /// O_NONBLOCK, FD_CLOEXEC and the socket options it is likely to have set.
    fn install_connection(&self, fd: c_int, newfd: c_int) -> Result<(), c_int> {
        let fl = crate::sys::fcntl_raw(fd, libc::F_GETFL, 0)?;
        let fdfl = crate::sys::fcntl_raw(fd, libc::F_GETFD, 0)?;
        for (level, opt) in [
            (libc::IPPROTO_TCP, libc::TCP_NODELAY),
            (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            (libc::SOL_SOCKET, libc::SO_OOBINLINE),
        ] {
            // The new socket has the defaults (0): copy only what the program changed.
            if let Some(v) = net::sock_opt(fd, level, opt).filter(|&v| v != 0) {
                net::set_sock_opt(newfd, level, opt, v);
            }
        }
        let cloexec = if fdfl & libc::FD_CLOEXEC != 0 {
            libc::O_CLOEXEC
        } else {
            0
        };
        // SAFETY: both are open fds of this process.
        if unsafe { libc::dup3(newfd, fd, cloexec) } < 0 {
            return Err(net::errno());
        }
        net::close(newfd);
        // The dialed socket is blocking now; restore O_NONBLOCK etc. if the program had them.
        if fl & libc::O_NONBLOCK != 0 || fl & libc::O_ASYNC != 0 {
            crate::sys::fcntl_raw(fd, libc::F_SETFL, fl as libc::c_ulong)?;
        }
        Ok(())
    }

    /// connect() through the relay: connect to the broker's relay port (racing attempts,
    /// so a lossy path costs little), present the id, and put the connection under the
    /// program's fd.
    fn connect_relay(
        &self,
        fd: c_int,
        relay: SocketAddrV4,
        id: &gcb_proto::ConnectId,
    ) -> Outcome<c_int> {
        let preamble = client::preamble(self.client.lock().key(), id);
        // In the program socket's family, so the connection it gets is of its own kind.
        let dialed = net::connect_race(
            relay,
            client::DIAL_SPACING,
            client::DIAL_TIMEOUT,
            true,
            net::domain(fd),
        );
        let r = dialed
            .and_then(
                |c| match net::write_all(c, &preamble, client::DIAL_TIMEOUT) {
                    Ok(()) => Ok(c),
                    Err(e) => {
                        net::close(c);
                        Err(e)
                    }
                },
            )
            .and_then(|c| match self.install_connection(fd, c) {
                Ok(()) => Ok(()),
                Err(e) => {
                    net::close(c);
                    Err(e)
                }
            });
        match r {
            Ok(()) => Outcome::Handled(0),
            Err(e) => {
                crate::warn!(
                    "relay connect to {} failed: {}",
                    relay,
                    std::io::Error::from_raw_os_error(e)
                );
                Outcome::Error(libc::ECONNREFUSED)
            }
        }
    }

    /// connect() by TCP hole punching ([`super::tcp_punch`]), the relay as the fallback:
    /// either way one connection under the program's fd before it writes a byte.
    fn connect_punch(
        &self,
        fd: c_int,
        dest: SocketAddrV4,
        relay: SocketAddrV4,
        leg: c_int,
        id: &gcb_proto::ConnectId,
        wait: Option<Duration>,
    ) -> Outcome<c_int> {
        let key = self.client.lock().key().cloned();
        let Some(key) = key else {
            net::close(leg);
            return Outcome::Bypass("a punch decision without a pool key");
        };
        let preamble = client::preamble(Some(&key), id);
        let bound =
            gcb_proto::token::present(Some(&key), gcb_proto::token::Use::Connect, id.as_bytes());
        let wait = wait.unwrap_or(super::tcp_punch::DEFAULT_PUNCH_WAIT);
        let started = Instant::now();
        let r =
            super::tcp_punch::connect(net::domain(fd), leg, relay, &preamble, &key, &bound, wait);
        let (conn, route) = match r {
            Ok(super::tcp_punch::Punched::Direct(c, peer)) => {
                (c, format!("punched (direct to {peer})"))
            }
            Ok(super::tcp_punch::Punched::Relay(c, why)) => {
                (c, format!("relay (punch failed: {why})"))
            }
            Err(why) => {
                crate::warn!("connect {}: punch and relay failed: {}", dest, why);
                return Outcome::Error(libc::ECONNREFUSED);
            }
        };
        crate::debug!(
            "connect {} route {} after {} us",
            dest,
            route,
            started.elapsed().as_micros()
        );
        match self.install_connection(fd, conn) {
            Ok(()) => Outcome::Handled(0),
            Err(e) => {
                net::close(conn);
                crate::warn!(
                    "connect {}: cannot install the connection: errno {}",
                    dest,
                    e
                );
                Outcome::Error(libc::ECONNREFUSED)
            }
        }
    }

    /// A direct connection to the listener's real address, bounded; Err if it failed and
    /// the caller should fall back to the proxy.
    fn connect_direct(&self, fd: c_int, addr: SocketAddrV4) -> Result<(), c_int> {
        let fl = crate::sys::fcntl_raw(fd, libc::F_GETFL, 0)?;
        let r = net::connect_timeout(fd, addr, Duration::from_secs(2));
        let _ = crate::sys::fcntl_raw(fd, libc::F_SETFL, fl as libc::c_ulong);
        if r.is_err() {
            // Reset the socket so it can connect again (AF_UNSPEC dissolves the attempt).
            // SAFETY: a zeroed sockaddr with family AF_UNSPEC is a valid argument.
            unsafe {
                let mut sa: libc::sockaddr = std::mem::zeroed();
                sa.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
                libc::connect(
                    fd,
                    &sa,
                    std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
                );
            }
        }
        r
    }

    /// Reverse: wait on `lsock` for the listener's dial-back presenting `id`.
    fn await_reverse(&self, lsock: c_int, id: &gcb_proto::ConnectId) -> Result<c_int, String> {
        let want = client::preamble(self.client.lock().key(), id);
        let deadline = Instant::now() + client::DIAL_TIMEOUT;
        while Instant::now() < deadline {
            let ready =
                net::wait_fd(lsock, libc::POLLIN, Duration::from_millis(20)).unwrap_or(false);
            self.client.lock().pump();
            if !ready {
                continue;
            }
            // SAFETY: null address arguments are allowed.
            let c = unsafe {
                libc::accept4(
                    lsock,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c < 0 {
                continue;
            }
            let mut got = [0u8; client::PREAMBLE_LEN];
            match net::read_exact(c, &mut got, client::DIAL_TIMEOUT) {
                Ok(()) if got[..] == want[..] => {
                    // The program's socket must not be close-on-exec unless it was.
                    let _ = crate::sys::fcntl_raw(c, libc::F_SETFD, 0);
                    return Ok(c);
                }
                _ => {
                    crate::warn!(
                        "dropped a reverse connection that did not present our connect id"
                    );
                    net::close(c);
                }
            }
        }
        Err("no dial-back in time".into())
    }

    /// A listener for a reversed connection, in `family` (the program socket's, so the
    /// connection it accepts is of the program's kind).
    fn reverse_listener(&self, local_ip: Ipv4Addr, family: c_int) -> Option<(c_int, SocketAddrV4)> {
        let s = net::socket_as(family, libc::SOCK_STREAM, false).ok()?;
        let ok = net::bind_as(s, SocketAddrV4::new(local_ip, 0), family).is_ok()
            // SAFETY: s is our socket.
            && unsafe { libc::listen(s, 4) } == 0;
        let addr = net::sock_name(s, false);
        match (ok, addr) {
            (true, Some(a)) => Some((s, a)),
            _ => {
                net::close(s);
                None
            }
        }
    }

    pub(super) fn tcp_listen(
        &self,
        fd: c_int,
        entry: Option<&Arc<FdEntry>>,
        backlog: c_int,
    ) -> Outcome<c_int> {
        if !net::is_tcp4(fd) {
            return Outcome::Bypass("not an IPv4 TCP socket");
        }
        if let Some(GcbSock::Listener { .. }) = entry.and_then(|e| gcb_state(e)) {
            return Outcome::Bypass("listen() again (backlog change): already registered");
        }
        if client::awaiting_registration()
            && entry.is_some_and(|e| self.client.lock().awaits_registration(e))
        {
            return Outcome::Bypass("listen() again: the AEH registers it later");
        }
        // SAFETY: plain syscall on the program's fd, as it asked.
        if unsafe { libc::listen(fd, backlog) } != 0 {
            return Outcome::Error(net::errno());
        }
        self.register_tcp(fd, entry);
        Outcome::Handled(0)
    }

    /// Registers the TCP socket `fd` (listening, or about to: see
    /// [`GcbLayer::register_public_bind`]) with the broker; on failure it serves locally and
    /// the AEH asks again.
    fn register_tcp(&self, fd: c_int, entry: Option<&Arc<FdEntry>>) {
        let Some(local) = net::sock_name(fd, false) else {
            return;
        };
        if local.ip().is_loopback() {
            return;
        }
        let mut c = self.client.lock();
        let (reg_local, listen_at) = if local.ip().is_unspecified() {
            let ip = c.route_ip().unwrap_or(Ipv4Addr::LOCALHOST);
            (
                SocketAddrV4::new(ip, local.port()),
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, local.port()),
            )
        } else {
            (local, local)
        };
        let Some(entry) = fdtable::socket_entry(fd, entry) else {
            return;
        };
        match c.register(reg_local, listen_at, &entry, fd) {
            Ok(proxy) => {
                entry.set_gcb(GcbSock::Listener {
                    proxy,
                    local: reg_local,
                });
                crate::info!(
                    "registered {} with broker {}: proxy {}",
                    reg_local,
                    proxy.ip(),
                    proxy
                );
            }
            Err(why) => {
                if why.starts_with("broker refused") {
                    crate::notice!(
                        Error,
                        RegisterRefused,
                        "listen on {}: {}; serving locally only (plain socket) (pid {})",
                        local,
                        why,
                        crate::control::getpid()
                    );
                } else {
                    crate::notice!(
                        Warn,
                        BrokerUnreachable,
                        "listen on {}: {}; serving locally only (plain socket) until the broker answers (pid {})",
                        local,
                        why,
                        crate::control::getpid()
                    );
                }
                // Fail open now, register when the broker answers (the AEH asks again).
                c.register_later(reg_local, listen_at, &entry);
            }
        }
    }

    /// A TCP socket the program bound to the host's public address (the shim bound it
    /// locally, see `Stack::on_bind`) registers at its first getsockname(), before
    /// listen(): programs that bind to the address they advertise read the port to
    /// advertise right after bind() (curl's active FTP reads it between bind() and
    /// listen()), and that port must be the proxy's.
    pub fn register_public_bind(&self, fd: c_int, entry: &Arc<FdEntry>) {
        let was_public_bind = entry.with_state(|s| {
            let yes = matches!(s, SockState::PublicBind);
            if yes {
                *s = SockState::Plain;
            }
            yes
        });
        // Not a socket that connected instead of listening (it has no listener to serve).
        if was_public_bind == Some(true) && net::is_tcp4(fd) && net::sock_name(fd, true).is_none() {
            self.register_tcp(fd, Some(entry));
        }
    }

    pub(super) fn tcp_name(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        peer: bool,
        addr: AddrOut,
    ) -> Outcome<c_int> {
        if !peer {
            self.settle_pending_udp(fd, entry);
            self.register_public_bind(fd, entry);
        }
        let family = entry.domain();
        match (gcb_state(entry), peer) {
            (Some(GcbSock::Listener { proxy, .. }), false) => {
                sockaddr::write_out(addr, proxy, family);
                Outcome::Handled(0)
            }
            (Some(GcbSock::Accepted { peer, family, .. }), true) => {
                sockaddr::write_out(addr, peer, family);
                Outcome::Handled(0)
            }
            // The address the peer dialed: the listener's proxy (see the identity model
            // in docs/architecture.md); GCB_PUBLIC_NAMES=0 reports the real one.
            (Some(GcbSock::Accepted { proxy, family, .. }), false)
                if crate::layer::public_names() && proxy.port() != 0 =>
            {
                sockaddr::write_out(addr, proxy, family);
                Outcome::Handled(0)
            }
            _ => match (udp::state(entry), peer) {
                (Some((proxy, _)), false) => {
                    sockaddr::write_out(addr, proxy, family);
                    Outcome::Handled(0)
                }
                (Some((_, Some(p))), true) => {
                    sockaddr::write_out(addr, p, family);
                    Outcome::Handled(0)
                }
                _ => Outcome::Bypass("not a GCB listener or accepted connection"),
            },
        }
    }

    pub(super) fn tcp_accept(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        addr: AddrOut,
        flags: c_int,
    ) -> Outcome<c_int> {
        let mut proxy = match gcb_state(entry) {
            Some(GcbSock::Listener { proxy, .. }) => Some(proxy),
            // Not registered yet: the AEH must run while the program waits in accept(),
            // or the retry that registers it never comes.
            _ if client::awaiting_registration()
                && self.client.lock().awaits_registration(entry) =>
            {
                None
            }
            _ => return Outcome::Bypass("not a GCB listener or accepted connection"),
        };
        let nonblock = net::is_nonblocking(fd);
        let deadline = (!nonblock)
            .then(|| net::rcv_timeout(fd))
            .flatten()
            .and_then(|t| Instant::now().checked_add(t));
        loop {
            if expired(deadline) {
                return Outcome::Error(libc::EAGAIN);
            }
            if let Some(GcbSock::Listener { proxy: p, .. }) = gcb_state(entry) {
                proxy = Some(p); // registered meanwhile (or again, with a new proxy)
            }
            let (aeh, direct) = {
                let mut c = self.client.lock();
                if c.needs_aeh() {
                    let direct = match proxy {
                        Some(p) if !nonblock => c.pump_for_accept(p),
                        _ => {
                            c.pump();
                            None
                        }
                    };
                    (Some((c.aeh_fds(), c.next_wakeup())), direct)
                } else {
                    (None, None)
                }
            };
            if let Some((rfd, logical)) = direct {
                return Outcome::Handled(self.accepted(rfd, logical, fd, entry, addr, flags));
            }
            if !nonblock {
                let (ours, wake) = aeh.unwrap_or_default();
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
                let ms = slice_ms(deadline, wake);
                // SAFETY: set is a valid pollfd array of its length.
                let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, ms) };
                if r < 0 {
                    return Outcome::Error(net::errno());
                }
                if set[0].revents == 0 {
                    continue;
                }
            }
            // Room for either family: a dual-stack listener gets `::ffff:` peers (and
            // native IPv6 ones, which are never placeholders).
            let mut from = SockAddrBuf::empty();
            // SAFETY: `from` is writable storage of the length it reports.
            let n = unsafe { libc::accept4(fd, from.as_mut_ptr(), from.len_mut(), flags) };
            if n < 0 {
                let e = net::errno();
                if e == libc::EAGAIN && !nonblock {
                    continue; // another process took it
                }
                return Outcome::Error(e);
            }
            let taken = from
                .v4()
                .and_then(|peer| self.client.lock().take_ready(peer));
            let Some((rfd, logical)) = taken else {
                // A kernel connection: whatever the table held for its number is stale
                // (the accept hook leaves the fds its layer returns alone).
                drop(fdtable::remove(n));
                sockaddr::copy_out(addr, &from);
                return Outcome::Handled(n);
            };
            net::close(n);
            return Outcome::Handled(self.accepted(rfd, logical, fd, entry, addr, flags));
        }
    }

    pub(super) fn tcp_connect(
        &self,
        fd: c_int,
        entry: Option<&Arc<FdEntry>>,
        addr: AddrIn,
    ) -> Outcome<c_int> {
        if let Some(e) = entry.filter(|e| udp::state(e).is_some()) {
            return self.udp_connect(fd, e, net::addr_in(addr));
        }
        let Some(dest) = net::addr_in(addr) else {
            return Outcome::Bypass("not an IPv4 destination");
        };
        if net::never_brokered(*dest.ip()) {
            return Outcome::Bypass("destination never brokered (loopback, multicast...)");
        }
        let (broker, local_ip, punch) = {
            let mut c = self.client.lock();
            // The broker of the pool whose IP the destination is on owns it (if a proxy).
            let Some(broker) = c.owner_of(dest).filter(|_| !c.is_negative(dest)) else {
                return Outcome::Bypass("not a proxy on a broker (or known not to be one)");
            };
            if c.relayed
                .get(&dest)
                .is_some_and(|until| *until > Instant::now())
            {
                // The broker relayed this proxy a moment ago, so it will again: connecting
                // to the proxy address as a plain client is that same relay (onto the
                // listener's standby), without the request round trip.
                crate::debug!(
                    "connect {} route relay (through the proxy: broker {} relayed it lately)",
                    dest,
                    broker
                );
                return Outcome::Bypass("broker unreachable: connecting plainly");
            }
            (broker, c.route_ip_to(broker), c.punch_wait())
        };
        if !net::is_tcp4(fd) {
            return Outcome::Bypass("not an IPv4 TCP socket");
        }
        let local_ip = local_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        // Offer a reverse connection only when we look reachable (not a private address).
        let rev = (!net::is_private(local_ip) && !local_ip.is_unspecified())
            .then(|| self.reverse_listener(local_ip, net::domain(fd)))
            .flatten();
        // A connector that may be told to punch dials its leg to the relay port now, so
        // the handshake overlaps the request (closed unread if the decision is another).
        let leg = (punch.is_some() && rev.is_none())
            .then(|| super::tcp_punch::dial_leg(net::domain(fd), local_ip, broker).ok())
            .flatten();
        let close_leg = || {
            if let Some(l) = leg {
                net::close(l);
            }
        };
        let body = Body::ConnectRequest {
            proxy: SocketAddr::V4(dest),
            transport: Transport::Tcp,
            connector_local: SocketAddr::V4(SocketAddrV4::new(local_ip, 0)),
            connector_listen: rev.map(|r| SocketAddr::V4(r.1)),
            punch: punch.is_some(),
        };
        let answer = self
            .client
            .lock()
            .request_to(broker, body, client::CONNECT_DEADLINE);
        let close_rev = || {
            if let Some((s, _)) = rev {
                net::close(s);
            }
            close_leg();
        };
        let route = match answer {
            Ok(Answer::Body(Body::ConnectDecision { route })) => {
                let mut c = self.client.lock();
                if matches!(route, Route::Relay { .. }) {
                    if c.relayed.len() >= 1024 {
                        let now = Instant::now();
                        c.relayed.retain(|_, until| *until > now);
                    }
                    c.relayed.insert(dest, Instant::now() + RELAYED_TTL);
                } else {
                    c.relayed.remove(&dest);
                }
                route
            }
            Ok(Answer::Body(Body::Error { code, reason })) => {
                close_rev();
                crate::debug!(
                    "broker {} on {}: {:?} {}; connecting plainly",
                    broker,
                    dest,
                    code,
                    reason
                );
                if code == gcb_proto::ErrorCode::NoSuchRegistration {
                    self.client.lock().mark_negative(dest);
                }
                return Outcome::Bypass("no such registration at the broker: connecting plainly");
            }
            Ok(Answer::Timeout) | Err(_) => {
                close_rev();
                crate::warn!(
                    "broker {} did not answer for {}; connecting plainly",
                    broker,
                    dest
                );
                self.client.lock().mark_negative(dest);
                return Outcome::Bypass("broker did not answer: connecting plainly");
            }
            Ok(Answer::Body(other)) => {
                close_rev();
                crate::warn!(
                    "unexpected broker answer {}; connecting plainly",
                    other.type_name()
                );
                return Outcome::Bypass("unexpected broker answer: connecting plainly");
            }
        };
        crate::debug!("connect {} via broker {}: {:?}", dest, broker, route);
        match route {
            Route::Direct { addr } => {
                close_rev();
                let Some(a) = net::v4(addr) else {
                    return Outcome::Bypass("direct route to a non-IPv4 address");
                };
                match self.connect_direct(fd, a) {
                    Ok(()) => {
                        crate::debug!("connect {} route direct (to {})", dest, a);
                        Outcome::Handled(0)
                    }
                    Err(e) => {
                        crate::info!(
                            "direct connect to {} failed ({}); using the proxy {}",
                            a,
                            std::io::Error::from_raw_os_error(e),
                            dest
                        );
                        Outcome::Bypass("direct route failed: connecting to the proxy")
                    }
                }
            }
            Route::Relay { addr, connect_id } => {
                close_rev();
                match net::v4(addr) {
                    Some(relay) => {
                        crate::debug!("connect {} route relay (through {})", dest, relay);
                        self.connect_relay(fd, relay, &connect_id)
                    }
                    None => Outcome::Bypass("relay address is not IPv4"),
                }
            }
            Route::Punch { addr, connect_id } => {
                if let Some((s, _)) = rev {
                    net::close(s);
                }
                let leg = match (net::v4(addr), leg) {
                    (Some(relay), Some(l)) if relay == broker => Ok(l),
                    (Some(relay), l) => {
                        // Not where the leg went (or none was dialed): dial it now.
                        if let Some(l) = l {
                            net::close(l);
                        }
                        super::tcp_punch::dial_leg(net::domain(fd), local_ip, relay)
                    }
                    (None, l) => {
                        if let Some(l) = l {
                            net::close(l);
                        }
                        return Outcome::Bypass("relay address is not IPv4");
                    }
                };
                match (leg, net::v4(addr)) {
                    (Ok(leg), Some(relay)) => {
                        self.connect_punch(fd, dest, relay, leg, &connect_id, punch)
                    }
                    (Err(e), _) => {
                        crate::warn!("connect {}: relay leg: {}", dest, net::errstr(e));
                        Outcome::Error(libc::ECONNREFUSED)
                    }
                    (Ok(leg), None) => {
                        net::close(leg);
                        Outcome::Bypass("relay address is not IPv4")
                    }
                }
            }
            Route::Reverse { connect_id } => {
                close_leg();
                let Some((lsock, _)) = rev else {
                    return Outcome::Bypass("no reverse listener: connecting to the proxy");
                };
                let got = self.await_reverse(lsock, &connect_id);
                net::close(lsock);
                match got.map(|c| (c, self.install_connection(fd, c))) {
                    Ok((_, Ok(()))) => {
                        crate::debug!("connect {} route reverse", dest);
                        Outcome::Handled(0)
                    }
                    Ok((c, Err(e))) => {
                        net::close(c);
                        crate::warn!(
                            "reverse connection could not replace fd {}: errno {}",
                            fd,
                            e
                        );
                        Outcome::Bypass("reverse connection not made: connecting to the proxy")
                    }
                    Err(why) => {
                        crate::info!("reverse connection for {}: {}; using the proxy", dest, why);
                        Outcome::Bypass("reverse connection not made: connecting to the proxy")
                    }
                }
            }
        }
    }
}
