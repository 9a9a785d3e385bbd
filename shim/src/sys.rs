//! Pointers to the real libc functions behind our hand-written hooks, and the shim's own
//! raw helpers (which always use the real functions, whatever the re-entrancy state).
//!
//! `fcntl` is variadic in C. We *call* the real one through a variadic pointer type, so
//! the caller side of the ABI is exact (Rust can call C-variadic functions; it just cannot
//! define them on stable).

use libc::{
    c_char, c_int, c_uint, c_ulong, c_void, epoll_event, fd_set, msghdr, nfds_t, pid_t, pollfd,
    sigset_t, size_t, sockaddr, socklen_t, ssize_t, timespec, timeval,
};

use crate::real_fn;

real_fn!(
    CLOSE,
    close,
    close_loaded,
    c"close",
    unsafe extern "C" fn(c_int) -> c_int
);
real_fn!(
    CLOSE_RANGE,
    close_range,
    close_range_loaded,
    c"close_range",
    unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int
);
real_fn!(
    CLOSEFROM,
    closefrom,
    closefrom_loaded,
    c"closefrom",
    unsafe extern "C" fn(c_int)
);
real_fn!(
    DUP,
    dup,
    dup_loaded,
    c"dup",
    unsafe extern "C" fn(c_int) -> c_int
);
real_fn!(
    DUP2,
    dup2,
    dup2_loaded,
    c"dup2",
    unsafe extern "C" fn(c_int, c_int) -> c_int
);
real_fn!(
    DUP3,
    dup3,
    dup3_loaded,
    c"dup3",
    unsafe extern "C" fn(c_int, c_int, c_int) -> c_int
);
real_fn!(
    FCNTL,
    fcntl,
    fcntl_loaded,
    c"fcntl",
    unsafe extern "C" fn(c_int, c_int, ...) -> c_int
);
real_fn!(
    FCNTL64,
    fcntl64,
    fcntl64_loaded,
    c"fcntl64",
    unsafe extern "C" fn(c_int, c_int, ...) -> c_int
);

real_fn!(
    SELECT,
    select,
    select_loaded,
    c"select",
    unsafe extern "C" fn(c_int, *mut fd_set, *mut fd_set, *mut fd_set, *mut timeval) -> c_int
);
real_fn!(
    PSELECT,
    pselect,
    pselect_loaded,
    c"pselect",
    unsafe extern "C" fn(
        c_int,
        *mut fd_set,
        *mut fd_set,
        *mut fd_set,
        *const timespec,
        *const sigset_t,
    ) -> c_int
);
real_fn!(
    POLL,
    poll,
    poll_loaded,
    c"poll",
    unsafe extern "C" fn(*mut pollfd, nfds_t, c_int) -> c_int
);
real_fn!(
    POLL_CHK,
    poll_chk,
    poll_chk_loaded,
    c"__poll_chk",
    unsafe extern "C" fn(*mut pollfd, nfds_t, c_int, size_t) -> c_int
);
real_fn!(
    PPOLL,
    ppoll,
    ppoll_loaded,
    c"ppoll",
    unsafe extern "C" fn(*mut pollfd, nfds_t, *const timespec, *const sigset_t) -> c_int
);
real_fn!(
    PPOLL_CHK,
    ppoll_chk,
    ppoll_chk_loaded,
    c"__ppoll_chk",
    unsafe extern "C" fn(*mut pollfd, nfds_t, *const timespec, *const sigset_t, size_t) -> c_int
);
real_fn!(
    EPOLL_CTL,
    epoll_ctl,
    epoll_ctl_loaded,
    c"epoll_ctl",
    unsafe extern "C" fn(c_int, c_int, c_int, *mut epoll_event) -> c_int
);
real_fn!(
    EPOLL_WAIT,
    epoll_wait,
    epoll_wait_loaded,
    c"epoll_wait",
    unsafe extern "C" fn(c_int, *mut epoll_event, c_int, c_int) -> c_int
);
real_fn!(
    EPOLL_PWAIT,
    epoll_pwait,
    epoll_pwait_loaded,
    c"epoll_pwait",
    unsafe extern "C" fn(c_int, *mut epoll_event, c_int, c_int, *const sigset_t) -> c_int
);
real_fn!(
    EPOLL_PWAIT2,
    epoll_pwait2,
    epoll_pwait2_loaded,
    c"epoll_pwait2",
    unsafe extern "C" fn(c_int, *mut epoll_event, c_int, *const timespec, *const sigset_t) -> c_int
);

