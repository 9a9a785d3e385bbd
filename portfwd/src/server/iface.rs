//! This host's interfaces and addresses (getifaddrs), and receiving a control datagram
//! with the index of the interface it arrived on (`IP_PKTINFO`/`IPV6_PKTINFO`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::unix::io::RawFd;

use ipnet::Ipv4Net;

/// One address of one interface of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// The interface's name.
    pub name: String,
    /// The address.
    pub ip: IpAddr,
    /// The interface is a loopback interface.
    pub loopback: bool,
}

/// Every IPv4 and IPv6 address of this host's interfaces (getifaddrs).
pub fn interface_addrs() -> Vec<InterfaceAddr> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `ifap` with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr of family sa_family.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: AF_INET6 addresses are sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        out.push(InterfaceAddr { name, ip, loopback });
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// The first address of this host inside `net` (the default `--listen`).
pub fn local_ip_in(net: Ipv4Net) -> Option<Ipv4Addr> {
    interface_addrs().into_iter().find_map(|a| match a.ip {
        IpAddr::V4(ip) if net.contains(&ip) => Some(ip),
        _ => None,
    })
}

/// The LAN interfaces for a control socket on `listen` (module docs): the
/// loopback interfaces and the interface holding `listen`, or, for an
/// unspecified `listen`, every interface with an address inside `private`.
/// Sorted, without duplicates; `--lan-if` names are added by the caller.
pub fn lan_interfaces(listen: IpAddr, private: Ipv4Net) -> Vec<String> {
    let mut names: Vec<String> = interface_addrs()
        .into_iter()
        .filter(|a| {
            a.loopback
                || if listen.is_unspecified() {
                    matches!(a.ip, IpAddr::V4(ip) if private.contains(&ip))
                } else {
                    a.ip == listen
                }
        })
        .map(|a| a.name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The name of the interface with index `ifindex`, if it exists.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Does an interface named `name` exist?
pub fn interface_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// Asks the kernel to attach the arrival interface to every datagram.
pub(super) fn enable_pktinfo(fd: RawFd, ipv6: bool) -> io::Result<()> {
    let (level, opt) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `one`, which lives across
    // the call; `fd` is our open socket.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram (non-blocking socket) with its source and the index of the
/// interface it arrived on (`None` if the kernel attached no packet info).
pub(super) fn recv_with_ifindex(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<u32>)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for one in_pktinfo or in6_pktinfo message, u64-aligned as cmsghdr needs.
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in `msg` points to a live buffer of the stated length.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ifindex = None;
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* macros stay inside msg_control.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is a header inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let h = unsafe { &*c };
        // SAFETY: the data of a header of these types is an in_pktinfo / in6_pktinfo; it may be
        // unaligned, so it is read with read_unaligned.
        unsafe {
            if h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>());
                ifindex = u32::try_from(info.ipi_ifindex).ok();
            } else if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>());
                ifindex = Some(info.ipi6_ifindex);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let from = match i32::from(name.ss_family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET source is a sockaddr_in.
            let sin =
                unsafe { &*(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 source is a sockaddr_in6.
            let sin6 =
                unsafe { &*(&name as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ))
        }
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("datagram from address family {f}"),
            ))
        }
    };
    Ok((n as usize, from, ifindex))
}

/// Is `ip` one of this host's addresses?
pub fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
