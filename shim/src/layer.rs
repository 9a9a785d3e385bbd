//! The seam where GCB and DPF plug in.
//!
//! Hooks convert their raw arguments into the small descriptions below and ask the active
//! [`Layer`] what to do; the answer is an [`Outcome`]. Without `GCB_BROKER` and
//! `GCB_DPF_SERVER` no layer is installed and every hook bypasses to libc; with them the
//! installed layer is [`crate::stack`] (DPF where it can map, GCB for the rest). When is a
//! layer consulted?
//!
//! * fd-based calls (accept, recv*, send*, getsockname, getpeername, getsockopt, close,
//!   dup*, fcntl, epoll_ctl): only when the fd table says the fd is managed (`FdKind::Socket`). The table
//!   is the switch: a layer that wants to see a socket's calls (e.g. to run the AEH inside
//!   `recv`) puts it in the table when it starts managing it (bind, listen, connect).
//! * calls that create or name sockets (socket, bind, listen, connect) and the readiness
//!   calls (select, pselect, poll, ppoll, epoll_wait, epoll_pwait, epoll_pwait2): whenever a
//!   layer is installed, because GCB must see a `listen()` on any TCP socket, broker any
//!   `connect()`, and pump its management sockets while the program waits.
//!
//! How the asynchronous event handler (AEH) of the paper plugs in: a GCB layer implements
//! [`Layer::on_wait`] by adding its management sockets to the program's poll/select set
//! (for epoll: `epoll_ctl` them into the program's epoll fd with a private tag), calling
//! the real function in bounded slices, running the AEH on its own readiness (heartbeats,
//! broker commands, dial-backs that create accept-queue placeholders) and filtering its own
//! fds out of what the program sees. `on_accept`/`on_connect`/`on_io` do the same around
//! the single fd they block on. Layer code runs with the re-entrancy guard set, so every
//! libc call it makes goes straight to the real function.
//!
//! Pointers inside these descriptions are exactly what the program passed; a layer may
//! dereference them only under the C contract of the call they came from.

use libc::{c_int, c_uint, epoll_event, ssize_t};
use once_cell::sync::OnceCell;
use std::sync::Arc;

pub use crate::abi::{AddrIn, AddrOut, IoCall, OptOut, Outcome, WaitCall};
use crate::fdtable::FdEntry;

/// Bypass reason of the trait's defaults.
pub const NOT_HANDLED: &str = "the layer does not handle this call";

/// The GCB/DPF logic. Every method has a pass-through default.
pub trait Layer: Send + Sync {
    fn name(&self) -> &'static str;

    /// DPF: ask portfwd for a public mapping.
    fn on_bind(&self, _fd: c_int, _entry: Option<&Arc<FdEntry>>, _addr: AddrIn) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// GCB: register the listening socket with the broker.
    fn on_listen(
        &self,
        _fd: c_int,
        _entry: Option<&Arc<FdEntry>>,
        _backlog: c_int,
    ) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// GCB: broker the connection; DPF: same-network lookup, drop the mapping.
    fn on_connect(
        &self,
        _fd: c_int,
        _entry: Option<&Arc<FdEntry>>,
        _addr: AddrIn,
    ) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// GCB: return placeholder-replaced / reversed connections in arrival order.
    fn on_accept(
        &self,
        _fd: c_int,
        _entry: &Arc<FdEntry>,
        _addr: AddrOut,
        _flags: c_int,
    ) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// getsockname (`peer == false`) / getpeername: report the proxy/public/logical address.
    fn on_name(
        &self,
        _fd: c_int,
        _entry: &Arc<FdEntry>,
        _peer: bool,
        _addr: AddrOut,
    ) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// getsockopt on a managed socket: what a connection the kernel accepted would report
    /// (a brokered connection's IP_PKTOPTIONS).
    fn on_getsockopt(&self, _fd: c_int, _entry: &Arc<FdEntry>, _call: OptOut) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// getsockname on a socket the shim does not manage (e.g. an outbound connection):
    /// report the address where the host can be reached, if the socket is connected to
    /// a peer outside the private network (the identity model; see docs/architecture.md).
    fn on_unmanaged_name(&self, _fd: c_int, _addr: AddrOut) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    fn on_io(&self, _fd: c_int, _entry: &Arc<FdEntry>, _call: IoCall) -> Outcome<ssize_t> {
        Outcome::Bypass(NOT_HANDLED)
    }
    fn on_wait(&self, _call: WaitCall) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// epoll_ctl on a managed fd (e.g. to also watch a placeholder or relay fd).
    fn on_epoll_ctl(
        &self,
        _epfd: c_int,
        _op: c_int,
        _fd: c_int,
        _entry: &Arc<FdEntry>,
        _ev: *mut epoll_event,
    ) -> Outcome<c_int> {
        Outcome::Bypass(NOT_HANDLED)
    }
    /// The program closed one fd number of a managed socket (the table slot is already
    /// cleared; `last` says no other fd number in this process refers to it). Registration
    /// teardown belongs in the state's `Drop` or here when `last`.
    fn on_close(&self, _fd: c_int, _entry: &Arc<FdEntry>, _last: bool) {}
    /// close_range(lo, hi, flags) is about to run (shim fds already excluded).
    fn on_close_range(&self, _lo: c_uint, _hi: c_uint, _flags: c_int) {}
    /// pthread_atfork prepare: take the layer's own locks (before the fd table's), so a
    /// fork while another thread holds one cannot leave the child with a held lock.
    fn fork_prepare(&self) {}
    /// pthread_atfork parent: release what `fork_prepare` took.
    fn fork_parent(&self) {}
    /// pthread_atfork child: re-initialise what `fork_prepare` took (single thread).
    fn fork_child_locks(&self) {}
    /// In the child of fork() (locks already re-initialised).
    fn on_fork_child(&self) {}
    /// Just before exec (never in a vfork child): the value of `GCB_INHERIT` that hands
    /// the layer's state to the new image, or None.
    fn exec_handoff(&self) -> Option<String> {
        None
    }
}

static LAYER: OnceCell<Box<dyn Layer>> = OnceCell::new();

/// Whether getsockname() on accepted and outbound connections reports the address the
/// Internet knows them by (`GCB_PUBLIC_NAMES`, on unless `0`; see the identity model in
/// docs/architecture.md).
static PUBLIC_NAMES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether getsockname() on accepted and outbound connections reports the address the
/// Internet knows them by (`GCB_PUBLIC_NAMES`, on unless `0`).
pub fn public_names() -> bool {
    PUBLIC_NAMES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Set once at init from `GCB_PUBLIC_NAMES`.
pub fn set_public_names(on: bool) {
    PUBLIC_NAMES.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// The active layer, if any (one atomic load).
#[inline(always)]
pub fn active() -> Option<&'static dyn Layer> {
    LAYER.get().map(|b| &**b)
}

/// Install the layer (once per process). Returns false if one is already installed.
pub fn install(layer: Box<dyn Layer>) -> bool {
    let name = layer.name();
    let ok = LAYER.set(layer).is_ok();
    if ok {
        crate::debug!("layer {} active", name);
    }
    ok
}
