//! read, write, recv, __recv_chk, recvfrom, __recvfrom_chk, recvmsg, send, sendto, sendmsg.
//!
//! The hot path of every program: an unmanaged fd costs one table lookup and the real call.
//! read/write reach the layer as `recv`/`send` with no flags and no address, only for
//! managed sockets (a GCB UDP socket's datagrams carry relay framing that read() must not
//! show; iperf3 reads its UDP socket with read()). The `_chk` variants (_FORTIFY_SOURCE)
//! leave an overflowing call (`len > buflen`) to glibc, which aborts the program as it
//! would without the shim.

use libc::{c_int, c_void, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use super::{shim_fd_outcome, why, Outcome};
use crate::fdtable::{self, FdKind};
use crate::hook;
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

const NO_ADDR_OUT: AddrOut = AddrOut {
    ptr: std::ptr::null_mut(),
    len: std::ptr::null_mut(),
};
const NO_ADDR_IN: AddrIn = AddrIn {
    ptr: std::ptr::null(),
    len: 0,
};

fn recv_call(buf: *mut c_void, len: size_t, flags: c_int, from: AddrOut) -> IoCall {
    IoCall::Recv {
        buf,
        len,
        flags,
        from,
    }
}

fn send_call(buf: *const c_void, len: size_t, flags: c_int, to: AddrIn) -> IoCall {
    IoCall::Send {
        buf,
        len,
        flags,
        to,
    }
}

hook! {
    /// read(2).
    fn read(fd: c_int, buf: *mut c_void, len: size_t) -> ssize_t = sys::READ;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, recv_call(buf, len, 0, NO_ADDR_OUT));
}

hook! {
    /// write(2).
    fn write(fd: c_int, buf: *const c_void, len: size_t) -> ssize_t = sys::WRITE;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, send_call(buf, len, 0, NO_ADDR_IN));
}

hook! {
    /// recv(2).
    fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t = sys::RECV;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, recv_call(buf, len, flags, NO_ADDR_OUT));
}

hook! {
    /// __recv_chk (recv under _FORTIFY_SOURCE).
    fn __recv_chk(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        buflen: size_t,
        flags: c_int,
    ) -> ssize_t = sys::RECV_CHK;
    mine: fdtable::is_marked(fd) && len <= buflen;
    logic: io_logic(fd, recv_call(buf, len, flags, NO_ADDR_OUT));
}

hook! {
    /// recvfrom(2).
    fn recvfrom(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t = sys::RECVFROM;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, recv_call(buf, len, flags, AddrOut { ptr: addr, len: alen }));
}

hook! {
    /// __recvfrom_chk (recvfrom under _FORTIFY_SOURCE).
    fn __recvfrom_chk(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        buflen: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t = sys::RECVFROM_CHK;
    mine: fdtable::is_marked(fd) && len <= buflen;
    logic: io_logic(fd, recv_call(buf, len, flags, AddrOut { ptr: addr, len: alen }));
}

hook! {
    /// recvmsg(2).
    fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t = sys::RECVMSG;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, IoCall::RecvMsg { msg, flags });
}

hook! {
    /// send(2).
    fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t = sys::SEND;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, send_call(buf, len, flags, NO_ADDR_IN));
}

hook! {
    /// sendto(2).
    fn sendto(
        fd: c_int,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
        addr: *const sockaddr,
        alen: socklen_t,
    ) -> ssize_t = sys::SENDTO;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, send_call(buf, len, flags, AddrIn { ptr: addr, len: alen }));
}

hook! {
    /// sendmsg(2).
    fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t = sys::SENDMSG;
    mine: fdtable::is_marked(fd);
    logic: io_logic(fd, IoCall::SendMsg { msg, flags });
}
