//! fork and the exec family.
//!
//! * `fork`: the real fork; the shim's locks are handled by the pthread_atfork handlers
//!   registered at init (see [`crate::fork`]), which also cover programs that reach fork
//!   some other way through glibc. In the child, the layer gets `on_fork_child`.
//!   `vfork`/`posix_spawn` children run no atfork handlers and share the parent's memory:
//!   the hooks detect them ([`crate::procid::foreign_process`]) and leave the table alone.
//!   (vfork itself cannot be wrapped by a normal function: the child would return through
//!   the wrapper's stack frame, which the parent then reuses.)
//! * `execve`, `execv`, `execvp`, `execvpe`: pass-through, with the seam for GCB state
//!   handoff in `exec_seam`. Each is hooked separately because glibc's `execv`/`execvp`/
//!   `execvpe` reach the kernel through the internal, non-interposable `__execve`.
//!   `execl`, `execle` and `execlp` are C-variadic (not definable in stable Rust) and glibc
//!   implements them by building an argv and calling `__execve`/`__execvpe` internally, so
//!   they are NOT seen by the shim, so they get no GCB handoff. `fexecve`/`execveat` and
//!   `posix_spawn` are not hooked either.
//! * GCB handoff: when registered sockets (TCP listeners, UDP sockets, DPF mappings)
//!   survive the exec (no FD_CLOEXEC), the layer's `exec_handoff` gives a `GCB_INHERIT`
//!   value (fds, inodes, proxies, UDP tokens) that the new image's shim adopts at init
//!   (see [`crate::gcb::inherit`]). The debug log line shows it without the tokens.
//!
//! In a vfork child these hooks allocate nothing (the handoff is skipped there).

use libc::{c_char, c_int, pid_t};
use std::ffi::{CStr, CString};

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

/// The exec seam: log, and ask the layer for a `GCB_INHERIT` value that hands its state
/// (registered sockets that survive exec) to the new image. Not in a vfork
/// child (shared memory, no allocation allowed).
fn exec_seam(func: &str, path: *const c_char) -> Option<CString> {
    crate::debug!("{}({})", func, CDisplay(path));
    if crate::procid::foreign_process() {
        return None;
    }
    let v = layer::active()?.exec_handoff()?;
    crate::debug!(
        "handing over to the new image: GCB_INHERIT={}",
        crate::inherit::redacted(&v)
    );
    CString::new(format!("{INHERIT}={v}")).ok()
}

const INHERIT: &str = "GCB_INHERIT";

fn seam_guarded(func: &str, path: *const c_char) -> Option<CString> {
    let _g = Guard::enter()?;
    std::panic::catch_unwind(|| exec_seam(func, path))
        .ok()
        .flatten()
}

/// For the exec calls that use `environ`: put the handoff there.
fn handoff_into_environ(entry: Option<CString>) {
    let Some(entry) = entry else { return };
    let Some(v) = entry.to_bytes().strip_prefix(b"GCB_INHERIT=") else {
        return;
    };
    let Ok(v) = CString::new(v) else { return };
    // SAFETY: both strings are NUL-terminated; we are about to exec, and setenv copies.
    unsafe { libc::setenv(c"GCB_INHERIT".as_ptr(), v.as_ptr(), 1) };
}

/// For the exec calls with an explicit envp: a copy of it with our entry instead of any
/// `GCB_INHERIT` it had. The returned vector owns nothing; `entry` must outlive it.
fn envp_with(envp: *const *const c_char, entry: &CString) -> Vec<*const c_char> {
    let mut out = Vec::new();
    if !envp.is_null() {
        let mut i = 0;
        loop {
            // SAFETY: envp is a NULL-terminated array of C strings (exec's contract).
            let p = unsafe { *envp.add(i) };
            if p.is_null() {
                break;
            }
            // SAFETY: p is a NUL-terminated string.
            let b = unsafe { CStr::from_ptr(p) }.to_bytes();
            if !b.starts_with(b"GCB_INHERIT=") {
                out.push(p);
            }
            i += 1;
        }
    }
    out.push(entry.as_ptr());
    out.push(std::ptr::null());
    out
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
    match seam_guarded("execve", path) {
        Some(entry) => {
            let env = envp_with(envp, &entry);
            call_real!(sys::execve, path, argv, env.as_ptr())
        }
        None => call_real!(sys::execve, path, argv, envp),
    }
}

#[no_mangle]
/// Hook for execv(3).
///
/// # Safety
/// C ABI; same contract as libc execv.
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    handoff_into_environ(seam_guarded("execv", path));
    call_real!(sys::execv, path, argv)
}

#[no_mangle]
/// Hook for execvp(3).
///
/// # Safety
/// C ABI; same contract as libc execvp.
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    handoff_into_environ(seam_guarded("execvp", file));
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
    match seam_guarded("execvpe", file) {
        Some(entry) => {
            let env = envp_with(envp, &entry);
            call_real!(sys::execvpe, file, argv, env.as_ptr())
        }
        None => call_real!(sys::execvpe, file, argv, envp),
    }
}
