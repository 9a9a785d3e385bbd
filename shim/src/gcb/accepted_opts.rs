//! What a brokered connection inherits so that it reads like a connection the kernel
//! accepted on the program's listener: the listener's socket options
//! (`inherit_listener_options`) and, for IP_PKTOPTIONS, the arrival interface
//! (`interface_of`, `mend_pktinfo`; see `GcbLayer::tcp_getsockopt`).

use libc::c_int;
use std::mem;
use std::net::Ipv4Addr;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use crate::net;
use crate::sockaddr;

/// How a socket option's value is written back.
#[derive(Clone, Copy, PartialEq)]
enum Inherit {
    /// As read.
    Same,
    /// Half of what is read: the kernel doubles SO_RCVBUF/SO_SNDBUF when they are set and
    /// reports the doubled value.
    Halved,
}

/// The options a socket the kernel accepts inherits from its listener (Linux clones the
/// listening socket, `sk_clone_lock`, and keeps these; each one checked: set on a listener,
/// read on a connection it accepted): (level, option, value size, how it is written back).
/// The IPv6 ones only for an AF_INET6 listener. Not copied: SO_MARK and SO_BINDTODEVICE
/// (they change where the packets go, and a brokered connection's path is the broker's),
/// TCP_MAXSEG (negotiated per connection).
const INHERITED: &[(c_int, c_int, usize, Inherit)] = {
    use libc::*;
    use Inherit::{Halved, Same};
    &[
        (SOL_SOCKET, SO_KEEPALIVE, 4, Same),
        (SOL_SOCKET, SO_OOBINLINE, 4, Same),
        (SOL_SOCKET, SO_RCVLOWAT, 4, Same),
        (SOL_SOCKET, SO_TIMESTAMP, 4, Same),
        (SOL_SOCKET, SO_TIMESTAMPNS, 4, Same),
        (SOL_SOCKET, SO_RCVBUF, 4, Halved),
        (SOL_SOCKET, SO_SNDBUF, 4, Halved),
        (SOL_SOCKET, SO_REUSEADDR, 4, Same),
        (SOL_SOCKET, SO_LINGER, mem::size_of::<linger>(), Same),
        (SOL_SOCKET, SO_RCVTIMEO, mem::size_of::<timeval>(), Same),
        (SOL_SOCKET, SO_SNDTIMEO, mem::size_of::<timeval>(), Same),
        (IPPROTO_IP, IP_TOS, 4, Same),
        (IPPROTO_IP, IP_TTL, 4, Same),
        (IPPROTO_IP, IP_PKTINFO, 4, Same),
        (IPPROTO_IP, IP_RECVTTL, 4, Same),
        (IPPROTO_IP, IP_RECVTOS, 4, Same),
        (IPPROTO_IP, IP_RECVOPTS, 4, Same),
        (IPPROTO_IP, IP_RETOPTS, 4, Same),
        (IPPROTO_IP, IP_RECVERR, 4, Same),
        (IPPROTO_IP, IP_MTU_DISCOVER, 4, Same),
        // After IP_TOS, which sets it too.
        (SOL_SOCKET, SO_PRIORITY, 4, Same),
        (IPPROTO_TCP, TCP_NODELAY, 4, Same),
        (IPPROTO_TCP, TCP_KEEPIDLE, 4, Same),
        (IPPROTO_TCP, TCP_KEEPINTVL, 4, Same),
        (IPPROTO_TCP, TCP_KEEPCNT, 4, Same),
        (IPPROTO_TCP, TCP_USER_TIMEOUT, 4, Same),
        (IPPROTO_TCP, TCP_NOTSENT_LOWAT, 4, Same),
        (IPPROTO_TCP, TCP_LINGER2, 4, Same),
        (IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 4, Same),
        (IPPROTO_TCP, TCP_WINDOW_CLAMP, 4, Same),
        (IPPROTO_TCP, TCP_CONGESTION, OPT_MAX, Same),
        (IPPROTO_IPV6, IPV6_TCLASS, 4, Same),
        (IPPROTO_IPV6, IPV6_RECVPKTINFO, 4, Same),
        (IPPROTO_IPV6, IPV6_2292PKTINFO, 4, Same),
        (IPPROTO_IPV6, IPV6_RECVTCLASS, 4, Same),
        (IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 4, Same),
        (IPPROTO_IPV6, IPV6_2292HOPLIMIT, 4, Same),
        (IPPROTO_IPV6, IPV6_UNICAST_HOPS, 4, Same),
        (IPPROTO_IPV6, IPV6_MTU_DISCOVER, 4, Same),
        (IPPROTO_IPV6, IPV6_RECVERR, 4, Same),
    ]
};

/// Room for the largest value in [`INHERITED`] (a congestion control name, 16 bytes).
const OPT_MAX: usize = 16;

/// One option's value as getsockopt(2) gave it.
#[derive(Clone, Copy, PartialEq)]
struct OptVal {
    len: usize,
    bytes: [u8; OPT_MAX],
}

fn get_opt(fd: c_int, level: c_int, opt: c_int, size: usize) -> Option<OptVal> {
    let mut v = OptVal {
        len: size.min(OPT_MAX),
        bytes: [0; OPT_MAX],
    };
    let mut len = v.len as libc::socklen_t;
    // SAFETY: bytes/len describe writable storage of `len` bytes.
    let r = unsafe { libc::getsockopt(fd, level, opt, v.bytes.as_mut_ptr().cast(), &mut len) };
    v.len = (len as usize).min(OPT_MAX);
    (r == 0).then_some(v)
}

