//! The exported hooks: every interposed symbol has the same shape, written once in
//! [`hook!`](crate::hook).
//!
//! ```ignore
//! hook! {
//!     /// recv(2).
//!     fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t = sys::RECV;
//!     mine: fdtable::is_marked(fd);
//!     logic: io_logic(fd, IoCall::Recv { buf, len, flags, from: NO_ADDR });
//! }
//! ```
//!
//! declares the exported `recv` (through `redhook::hook!`, which adds the `#[no_mangle]
//! extern "C"` wrapper and a last-resort `catch_unwind`), and inside it:
//!
//! 1. `real`: the real function through its cached pointer in [`crate::sys`] (`sys::RECV`,
//!    resolved at init; missing in libc -> `ENOSYS`);
//! 2. the fast path: `mine:` is false -> `return real()`. For fd-based calls this is
//!    [`crate::fdtable::is_marked`] (one or two loads, no lock, allocation or syscall): the
//!    whole cost for the program's ordinary sockets and files, and silent. A hook whose
//!    test is "a layer is installed" names its reason (`mine: ..., else why::NO_LAYER`),
//!    which is logged at trace level (one Relaxed load of the log level otherwise);
//! 3. the slow path, [`run`]: enter the re-entrancy guard (already inside the shim ->
//!    `real()`, traced as [`REENTERED`]), make sure init ran, call `logic:` under
//!    `catch_unwind` (a panic becomes a bypass) and hand its [`Outcome`] to [`finish`]: the
//!    one place errno is set. `Bypass(why)` is traced as `<call>: bypass: <why>` and calls
//!    `real()` after the guard is released; `Handled(v)` returns `v`; `Error(e)` sets errno
//!    and returns the call's error value. `logic(real):` binds the real call for logic that
//!    must call it itself (dup2 moving a shim fd out of the way first);
//! 4. the optional `after:` step on the value about to be returned, whichever path made it
//!    (socket/accept forget a stale table entry for the fd number the kernel returned).
//!
//! errno is read in one place, [`crate::sys::errno`]; logic that called the real function
//! itself turns its result into an outcome with [`outcome_of`].
//!
//! Modules: [`sock`] (socket, bind, listen, connect, accept, accept4, getsockname,
//! getpeername), [`fds`] (close, close_range, closefrom, dup, dup2, dup3, fcntl, fcntl64),
//! [`io`] (read, write, recv*, send*), [`wait`] (select, pselect, poll, ppoll, epoll_ctl,
//! epoll_wait, epoll_pwait, epoll_pwait2), [`process`] (fork, exec family). Each hook is a
//! module of its family named after the symbol (e.g. `hooks::io::recv`).

use std::panic::{catch_unwind, AssertUnwindSafe};

pub use crate::abi::{why, Outcome};
use crate::guard::Guard;

pub mod fds;
pub mod io;
pub mod process;
pub mod sock;
pub mod wait;

/// Bypass reason: the thread is already running shim logic (the shim's own libc calls, or
/// a signal handler interrupting it), so the call goes to libc unchanged.
pub const REENTERED: &str = "re-entered: this thread is already inside the shim";

/// C return types and their error value.
pub trait Ret: Copy + PartialEq {
    const ERR: Self;
}
impl Ret for i32 {
    const ERR: i32 = -1;
}
impl Ret for isize {
    const ERR: isize = -1;
}
impl Ret for () {
    const ERR: () = ();
}

/// Trace a bypass with the call's name. Costs one Relaxed load unless trace is enabled.
#[inline(always)]
pub fn trace_bypass(call: &'static str, why: &'static str) {
    crate::trace!("{}: bypass: {}", call, why);
}

/// The one place where an [`Outcome`] becomes a C return value and errno is set.
#[inline(always)]
pub fn finish<T: Ret>(call: &'static str, out: Outcome<T>, real: impl FnOnce() -> T) -> T {
    match out {
        Outcome::Bypass(why) => {
            trace_bypass(call, why);
            real()
        }
        Outcome::Handled(v) => v,
        Outcome::Error(e) => {
            // SAFETY: __errno_location returns the calling thread's errno, always valid.
            unsafe { *libc::__errno_location() = e };
            T::ERR
        }
    }
}

