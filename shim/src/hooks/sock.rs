//! socket, bind, listen, connect, accept, accept4, getsockname, getpeername, getsockopt.
//!
//! socket() is never changed, but it goes through [`super::run`] (which makes sure init
//! ran) so that a socket created before the library's constructor ran still finds the
//! layer installed. bind, listen and connect are the layer's business whenever one is
//! installed (GCB must see every `listen()` and broker every `connect()`); accept and the
//! name calls only for managed fds. socket and accept return a new fd from the kernel:
//! whatever the table still held for that number is stale and is forgotten (`after:`),
//! except the entry of a brokered connection the layer's accept itself made (it carries
//! the logical peer that getpeername() reports).

use libc::{c_int, sockaddr, socklen_t};
use std::cell::Cell;
use std::sync::Arc;

use super::{shim_fd_outcome, why, Outcome};
use crate::fdtable::{self, FdEntry, FdKind};
use crate::hook;
use crate::layer::{self, AddrIn, AddrOut, Layer, OptOut};
use crate::sys;

/// Bypass reason of socket(): the shim only looks at sockets from bind/listen/connect on.
const CREATED: &str = "socket creation is never changed";

/// A new fd came back from the kernel: whatever the table held for that number is stale
/// (closed behind our back, e.g. by a raw syscall). One lookup when nothing is there.
#[inline(always)]
fn fresh_fd(fd: c_int) -> c_int {
    if fd >= 0 && fdtable::is_marked(fd) {
        drop(fdtable::remove(fd));
    }
    fd
}

thread_local! {
    /// The fd the layer's accept just returned on this thread (-1: none). The layer keeps
    /// its table entry right: a brokered connection's entry is new (it carries the logical
    /// peer), and the layer forgets a stale one for a kernel connection it returns.
    static LAYER_ACCEPTED: Cell<c_int> = const { Cell::new(-1) };
}

/// accept/accept4 logic: the layer's answer, noting an fd the layer returned.
fn accept_logic(
    fd: c_int,
    f: impl FnOnce(&dyn Layer, &Arc<FdEntry>) -> Outcome<c_int>,
) -> Outcome<c_int> {
    let out = managed_socket_logic(fd, f);
    if let Outcome::Handled(new) = out {
        LAYER_ACCEPTED.set(new);
    }
    out
}

/// After accept/accept4: [`fresh_fd`], unless the layer returned `new`.
#[inline(always)]
fn fresh_accepted_fd(new: c_int) -> c_int {
    // Always taken, so a note left by a layer accept whose fd had no entry cannot make a
    // later kernel accept of the same number keep a stale one.
    let layer_made = LAYER_ACCEPTED.replace(-1);
    if new >= 0 && layer_made != new && fdtable::is_marked(new) {
        drop(fdtable::remove(new));
    }
    new
}

/// Managed entry for a fd-based call: None = unmanaged; Err = shim-owned fd.
fn socket_entry(fd: c_int) -> Result<Option<Arc<FdEntry>>, ()> {
    match fdtable::get(fd) {
        Some(e) if matches!(e.kind, FdKind::ShimOwned(_)) => Err(()),
        other => Ok(other),
    }
}

/// bind/listen/connect: the layer decides, managed fd or not (not for shim-owned fds).
fn any_socket_logic(
    fd: c_int,
    f: impl FnOnce(&dyn Layer, Option<&Arc<FdEntry>>) -> Outcome<c_int>,
) -> Outcome<c_int> {
    match socket_entry(fd) {
        Err(()) => shim_fd_outcome(),
        Ok(e) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| f(l, e.as_ref())),
    }
}

/// accept/accept4/getsockname/getpeername: the layer decides for managed sockets only.
fn managed_socket_logic(
    fd: c_int,
    f: impl FnOnce(&dyn Layer, &Arc<FdEntry>) -> Outcome<c_int>,
) -> Outcome<c_int> {
    match socket_entry(fd) {
        Err(()) => shim_fd_outcome(),
        Ok(None) => Outcome::Bypass(why::UNMANAGED),
        Ok(Some(e)) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| f(l, &e)),
    }
}

