//! select, pselect, poll, __poll_chk, ppoll, __ppoll_chk, epoll_ctl, epoll_wait,
//! epoll_pwait, epoll_pwait2: where the AEH will run.
//!
//! Without a layer the cost is one load of the layer pointer. With one, the layer's
//! [`crate::layer::Layer::on_wait`] decides (see the layer module for how the AEH plugs in).

use libc::{c_int, epoll_event, fd_set, nfds_t, pollfd, sigset_t, size_t, timespec, timeval};

use super::{run, shim_fd_outcome, why, Outcome};
use crate::call_real;
use crate::fdtable::{self, FdKind};
use crate::layer::{self, WaitCall};
use crate::sys;

#[inline(always)]
fn wait_logic(call: WaitCall) -> Outcome<c_int> {
    layer::active().map_or(Outcome::Bypass(why::NO_LAYER), |l| l.on_wait(call))
}

#[no_mangle]
/// Hook for select(2).
///
/// # Safety
/// C ABI; same contract as libc select.
pub unsafe extern "C" fn select(
    nfds: c_int,
    read: *mut fd_set,
    write: *mut fd_set,
    except: *mut fd_set,
    timeout: *mut timeval,
) -> c_int {
    let real = move || call_real!(sys::select, nfds, read, write, except, timeout);
    if layer::active().is_none() {
        return real();
    }
    run(
        move || {
            wait_logic(WaitCall::Select {
                nfds,
                read,
                write,
                except,
                timeout,
            })
        },
        real,
    )
}

#[no_mangle]
/// Hook for pselect(2).
///
/// # Safety
/// C ABI; same contract as libc pselect.
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    read: *mut fd_set,
    write: *mut fd_set,
    except: *mut fd_set,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    let real = move || call_real!(sys::pselect, nfds, read, write, except, timeout, sigmask);
    if layer::active().is_none() {
        return real();
    }
    run(
        move || {
            wait_logic(WaitCall::PSelect {
                nfds,
                read,
                write,
                except,
                timeout,
                sigmask,
            })
        },
        real,
    )
}

fn poll_call(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout_ms: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> WaitCall {
    WaitCall::Poll {
        fds,
        nfds,
        timeout_ms,
        timeout,
        sigmask,
    }
}

#[no_mangle]
/// Hook for poll(2).
///
/// # Safety
/// C ABI; same contract as libc poll.
pub unsafe extern "C" fn poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int {
    let real = move || call_real!(sys::poll, fds, nfds, timeout);
    if layer::active().is_none() {
        return real();
    }
    run(
        move || {
            wait_logic(poll_call(
                fds,
                nfds,
                timeout,
                std::ptr::null(),
                std::ptr::null(),
            ))
        },
        real,
    )
}

#[no_mangle]
/// Hook for __poll_chk (poll under _FORTIFY_SOURCE).
///
/// # Safety
/// C ABI; same contract as glibc __poll_chk.
pub unsafe extern "C" fn __poll_chk(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    let real = move || call_real!(sys::poll_chk, fds, nfds, timeout, fdslen);
    if layer::active().is_none() {
        return real();
    }
    run(
        move || {
            wait_logic(poll_call(
                fds,
                nfds,
                timeout,
                std::ptr::null(),
                std::ptr::null(),
            ))
        },
        real,
    )
}

#[no_mangle]
/// Hook for ppoll(2).
///
/// # Safety
/// C ABI; same contract as libc ppoll.
pub unsafe extern "C" fn ppoll(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    let real = move || call_real!(sys::ppoll, fds, nfds, timeout, sigmask);
    if layer::active().is_none() {
        return real();
    }
    run(
        || wait_logic(poll_call(fds, nfds, -2, timeout, sigmask)),
        real,
    )
}

#[no_mangle]
/// Hook for __ppoll_chk (ppoll under _FORTIFY_SOURCE).
///
/// # Safety
/// C ABI; same contract as glibc __ppoll_chk.
pub unsafe extern "C" fn __ppoll_chk(
    fds: *mut pollfd,
    nfds: nfds_t,
    timeout: *const timespec,
    sigmask: *const sigset_t,
    fdslen: size_t,
) -> c_int {
    let real = move || call_real!(sys::ppoll_chk, fds, nfds, timeout, sigmask, fdslen);
    if layer::active().is_none() {
        return real();
    }
    run(
        || wait_logic(poll_call(fds, nfds, -2, timeout, sigmask)),
        real,
    )
}

#[no_mangle]
/// Hook for epoll_ctl(2).
///
/// # Safety
/// C ABI; same contract as libc epoll_ctl.
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    ev: *mut epoll_event,
) -> c_int {
    let real = move || call_real!(sys::epoll_ctl, epfd, op, fd, ev);
    if !fdtable::is_marked(fd) && !fdtable::is_marked(epfd) {
        return real();
    }
    run(
        move || {
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
        },
        real,
    )
}

fn epoll_call(
    epfd: c_int,
    events: *mut epoll_event,
    maxevents: c_int,
    timeout_ms: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> WaitCall {
    WaitCall::Epoll {
        epfd,
        events,
        maxevents,
        timeout_ms,
        timeout,
        sigmask,
    }
}

#[no_mangle]
/// Hook for epoll_wait(2).
///
/// # Safety
/// C ABI; same contract as libc epoll_wait.
pub unsafe extern "C" fn epoll_wait(
    epfd: c_int,
    events: *mut epoll_event,
    maxevents: c_int,
    timeout: c_int,
) -> c_int {
    let real = move || call_real!(sys::epoll_wait, epfd, events, maxevents, timeout);
    if layer::active().is_none() {
        return real();
    }
    run(
        move || {
            wait_logic(epoll_call(
                epfd,
                events,
                maxevents,
                timeout,
                std::ptr::null(),
                std::ptr::null(),
            ))
        },
        real,
    )
}

#[no_mangle]
/// Hook for epoll_pwait(2).
///
/// # Safety
/// C ABI; same contract as libc epoll_pwait.
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut epoll_event,
    maxevents: c_int,
    timeout: c_int,
    sigmask: *const sigset_t,
) -> c_int {
    let real = move || call_real!(sys::epoll_pwait, epfd, events, maxevents, timeout, sigmask);
    if layer::active().is_none() {
        return real();
    }
    run(
        move || {
            wait_logic(epoll_call(
                epfd,
                events,
                maxevents,
                timeout,
                std::ptr::null(),
                sigmask,
            ))
        },
        real,
    )
}

#[no_mangle]
/// Hook for epoll_pwait2(2) (glibc >= 2.35).
///
/// # Safety
/// C ABI; same contract as libc epoll_pwait2.
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut epoll_event,
    maxevents: c_int,
    timeout: *const timespec,
    sigmask: *const sigset_t,
) -> c_int {
    let real = move || call_real!(sys::epoll_pwait2, epfd, events, maxevents, timeout, sigmask);
    if layer::active().is_none() {
        return real();
    }
    run(
        || wait_logic(epoll_call(epfd, events, maxevents, -2, timeout, sigmask)),
        real,
    )
}
