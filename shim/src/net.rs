//! Small socket helpers for the GCB client: address conversion and bounded blocking
//! operations built on poll(2).
//!
//! Everything here runs with the re-entrancy guard set (it is only called from layer
//! code), so each libc call goes straight to the real function.

use libc::{c_int, socklen_t};
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use crate::abi::AddrIn;
use crate::sockaddr::SockAddrBuf;

pub use crate::sys::errno;

/// The socket's address family (AF_INET, AF_INET6, ...; 0 if not a socket).
pub fn domain(fd: c_int) -> c_int {
    sock_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(0)
}

/// Does `fd`, a socket of type `ty`, carry IPv4? An AF_INET socket does; so does a
/// dual-stack AF_INET6 socket (IPV6_V6ONLY off) that is unbound or bound to `::` or to an
/// IPv4-mapped address. A v6-only socket, or one bound to a native IPv6 address, does not
/// (the shim leaves it alone, and says so at debug level).
pub fn carries_ipv4(fd: c_int, ty: c_int) -> bool {
    if sock_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE) != Some(ty) {
        return false;
    }
    match domain(fd) {
        libc::AF_INET => true,
        libc::AF_INET6 => {
            let dual = sock_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) == Some(0);
            let v4_side = dual && sock_name(fd, false).is_some();
            if !v4_side {
                crate::debug!(
                    "fd {}: IPv6-only socket (v6only or bound to a native IPv6 address); left alone",
                    fd
                );
            }
            v4_side
        }
        _ => false,
    }
}

/// An IPv4-carrying UDP socket? (see [`carries_ipv4`])
pub fn is_udp4(fd: c_int) -> bool {
    carries_ipv4(fd, libc::SOCK_DGRAM)
}

/// An IPv4-carrying TCP socket? (see [`carries_ipv4`])
pub fn is_tcp4(fd: c_int) -> bool {
    carries_ipv4(fd, libc::SOCK_STREAM)
}

/// An int socket option, or None on error.
pub fn sock_opt(fd: c_int, level: c_int, opt: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: v/len describe a writable c_int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            &mut v as *mut c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// Sets an int socket option (errors ignored: best effort).
pub fn set_sock_opt(fd: c_int, level: c_int, opt: c_int, v: c_int) {
    // SAFETY: v is a readable c_int of the given length.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const c_int as *const libc::c_void,
            std::mem::size_of::<c_int>() as libc::socklen_t,
        );
    }
}

/// The IPv4 socket address the program passed, if it is one: AF_INET, or an AF_INET6
/// address that is IPv4-mapped or `::` (see [`crate::sockaddr`]; GCB and DPF broker IPv4).
pub fn addr_in(a: AddrIn) -> Option<SocketAddrV4> {
    // SAFETY: the program passed `ptr`/`len` to a socket call whose contract says `ptr`
    // points at `len` readable bytes.
    unsafe { crate::sockaddr::parse(a.ptr, a.len) }
}

pub fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

/// getsockname (peer == false) or getpeername, as an IPv4 address (either family's form;
/// None for native IPv6 and other families).
pub fn sock_name(fd: c_int, peer: bool) -> Option<SocketAddrV4> {
    let mut b = SockAddrBuf::empty();
    let p = b.as_mut_ptr();
    // SAFETY: p/len describe the writable storage of `b`.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, b.len_mut())
        } else {
            libc::getsockname(fd, p, b.len_mut())
        }
    };
    if r != 0 {
        return None;
    }
    b.v4()
}

/// Our IP on the route to `to` (a connected UDP socket's name; nothing is sent).
pub fn route_ip(to: SocketAddrV4) -> Option<Ipv4Addr> {
    let fd = socket(libc::SOCK_DGRAM, false).ok()?;
    let ip = connect_raw(fd, to)
        .ok()
        .and_then(|_| sock_name(fd, false))
        .map(|a| *a.ip());
    close(fd);
    ip
}

/// A new IPv4 socket of the shim's (close-on-exec unless `inheritable`).
pub fn socket(ty: c_int, inheritable: bool) -> Result<c_int, c_int> {
    socket_as(libc::AF_INET, ty, inheritable)
}

