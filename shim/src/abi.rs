//! What a hook hands to the logic and what it gets back: descriptions of the intercepted
//! calls (raw pointers exactly as the program passed them) and [`Outcome`].
//!
//! Floor 0: plain data, no behaviour. A layer may dereference the pointers only under
//! the C contract of the call they came from.

use libc::{
    c_int, epoll_event, fd_set, msghdr, nfds_t, pollfd, sigset_t, sockaddr, socklen_t, timespec,
    timeval,
};

/// Bypass reasons the hook machinery itself gives (layers give their own, specific ones).
pub mod why {
    /// The fd is not in the shim's table.
    pub const UNMANAGED: &str = "not a socket the shim manages";
    /// No GCB or DPF layer is installed.
    pub const NO_LAYER: &str = "no layer installed";
    /// A vfork/posix_spawn child shares the parent's memory and must not change the table.
    pub const FOREIGN_PROCESS: &str = "vfork or posix_spawn child";
    /// This thread is already inside the shim (its own traffic, a signal handler...).
    pub const REENTERED: &str = "re-entered: this thread is already inside the shim";
    /// The shim's logic panicked (logged once by the panic hook).
    pub const PANICKED: &str = "internal panic: falling back to the real call";
}

/// What a hook should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Call the real libc function with the program's arguments. The reason is logged at
    /// trace level (why the shim left this call alone).
    Bypass(&'static str),
    /// Return this value to the program (errno untouched).
    Handled(T),
    /// Return -1 (or the call's error value) with this errno.
    Error(c_int),
}

/// A socket address the program passed in.
#[derive(Clone, Copy, Debug)]
pub struct AddrIn {
    pub ptr: *const sockaddr,
    pub len: socklen_t,
}

/// A socket address buffer the program passed for the result (may be null).
#[derive(Clone, Copy, Debug)]
pub struct AddrOut {
    pub ptr: *mut sockaddr,
    pub len: *mut socklen_t,
}

/// A getsockopt(2) call's option and result buffer (may be null).
#[derive(Clone, Copy, Debug)]
pub struct OptOut {
    pub level: libc::c_int,
    pub opt: libc::c_int,
    pub ptr: *mut libc::c_void,
    pub len: *mut socklen_t,
}

/// A data-transfer call on a managed socket.
#[derive(Clone, Copy, Debug)]
pub enum IoCall {
    /// recv, __recv_chk, recvfrom, __recvfrom_chk (`from` is null for recv).
    Recv {
        buf: *mut libc::c_void,
        len: usize,
        flags: c_int,
        from: AddrOut,
    },
    RecvMsg {
        msg: *mut msghdr,
        flags: c_int,
    },
    /// send, sendto (`to.ptr` is null for send).
    Send {
        buf: *const libc::c_void,
        len: usize,
        flags: c_int,
        to: AddrIn,
    },
    SendMsg {
        msg: *const msghdr,
        flags: c_int,
    },
}

/// A readiness wait (where the AEH runs).
#[derive(Clone, Copy, Debug)]
pub enum WaitCall {
    Select {
        nfds: c_int,
        read: *mut fd_set,
        write: *mut fd_set,
        except: *mut fd_set,
        timeout: *mut timeval,
    },
    PSelect {
        nfds: c_int,
        read: *mut fd_set,
        write: *mut fd_set,
        except: *mut fd_set,
        timeout: *const timespec,
        sigmask: *const sigset_t,
    },
    /// poll, __poll_chk, ppoll, __ppoll_chk (`timeout_ms` is -2 when `timeout` is used).
    Poll {
        fds: *mut pollfd,
        nfds: nfds_t,
        timeout_ms: c_int,
        timeout: *const timespec,
        sigmask: *const sigset_t,
    },
    /// epoll_wait, epoll_pwait, epoll_pwait2 (`timeout_ms` is -2 when `timeout` is used).
    Epoll {
        epfd: c_int,
        events: *mut epoll_event,
        maxevents: c_int,
        timeout_ms: c_int,
        timeout: *const timespec,
        sigmask: *const sigset_t,
    },
}
