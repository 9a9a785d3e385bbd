//! read, write, recv, __recv_chk, recvfrom, __recvfrom_chk, recvmsg, send, sendto, sendmsg.
//!
//! The hot path of every program: an unmanaged fd costs one table lookup and the real call.
//! read/write reach the layer as `recv`/`send` with no flags and no address, only for
//! managed sockets (a GCB UDP socket's datagrams carry relay framing that read() must not
//! show; iperf3 reads its UDP socket with read()).

use libc::{c_int, c_void, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use super::{run, shim_fd_outcome, why, Outcome};
use crate::call_real;
use crate::fdtable::{self, FdKind};
use crate::layer::{self, AddrIn, AddrOut, IoCall};
use crate::sys;

fn io_logic(fd: c_int, call: IoCall) -> Outcome<ssize_t> {
    let Some(e) = fdtable::get(fd) else {
        return Outcome::Bypass(why::UNMANAGED);
    };
    match &e.kind {
        FdKind::ShimOwned(_) => shim_fd_outcome(),
        FdKind::Socket(_) => {
            layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| l.on_io(fd, &e, call))
        }
    }
}

const NO_ADDR: AddrOut = AddrOut {
    ptr: std::ptr::null_mut(),
    len: std::ptr::null_mut(),
};

#[no_mangle]
/// Hook for read(2).
///
/// # Safety
/// C ABI; same contract as libc read.
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, len: size_t) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::read_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len) };
        }
    }
    #[inline(never)]
    unsafe fn slow(fd: c_int, buf: *mut c_void, len: size_t) -> ssize_t {
        let real = move || call_real!(sys::read, fd, buf, len);
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Recv {
                        buf,
                        len,
                        flags: 0,
                        from: NO_ADDR,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len) }
}

#[no_mangle]
/// Hook for write(2).
///
/// # Safety
/// C ABI; same contract as libc write.
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, len: size_t) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::write_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len) };
        }
    }
    #[inline(never)]
    unsafe fn slow(fd: c_int, buf: *const c_void, len: size_t) -> ssize_t {
        let real = move || call_real!(sys::write, fd, buf, len);
        let to = AddrIn {
            ptr: std::ptr::null(),
            len: 0,
        };
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Send {
                        buf,
                        len,
                        flags: 0,
                        to,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len) }
}

#[no_mangle]
/// Hook for recv(2).
///
/// # Safety
/// C ABI; same contract as libc recv.
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::recv_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len, flags) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
        let real = move || call_real!(sys::recv, fd, buf, len, flags);
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Recv {
                        buf,
                        len,
                        flags,
                        from: NO_ADDR,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len, flags) }
}

#[no_mangle]
/// Hook for __recv_chk (recv under _FORTIFY_SOURCE).
///
/// # Safety
/// C ABI; same contract as glibc __recv_chk.
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if !fdtable::is_marked(fd) || len > buflen {
        if let Some(f) = sys::recv_chk_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len, buflen, flags) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        buflen: size_t,
        flags: c_int,
    ) -> ssize_t {
        let real = move || call_real!(sys::recv_chk, fd, buf, len, buflen, flags);
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Recv {
                        buf,
                        len,
                        flags,
                        from: NO_ADDR,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len, buflen, flags) }
}

#[no_mangle]
/// Hook for recvfrom(2).
///
/// # Safety
/// C ABI; same contract as libc recvfrom.
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::recvfrom_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len, flags, addr, alen) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t {
        let real = move || call_real!(sys::recvfrom, fd, buf, len, flags, addr, alen);
        let from = AddrOut {
            ptr: addr,
            len: alen,
        };
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Recv {
                        buf,
                        len,
                        flags,
                        from,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len, flags, addr, alen) }
}

#[no_mangle]
/// Hook for __recvfrom_chk (recvfrom under _FORTIFY_SOURCE).
///
/// # Safety
/// C ABI; same contract as glibc __recvfrom_chk.
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if !fdtable::is_marked(fd) || len > buflen {
        if let Some(f) = sys::recvfrom_chk_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len, buflen, flags, addr, alen) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        buflen: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t {
        let real = move || call_real!(sys::recvfrom_chk, fd, buf, len, buflen, flags, addr, alen);
        let from = AddrOut {
            ptr: addr,
            len: alen,
        };
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Recv {
                        buf,
                        len,
                        flags,
                        from,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len, buflen, flags, addr, alen) }
}

#[no_mangle]
/// Hook for recvmsg(2).
///
/// # Safety
/// C ABI; same contract as libc recvmsg.
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::recvmsg_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, msg, flags) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
        let real = move || call_real!(sys::recvmsg, fd, msg, flags);
        run(move || io_logic(fd, IoCall::RecvMsg { msg, flags }), real)
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, msg, flags) }
}

#[no_mangle]
/// Hook for send(2).
///
/// # Safety
/// C ABI; same contract as libc send.
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::send_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len, flags) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
        let real = move || call_real!(sys::send, fd, buf, len, flags);
        let to = AddrIn {
            ptr: std::ptr::null(),
            len: 0,
        };
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Send {
                        buf,
                        len,
                        flags,
                        to,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len, flags) }
}

#[no_mangle]
/// Hook for sendto(2).
///
/// # Safety
/// C ABI; same contract as libc sendto.
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
    addr: *const sockaddr,
    alen: socklen_t,
) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::sendto_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, buf, len, flags, addr, alen) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(
        fd: c_int,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
        addr: *const sockaddr,
        alen: socklen_t,
    ) -> ssize_t {
        let real = move || call_real!(sys::sendto, fd, buf, len, flags, addr, alen);
        let to = AddrIn {
            ptr: addr,
            len: alen,
        };
        run(
            move || {
                io_logic(
                    fd,
                    IoCall::Send {
                        buf,
                        len,
                        flags,
                        to,
                    },
                )
            },
            real,
        )
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, buf, len, flags, addr, alen) }
}

#[no_mangle]
/// Hook for sendmsg(2).
///
/// # Safety
/// C ABI; same contract as libc sendmsg.
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::sendmsg_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd, msg, flags) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
        let real = move || call_real!(sys::sendmsg, fd, msg, flags);
        run(move || io_logic(fd, IoCall::SendMsg { msg, flags }), real)
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd, msg, flags) }
}
