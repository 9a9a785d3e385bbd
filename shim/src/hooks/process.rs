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
//!   handoff in `handoff`. Each is hooked separately because glibc's `execv`/`execvp`/
//!   `execvpe` reach the kernel through the internal, non-interposable `__execve`.
//!   `execl`, `execle` and `execlp` are C-variadic (not definable in stable Rust) and glibc
//!   implements them by building an argv and calling `__execve`/`__execvpe` internally, so
//!   they are NOT seen by the shim, so they get no GCB handoff. `fexecve`/`execveat` and
//!   `posix_spawn` are not hooked either.
//! * GCB handoff: when registered sockets (TCP listeners, UDP sockets, DPF mappings)
//!   survive the exec (no FD_CLOEXEC), the layer's `exec_handoff` gives a `GCB_INHERIT`
//!   value (fds, inodes, proxies, UDP tokens) that the new image's shim adopts at init
//!   (see [`crate::inherit`]). The debug log line shows it without the tokens.
//!
//! In a vfork child these hooks allocate nothing (the handoff is skipped there, with the
//! bypass reason [`why::FOREIGN_PROCESS`]).

use libc::{c_char, c_int, pid_t};
use std::ffi::{CStr, CString};

use super::{outcome_of, run, why, Outcome};
use crate::hook;
use crate::{layer, procid, sys};

/// Bypass reason of fork(): the real fork does the work; the shim's part is in the
/// atfork handlers and `after_fork`.
const FORK: &str = "the real fork; atfork handlers keep the shim's locks consistent";

/// In the child, the layer gets `on_fork_child` (under the guard, like any shim logic).
fn after_fork(pid: pid_t) -> pid_t {
    if pid == 0 {
        run(
            "fork",
            || {
                if let Some(l) = layer::active() {
                    l.on_fork_child();
                }
                crate::debug!("fork child");
                Outcome::Handled(0)
            },
            || 0,
        );
    } else if pid > 0 {
        crate::debug!("fork() = {}", pid);
    }
    pid
}

hook! {
    /// fork(2). `mine` so that init runs (in [`super::run`]) before the first fork.
    fn fork() -> pid_t = sys::FORK;
    mine: true;
    logic: Outcome::Bypass(FORK);
    after: |pid| after_fork(pid);
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

/// The exec family's fast test: log the call; the shim has state to hand over only if a
/// layer is installed.
#[inline(always)]
fn exec_seen(func: &str, path: *const c_char) -> bool {
    crate::debug!("{}({})", func, CDisplay(path));
    layer::active().is_some()
}

const INHERIT: &str = "GCB_INHERIT";

/// The exec seam: a `GCB_INHERIT=...` environment entry that hands the layer's state
/// (registered sockets that survive exec) to the new image, or why there is none. Never
/// in a vfork child (shared memory, no allocation allowed).
fn handoff() -> Result<CString, &'static str> {
    if procid::foreign_process() {
        return Err(why::FOREIGN_PROCESS);
    }
    let l = layer::active().ok_or(why::NO_LAYER)?;
    let v = l
        .exec_handoff()
        .ok_or("no registered socket survives the exec")?;
    crate::debug!(
        "handing over to the new image: GCB_INHERIT={}",
        crate::inherit::redacted(&v)
    );
    CString::new(format!("{INHERIT}={v}")).map_err(|_| "GCB_INHERIT value holds a NUL byte")
}

/// For the exec calls that use `environ`: put the handoff there, then the real call.
fn handoff_into_environ() -> Outcome<c_int> {
    let entry = match handoff() {
        Ok(entry) => entry,
        Err(why) => return Outcome::Bypass(why),
    };
    let Some(v) = entry.to_bytes().strip_prefix(b"GCB_INHERIT=") else {
        return Outcome::Bypass("malformed handoff entry");
    };
    let Ok(v) = CString::new(v) else {
        return Outcome::Bypass("malformed handoff entry");
    };
    // SAFETY: both strings are NUL-terminated; we are about to exec, and setenv copies.
    unsafe { libc::setenv(c"GCB_INHERIT".as_ptr(), v.as_ptr(), 1) };
    Outcome::Bypass("handoff written to environ")
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

type ExecEnv =
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;

/// For execve/execvpe: the real call with the handoff in a copy of `envp`.
fn handoff_into_envp(
    real: &crate::real::Real<ExecEnv>,
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> Outcome<c_int> {
    let entry = match handoff() {
        Ok(entry) => entry,
        Err(why) => return Outcome::Bypass(why),
    };
    let env = envp_with(envp, &entry);
    let Some(f) = real.get() else {
        return Outcome::Error(libc::ENOSYS);
    };
    // SAFETY: the program's exec call with its path and argv unchanged and a valid,
    // NULL-terminated envp that outlives the call (on success the call does not return).
    outcome_of(unsafe { f(path, argv, env.as_ptr()) })
}

hook! {
    /// execve(2).
    fn execve(
        path: *const c_char,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> c_int = sys::EXECVE;
    mine: exec_seen("execve", path), else why::NO_LAYER;
    logic: handoff_into_envp(&sys::EXECVE, path, argv, envp);
}

hook! {
    /// execv(3).
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int = sys::EXECV;
    mine: exec_seen("execv", path), else why::NO_LAYER;
    logic: handoff_into_environ();
}

hook! {
    /// execvp(3).
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int = sys::EXECVP;
    mine: exec_seen("execvp", file), else why::NO_LAYER;
    logic: handoff_into_environ();
}

hook! {
    /// execvpe(3).
    fn execvpe(
        file: *const c_char,
        argv: *const *const c_char,
        envp: *const *const c_char,
    ) -> c_int = sys::EXECVPE;
    mine: exec_seen("execvpe", file), else why::NO_LAYER;
    logic: handoff_into_envp(&sys::EXECVPE, file, argv, envp);
}