/// The values of [`INHERITED`] on a fresh socket of each family (AF_INET, AF_INET6),
/// read once per process: a listener's option that differs from this was set by the
/// program. Published without a lock (a fork child never waits for it): a thread that
/// loses the race frees its copy.
static DEFAULTS: [AtomicPtr<Vec<Option<OptVal>>>; 2] = [
    AtomicPtr::new(ptr::null_mut()),
    AtomicPtr::new(ptr::null_mut()),
];

fn defaults(family: c_int) -> Option<&'static [Option<OptVal>]> {
    let slot = &DEFAULTS[usize::from(family == libc::AF_INET6)];
    let p = slot.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: a published pointer is a leaked Box, never freed or written again.
        return Some(unsafe { &*p });
    }
    let s = net::socket_as(family, libc::SOCK_STREAM, false).ok()?;
    let vals: Vec<Option<OptVal>> = INHERITED
        .iter()
        .map(|&(level, opt, size, _)| get_opt(s, level, opt, size))
        .collect();
    net::close(s);
    let mine = Box::into_raw(Box::new(vals));
    match slot.compare_exchange(ptr::null_mut(), mine, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just published; never freed.
        Ok(_) => Some(unsafe { &*mine }),
        Err(theirs) => {
            // SAFETY: `mine` was never published; `theirs` is a published leaked Box.
            drop(unsafe { Box::from_raw(mine) });
            Some(unsafe { &*theirs })
        }
    }
}

/// Gives brokered connection `conn` the options a connection the kernel accepted on
/// `listener` would have inherited from it: each one the program changed on the listener
/// (it differs from a fresh socket's), so the common case costs reads only.
pub(super) fn inherit_listener_options(listener: c_int, conn: c_int, family: c_int) {
    let Some(defaults) = defaults(family) else {
        return;
    };
    for (&(level, opt, size, how), default) in INHERITED.iter().zip(defaults) {
        if level == libc::IPPROTO_IPV6 && family != libc::AF_INET6 {
            continue;
        }
        let Some(mut v) = get_opt(listener, level, opt, size) else {
            continue;
        };
        if Some(v) == *default {
            continue;
        }
        if how == Inherit::Halved && v.len == 4 {
            let n = i32::from_ne_bytes([v.bytes[0], v.bytes[1], v.bytes[2], v.bytes[3]]);
            v.bytes[..4].copy_from_slice(&(n / 2).to_ne_bytes());
        }
        // SAFETY: bytes holds `len` readable bytes. Best effort: an option the connection
        // refuses stays as it is.
        unsafe {
            libc::setsockopt(
                conn,
                level,
                opt,
                v.bytes.as_ptr().cast(),
                v.len as libc::socklen_t,
            )
        };
    }
}

/// Fills in the interface index of the IP_PKTINFO / IPV6_PKTINFO control messages in the
/// `len` bytes at `buf` (an IP_PKTOPTIONS answer) that have none: see
/// [`GcbLayer::tcp_getsockopt`].
///
/// # Safety
/// `buf` points at `len` readable and writable bytes.
pub(super) unsafe fn mend_pktinfo(buf: *mut libc::c_void, len: libc::socklen_t) {
    // SAFETY: zeroed msghdr is valid; only the control fields are used, to walk `buf`.
    let mut mh: libc::msghdr = unsafe { mem::zeroed() };
    mh.msg_control = buf;
    mh.msg_controllen = len as usize;
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR stay inside the control buffer described by mh,
    // and each header's data is read/written only within its cmsg_len.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&mh);
        while !cm.is_null() {
            let data = libc::CMSG_DATA(cm);
            let room = (*cm)
                .cmsg_len
                .saturating_sub((data as usize) - (cm as usize));
            match ((*cm).cmsg_level, (*cm).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO)
                    if room >= mem::size_of::<libc::in_pktinfo>() =>
                {
                    let p = data as *mut libc::in_pktinfo;
                    let mut info = ptr::read_unaligned(p);
                    let ip = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                    if info.ipi_ifindex == 0 {
                        if let Some(i) = interface_of(ip) {
                            info.ipi_ifindex = i as c_int;
                            ptr::write_unaligned(p, info);
                        }
                    }
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO | libc::IPV6_2292PKTINFO)
                    if room >= mem::size_of::<libc::in6_pktinfo>() =>
                {
                    let p = data as *mut libc::in6_pktinfo;
                    let mut info = ptr::read_unaligned(p);
                    let v6 = std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr);
                    let ip = sockaddr::from_v6(&v6);
                    if info.ipi6_ifindex == 0 {
                        if let Some(i) = ip.and_then(interface_of) {
                            info.ipi6_ifindex = i;
                            ptr::write_unaligned(p, info);
                        }
                    }
                }
                _ => {}
            }
            cm = libc::CMSG_NXTHDR(&mh, cm);
        }
    }
}

/// The index of the interface that holds `ip`, if one does.
pub(super) fn interface_of(ip: Ipv4Addr) -> Option<u32> {
    let mut list: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    // SAFETY: walking the list getifaddrs returned, before freeing it; ifa_addr is null
    // or points at a sockaddr of its family.
    unsafe {
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() && (*a).sa_family as c_int == libc::AF_INET {
                let sin = ptr::read_unaligned(a as *const libc::sockaddr_in);
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == ip {
                    let i = libc::if_nametoindex((*cur).ifa_name);
                    found = (i != 0).then_some(i);
                    break;
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}