/// The slow path of every hook: re-entrancy guard, init, panic containment, outcome.
/// The guard is released before the real function runs, so a signal handler that
/// interrupts a long blocking call still goes through the shim normally.
///
/// Never inlined and marked cold: the hooks' fast paths then compile to the `mine` test,
/// one load and a call of the real function, without saving registers for this.
#[cold]
#[inline(never)]
pub fn run<T: Ret>(
    call: &'static str,
    logic: impl FnOnce() -> Outcome<T>,
    real: impl FnOnce() -> T,
) -> T {
    let out = {
        let Some(_g) = Guard::enter() else {
            trace_bypass(call, REENTERED);
            return real();
        };
        crate::init::ensure();
        // A panic is reported once by the panic hook installed at init; then pass through.
        catch_unwind(AssertUnwindSafe(logic)).unwrap_or(Outcome::Bypass(why::PANICKED))
    };
    finish(call, out, real)
}

/// The outcome of a real call that the logic made itself: its value, or `Error(errno)`.
#[inline]
pub fn outcome_of<T: Ret>(r: T) -> Outcome<T> {
    if r == T::ERR {
        Outcome::Error(crate::sys::errno())
    } else {
        Outcome::Handled(r)
    }
}

/// The real function is missing (symbol not defined after us): ENOSYS.
#[cold]
#[inline(never)]
pub fn no_real<T: Ret>() -> T {
    finish("", Outcome::Error(libc::ENOSYS), || T::ERR)
}

/// Outcome for a program call on a shim-owned fd: the program never received that fd, so
/// it gets what it would get without the shim, EBADF.
pub fn shim_fd_outcome<T>() -> Outcome<T> {
    Outcome::Error(libc::EBADF)
}

/// Declares one hook; see the module docs for the shape and what each clause means.
///
/// ```ignore
/// hook! {
///     /// docs
///     fn NAME(ARG: TYPE, ...) -> RET = sys::REAL_CELL;
///     mine: EXPR [, else REASON];   // false -> the real function, directly
///     logic[(real)]: EXPR;          // Outcome<RET>, run under hooks::run
///     [after: |r| EXPR;]            // applied to the value returned, whatever the path
/// }
/// ```
///
/// The expansion is a module `NAME` (it glob-imports its parent, so the clauses see the
/// parent's items) holding `redhook::hook!`'s exported `NAME`.
#[macro_export]
#[doc(hidden)]
macro_rules! hook {
    (
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $cell:path;
        mine: $mine:expr $(, else $why:expr)?;
        logic $(($real:ident))?: $logic:expr;
        $(after: |$res:ident| $after:expr;)?
    ) => {
        $(#[$doc])*
        pub mod $name {
            #[allow(unused_imports)]
            use super::*;

            redhook::hook! {
                unsafe fn $name($($arg: $ty),*) -> $ret => hook {
                    let result: $ret = if !($mine) {
                        $($crate::hooks::trace_bypass(stringify!($name), $why);)?
                        // SAFETY: the program's own call, passed on unchanged.
                        unsafe { real($($arg),*) }
                    } else {
                        // SAFETY: as for `real`.
                        unsafe { slow($($arg),*) }
                    };
                    $(let $res = result; let result: $ret = $after;)?
                    result
                }
            }

            /// The real function with the program's arguments.
            ///
            /// # Safety
            /// The C contract of the real function (the program's call upholds it).
            #[inline(always)]
            unsafe fn real($($arg: $ty),*) -> $ret {
                match $cell.get() {
                    // SAFETY: the real libc function, called with the unchanged arguments
                    // the program passed to this hook; the program upholds its C contract.
                    Some(f) => unsafe { f($($arg),*) },
                    None => missing(),
                }
            }

            /// The real function is missing: ENOSYS. `extern "C"` (cannot unwind), like
            /// `slow`.
            #[cold]
            #[inline(never)]
            extern "C" fn missing() -> $ret {
                $crate::hooks::no_real()
            }

            /// The slow path. Out of line, cold and `extern "C"` (cannot unwind: `run`
            /// contains every panic of the logic), so the fast path saves no registers
            /// for it and keeps its tail call of the real function.
            ///
            /// # Safety
            /// As for `real`.
            #[cold]
            #[inline(never)]
            unsafe extern "C" fn slow($($arg: $ty),*) -> $ret {
                // SAFETY: as for `real`; the closure only runs with the arguments it
                // captured, which are the program's.
                let real = move || unsafe { real($($arg),*) };
                $crate::hooks::run(
                    stringify!($name),
                    move || {
                        $(let $real = real;)?
                        $logic
                    },
                    real,
                )
            }
        }
    };
}