/// The fast test of bind/listen/connect.
#[inline(always)]
fn managed_or_layer(fd: c_int) -> bool {
    fdtable::is_marked(fd) || layer::active().is_some()
}

hook! {
    /// socket(2).
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int = sys::SOCKET;
    mine: true;
    logic: Outcome::Bypass(CREATED);
    after: |fd| {
        crate::trace!("socket({}, {:#x}, {}) = {}", domain, ty, protocol, fd);
        fresh_fd(fd)
    };
}

hook! {
    /// bind(2).
    fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int = sys::BIND;
    mine: managed_or_layer(fd), else why::NO_LAYER;
    logic: any_socket_logic(fd, |l, e| l.on_bind(fd, e, AddrIn { ptr: addr, len }));
}

hook! {
    /// listen(2).
    fn listen(fd: c_int, backlog: c_int) -> c_int = sys::LISTEN;
    mine: {
        crate::debug!("listen({}, {})", fd, backlog);
        managed_or_layer(fd)
    }, else why::NO_LAYER;
    logic: any_socket_logic(fd, |l, e| l.on_listen(fd, e, backlog));
}

hook! {
    /// connect(2).
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int = sys::CONNECT;
    mine: {
        crate::debug!("connect({})", fd);
        managed_or_layer(fd)
    }, else why::NO_LAYER;
    logic: any_socket_logic(fd, |l, e| l.on_connect(fd, e, AddrIn { ptr: addr, len }));
}

hook! {
    /// accept(2).
    fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int = sys::ACCEPT;
    mine: fdtable::is_marked(fd);
    logic: accept_logic(fd, |l, e| l.on_accept(fd, e, AddrOut { ptr: addr, len }, 0));
    after: |new| {
        crate::trace!("accept({}) = {}", fd, new);
        fresh_accepted_fd(new)
    };
}

hook! {
    /// accept4(2).
    fn accept4(
        fd: c_int,
        addr: *mut sockaddr,
        len: *mut socklen_t,
        flags: c_int,
    ) -> c_int = sys::ACCEPT4;
    mine: fdtable::is_marked(fd);
    logic: accept_logic(fd, |l, e| {
        l.on_accept(fd, e, AddrOut { ptr: addr, len }, flags)
    });
    after: |new| {
        crate::trace!("accept4({}) = {}", fd, new);
        fresh_accepted_fd(new)
    };
}

/// getsockname: the layer decides for managed sockets, and answers for unmanaged ones
/// too (an outbound connection reports where the host can be reached).
fn sockname_logic(fd: c_int, addr: AddrOut) -> Outcome<c_int> {
    let Some(l) = layer::active() else {
        return Outcome::Bypass(why::NO_LAYER);
    };
    match socket_entry(fd) {
        Err(()) => shim_fd_outcome(),
        Ok(None) => l.on_unmanaged_name(fd, addr),
        Ok(Some(e)) => l.on_name(fd, &e, false, addr),
    }
}

hook! {
    /// getsockname(2). Not a hot call: with a layer installed it always reaches the layer.
    fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int = sys::GETSOCKNAME;
    mine: fdtable::is_marked(fd) || layer::active().is_some(), else why::NO_LAYER;
    logic: sockname_logic(fd, AddrOut { ptr: addr, len });
}

hook! {
    /// getsockopt(2): the layer's for managed sockets (a brokered connection reports the
    /// interface a connection the kernel accepted arrived on); one lookup for the rest.
    fn getsockopt(
        fd: c_int,
        level: c_int,
        opt: c_int,
        val: *mut libc::c_void,
        len: *mut socklen_t,
    ) -> c_int = sys::GETSOCKOPT;
    mine: fdtable::is_marked(fd);
    logic: managed_socket_logic(fd, |l, e| {
        l.on_getsockopt(fd, e, OptOut { level, opt, ptr: val, len })
    });
}

hook! {
    /// getpeername(2).
    fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int = sys::GETPEERNAME;
    mine: fdtable::is_marked(fd);
    logic: managed_socket_logic(fd, |l, e| l.on_name(fd, e, true, AddrOut { ptr: addr, len }));
}
