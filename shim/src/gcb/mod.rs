//! The GCB client layer (paper section 4.2.1), active when `GCB_BROKER` is set.
//!
//! * `listen()` on an IPv4 TCP socket registers it with the broker, which opens a proxy
//!   socket; from then on `getsockname()` reports the proxy address, the address the
//!   program will advertise. If the broker does not answer (or refuses), listen() still
//!   succeeds and the socket serves locally (one log line); the AEH asks again, after 1 s
//!   and then twice as long each time up to 30 s, and from the registration on
//!   `getsockname()` reports the proxy.
//! * The broker's `connect_back` arrives on the process's control socket while the
//!   program waits in accept/select/poll/epoll (the AEH runs inside those calls). The
//!   shim dials out (to the connector for a reversed connection, to the broker's relay
//!   port otherwise; never to loopback, private, link-local or multicast addresses other
//!   than the broker's own, and without ever waiting for the dial in the program's call:
//!   see [`dial`]), presents the single-use connect id, and then makes a loopback
//!   *placeholder* connection to the program's own listening socket, so the kernel's
//!   accept queue holds an entry in arrival order and every readiness call wakes up as
//!   for a kernel connection. The interposed `accept()` recognises the placeholder by
//!   its source address, closes it and returns the brokered connection instead, with the
//!   logical peer as its address (also from `getpeername()`). When the program is
//!   blocked in `accept()` on that very listener, the connection is returned directly.
//! * Faster still, the registering process keeps a *standby* connection parked at the
//!   broker's relay port ([`standby`]): a connection to the proxy is spliced onto it at
//!   once (the broker writes a 12-byte claim, the AEH acks and hands it over as above),
//!   without the `connect_back` datagram and the dial; `connect_back` is the fallback.
//! * `connect()` to an address on the broker's IP asks the broker how: `direct` (connect
//!   to the listener's real address), `reverse` (we listen, the listener dials us and
//!   presents the connect id), or `relay` (connect to the broker's relay port and present
//!   the connect id). Destinations the broker does not know, and an unreachable broker,
//!   are remembered for a minute (negative cache), so a plain connect is delayed once.
//!   A proxy the broker just *relayed* is also remembered for a minute: connecting to
//!   it plainly is that same relay (through the proxy socket, onto the standby), so the
//!   process's next connects skip the question.
//!
//! * A bound UDP socket registers too (port 0: at its first getsockname() or send to the
//!   broker's host); see [`udp`] (relay frames, keepalives, the
//!   receiver list).
//! * Shared sockets (see [`client`]): the registration channel and a mailbox of
//!   brokered connections are inherited across fork and handed across exec
//!   (`GCB_INHERIT`, see [`inherit`]), so every process holding a registered TCP listener
//!   or UDP socket can serve it and keep it alive; the registration ends when no process
//!   holds the socket.
//!
//! * UDP between two registered GCB sockets punches a hole through both NATs ([`punch`]);
//!   the relay carries the first datagrams and everything where punching fails. The
//!   shim's own datagrams on a registered UDP socket never make it readable for the
//!   program: select/poll and epoll ([`udp_epoll`]) hide readiness they alone caused.
//!
//! Limits today: IPv4 only; one broker per process; no TCP hole punching (TCP between
//! two private networks goes through the broker's relay); `execl*`/`posix_spawn` get no
//! handoff.

pub mod client;
pub mod dial;
pub mod inherit;
pub mod punch;
pub mod standby;
pub mod udp;
pub mod udp_epoll;

use gcb_proto::{Body, Route, Transport};
use libc::{c_int, ssize_t};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fdtable::{self, FdEntry};
use crate::forklock::ForkMutex;
use crate::layer::{AddrIn, AddrOut, IoCall, Layer, Outcome, WaitCall};
use crate::net;
use client::{Answer, Client};

