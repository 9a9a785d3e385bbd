//! close, close_range, closefrom, dup, dup2, dup3, fcntl, fcntl64.
//!
//! Choices for shim-owned fds (the program never received them from the kernel, so it
//! gets what it would get without the shim):
//! * `close(shim_fd)` -> EBADF, the shim's fd stays open.
//! * `close_range(lo, hi, f)` / `closefrom(lo)` -> the range is split around shim fds and the
//!   pieces are closed with the real close_range; returns 0 like the kernel does.
//! * `dup2/dup3(x, shim_fd)` -> the shim fd is first moved to another high number, then the
//!   program's dup2 proceeds and the program gets exactly the number it asked for.
//! * `dup/dup2/dup3/fcntl(shim_fd, ...)` as the *source* -> EBADF.
//!
//! Managed sockets: dup'd numbers share the entry; close clears the slot *before* the real
//! close (after it, the kernel may hand the number to another thread's new socket). In a
//! vfork/posix_spawn child (shared memory) the table is left alone.
//!
//! `fcntl` is variadic in C; Rust cannot define C-variadic functions on stable. We define it
//! with a fixed third `c_ulong` parameter. On x86_64 and aarch64 SysV (Linux), variadic
//! integer/pointer arguments are passed exactly like fixed ones (x86_64: rdx; aarch64
//! Linux: x2), so we receive the caller's third argument bit-for-bit (garbage when the
//! command takes none, which the real fcntl then ignores) and pass it on unchanged.

use libc::{c_int, c_uint, c_ulong};

use super::{run, shim_fd_outcome, why, Outcome};
use crate::call_real;
use crate::fdtable::{self, FdKind};
use crate::{layer, procid, sys};

fn close_logic(fd: c_int) -> Outcome<c_int> {
    let Some(e) = fdtable::get(fd) else {
        return Outcome::Bypass(why::UNMANAGED);
    };
    if let FdKind::ShimOwned(s) = &e.kind {
        crate::debug!("program close({}) of shim fd ({}): EBADF", fd, s.label);
        return shim_fd_outcome();
    }
    if procid::foreign_process() {
        return Outcome::Bypass(why::FOREIGN_PROCESS);
    }
    let removed = fdtable::remove(fd);
    if let (Some(l), Some(r)) = (layer::active(), removed.as_ref()) {
        // Our clone `e` and the slot's count: last if nothing else holds it.
        let last = std::sync::Arc::strong_count(r) <= 2;
        l.on_close(fd, r, last);
    }
    drop(removed);
    drop(e);
    Outcome::Bypass("the table forgot the fd; the kernel closes it")
}

#[no_mangle]
/// Hook for close(2).
///
/// # Safety
/// C ABI; same contract as libc close.
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if !fdtable::is_marked(fd) {
        if let Some(f) = sys::close_loaded() {
            // SAFETY: the real function, with the program's unchanged arguments.
            return unsafe { f(fd) };
        }
    }
    // Managed fd, or real function not resolved yet.
    #[inline(never)]
    unsafe fn slow(fd: c_int) -> c_int {
        let real = move || call_real!(sys::close, fd);
        run(move || close_logic(fd), real)
    }
    // SAFETY: the same arguments, under the same C contract.
    unsafe { slow(fd) }
}

/// Real close_range over `lo..=hi` minus the shim-owned fds in it.
fn close_range_split(lo: c_uint, hi: c_uint, flags: c_int) -> Outcome<c_int> {
    if lo > hi {
        return Outcome::Bypass("empty range: the kernel reports EINVAL"); // kernel says EINVAL
    }
    if let Some(l) = layer::active() {
        l.on_close_range(lo, hi, flags);
    }
    if flags & (libc::CLOSE_RANGE_CLOEXEC as c_int) == 0 && !procid::foreign_process() {
        drop(fdtable::remove_range(lo, hi));
    }
    let owned = fdtable::owned_in_range(lo, hi);
    if owned.is_empty() {
        return Outcome::Bypass("no shim-owned fd in the range");
    }
    let Some(real) = sys::close_range() else {
        return Outcome::Error(libc::ENOSYS);
    };
    let mut start = lo as u64;
    let mut pieces = Vec::with_capacity(owned.len() + 1);
    for &o in &owned {
        let o = o as u64;
        if o > start {
            pieces.push((start as c_uint, (o - 1) as c_uint));
        }
        start = o + 1;
    }
    if start <= hi as u64 {
        pieces.push((start as c_uint, hi));
    }
    crate::debug!(
        "close_range({}, {}, {:#x}) split around {} shim fd(s)",
        lo,
        hi,
        flags,
        owned.len()
    );
    for (a, b) in pieces {
        // SAFETY: real close_range on a sub-range of what the program asked for.
        let r = unsafe { real(a, b, flags) };
        if r < 0 {
            // SAFETY: errno location is valid.
            return Outcome::Error(unsafe { *libc::__errno_location() });
        }
    }
    Outcome::Handled(0)
}

/// Is there anything at all in the table? (close_range's fast test: one load per chunk
/// would be a scan, so use the slot count.)
#[inline(always)]
fn table_empty() -> bool {
    fdtable::slots() == 0
}

#[no_mangle]
/// Hook for close_range(2) (glibc >= 2.34).
///
/// # Safety
/// C ABI; same contract as libc close_range.
pub unsafe extern "C" fn close_range(lo: c_uint, hi: c_uint, flags: c_int) -> c_int {
    let real = move || call_real!(sys::close_range, lo, hi, flags);
    if table_empty() && layer::active().is_none() {
        return real();
    }
    run(move || close_range_split(lo, hi, flags), real)
}

