//! fork() safety: the shim's locks are taken around fork() with pthread_atfork handlers
//! (registered once at init), so a fork while another thread holds a shim lock never leaves
//! the child with a lock that nobody will release. The child re-initialises the lock words
//! and records its pid (see [`crate::procid::foreign_process`] for vfork/posix_spawn children,
//! which run no atfork handlers and must not touch the shared table).

// Lock order: the layer's locks before the table's (layer code takes the table lock while
// holding its own), released in reverse.
extern "C" fn prepare() {
    let _ = std::panic::catch_unwind(|| {
        if let Some(l) = crate::layer::active() {
            l.fork_prepare();
        }
        crate::fdtable::fork_prepare();
    });
}

extern "C" fn parent() {
    let _ = std::panic::catch_unwind(|| {
        crate::fdtable::fork_parent();
        if let Some(l) = crate::layer::active() {
            l.fork_parent();
        }
    });
}

extern "C" fn child() {
    let _ = std::panic::catch_unwind(|| {
        crate::fdtable::fork_child();
        if let Some(l) = crate::layer::active() {
            l.fork_child_locks();
        }
        crate::procid::record_pid();
    });
}

pub(crate) fn register() {
    // SAFETY: the three handlers are plain extern "C" functions that never unwind.
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r != 0 {
        crate::warn!(
            "pthread_atfork failed ({}); fork while a shim lock is held may deadlock",
            r
        );
    }
}
