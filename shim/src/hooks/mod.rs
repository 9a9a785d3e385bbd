//! The exported hooks: every interposed symbol has the same shape, written once in
//! [`hook!`](crate::hook).
//!
//! ```text
//! hook! {
//!     /// recv(2).
//!     fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t = sys::RECV;
//!     mine: fdtable::is_marked(fd);
//!     logic: io_logic(fd, recv_call(buf, len, flags, NO_ADDR_OUT));
//! }
//! ```
//!
//! declares the module `hooks::io::recv` holding the exported `recv` (through
//! `redhook::hook!`, which writes the `#[no_mangle] extern "C"` function and a last-resort
//! `catch_unwind` around its body) and three helpers: `real` (the real function),
//! `missing` (ENOSYS) and `slow`. Clauses: `mine:` says whether the call may concern the
//! shim (`, else REASON` names why not, for tests that are not the per-fd hot path);
//! `logic:` gives the [`Outcome`] (`logic(real):` binds the real call for logic that must
//! make it itself, e.g. dup2 moving a shim fd out of the way first); the optional `after:`
//! runs on the value about to be returned, whichever path made it (socket/accept forget a
//! stale table entry for the fd number the kernel returned).
//!
//! ## One call, end to end: `recv(fd, buf, len, 0)`
//!
//! 1. The program's call binds to our `recv` (LD_PRELOAD objects come first in the lookup
//!    scope).
//! 2. Fast path: `mine` is [`crate::fdtable::is_marked`]`(fd)`: a bounds check, one load of
//!    the chunk pointer and at most one of the slot. Not managed: tail call of the real
//!    `recv` through its cached pointer `sys::RECV` (resolved at init by
//!    [`crate::sys::resolve_all`]; missing in libc -> `missing()` -> ENOSYS). No lock,
//!    allocation, syscall or log-level check: the whole cost for ordinary sockets.
//!    (A hook whose test is "a layer is installed" checks the log level on its bypass and
//!    traces `<call>: bypass: <reason>`.)
//! 3. Managed: tail call of `slow`, which is cold, out of line and `extern "C"` (cannot
//!    unwind), so the fast path saves no registers for it. `slow` calls [`run`] with the
//!    call's name, the logic and `real`.
//! 4. [`run`] enters the [`crate::guard`] (already inside the shim, e.g. the shim's own
//!    management traffic: `real()`, traced as [`why::REENTERED`]), makes sure init ran and
//!    calls the logic under `catch_unwind` (a panic becomes `Bypass(why::PANICKED)`).
//! 5. The logic (`io_logic`) looks the fd up: a shim-owned fd gives `Error(EBADF)`; a
//!    managed socket asks the active layer's `on_io`, which answers `Bypass(why)`,
//!    `Handled(n)` or `Error(e)`.
//! 6. [`finish`], the one place errno is set: `Bypass(why)` is traced as
//!    `recv: bypass: <why>` and calls `real()` after the guard was released; `Handled(n)`
//!    returns `n`; `Error(e)` sets errno to `e` and returns -1.
//!
//! errno is read with [`crate::sys::errno`]; logic that made the real call itself turns its
//! result into an outcome with [`outcome_of`].
//!
//! Modules: [`sock`] (socket, bind, listen, connect, accept, accept4, getsockname,
//! getpeername, getsockopt), [`fds`] (close, close_range, closefrom, dup, dup2, dup3, fcntl, fcntl64),
//! [`io`] (read, write, recv*, send*), [`wait`] (select, pselect, poll, ppoll, epoll_ctl,
//! epoll_wait, epoll_pwait, epoll_pwait2), [`process`] (fork, exec family).

use std::panic::{catch_unwind, AssertUnwindSafe};

pub use crate::abi::{why, Outcome};
use crate::guard::Guard;

pub mod fds;
pub mod io;
pub mod process;
pub mod sock;
pub mod wait;

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
    if crate::log::enabled(crate::log::Level::Trace) {
        trace_bypass_line(call, why);
    }
}

/// Out of line and `extern "C"` (cannot unwind), so a fast path that may trace keeps no
/// landing pad for it. Only ever called from Rust.
#[cold]
#[inline(never)]
#[allow(improper_ctypes_definitions)]
extern "C" fn trace_bypass_line(call: &'static str, why: &'static str) {
    crate::log::write_line(
        crate::log::Level::Trace,
        format_args!("{call}: bypass: {why}"),
    );
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
            crate::sys::set_errno(e);
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
            trace_bypass(call, why::REENTERED);
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
/// ```text
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::errno;

    use crate::sys::set_errno;

    #[test]
    fn finish_sets_errno_only_on_error() {
        set_errno(0);
        assert_eq!(finish("t", Outcome::Error(libc::EINVAL), || 7), -1);
        assert_eq!(errno(), libc::EINVAL);
        set_errno(0);
        assert_eq!(finish("t", Outcome::Handled(5isize), || 7), 5);
        assert_eq!(finish("t", Outcome::Bypass("test"), || 7), 7);
        assert_eq!(errno(), 0);
    }

    #[test]
    fn outcome_of_reads_errno_of_a_failed_call() {
        // SAFETY: close(-1) fails with EBADF and has no other effect.
        let r = unsafe { libc::close(-1) };
        assert_eq!(outcome_of(r), Outcome::Error(libc::EBADF));
        assert_eq!(outcome_of(3), Outcome::Handled(3));
    }

    #[test]
    fn run_inside_the_guard_calls_the_real_function_only() {
        let _g = Guard::enter().expect("test thread starts outside the shim");
        let r = run(
            "t",
            || -> Outcome<i32> { panic!("logic must not run") },
            || 9,
        );
        assert_eq!(r, 9);
    }

    #[test]
    fn run_contains_a_panicking_logic() {
        let r = run("t", || -> Outcome<i32> { panic!("test panic") }, || 4);
        assert_eq!(r, 4);
    }
}
