//! Floor 0: the real libc functions behind our hooks, errno, and the shim's own raw helpers
//! (which always use the real functions, whatever the re-entrancy state).
//!
//! The table below has one typed [`Real`](crate::real::Real) cell per hooked symbol: the
//! hook named `recv` (see [`crate::hooks`]) calls the real `recv` through `RECV`, and so
//! on. `fcntl` is variadic in C. We *call* the real one through a variadic pointer type, so
//! the caller side of the ABI is exact (Rust can call C-variadic functions; it just cannot
//! define them on stable).
//!
//! errno is read with [`errno`] and set only by [`crate::hooks::finish`] (the logger saves
//! and restores it around its own write).

use libc::{
    c_char, c_int, c_uint, c_ulong, c_void, epoll_event, fd_set, msghdr, nfds_t, pid_t, pollfd,
    sigset_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval,
};

type Fd = c_int;

crate::real_fns! {
    SOCKET = c"socket": unsafe extern "C" fn(c_int, c_int, c_int) -> Fd;
    BIND = c"bind": unsafe extern "C" fn(Fd, *const sockaddr, socklen_t) -> c_int;
    LISTEN = c"listen": unsafe extern "C" fn(Fd, c_int) -> c_int;
    CONNECT = c"connect": unsafe extern "C" fn(Fd, *const sockaddr, socklen_t) -> c_int;
    ACCEPT = c"accept": unsafe extern "C" fn(Fd, *mut sockaddr, *mut socklen_t) -> Fd;
    ACCEPT4 = c"accept4": unsafe extern "C" fn(Fd, *mut sockaddr, *mut socklen_t, c_int) -> Fd;
    GETSOCKNAME = c"getsockname": unsafe extern "C" fn(Fd, *mut sockaddr, *mut socklen_t) -> c_int;
    GETPEERNAME = c"getpeername": unsafe extern "C" fn(Fd, *mut sockaddr, *mut socklen_t) -> c_int;
    GETSOCKOPT = c"getsockopt": unsafe extern "C" fn(Fd, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int;

    CLOSE = c"close": unsafe extern "C" fn(Fd) -> c_int;
    CLOSE_RANGE = c"close_range": unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int;
    CLOSEFROM = c"closefrom": unsafe extern "C" fn(Fd);
    DUP = c"dup": unsafe extern "C" fn(Fd) -> Fd;
    DUP2 = c"dup2": unsafe extern "C" fn(Fd, Fd) -> Fd;
    DUP3 = c"dup3": unsafe extern "C" fn(Fd, Fd, c_int) -> Fd;
    FCNTL = c"fcntl": unsafe extern "C" fn(Fd, c_int, ...) -> c_int;
    FCNTL64 = c"fcntl64": unsafe extern "C" fn(Fd, c_int, ...) -> c_int;

    SELECT = c"select": unsafe extern "C" fn(
        c_int,
        *mut fd_set,
        *mut fd_set,
        *mut fd_set,
        *mut timeval,
    ) -> c_int;
    PSELECT = c"pselect": unsafe extern "C" fn(
        c_int,
        *mut fd_set,
        *mut fd_set,
        *mut fd_set,
        *const timespec,
        *const sigset_t,
    ) -> c_int;
    POLL = c"poll": unsafe extern "C" fn(*mut pollfd, nfds_t, c_int) -> c_int;
    POLL_CHK = c"__poll_chk": unsafe extern "C" fn(*mut pollfd, nfds_t, c_int, size_t) -> c_int;
    PPOLL = c"ppoll": unsafe extern "C" fn(
        *mut pollfd,
        nfds_t,
        *const timespec,
        *const sigset_t,
    ) -> c_int;
    PPOLL_CHK = c"__ppoll_chk": unsafe extern "C" fn(
        *mut pollfd,
        nfds_t,
        *const timespec,
        *const sigset_t,
        size_t,
    ) -> c_int;
    EPOLL_CTL = c"epoll_ctl": unsafe extern "C" fn(Fd, c_int, Fd, *mut epoll_event) -> c_int;
    EPOLL_WAIT = c"epoll_wait": unsafe extern "C" fn(Fd, *mut epoll_event, c_int, c_int) -> c_int;
    EPOLL_PWAIT = c"epoll_pwait": unsafe extern "C" fn(
        Fd,
        *mut epoll_event,
        c_int,
        c_int,
        *const sigset_t,
    ) -> c_int;
    EPOLL_PWAIT2 = c"epoll_pwait2": unsafe extern "C" fn(
        Fd,
        *mut epoll_event,
        c_int,
        *const timespec,
        *const sigset_t,
    ) -> c_int;

    READ = c"read": unsafe extern "C" fn(Fd, *mut c_void, size_t) -> ssize_t;
    WRITE = c"write": unsafe extern "C" fn(Fd, *const c_void, size_t) -> ssize_t;
    RECV = c"recv": unsafe extern "C" fn(Fd, *mut c_void, size_t, c_int) -> ssize_t;
    RECV_CHK = c"__recv_chk": unsafe extern "C" fn(
        Fd,
        *mut c_void,
        size_t,
        size_t,
        c_int,
    ) -> ssize_t;
    RECVFROM = c"recvfrom": unsafe extern "C" fn(
        Fd,
        *mut c_void,
        size_t,
        c_int,
        *mut sockaddr,
        *mut socklen_t,
    ) -> ssize_t;
    RECVFROM_CHK = c"__recvfrom_chk": unsafe extern "C" fn(
        Fd,
        *mut c_void,
        size_t,
        size_t,
        c_int,
        *mut sockaddr,
        *mut socklen_t,
    ) -> ssize_t;
    RECVMSG = c"recvmsg": unsafe extern "C" fn(Fd, *mut msghdr, c_int) -> ssize_t;
    SEND = c"send": unsafe extern "C" fn(Fd, *const c_void, size_t, c_int) -> ssize_t;
    SENDTO = c"sendto": unsafe extern "C" fn(
        Fd,
        *const c_void,
        size_t,
        c_int,
        *const sockaddr,
        socklen_t,
    ) -> ssize_t;
    SENDMSG = c"sendmsg": unsafe extern "C" fn(Fd, *const msghdr, c_int) -> ssize_t;

    FORK = c"fork": unsafe extern "C" fn() -> pid_t;
    EXECVE = c"execve": unsafe extern "C" fn(
        *const c_char,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int;
    EXECV = c"execv": unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int;
    EXECVP = c"execvp": unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int;
    EXECVPE = c"execvpe": unsafe extern "C" fn(
        *const c_char,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int;
}

/// The calling thread's errno: the one place the shim reads it.
#[inline]
pub fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno, always valid.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's errno: [`crate::hooks::finish`] does (the one place a
/// program-visible errno is chosen), and the logger restores the value it found.
#[inline]
pub fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns the calling thread's errno, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// The real write(2), for the logger (which must never go through the hook).
#[inline]
pub fn write() -> Option<unsafe extern "C" fn(Fd, *const c_void, size_t) -> ssize_t> {
    WRITE.get()
}

/// Close an fd of the shim's own with the real close(2).
pub fn close_raw(fd: c_int) {
    match CLOSE.get() {
        // SAFETY: real close on an fd the caller owns.
        Some(f) => unsafe {
            f(fd);
        },
        // SAFETY: plain syscall on an fd the caller owns.
        None => unsafe {
            libc::syscall(libc::SYS_close, fd as libc::c_long);
        },
    }
}

/// fcntl with an integer argument, via the real function: the result, or errno.
pub fn fcntl_raw(fd: c_int, cmd: c_int, arg: c_ulong) -> Result<c_int, c_int> {
    let r = match FCNTL.get() {
        // SAFETY: real fcntl called with an integer argument, which is what `cmd` takes.
        Some(f) => unsafe { f(fd, cmd, arg) },
        // SAFETY: the same call as a plain syscall.
        None => unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as c_int },
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}
