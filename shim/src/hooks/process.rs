//! fork and the exec family.
//!
//! * `fork`: the real fork; the shim's locks are handled by the pthread_atfork handlers
//!   registered at init (see [`crate::fork`]), which also cover programs that reach fork
//!   some other way through glibc. In the child, the layer gets `on_fork_child`.
//!   `vfork`/`posix_spawn` children run no atfork handlers and share the parent's memory:
//!   the hooks detect them ([`crate::init::foreign_process`]) and leave the table alone.
//!   (vfork itself cannot be wrapped by a normal function: the child would return through
//!   the wrapper's stack frame, which the parent then reuses.)
//! * `execve`, `execv`, `execvp`, `execvpe`: pass-through, with the seam for GCB state
//!   handoff in [`exec_seam`]. Each is hooked separately because glibc's `execv`/`execvp`/
//!   `execvpe` reach the kernel through the internal, non-interposable `__execve`.
//!   `execl`, `execle` and `execlp` are C-variadic (not definable in stable Rust) and glibc
//!   implements them by building an argv and calling `__execve`/`__execvpe` internally, so
//!   they are NOT seen by the shim; a later GCB state handoff through the environment still
//!   works for them as long as the variable is already in `environ` (set it at
//!   registration time, not at exec time). `fexecve`/`execveat` and `posix_spawn` are not
//!   hooked either.
//!
//! These hooks allocate nothing: they may run in a vfork child.

use libc::{c_char, c_int, pid_t};
use std::ffi::CStr;

use crate::call_real;
use crate::guard::Guard;
use crate::{layer, sys};

#[no_mangle]
/// Hook for fork(2).
///
/// # Safety
/// C ABI; same contract as libc fork.
pub unsafe extern "C" fn fork() -> pid_t {
    crate::init::ensure();
    let pid: pid_t = call_real!(sys::fork);
    if pid == 0 {
        if let Some(l) = layer::active() {
            if let Some(_g) = Guard::enter() {
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.on_fork_child()));
            }
        }
        crate::debug!("fork child");
    } else if pid > 0 {
        crate::debug!("fork() = {}", pid);
    }
    pid
}

/// Printable view of a C string without allocating.
struct CDisplay(*const c_char);
impl std::fmt::Display for CDisplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_null() {
            return f.write_str("(null)");
        }
        // SAFETY: exec paths are NUL-terminated strings (the C contract of the call).
        let b = unsafe { CStr::from_ptr(self.0) }.to_bytes();
        f.write_str(std::str::from_utf8(b).unwrap_or("(non-utf8 path)"))
    }
}

/// The exec seam. Today: log and pass through. Later: GCB hands its registrations to the
/// new image here (e.g. `layer.exec_env()` producing an environment with `GCB_INHERIT=...`),
/// in which case the hook calls the real function with the replacement envp.
fn exec_seam(func: &str, path: *const c_char) {
    crate::debug!("{}({})", func, CDisplay(path));
    if let Some(_l) = layer::active() {
        // Seam: no layer implements exec handoff yet.
    }
}

#[inline(always)]
fn seam_guarded(func: &str, path: *const c_char) {
    if let Some(_g) = Guard::enter() {
        let _ = std::panic::catch_unwind(|| exec_seam(func, path));
    }
}

#[no_mangle]
/// Hook for execve(2).
///
/// # Safety
/// C ABI; same contract as libc execve.
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    seam_guarded("execve", path);
    call_real!(sys::execve, path, argv, envp)
}

#[no_mangle]
/// Hook for execv(3).
///
/// # Safety
/// C ABI; same contract as libc execv.
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    seam_guarded("execv", path);
    call_real!(sys::execv, path, argv)
}

#[no_mangle]
/// Hook for execvp(3).
///
/// # Safety
/// C ABI; same contract as libc execvp.
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    seam_guarded("execvp", file);
    call_real!(sys::execvp, file, argv)
}

#[no_mangle]
/// Hook for execvpe(3).
///
/// # Safety
/// C ABI; same contract as libc execvpe.
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    seam_guarded("execvpe", file);
    call_real!(sys::execvpe, file, argv, envp)
}