real_fn!(
    READ,
    read,
    read_loaded,
    c"read",
    unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t
);
real_fn!(
    WRITE,
    write,
    write_loaded,
    c"write",
    unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t
);
real_fn!(
    RECV,
    recv,
    recv_loaded,
    c"recv",
    unsafe extern "C" fn(c_int, *mut c_void, size_t, c_int) -> ssize_t
);
real_fn!(
    RECV_CHK,
    recv_chk,
    recv_chk_loaded,
    c"__recv_chk",
    unsafe extern "C" fn(c_int, *mut c_void, size_t, size_t, c_int) -> ssize_t
);
real_fn!(
    RECVFROM,
    recvfrom,
    recvfrom_loaded,
    c"recvfrom",
    unsafe extern "C" fn(
        c_int,
        *mut c_void,
        size_t,
        c_int,
        *mut sockaddr,
        *mut socklen_t,
    ) -> ssize_t
);
real_fn!(
    RECVFROM_CHK,
    recvfrom_chk,
    recvfrom_chk_loaded,
    c"__recvfrom_chk",
    unsafe extern "C" fn(
        c_int,
        *mut c_void,
        size_t,
        size_t,
        c_int,
        *mut sockaddr,
        *mut socklen_t,
    ) -> ssize_t
);
real_fn!(
    RECVMSG,
    recvmsg,
    recvmsg_loaded,
    c"recvmsg",
    unsafe extern "C" fn(c_int, *mut msghdr, c_int) -> ssize_t
);
real_fn!(
    SEND,
    send,
    send_loaded,
    c"send",
    unsafe extern "C" fn(c_int, *const c_void, size_t, c_int) -> ssize_t
);
real_fn!(
    SENDTO,
    sendto,
    sendto_loaded,
    c"sendto",
    unsafe extern "C" fn(
        c_int,
        *const c_void,
        size_t,
        c_int,
        *const sockaddr,
        socklen_t,
    ) -> ssize_t
);
real_fn!(
    SENDMSG,
    sendmsg,
    sendmsg_loaded,
    c"sendmsg",
    unsafe extern "C" fn(c_int, *const msghdr, c_int) -> ssize_t
);

real_fn!(
    FORK,
    fork,
    fork_loaded,
    c"fork",
    unsafe extern "C" fn() -> pid_t
);
real_fn!(
    EXECVE,
    execve,
    execve_loaded,
    c"execve",
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int
);
real_fn!(
    EXECV,
    execv,
    execv_loaded,
    c"execv",
    unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int
);
real_fn!(
    EXECVP,
    execvp,
    execvp_loaded,
    c"execvp",
    unsafe extern "C" fn(*const c_char, *const *const c_char) -> c_int
);
real_fn!(
    EXECVPE,
    execvpe,
    execvpe_loaded,
    c"execvpe",
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int
);

fn errno() -> c_int {
    // SAFETY: errno location is always valid for the calling thread.
    unsafe { *libc::__errno_location() }
}

/// Close an fd of the shim's own with the real close(2).
pub fn close_raw(fd: c_int) {
    match close() {
        // SAFETY: real close on an fd the caller owns.
        Some(f) => unsafe {
            f(fd);
        },
        // SAFETY: plain syscall.
        None => unsafe {
            libc::syscall(libc::SYS_close, fd as libc::c_long);
        },
    }
}

/// fcntl with an integer argument, via the real function.
pub fn fcntl_raw(fd: c_int, cmd: c_int, arg: c_ulong) -> Result<c_int, c_int> {
    // SAFETY: real fcntl called with an integer argument, which is what `cmd` takes.
    let r = match fcntl() {
        Some(f) => unsafe { f(fd, cmd, arg) },
        None => unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as c_int },
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// Resolve every real function now (called at init), so the hooks' fast paths find the
/// pointer already cached.
pub fn resolve_all() {
    let _ = close();
    let _ = close_range();
    let _ = closefrom();
    let _ = dup();
    let _ = dup2();
    let _ = dup3();
    let _ = fcntl();
    let _ = fcntl64();
    let _ = select();
    let _ = pselect();
    let _ = poll();
    let _ = poll_chk();
    let _ = ppoll();
    let _ = ppoll_chk();
    let _ = epoll_ctl();
    let _ = epoll_wait();
    let _ = epoll_pwait();
    let _ = epoll_pwait2();
    let _ = read();
    let _ = write();
    let _ = recv();
    let _ = recv_chk();
    let _ = recvfrom();
    let _ = recvfrom_chk();
    let _ = recvmsg();
    let _ = send();
    let _ = sendto();
    let _ = sendmsg();
    let _ = fork();
    let _ = execve();
    let _ = execv();
    let _ = execvp();
    let _ = execvpe();
}
