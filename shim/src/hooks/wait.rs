//! select, pselect, poll, __poll_chk, ppoll, __ppoll_chk, epoll_ctl, epoll_wait,
//! epoll_pwait, epoll_pwait2: where the AEH runs.
//!
//! Without a layer the cost is one load of the layer pointer. With one, the layer's
//! [`crate::layer::Layer::on_wait`] decides (see the layer module for how the AEH plugs in).
//! epoll_ctl is fd-based: the layer sees it only for managed fds.

use libc::{c_int, epoll_event, fd_set, nfds_t, pollfd, sigset_t, size_t, timespec, timeval};

use super::{shim_fd_outcome, why, Outcome};
use crate::fdtable::{self, FdKind};
use crate::hook;
use crate::layer::{self, WaitCall};
use crate::sys;

/// The fast test of the readiness calls.
#[inline(always)]
fn has_layer() -> bool {
    layer::active().is_some()
}

fn wait_logic(call: WaitCall) -> Outcome<c_int> {
    layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| l.on_wait(call))
}

/// No timespec / no signal mask.
const NONE: *const timespec = std::ptr::null();
const NO_MASK: *const sigset_t = std::ptr::null();
/// `timeout_ms` when the call gave a timespec instead.
const TIMESPEC: c_int = -2;

fn poll_logic(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout_ms: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> Outcome<c_int> {
    wait_logic(WaitCall::Poll {
        fds,
        nfds,
        timeout_ms,
        timeout,
        sigmask,
    })
}

fn epoll_logic(
    epfd: c_int,
    events: *mut epoll_event,
    maxevents: c_int,
    timeout_ms: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> Outcome<c_int> {
    wait_logic(WaitCall::Epoll {
        epfd,
        events,
        maxevents,
        timeout_ms,
        timeout,
        sigmask,
    })
}

hook! {
    /// select(2).
    fn select(
        nfds: c_int,
        rd: *mut fd_set,
        wr: *mut fd_set,
        ex: *mut fd_set,
        timeout: *mut timeval,
    ) -> c_int = sys::SELECT;
    mine: has_layer(), else why::NO_LAYER;
    logic: wait_logic(WaitCall::Select { nfds, read: rd, write: wr, except: ex, timeout });
}

hook! {
    /// pselect(2).
    fn pselect(
        nfds: c_int,
        rd: *mut fd_set,
        wr: *mut fd_set,
        ex: *mut fd_set,
        timeout: *const timespec,
        sigmask: *const sigset_t,
    ) -> c_int = sys::PSELECT;
    mine: has_layer(), else why::NO_LAYER;
    logic: wait_logic(WaitCall::PSelect {
        nfds,
        read: rd,
        write: wr,
        except: ex,
        timeout,
        sigmask,
    });
}

hook! {
    /// poll(2).
    fn poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int = sys::POLL;
    mine: has_layer(), else why::NO_LAYER;
    logic: poll_logic(fds, nfds, timeout, NONE, NO_MASK);
}

hook! {
    /// __poll_chk (poll under _FORTIFY_SOURCE).
    fn __poll_chk(fds: *mut pollfd, nfds: nfds_t, timeout: c_int, fdslen: size_t) -> c_int
        = sys::POLL_CHK;
    mine: has_layer(), else why::NO_LAYER;
    logic: poll_logic(fds, nfds, timeout, NONE, NO_MASK);
}

hook! {
    /// ppoll(2).
    fn ppoll(
        fds: *mut pollfd,
        nfds: nfds_t,
        timeout: *const timespec,
        sigmask: *const sigset_t,
    ) -> c_int = sys::PPOLL;
    mine: has_layer(), else why::NO_LAYER;
    logic: poll_logic(fds, nfds, TIMESPEC, timeout, sigmask);
}

hook! {
    /// __ppoll_chk (ppoll under _FORTIFY_SOURCE).
    fn __ppoll_chk(
        fds: *mut pollfd,
        nfds: nfds_t,
        timeout: *const timespec,
        sigmask: *const sigset_t,
        fdslen: size_t,
    ) -> c_int = sys::PPOLL_CHK;
    mine: has_layer(), else why::NO_LAYER;
    logic: poll_logic(fds, nfds, TIMESPEC, timeout, sigmask);
}

fn epoll_ctl_logic(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> Outcome<c_int> {
    if fdtable::is_owned(epfd) {
        return shim_fd_outcome();
    }
    let Some(e) = fdtable::get(fd) else {
        return Outcome::Bypass(why::UNMANAGED);
    };
    match &e.kind {
        FdKind::ShimOwned(_) => shim_fd_outcome(),
        FdKind::Socket(_) => layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| {
            l.on_epoll_ctl(epfd, op, fd, &e, ev)
        }),
    }
}

hook! {
    /// epoll_ctl(2).
    fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, ev: *mut epoll_event) -> c_int
        = sys::EPOLL_CTL;
    mine: fdtable::is_marked(fd) || fdtable::is_marked(epfd);
    logic: epoll_ctl_logic(epfd, op, fd, ev);
}

hook! {
    /// epoll_wait(2).
    fn epoll_wait(epfd: c_int, events: *mut epoll_event, maxevents: c_int, timeout: c_int)
        -> c_int = sys::EPOLL_WAIT;
    mine: has_layer(), else why::NO_LAYER;
    logic: epoll_logic(epfd, events, maxevents, timeout, NONE, NO_MASK);
}

hook! {
    /// epoll_pwait(2).
    fn epoll_pwait(
        epfd: c_int,
        events: *mut epoll_event,
        maxevents: c_int,
        timeout: c_int,
        sigmask: *const sigset_t,
    ) -> c_int = sys::EPOLL_PWAIT;
    mine: has_layer(), else why::NO_LAYER;
    logic: epoll_logic(epfd, events, maxevents, timeout, NONE, sigmask);
}

hook! {
    /// epoll_pwait2(2) (glibc >= 2.35).
    fn epoll_pwait2(
        epfd: c_int,
        events: *mut epoll_event,
        maxevents: c_int,
        timeout: *const timespec,
        sigmask: *const sigset_t,
    ) -> c_int = sys::EPOLL_PWAIT2;
    mine: has_layer(), else why::NO_LAYER;
    logic: epoll_logic(epfd, events, maxevents, TIMESPEC, timeout, sigmask);
}