/// Default broker control port (UDP; the relay is TCP on the same port).
pub const DEFAULT_BROKER_PORT: u16 = 9650;
/// How long a `relay` decision for a proxy is reused without asking the broker again.
const RELAYED_TTL: Duration = Duration::from_secs(60);

/// Tag of our control socket in a program's epoll set.
const EPOLL_TAG: u64 = 0x6763_625f_6374_6c00; // "gcb_ctl\0"

pub use crate::sockstate::GcbSock;

pub struct GcbLayer {
    client: ForkMutex<Client>,
}

/// Parse `IP[:PORT]`.
pub fn parse_broker(s: &str) -> Option<SocketAddrV4> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddrV4>() {
        return Some(a);
    }
    s.parse::<Ipv4Addr>()
        .ok()
        .map(|ip| SocketAddrV4::new(ip, DEFAULT_BROKER_PORT))
}

fn gcb_state(entry: &FdEntry) -> Option<GcbSock> {
    entry.with_state(|s| s.gcb()).flatten()
}

/// A program-side deadline from a poll-style timeout (ms, -1 infinite, -2: use `ts`).
fn deadline_of(timeout_ms: c_int, ts: *const libc::timespec) -> Option<Instant> {
    let d = if timeout_ms == -2 {
        if ts.is_null() {
            return None;
        }
        // SAFETY: the program passed a valid timespec pointer to ppoll/epoll_pwait2.
        let t = unsafe { *ts };
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    } else if timeout_ms < 0 {
        return None;
    } else {
        Duration::from_millis(timeout_ms as u64)
    };
    // A timeout too large for the clock (some programs pass LONG_MAX for "forever") is
    // no deadline at all.
    Instant::now().checked_add(d)
}

/// The slice to wait now: until the program's deadline or the AEH's next timer.
fn slice_ms(deadline: Option<Instant>, wake: Option<Instant>) -> c_int {
    let t = match (deadline, wake) {
        (None, None) => return -1,
        (Some(a), None) | (None, Some(a)) => a,
        (Some(a), Some(b)) => a.min(b),
    };
    net::ms_ceil(t.saturating_duration_since(Instant::now()))
}