/// A new socket of `family` that carries IPv4: AF_INET, or a dual-stack AF_INET6 socket
/// (IPV6_V6ONLY off whatever the system default), for a connection the program will hold
/// in a socket of that family.
pub fn socket_as(family: c_int, ty: c_int, inheritable: bool) -> Result<c_int, c_int> {
    let family = if family == libc::AF_INET6 {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    let flags = if inheritable { 0 } else { libc::SOCK_CLOEXEC };
    // SAFETY: plain syscall with constant arguments.
    let fd = unsafe { libc::socket(family, ty | flags, 0) };
    if fd < 0 {
        return Err(errno());
    }
    if family == libc::AF_INET6 {
        set_sock_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0);
    }
    Ok(fd)
}

pub fn close(fd: c_int) {
    crate::sys::close_raw(fd);
}

pub fn set_nonblocking(fd: c_int, on: bool) -> Result<(), c_int> {
    let mut v: c_int = on.into();
    // SAFETY: FIONBIO reads one int; v outlives the call. One syscall instead of
    // F_GETFL + F_SETFL (this runs on every brokered connection's path).
    if unsafe { libc::ioctl(fd, libc::FIONBIO, &mut v) } != 0 {
        return Err(errno());
    }
    Ok(())
}

pub fn is_nonblocking(fd: c_int) -> bool {
    crate::sys::fcntl_raw(fd, libc::F_GETFL, 0).is_ok_and(|fl| fl & libc::O_NONBLOCK != 0)
}

/// bind(2) of one of the shim's own (AF_INET) sockets.
pub fn bind(fd: c_int, a: SocketAddrV4) -> Result<(), c_int> {
    bind_as(fd, a, libc::AF_INET)
}

/// bind(2) with `a` in `family`'s form.
pub fn bind_as(fd: c_int, a: SocketAddrV4, family: c_int) -> Result<(), c_int> {
    let b = SockAddrBuf::new(a, family);
    // SAFETY: b holds a valid address of b.len() bytes for the duration of the call.
    let r = unsafe { libc::bind(fd, b.as_ptr(), b.len()) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// connect(2) of one of the shim's own (AF_INET) sockets, as is (the caller decides about
/// blocking).
pub fn connect_raw(fd: c_int, a: SocketAddrV4) -> Result<(), c_int> {
    connect_as(fd, a, libc::AF_INET)
}

/// connect(2) of the program's socket `fd` to `a`, in the form its family takes (a
/// dual-stack AF_INET6 socket connects to `::ffff:a`).
pub fn connect_program(fd: c_int, a: SocketAddrV4) -> Result<(), c_int> {
    connect_as(fd, a, domain(fd))
}

/// connect(2) with `a` in `family`'s form.
pub fn connect_as(fd: c_int, a: SocketAddrV4, family: c_int) -> Result<(), c_int> {
    let b = SockAddrBuf::new(a, family);
    // SAFETY: b holds a valid address of b.len() bytes for the duration of the call.
    let r = unsafe { libc::connect(fd, b.as_ptr(), b.len()) };
    if r == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Wait until `fd` has one of `events`, at most `timeout`. Ok(true) if ready.
pub fn wait_fd(fd: c_int, events: i16, timeout: Duration) -> Result<bool, c_int> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms_ceil(left)) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            if left.is_zero() {
                return Ok(false);
            }
            continue;
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// A poll timeout in ms from a duration, rounded up (so we never spin on 0 ms).
pub fn ms_ceil(d: Duration) -> c_int {
    let ms = d.as_micros().div_ceil(1000);
    ms.min(c_int::MAX as u128) as c_int
}

/// Connect a TCP socket with a deadline; the socket is left in blocking mode on success.
/// connect(2) of the program's socket `fd` (in its family's form), waiting at most
/// `timeout`; the socket is blocking again afterwards.
pub fn connect_timeout(fd: c_int, a: SocketAddrV4, timeout: Duration) -> Result<(), c_int> {
    set_nonblocking(fd, true)?;
    match connect_program(fd, a) {
        Ok(()) => {}
        Err(libc::EINPROGRESS) => {
            if !wait_fd(fd, libc::POLLOUT, timeout)? {
                return Err(libc::ETIMEDOUT);
            }
            let err = so_error(fd);
            if err != 0 {
                return Err(err);
            }
        }
        Err(e) => return Err(e),
    }
    set_nonblocking(fd, false)
}

pub fn so_error(fd: c_int) -> c_int {
    let mut err: c_int = 0;
    let mut len = mem::size_of::<c_int>() as socklen_t;
    // SAFETY: err/len describe a writable c_int.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        errno()
    } else {
        err
    }
}

/// The socket's receive timeout (SO_RCVTIMEO), if the program set one: a blocking
/// recv()/accept() the shim waits in for the program must give up after it (EAGAIN), as
/// the kernel's would.
pub fn rcv_timeout(fd: c_int) -> Option<Duration> {
    // SAFETY: zeroed timeval is valid; tv/len describe it.
    let mut tv: libc::timeval = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::timeval>() as socklen_t;
    // SAFETY: tv/len describe a writable timeval.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &mut tv as *mut libc::timeval as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 || (tv.tv_sec <= 0 && tv.tv_usec <= 0) {
        return None;
    }
    Some(Duration::new(tv.tv_sec as u64, 0) + Duration::from_micros(tv.tv_usec.max(0) as u64))
}

