//! socket, bind, listen, connect, accept, accept4, getsockname, getpeername.
//!
//! These are fixed-arity POSIX functions that every glibc defines, so they use
//! `redhook::hook!` (exported `#[no_mangle]` wrapper + `dlsym(RTLD_NEXT)` resolution +
//! `catch_unwind` around the body). The body is the same thin shape as the other hooks.

use libc::{c_int, sockaddr, socklen_t};
use std::sync::Arc;

use super::{run, shim_fd_outcome, why, Outcome};
use crate::fdtable::{self, FdEntry, FdKind};
use crate::layer::{self, AddrIn, AddrOut};

/// A new fd came back from the kernel: whatever the table held for that number is stale
/// (closed behind our back, e.g. by a raw syscall). One lookup when nothing is there.
#[inline(always)]
fn fresh_fd(fd: c_int) {
    if fd >= 0 && fdtable::is_marked(fd) {
        drop(fdtable::remove(fd));
    }
}

/// Managed entry for a fd-based call: None = unmanaged; Err = shim-owned fd.
fn socket_entry(fd: c_int) -> Result<Option<Arc<FdEntry>>, ()> {
    match fdtable::get(fd) {
        Some(e) if matches!(e.kind, FdKind::ShimOwned(_)) => Err(()),
        other => Ok(other),
    }
}

redhook::hook! {
    unsafe fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int => gcb_socket {
        crate::init::ensure();
        // SAFETY: real socket() with the program's arguments.
        let fd = unsafe { redhook::real!(socket)(domain, ty, protocol) };
        fresh_fd(fd);
        crate::trace!("socket({}, {:#x}, {}) = {}", domain, ty, protocol, fd);
        fd
    }
}

redhook::hook! {
    unsafe fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => gcb_bind {
        // SAFETY: real bind() with the program's arguments.
        let real = move || unsafe { redhook::real!(bind)(fd, addr, len) };
        if !fdtable::is_marked(fd) && layer::active().is_none() {
            return real();
        }
        run(move || match socket_entry(fd) {
            Err(()) => shim_fd_outcome(),
            Ok(e) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| {
                l.on_bind(fd, e.as_ref(), AddrIn { ptr: addr, len })
            }),
        }, real)
    }
}

redhook::hook! {
    unsafe fn listen(fd: c_int, backlog: c_int) -> c_int => gcb_listen {
        // SAFETY: real listen() with the program's arguments.
        let real = move || unsafe { redhook::real!(listen)(fd, backlog) };
        crate::debug!("listen({}, {})", fd, backlog);
        if !fdtable::is_marked(fd) && layer::active().is_none() {
            return real();
        }
        run(move || match socket_entry(fd) {
            Err(()) => shim_fd_outcome(),
            Ok(e) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| l.on_listen(fd, e.as_ref(), backlog)),
        }, real)
    }
}

redhook::hook! {
    unsafe fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int => gcb_connect {
        // SAFETY: real connect() with the program's arguments.
        let real = move || unsafe { redhook::real!(connect)(fd, addr, len) };
        crate::debug!("connect({})", fd);
        if !fdtable::is_marked(fd) && layer::active().is_none() {
            return real();
        }
        run(move || match socket_entry(fd) {
            Err(()) => shim_fd_outcome(),
            Ok(e) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| {
                l.on_connect(fd, e.as_ref(), AddrIn { ptr: addr, len })
            }),
        }, real)
    }
}

fn accept_common(fd: c_int, addr: AddrOut, flags: c_int) -> Outcome<c_int> {
    match socket_entry(fd) {
        Err(()) => shim_fd_outcome(),
        Ok(None) => Outcome::Bypass(why::UNMANAGED),
        Ok(Some(e)) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| {
            l.on_accept(fd, &e, addr, flags)
        }),
    }
}

redhook::hook! {
    unsafe fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => gcb_accept {
        // SAFETY: real accept() with the program's arguments.
        let real = move || unsafe { redhook::real!(accept)(fd, addr, len) };
        let r = if fdtable::is_marked(fd) {
            run(move || accept_common(fd, AddrOut { ptr: addr, len }, 0), real)
        } else {
            real()
        };
        fresh_fd(r);
        crate::trace!("accept({}) = {}", fd, r);
        r
    }
}

redhook::hook! {
    unsafe fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int => gcb_accept4 {
        // SAFETY: real accept4() with the program's arguments.
        let real = move || unsafe { redhook::real!(accept4)(fd, addr, len, flags) };
        let r = if fdtable::is_marked(fd) {
            run(move || accept_common(fd, AddrOut { ptr: addr, len }, flags), real)
        } else {
            real()
        };
        fresh_fd(r);
        crate::trace!("accept4({}) = {}", fd, r);
        r
    }
}

fn name_common(fd: c_int, peer: bool, addr: AddrOut) -> Outcome<c_int> {
    match socket_entry(fd) {
        Err(()) => shim_fd_outcome(),
        Ok(None) => Outcome::Bypass(why::UNMANAGED),
        Ok(Some(e)) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| {
            l.on_name(fd, &e, peer, addr)
        }),
    }
}

redhook::hook! {
    unsafe fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => gcb_getsockname {
        // SAFETY: real getsockname() with the program's arguments.
        let real = move || unsafe { redhook::real!(getsockname)(fd, addr, len) };
        if !fdtable::is_marked(fd) {
            return real();
        }
        run(move || name_common(fd, false, AddrOut { ptr: addr, len }), real)
    }
}

redhook::hook! {
    unsafe fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int => gcb_getpeername {
        // SAFETY: real getpeername() with the program's arguments.
        let real = move || unsafe { redhook::real!(getpeername)(fd, addr, len) };
        if !fdtable::is_marked(fd) {
            return real();
        }
        run(move || name_common(fd, true, AddrOut { ptr: addr, len }), real)
    }
}