fn expired(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

impl GcbLayer {
    pub fn new(
        broker: SocketAddrV4,
        key: Option<gcb_proto::PoolKey>,
        heartbeat: Duration,
        standby: bool,
    ) -> GcbLayer {
        GcbLayer {
            client: ForkMutex::new(Client::new(broker, key, heartbeat, standby)),
        }
    }

    pub fn client(&self) -> &ForkMutex<Client> {
        &self.client
    }

    /// Run the AEH once if this process has something to serve; returns the fds it
    /// waits on and its next timer.
    pub(crate) fn pump(&self) -> Option<(Vec<c_int>, Option<Instant>)> {
        let mut c = self.client.lock();
        if !c.needs_aeh() {
            return None;
        }
        c.pump();
        Some((c.aeh_fds(), c.next_wakeup()))
    }

    /// AEH state for a wait: the fds it waits on and its next timer, if it must run.
    fn aeh(&self) -> Option<(Vec<c_int>, Option<Instant>)> {
        let c = self.client.lock();
        if !c.needs_aeh() {
            return None;
        }
        Some((c.aeh_fds(), c.next_wakeup()))
    }

    /// The `GCB_INHERIT` value for an exec, if registered sockets survive it.
    pub fn handoff(&self) -> Option<String> {
        let pending = udp::pending_handoff();
        let regs = self.client.lock().handoff();
        if pending.is_empty() {
            return regs;
        }
        let mut v = regs.unwrap_or_else(|| inherit::VERSION.to_owned());
        for p in pending {
            v.push(';');
            v.push_str(&p);
        }
        Some(v)
    }

    /// At init of an exec'd image: adopt the registrations handed over in `spec`.
    pub fn adopt(&self, spec: &str) {
        udp::adopt_pending(spec);
        for (fd, transport, local, proxy) in self.client.lock().adopt(spec) {
            match transport {
                Transport::Tcp => crate::info!(
                    "inherited registration of fd {} ({}) as proxy {}",
                    fd,
                    local,
                    proxy
                ),
                Transport::Udp => crate::info!(
                    "inherited udp registration of fd {} ({}) as proxy {}",
                    fd,
                    local,
                    proxy
                ),
            }
        }
    }

    /// Return brokered connection `rfd` from accept4() with `flags`, as from `logical`.
    fn accepted(&self, rfd: c_int, logical: SocketAddrV4, addr: AddrOut, flags: c_int) -> c_int {
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
            e.set_gcb(GcbSock::Accepted { peer: logical });
        }
        net::write_addr_out(addr, logical);
        crate::debug!("accept: brokered connection from {} as fd {}", logical, rfd);
        rfd
    }

    fn wait_poll(
        &self,
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        timeout_ms: c_int,
        ts: *const libc::timespec,
        sigmask: *const libc::sigset_t,
    ) -> Outcome<c_int> {
        let Some((ours, mut wake)) = self.aeh() else {
            return Outcome::Bypass("no GCB management sockets to watch");
        };
        let deadline = deadline_of(timeout_ms, ts);
        let n = nfds as usize;
        let mut set: Vec<libc::pollfd> = Vec::with_capacity(n + 1);
        if n > 0 {
            // SAFETY: the program passed `nfds` valid pollfd entries at `fds`.
            set.extend_from_slice(unsafe { std::slice::from_raw_parts(fds, n) });
        }
        set.extend(ours.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        loop {
            let ms = slice_ms(deadline, wake);
            let tspec = (ms >= 0).then(|| libc::timespec {
                tv_sec: (ms / 1000) as libc::time_t,
                tv_nsec: ((ms % 1000) as libc::c_long) * 1_000_000,
            });
            let tptr = tspec
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: set is a valid pollfd array of its length; tptr/sigmask are null or
            // valid for the call.
            let r =
                unsafe { libc::ppoll(set.as_mut_ptr(), set.len() as libc::nfds_t, tptr, sigmask) };
            if r < 0 {
                return Outcome::Error(net::errno());
            }
            let aeh_ready = set[n..].iter().any(|p| p.revents != 0);
            if aeh_ready || r == 0 {
                for p in &mut set[n..] {
                    p.revents = 0;
                }
                wake = self.pump().and_then(|(_, w)| w);
            }
            for p in set[..n].iter_mut() {
                if p.revents & libc::POLLIN != 0 && !self.udp_has_program_data(p.fd) {
                    // Only the shim's own datagrams were queued (now handled).
                    p.revents &= !(libc::POLLIN | libc::POLLRDNORM);
                }
            }
            let ready = set[..n].iter().filter(|p| p.revents != 0).count();
            if ready > 0 || expired(deadline) {
                if n > 0 {
                    // SAFETY: as above, `fds` holds `n` writable entries.
                    let out = unsafe { std::slice::from_raw_parts_mut(fds, n) };
                    for (o, s) in out.iter_mut().zip(&set[..n]) {
                        o.revents = s.revents;
                    }
                }
                return Outcome::Handled(ready as c_int);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_select(
        &self,
        nfds: c_int,
        read: *mut libc::fd_set,
        write: *mut libc::fd_set,
        except: *mut libc::fd_set,
        deadline: Option<Instant>,
        sigmask: *const libc::sigset_t,
        tv_out: *mut libc::timeval,
    ) -> Outcome<c_int> {
        let Some((ours, mut wake)) = self.aeh() else {
            return Outcome::Bypass("no GCB management sockets to watch");
        };
        let ours: Vec<c_int> = ours
            .into_iter()
            .filter(|&fd| fd < libc::FD_SETSIZE as c_int)
            .collect();
        let Some(&top) = ours.iter().max() else {
            return Outcome::Bypass("no management socket fits in an fd_set");
        };
        // SAFETY: fd_set is plain data; copies of the program's sets (null = empty/absent).
        let copy = |p: *mut libc::fd_set| (!p.is_null()).then(|| unsafe { *p });
        let (r0, w0, e0) = (copy(read), copy(write), copy(except));
        loop {
            // SAFETY: zeroed fd_set is the empty set.
            let mut rs: libc::fd_set = r0.unwrap_or_else(|| unsafe { std::mem::zeroed() });
            let mut ws = w0;
            let mut es = e0;
            for &fd in &ours {
                // SAFETY: fd < FD_SETSIZE, filtered above.
                unsafe { libc::FD_SET(fd, &mut rs) };
            }
            let ms = slice_ms(deadline, wake);
            let tspec = (ms >= 0).then(|| libc::timespec {
                tv_sec: (ms / 1000) as libc::time_t,
                tv_nsec: ((ms % 1000) as libc::c_long) * 1_000_000,
            });
            let tptr = tspec
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            let wp = ws.as_mut().map_or(std::ptr::null_mut(), |s| s as *mut _);
            let ep = es.as_mut().map_or(std::ptr::null_mut(), |s| s as *mut _);
            // SAFETY: all set pointers are null or point at local fd_sets; nfds covers ours.
            let r = unsafe { libc::pselect(nfds.max(top + 1), &mut rs, wp, ep, tptr, sigmask) };
            if r < 0 {
                return Outcome::Error(net::errno());
            }
            let mut ctl_ready = false;
            for &fd in &ours {
                // SAFETY: rs is a valid set and fd < FD_SETSIZE.
                unsafe {
                    if libc::FD_ISSET(fd, &rs) {
                        ctl_ready = true;
                        libc::FD_CLR(fd, &mut rs);
                    }
                }
            }
            if ctl_ready || r == 0 {
                wake = self.pump().and_then(|(_, w)| w);
            }
            if r0.is_some() {
                for fd in 0..nfds.min(libc::FD_SETSIZE as c_int) {
                    // SAFETY: fd < FD_SETSIZE; rs is a valid set.
                    if unsafe { libc::FD_ISSET(fd, &rs) } && !self.udp_has_program_data(fd) {
                        // Only the shim's own datagrams were queued (now handled).
                        // SAFETY: as above.
                        unsafe { libc::FD_CLR(fd, &mut rs) };
                    }
                }
            }
            let count = |s: &libc::fd_set| {
                // SAFETY: i < nfds <= FD_SETSIZE (the program's own contract).
                (0..nfds)
                    .filter(|&i| unsafe { libc::FD_ISSET(i, s) })
                    .count()
            };
            let ready = (r0.map(|_| count(&rs)).unwrap_or(0))
                + ws.as_ref().map_or(0, count)
                + es.as_ref().map_or(0, count);
            if ready > 0 || expired(deadline) {
                // SAFETY: each non-null program pointer is a writable fd_set.
                unsafe {
                    if !read.is_null() {
                        *read = rs;
                    }
                    if let Some(s) = ws {
                        *write = s;
                    }
                    if let Some(s) = es {
                        *except = s;
                    }
                    if !tv_out.is_null() {
                        let left = deadline
                            .map(|d| d.saturating_duration_since(Instant::now()))
                            .unwrap_or_default();
                        (*tv_out).tv_sec = left.as_secs() as libc::time_t;
                        (*tv_out).tv_usec = left.subsec_micros() as libc::suseconds_t;
                    }
                }
                return Outcome::Handled(ready as c_int);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_epoll(
        &self,
        epfd: c_int,
        events: *mut libc::epoll_event,
        maxevents: c_int,
        timeout_ms: c_int,
        ts: *const libc::timespec,
        sigmask: *const libc::sigset_t,
    ) -> Outcome<c_int> {
        let Some((ours, mut wake)) = self.aeh() else {
            return Outcome::Bypass("no GCB management sockets to watch");
        };
        if maxevents <= 0 || events.is_null() {
            return Outcome::Bypass("no room for events: the kernel reports the error");
        }
        {
            let mut c = self.client.lock();
            let watch = c.watch_fd();
            for fd in ours {
                // Added on every wait (EEXIST is the usual answer): a cache keyed by the
                // epoll fd's number would go stale when the program closes the epoll set
                // and a new one gets the same number. The standby watch is edge-triggered
                // (see `standby`: a fork child sharing the set must not spin on it).
                let edge = if Some(fd) == watch {
                    libc::EPOLLET as u32
                } else {
                    0
                };
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32 | edge,
                    u64: EPOLL_TAG,
                };
                // SAFETY: ev is a valid epoll_event; failure (EEXIST etc.) is harmless.
                let r = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
                if r == 0 || net::errno() == libc::EEXIST {
                    c.epolls.insert((epfd, fd));
                } else {
                    return Outcome::Bypass("cannot add the management sockets to this epoll set");
                }
            }
        }
        let deadline = deadline_of(timeout_ms, ts);
        loop {
            let ms = slice_ms(deadline, wake);
            // SAFETY: events holds maxevents writable entries (program's contract).
            let r = unsafe { libc::epoll_pwait(epfd, events, maxevents, ms, sigmask) };
            if r < 0 {
                return Outcome::Error(net::errno());
            }
            // SAFETY: the kernel filled `r` entries.
            let evs = unsafe { std::slice::from_raw_parts_mut(events, r as usize) };
            let mut kept = 0;
            let mut ours = false;
            for i in 0..evs.len() {
                if evs[i].u64 == EPOLL_TAG {
                    ours = true;
                } else {
                    evs[kept] = evs[i];
                    kept += 1;
                }
            }
            if ours || r == 0 {
                wake = self.pump().and_then(|(_, w)| w);
            }
            let kept = self.hide_shim_only_readiness(epfd, &mut evs[..kept]);
            if kept > 0 || expired(deadline) {
                return Outcome::Handled(kept as c_int);
            }
        }
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
        let dialed = net::connect_race(relay, client::DIAL_SPACING, client::DIAL_TIMEOUT, true);
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

    fn reverse_listener(&self, local_ip: Ipv4Addr) -> Option<(c_int, SocketAddrV4)> {
        let s = net::socket(libc::SOCK_STREAM, false).ok()?;
        let ok = net::bind(s, SocketAddrV4::new(local_ip, 0)).is_ok()
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
}

impl Layer for GcbLayer {
    fn name(&self) -> &'static str {
        "gcb"
    }

    fn on_listen(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, backlog: c_int) -> Outcome<c_int> {
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
        let Some(local) = net::sock_name(fd, false) else {
            return Outcome::Handled(0);
        };
        if local.ip().is_loopback() {
            return Outcome::Handled(0);
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
            return Outcome::Handled(0);
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
                    c.broker,
                    proxy
                );
            }
            Err(why) => {
                crate::warn!("listen on {}: {}; serving locally only", local, why);
                // Fail open now, register when the broker answers (the AEH asks again).
                c.register_later(reg_local, listen_at, &entry);
            }
        }
        Outcome::Handled(0)
    }

    fn on_name(
        &self,
        fd: c_int,
        entry: &Arc<FdEntry>,
        peer: bool,
        addr: AddrOut,
    ) -> Outcome<c_int> {
        if !peer {
            self.settle_pending_udp(fd, entry);
        }
        match (gcb_state(entry), peer) {
            (Some(GcbSock::Listener { proxy, .. }), false) => {
                net::write_addr_out(addr, proxy);
                Outcome::Handled(0)
            }
            (Some(GcbSock::Accepted { peer }), true) => {
                net::write_addr_out(addr, peer);
                Outcome::Handled(0)
            }
            _ => match (udp::state(entry), peer) {
                (Some((proxy, _)), false) => {
                    net::write_addr_out(addr, proxy);
                    Outcome::Handled(0)
                }
                (Some((_, Some(p))), true) => {
                    net::write_addr_out(addr, p);
                    Outcome::Handled(0)
                }
                _ => Outcome::Bypass("not a GCB listener or accepted connection"),
            },
        }
    }

    fn on_accept(
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
                return Outcome::Handled(self.accepted(rfd, logical, addr, flags));
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
            // SAFETY: zeroed sockaddr_in is valid; len describes it.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: sin/len describe a writable sockaddr_in.
            let n = unsafe {
                libc::accept4(
                    fd,
                    &mut sin as *mut _ as *mut libc::sockaddr,
                    &mut len,
                    flags,
                )
            };
            if n < 0 {
                let e = net::errno();
                if e == libc::EAGAIN && !nonblock {
                    continue; // another process took it
                }
                return Outcome::Error(e);
            }
            let peer = net::from_sockaddr_in(&sin);
            let taken = {
                let mut c = self.client.lock();
                c.take_ready(peer)
            };
            let Some((rfd, logical)) = taken else {
                net::write_addr_out(addr, peer);
                return Outcome::Handled(n);
            };
            net::close(n);
            return Outcome::Handled(self.accepted(rfd, logical, addr, flags));
        }
    }

    fn on_connect(&self, fd: c_int, entry: Option<&Arc<FdEntry>>, addr: AddrIn) -> Outcome<c_int> {
        if let Some(e) = entry.filter(|e| udp::state(e).is_some()) {
            return self.udp_connect(fd, e, net::addr_in(addr));
        }
        let Some(dest) = net::addr_in(addr) else {
            return Outcome::Bypass("not an IPv4 destination");
        };
        if net::never_brokered(*dest.ip()) {
            return Outcome::Bypass("destination never brokered (loopback, multicast...)");
        }
        let (broker, local_ip) = {
            let mut c = self.client.lock();
            if *dest.ip() != *c.broker.ip() || dest.port() == c.broker.port() || c.is_negative(dest)
            {
                return Outcome::Bypass("not a proxy on the broker (or known not to be one)");
            }
            if c.relayed
                .get(&dest)
                .is_some_and(|until| *until > Instant::now())
            {
                // The broker relayed this proxy a moment ago, so it will again: connecting
                // to the proxy address as a plain client is that same relay (onto the
                // listener's standby), without the request round trip.
                crate::debug!(
                    "connect {} via broker {}: Relay (proxy, cached)",
                    dest,
                    c.broker
                );
                return Outcome::Bypass("broker unreachable: connecting plainly");
            }
            (c.broker, c.route_ip())
        };
        if !net::is_tcp4(fd) {
            return Outcome::Bypass("not an IPv4 TCP socket");
        }
        let local_ip = local_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        // Offer a reverse connection only when we look reachable (not a private address).
        let rev = (!net::is_private(local_ip) && !local_ip.is_unspecified())
            .then(|| self.reverse_listener(local_ip))
            .flatten();
        let body = Body::ConnectRequest {
            proxy: SocketAddr::V4(dest),
            transport: Transport::Tcp,
            connector_local: SocketAddr::V4(SocketAddrV4::new(local_ip, 0)),
            connector_listen: rev.map(|r| SocketAddr::V4(r.1)),
        };
        let answer = self.client.lock().request(body, client::CONNECT_DEADLINE);
        let close_rev = || {
            if let Some((s, _)) = rev {
                net::close(s);
            }
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
                    Ok(()) => Outcome::Handled(0),
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
                    Some(relay) => self.connect_relay(fd, relay, &connect_id),
                    None => Outcome::Bypass("relay address is not IPv4"),
                }
            }
            Route::Reverse { connect_id } => {
                let Some((lsock, _)) = rev else {
                    return Outcome::Bypass("no reverse listener: connecting to the proxy");
                };
                let got = self.await_reverse(lsock, &connect_id);
                net::close(lsock);
                match got.map(|c| (c, self.install_connection(fd, c))) {
                    Ok((_, Ok(()))) => Outcome::Handled(0),
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

    fn on_io(&self, fd: c_int, entry: &Arc<FdEntry>, call: IoCall) -> Outcome<ssize_t> {
        match call {
            IoCall::Recv { .. } | IoCall::RecvMsg { .. } => self.udp_recv(fd, entry, call),
            IoCall::Send { .. } | IoCall::SendMsg { .. } => self.udp_send(fd, entry, call),
        }
    }

    fn on_wait(&self, call: WaitCall) -> Outcome<c_int> {
        match call {
            WaitCall::Poll {
                fds,
                nfds,
                timeout_ms,
                timeout,
                sigmask,
            } => self.wait_poll(fds, nfds, timeout_ms, timeout, sigmask),
            WaitCall::Select {
                nfds,
                read,
                write,
                except,
                timeout,
            } => {
                let deadline = (!timeout.is_null())
                    .then(|| {
                        // SAFETY: the program passed a valid timeval.
                        let t = unsafe { *timeout };
                        Instant::now().checked_add(Duration::new(
                            t.tv_sec.max(0) as u64,
                            (t.tv_usec.clamp(0, 999_999) * 1000) as u32,
                        ))
                    })
                    .flatten();
                self.wait_select(
                    nfds,
                    read,
                    write,
                    except,
                    deadline,
                    std::ptr::null(),
                    timeout,
                )
            }
            WaitCall::PSelect {
                nfds,
                read,
                write,
                except,
                timeout,
                sigmask,
            } => {
                let deadline = deadline_of(if timeout.is_null() { -1 } else { -2 }, timeout);
                self.wait_select(
                    nfds,
                    read,
                    write,
                    except,
                    deadline,
                    sigmask,
                    std::ptr::null_mut(),
                )
            }
            WaitCall::Epoll {
                epfd,
                events,
                maxevents,
                timeout_ms,
                timeout,
                sigmask,
            } => self.wait_epoll(epfd, events, maxevents, timeout_ms, timeout, sigmask),
        }
    }

    fn on_epoll_ctl(
        &self,
        epfd: c_int,
        op: c_int,
        fd: c_int,
        entry: &Arc<FdEntry>,
        ev: *mut libc::epoll_event,
    ) -> Outcome<c_int> {
        self.note_udp_epoll_ctl(epfd, op, fd, entry, ev);
        Outcome::Bypass("epoll_ctl on a managed socket goes to the kernel as is")
    }

    fn on_close(&self, fd: c_int, entry: &Arc<FdEntry>, last: bool) {
        self.forget_udp_epoll(fd);
        if !last {
            return;
        }
        if let Some(GcbSock::Listener { proxy, .. }) = gcb_state(entry) {
            self.client.lock().release(Transport::Tcp, proxy, entry);
        } else if let Some((proxy, _)) = udp::state(entry) {
            self.client.lock().release(Transport::Udp, proxy, entry);
        }
    }

    fn fork_prepare(&self) {
        self.client.lock_raw();
    }

    fn fork_parent(&self) {
        // SAFETY: fork_prepare locked it on this thread.
        unsafe { self.client.unlock_raw() };
    }

    fn fork_child_locks(&self) {
        // SAFETY: in the fork child (one thread); fork_prepare held the lock, no guard alive.
        unsafe { self.client.reset_in_child() };
    }

    fn exec_handoff(&self) -> Option<String> {
        self.handoff()
    }

    fn on_fork_child(&self) {
        self.client.lock().reset_after_fork();
        udp::registering_to_pending_after_fork();
    }
}
