//! The exported hooks.
//!
//! Every hook has the same shape:
//!
//! 1. a fast pass-through test that costs one table lookup (fd-based calls) or one load of
//!    the layer pointer (socket-creating and readiness calls); on "not ours" it calls the
//!    real function immediately;
//! 2. otherwise [`run`]: enter the re-entrancy guard (already inside the shim -> real call),
//!    make sure init ran, call the safe logic under `catch_unwind`, and turn its
//!    [`Outcome`] into the C return value in [`finish`], the one place errno is set.
//!
//! Modules: [`sock`] (socket, bind, listen, connect, accept, accept4, getsockname,
//! getpeername: via `redhook::hook!`), [`fds`] (close, close_range, closefrom, dup, dup2,
//! dup3, fcntl, fcntl64), [`io`] (recv*, send*), [`wait`] (select, pselect, poll, ppoll,
//! epoll_ctl, epoll_wait, epoll_pwait, epoll_pwait2), [`process`] (fork, exec family).

use std::panic::{catch_unwind, AssertUnwindSafe};

pub use crate::abi::{why, Outcome};
use crate::guard::Guard;

pub mod fds;
pub mod io;
pub mod process;
pub mod sock;
pub mod wait;

/// C return types and their error value.
pub trait Ret: Copy {
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

/// The one place where an [`Outcome`] becomes a C return value and errno.
#[inline(always)]
pub fn finish<T: Ret>(out: Outcome<T>, real: impl FnOnce() -> T) -> T {
    match out {
        Outcome::Bypass(why) => {
            crate::trace!("bypass: {}", why);
            real()
        }
        Outcome::Handled(v) => v,
        Outcome::Error(e) => {
            // SAFETY: errno location is always valid for the calling thread.
            unsafe { *libc::__errno_location() = e };
            T::ERR
        }
    }
}

/// Run shim logic for one call: re-entrancy guard, init, panic containment, outcome.
/// The guard is released before the real function runs, so a signal handler that
/// interrupts a long blocking call still goes through the shim normally.
///
/// Never inlined and marked cold: the hooks' fast paths then compile to a bounds check, one
/// or two loads and a tail jump to the real function, without saving registers for this.
#[cold]
#[inline(never)]
pub fn run<T: Ret>(logic: impl FnOnce() -> Outcome<T>, real: impl FnOnce() -> T) -> T {
    let out = {
        let Some(_g) = Guard::enter() else {
            return real();
        };
        crate::init::ensure();
        // A panic is reported once by the panic hook installed at init; then pass through.
        catch_unwind(AssertUnwindSafe(logic)).unwrap_or(Outcome::Bypass(why::PANICKED))
    };
    finish(out, real)
}

/// The real function is missing (symbol not defined after us): ENOSYS.
#[cold]
#[inline(never)]
pub fn no_real<T: Ret>() -> T {
    finish(Outcome::Error(libc::ENOSYS), || T::ERR)
}

/// Call the real function through a `sys` getter with the program's own arguments.
#[macro_export]
#[doc(hidden)]
macro_rules! call_real {
    ($getter:path $(, $arg:expr)*) => {
        match $getter() {
            // SAFETY: the real libc function, called with the unchanged arguments the program
            // passed to our hook; the program upholds that function's C contract.
            Some(f) => unsafe { f($($arg),*) },
            None => $crate::hooks::no_real(),
        }
    };
}

/// Outcome for a program call on a shim-owned fd: the program never received that fd, so
/// it gets what it would get without the shim, EBADF.
pub fn shim_fd_outcome<T>() -> Outcome<T> {
    Outcome::Error(libc::EBADF)
}