/// An errno as text.
pub fn errstr(e: c_int) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// One non-blocking send (no SIGPIPE): the count sent, or the errno.
pub fn send_some(fd: c_int, buf: &[u8]) -> Result<usize, c_int> {
    loop {
        // SAFETY: buf is a valid readable slice.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        match errno() {
            libc::EINTR => {}
            e => return Err(e),
        }
    }
}

fn recv_flags(fd: c_int, buf: &mut [u8], flags: c_int) -> Result<usize, c_int> {
    loop {
        // SAFETY: buf is a valid writable slice.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        match errno() {
            libc::EINTR => {}
            e => return Err(e),
        }
    }
}

/// One non-blocking recv: the count (0 = EOF), or the errno (EAGAIN: nothing yet).
pub fn recv_some(fd: c_int, buf: &mut [u8]) -> Result<usize, c_int> {
    recv_flags(fd, buf, 0)
}

/// Like [`recv_some`] but leaves the bytes queued.
pub fn recv_peek(fd: c_int, buf: &mut [u8]) -> Result<usize, c_int> {
    recv_flags(fd, buf, libc::MSG_PEEK)
}

/// Write all of `buf` to a blocking or non-blocking socket within `timeout`.
pub fn write_all(fd: c_int, mut buf: &[u8], timeout: Duration) -> Result<(), c_int> {
    let deadline = Instant::now() + timeout;
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            buf = &buf[n as usize..];
            continue;
        }
        let e = if n == 0 { libc::EPIPE } else { errno() };
        match e {
            libc::EINTR => {}
            libc::EAGAIN => {
                let left = deadline.saturating_duration_since(Instant::now());
                if !wait_fd(fd, libc::POLLOUT, left)? {
                    return Err(libc::ETIMEDOUT);
                }
            }
            e => return Err(e),
        }
    }
    Ok(())
}

/// Read exactly `buf.len()` bytes within `timeout` (without ever reading past them).
pub fn read_exact(fd: c_int, buf: &mut [u8], timeout: Duration) -> Result<(), c_int> {
    let deadline = Instant::now() + timeout;
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: rest is a valid writable slice.
        let n = unsafe {
            libc::recv(
                fd,
                rest.as_mut_ptr() as *mut libc::c_void,
                rest.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            got += n as usize;
            continue;
        }
        if n == 0 {
            return Err(libc::ECONNRESET);
        }
        match errno() {
            libc::EINTR => {}
            libc::EAGAIN => {
                let left = deadline.saturating_duration_since(Instant::now());
                if !wait_fd(fd, libc::POLLIN, left)? {
                    return Err(libc::ETIMEDOUT);
                }
            }
            e => return Err(e),
        }
    }
    Ok(())
}

/// Addresses a GCB decision must never broker: loopback, unspecified, multicast.
pub fn never_brokered(ip: Ipv4Addr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()
}

/// RFC 1918, CGNAT 100.64/10 and link-local: not reachable from the public side.
pub fn is_private(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private() || ip.is_link_local() || (o[0] == 100 && (o[1] & 0xc0) == 64)
}