#[no_mangle]
/// Hook for closefrom(3) (glibc >= 2.34). glibc implements it with an internal,
/// non-interposable close_range call, so it needs its own hook.
///
/// # Safety
/// C ABI; same contract as libc closefrom.
pub unsafe extern "C" fn closefrom(lo: c_int) {
    let real = move || call_real!(sys::closefrom, lo);
    if (table_empty() && layer::active().is_none()) || lo < 0 {
        return real();
    }
    run(
        || match close_range_split(lo as c_uint, c_uint::MAX, 0) {
            Outcome::Bypass(why) => Outcome::Bypass(why),
            // closefrom returns nothing; on a failed split fall back to the real one,
            // which would not spare shim fds, so only after the split failed.
            Outcome::Handled(_) => Outcome::Handled(()),
            Outcome::Error(_) => Outcome::Handled(()),
        },
        real,
    )
}

/// Shared by dup/dup2/dup3/fcntl(F_DUPFD*): after the real call returned `new`.
fn after_dup(old: c_int, new: c_int) {
    if new < 0 || procid::foreign_process() {
        return;
    }
    let displaced = fdtable::dup_to(old, new);
    if let (Some(l), Some(d)) = (layer::active(), displaced.as_ref()) {
        // dup2/dup3 onto a managed socket closed that socket's `new` number.
        if matches!(d.kind, FdKind::Socket(_)) {
            l.on_close(new, d, std::sync::Arc::strong_count(d) == 1);
        }
    }
}

#[no_mangle]
/// Hook for dup(2).
///
/// # Safety
/// C ABI; same contract as libc dup.
pub unsafe extern "C" fn dup(old: c_int) -> c_int {
    let real = move || call_real!(sys::dup, old);
    if !fdtable::is_marked(old) {
        let new = real();
        if new >= 0 && fdtable::is_marked(new) {
            run(
                move || {
                    after_dup(old, new);
                    Outcome::Handled(new)
                },
                || new,
            );
        }
        return new;
    }
    run(
        move || {
            if fdtable::is_owned(old) {
                return shim_fd_outcome();
            }
            let new: c_int = call_real!(sys::dup, old);
            if new < 0 {
                // SAFETY: errno location is valid.
                return Outcome::Error(unsafe { *libc::__errno_location() });
            }
            after_dup(old, new);
            Outcome::Handled(new)
        },
        real,
    )
}

/// dup2/dup3 logic. `real` is the real call; returns what it returned.
fn dup2_logic(old: c_int, new: c_int, real: impl Fn() -> c_int) -> Outcome<c_int> {
    if fdtable::is_owned(old) {
        return shim_fd_outcome();
    }
    let moved = if old != new && fdtable::is_owned(new) {
        fdtable::relocate_owned(new)
    } else {
        None
    };
    let r = real();
    if r < 0 {
        // SAFETY: errno location is valid.
        let e = unsafe { *libc::__errno_location() };
        if moved.is_some() {
            // The old shim number is still open (the dup failed): it is no longer ours.
            sys::close_raw(new);
        }
        return Outcome::Error(e);
    }
    if old != new {
        after_dup(old, r);
    }
    Outcome::Handled(r)
}

#[no_mangle]
/// Hook for dup2(2).
///
/// # Safety
/// C ABI; same contract as libc dup2.
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    let real = move || call_real!(sys::dup2, old, new);
    if !fdtable::is_marked(old) && !fdtable::is_marked(new) {
        return real();
    }
    run(move || dup2_logic(old, new, real), real)
}

#[no_mangle]
/// Hook for dup3(2).
///
/// # Safety
/// C ABI; same contract as libc dup3.
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    let real = move || call_real!(sys::dup3, old, new, flags);
    if !fdtable::is_marked(old) && !fdtable::is_marked(new) {
        return real();
    }
    run(move || dup2_logic(old, new, real), real)
}

fn fcntl_logic(fd: c_int, cmd: c_int, real: impl Fn() -> c_int) -> Outcome<c_int> {
    if fdtable::is_owned(fd) {
        return shim_fd_outcome();
    }
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        let new = real();
        if new < 0 {
            // SAFETY: errno location is valid.
            return Outcome::Error(unsafe { *libc::__errno_location() });
        }
        after_dup(fd, new);
        return Outcome::Handled(new);
    }
    Outcome::Bypass("not a shim-owned target")
}

#[no_mangle]
/// Hook for fcntl(2) (see the module docs for the variadic third argument).
///
/// # Safety
/// C ABI; same contract as libc fcntl.
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let real = move || call_real!(sys::fcntl, fd, cmd, arg);
    if !fdtable::is_marked(fd) {
        let r = real();
        if r >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) && fdtable::is_marked(r)
        {
            run(
                move || {
                    after_dup(fd, r);
                    Outcome::Handled(r)
                },
                || r,
            );
        }
        return r;
    }
    run(move || fcntl_logic(fd, cmd, real), real)
}

#[no_mangle]
/// Hook for fcntl64 (glibc >= 2.28; what programs built with _FILE_OFFSET_BITS=64 call).
///
/// # Safety
/// C ABI; same contract as libc fcntl64.
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    let real = move || call_real!(sys::fcntl64, fd, cmd, arg);
    if !fdtable::is_marked(fd) {
        let r = real();
        if r >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) && fdtable::is_marked(r)
        {
            run(
                move || {
                    after_dup(fd, r);
                    Outcome::Handled(r)
                },
                || r,
            );
        }
        return r;
    }
    run(move || fcntl_logic(fd, cmd, real), real)
}
