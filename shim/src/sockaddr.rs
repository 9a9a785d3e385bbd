//! IPv4 addresses in the family of the program's socket.
//!
//! Floor 0. GCB and DPF broker IPv4. A program may still hold an IPv4 path on an AF_INET6
//! socket: a *dual-stack* socket (IPV6_V6ONLY off, the Linux default) bound to `::` or to
//! an IPv4-mapped address `::ffff:a.b.c.d`, which is what Node.js, Java, Apache httpd and
//! Python's `create_server(..., dualstack_ipv6=True)` open. The kernel shows such a
//! socket's IPv4 peers as `::ffff:a.b.c.d` in `sockaddr_in6`. This module reads an IPv4
//! address from either form ([`parse`]) and writes one in the form the socket's family
//! expects ([`SockAddrBuf::new`], [`write_out`]), with the sizes the kernel would use
//! (16 bytes for `sockaddr_in`, 28 for `sockaddr_in6`).
//!
//! Native IPv6 addresses are not IPv4: [`parse`] says `None`, and the shim leaves them
//! alone.

use libc::{c_int, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use crate::abi::AddrOut;

/// The IPv4 address `a` means, if it is one: an AF_INET address, or an AF_INET6 address
/// that is IPv4-mapped (`::ffff:a.b.c.d`) or unspecified (`::`, which for a dual-stack
/// socket also means "any IPv4 address", so it reads as `0.0.0.0`).
pub fn from_v6(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    if ip.is_unspecified() {
        return Some(Ipv4Addr::UNSPECIFIED);
    }
    ip.to_ipv4_mapped()
}

/// Reads the IPv4 address at `ptr` (`len` bytes, as a program or the kernel passed it).
///
/// # Safety
/// `ptr` is null or points at `len` readable bytes (the C contract of the socket call it
/// came from). No alignment is assumed.
pub unsafe fn parse(ptr: *const sockaddr, len: socklen_t) -> Option<SocketAddrV4> {
    let len = len as usize;
    if ptr.is_null() || len < mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above).
    let family = unsafe { std::ptr::read_unaligned(ptr as *const libc::sa_family_t) } as c_int;
    match family {
        libc::AF_INET if len >= mem::size_of::<sockaddr_in>() => {
            // SAFETY: len covers a sockaddr_in.
            let sin = unsafe { std::ptr::read_unaligned(ptr as *const sockaddr_in) };
            Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 if len >= mem::size_of::<sockaddr_in6>() => {
            // SAFETY: len covers a sockaddr_in6.
            let sin6 = unsafe { std::ptr::read_unaligned(ptr as *const sockaddr_in6) };
            let ip = from_v6(&Ipv6Addr::from(sin6.sin6_addr.s6_addr))?;
            Some(SocketAddrV4::new(ip, u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

/// A socket address of either family, built or received in place.
#[derive(Clone, Copy)]
pub struct SockAddrBuf {
    storage: sockaddr_storage,
    len: socklen_t,
}

impl SockAddrBuf {
    /// `a` in the form a socket of `family` takes: `sockaddr_in` for AF_INET,
    /// `sockaddr_in6` with `::ffff:a.b.c.d` (`0.0.0.0` becomes `::`) for AF_INET6.
    pub fn new(a: SocketAddrV4, family: c_int) -> SockAddrBuf {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let mut storage: sockaddr_storage = unsafe { mem::zeroed() };
        let len = if family == libc::AF_INET6 {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin6 =
                unsafe { &mut *(&mut storage as *mut sockaddr_storage as *mut sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = if a.ip().is_unspecified() {
                Ipv6Addr::UNSPECIFIED.octets()
            } else {
                a.ip().to_ipv6_mapped().octets()
            };
            mem::size_of::<sockaddr_in6>()
        } else {
            // SAFETY: as above.
            let sin = unsafe { &mut *(&mut storage as *mut sockaddr_storage as *mut sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            mem::size_of::<sockaddr_in>()
        };
        SockAddrBuf {
            storage,
            len: len as socklen_t,
        }
    }

    /// Room for an address the kernel writes (recvfrom, accept, getsockname).
    pub fn empty() -> SockAddrBuf {
        SockAddrBuf {
            // SAFETY: plain old data; all-zero is valid.
            storage: unsafe { mem::zeroed() },
            len: mem::size_of::<sockaddr_storage>() as socklen_t,
        }
    }

    pub fn as_ptr(&self) -> *const sockaddr {
        &self.storage as *const sockaddr_storage as *const sockaddr
    }

    pub fn as_mut_ptr(&mut self) -> *mut sockaddr {
        &mut self.storage as *mut sockaddr_storage as *mut sockaddr
    }

    /// The address's length in bytes (16 or 28; the room left for the kernel in
    /// [`SockAddrBuf::empty`]).
    #[allow(clippy::len_without_is_empty)] // an address is never empty
    pub fn len(&self) -> socklen_t {
        self.len
    }

    /// For the kernel to set the length it wrote.
    pub fn len_mut(&mut self) -> &mut socklen_t {
        &mut self.len
    }

    /// The IPv4 address held, in either form.
    pub fn v4(&self) -> Option<SocketAddrV4> {
        // SAFETY: the storage holds `len` (at most its size) initialised bytes.
        unsafe {
            parse(
                self.as_ptr(),
                self.len
                    .min(mem::size_of::<sockaddr_storage>() as socklen_t),
            )
        }
    }

    /// The family the address is in.
    pub fn family(&self) -> c_int {
        self.storage.ss_family as c_int
    }
}

/// Copies the address the kernel gave (`b`, any family) into the program's result buffer,
/// with the truncation rules of accept(2).
pub fn copy_out(out: AddrOut, b: &SockAddrBuf) {
    if out.ptr.is_null() || out.len.is_null() {
        return;
    }
    let full = (b.len() as usize).min(mem::size_of::<sockaddr_storage>());
    // SAFETY: by the call's contract `out.len` points at a readable/writable socklen_t and
    // `out.ptr` at `*out.len` writable bytes; we copy no more than that, from the `full`
    // initialised bytes of `b`.
    unsafe {
        let room = *out.len as usize;
        std::ptr::copy_nonoverlapping(b.as_ptr() as *const u8, out.ptr as *mut u8, room.min(full));
        *out.len = b.len();
    }
}

/// Writes `a` into the program's result buffer in `family`'s form, with the truncation
/// rules of accept(2) and getsockname(2): copy at most `*len` bytes, then set `*len` to the
/// full size.
pub fn write_out(out: AddrOut, a: SocketAddrV4, family: c_int) {
    copy_out(out, &SockAddrBuf::new(a, family));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn both_forms_round_trip() {
        for family in [libc::AF_INET, libc::AF_INET6] {
            let b = SockAddrBuf::new(a("203.0.113.10:4242"), family);
            assert_eq!(b.family(), family);
            assert_eq!(b.v4(), Some(a("203.0.113.10:4242")));
            let want = if family == libc::AF_INET6 { 28 } else { 16 };
            assert_eq!(b.len() as usize, want);
        }
        let any6 = SockAddrBuf::new(a("0.0.0.0:80"), libc::AF_INET6);
        assert_eq!(any6.v4(), Some(a("0.0.0.0:80")));
    }

    #[test]
    fn native_ipv6_is_not_ipv4() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(from_v6(&ip), None);
        assert_eq!(
            from_v6(&"::ffff:10.0.0.1".parse().unwrap()),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(from_v6(&Ipv6Addr::UNSPECIFIED), Some(Ipv4Addr::UNSPECIFIED));
        // SAFETY: a null pointer is allowed and reads as nothing.
        assert_eq!(unsafe { parse(std::ptr::null(), 28) }, None);
        let b = SockAddrBuf::new(a("10.0.0.1:1"), libc::AF_INET6);
        // Too short for the family it claims.
        // SAFETY: b holds 28 readable bytes; we claim fewer.
        assert_eq!(unsafe { parse(b.as_ptr(), 16) }, None);
    }

    #[test]
    fn write_out_truncates_like_the_kernel() {
        let mut room = [0u8; 28];
        let mut len: socklen_t = 8;
        write_out(
            AddrOut {
                ptr: room.as_mut_ptr() as *mut sockaddr,
                len: &mut len,
            },
            a("1.2.3.4:5"),
            libc::AF_INET6,
        );
        assert_eq!(len, 28, "the full size, as the kernel reports it");
        assert_eq!(
            room[8..],
            [0u8; 20],
            "nothing written beyond the room given"
        );
    }
}