/// Why a `connect_back` must not dial `target`, or None if it may. The broker names the
/// address to dial; a broker that was fooled (or spoofed, without a pool key) must not
/// make us reach our own host or our LAN on someone's behalf (server-side request
/// forgery): only public addresses are dialed, plus the broker's own (its relay port).
pub fn dial_refusal(target: Ipv4Addr, broker: Ipv4Addr) -> Option<&'static str> {
    if target == broker {
        return None;
    }
    if target.is_loopback() {
        Some("loopback")
    } else if target.is_unspecified() {
        Some("unspecified")
    } else if target.is_multicast() || target.is_broadcast() {
        Some("multicast/broadcast")
    } else if target.is_link_local() {
        Some("link-local")
    } else if is_private(target) {
        Some("private")
    } else {
        None
    }
}

/// Connect a new TCP socket to `a`, racing a fresh attempt every `spacing` until one
/// succeeds or `timeout` passes. Linux retries a lost SYN only after 1 s and 3 s, so on
/// a lossy path a single attempt often needs seconds; staggered attempts need one
/// round trip that gets through. The winner is returned in blocking mode (inheritable if
/// asked); the losers are closed.
pub fn connect_race(
    a: SocketAddrV4,
    spacing: Duration,
    timeout: Duration,
    inheritable: bool,
    family: c_int,
) -> Result<c_int, c_int> {
    let deadline = Instant::now() + timeout;
    let mut tries: Vec<c_int> = Vec::new();
    let mut next = Instant::now();
    let mut last_err = libc::ETIMEDOUT;
    let close_all = |v: &mut Vec<c_int>| v.drain(..).for_each(close);
    loop {
        let now = Instant::now();
        if now >= next && tries.len() < 32 {
            let s = socket_as(family, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, inheritable)?;
            match connect_as(s, a, family) {
                Ok(()) => {
                    close_all(&mut tries);
                    set_nonblocking(s, false)?;
                    return Ok(s);
                }
                Err(libc::EINPROGRESS) => tries.push(s),
                Err(e) => {
                    close(s);
                    last_err = e;
                }
            }
            next = now + spacing;
        }
        if now >= deadline {
            close_all(&mut tries);
            return Err(last_err);
        }
        let mut set: Vec<libc::pollfd> = tries
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let wait = next.min(deadline).saturating_duration_since(Instant::now());
        // SAFETY: set is a valid pollfd array of its length.
        let r = unsafe { libc::poll(set.as_mut_ptr(), set.len() as libc::nfds_t, ms_ceil(wait)) };
        if r <= 0 {
            continue;
        }
        let mut i = 0;
        while i < tries.len() {
            if set[i].revents == 0 {
                i += 1;
                continue;
            }
            let s = tries.remove(i);
            set.remove(i);
            match so_error(s) {
                0 => {
                    close_all(&mut tries);
                    set_nonblocking(s, false)?;
                    return Ok(s);
                }
                e => {
                    last_err = e;
                    close(s);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn dial_targets_on_the_public_internet_are_allowed() {
        let broker = ip("203.0.113.10");
        for t in [
            "203.0.113.11",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
        ] {
            assert_eq!(dial_refusal(ip(t), broker), None, "{t}");
        }
    }

    #[test]
    fn dial_targets_inside_private_or_special_ranges_are_refused() {
        let broker = ip("203.0.113.10");
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.71.66.1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast/broadcast"),
            ("239.255.255.250", "multicast/broadcast"),
            ("255.255.255.255", "multicast/broadcast"),
            ("169.254.169.254", "link-local"),
            ("10.1.0.12", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.254", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "private"),
            ("100.127.255.254", "private"),
        ];
        for (t, why) in cases {
            assert_eq!(dial_refusal(ip(t), broker), Some(why), "{t}");
        }
    }

    #[test]
    fn the_brokers_own_address_is_always_allowed() {
        // A broker on a private address (its relay port is what we dial for a relay).
        for b in ["10.1.0.1", "127.0.0.1", "100.64.0.9", "203.0.113.10"] {
            assert_eq!(dial_refusal(ip(b), ip(b)), None, "{b}");
        }
        assert_eq!(
            dial_refusal(ip("10.1.0.2"), ip("10.1.0.1")),
            Some("private")
        );
    }
}
