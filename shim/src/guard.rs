//! The thread-local re-entrancy guard.
//!
//! While a thread runs shim logic (including the shim's own initialisation), every libc call
//! it makes that lands in one of our hooks must go straight to the real function. The flag
//! is a `const`-initialised `Cell<bool>` without a destructor, so it needs no lazy
//! initialisation and no TLS destructor registration; `try_with` still covers the
//! thread-teardown window in which thread-locals are unavailable (then we bypass).

use std::cell::Cell;

thread_local! {
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
}

/// True if the current thread is already inside shim logic (or TLS is unavailable): the
/// caller must bypass to the real function.
#[inline]
pub fn in_shim() -> bool {
    IN_SHIM.try_with(|c| c.get()).unwrap_or(true)
}

/// RAII marker: "this thread is running shim logic". `enter()` returns `None` if the thread
/// already was (re-entrant call) or TLS is unavailable; the caller then bypasses.
pub struct Guard(());

impl Guard {
    #[inline]
    pub fn enter() -> Option<Guard> {
        IN_SHIM
            .try_with(|c| {
                if c.get() {
                    None
                } else {
                    c.set(true);
                    Some(Guard(()))
                }
            })
            .ok()
            .flatten()
    }
}

impl Drop for Guard {
    #[inline]
    fn drop(&mut self) {
        let _ = IN_SHIM.try_with(|c| c.set(false));
    }
}
