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

use super::{outcome_of, run, shim_fd_outcome, why, Outcome};
use crate::fdtable::{self, FdKind};
use crate::hook;
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

hook! {
    /// close(2).
    fn close(fd: c_int) -> c_int = sys::CLOSE;
    mine: fdtable::is_marked(fd);
    logic: close_logic(fd);
}

/// Real close_range over `lo..=hi` minus the shim-owned fds in it.
fn close_range_split(lo: c_uint, hi: c_uint, flags: c_int) -> Outcome<c_int> {
    if lo > hi {
        return Outcome::Bypass("empty range: the kernel reports EINVAL");
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
    let Some(real) = sys::CLOSE_RANGE.get() else {
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
        if let err @ Outcome::Error(_) = outcome_of(unsafe { real(a, b, flags) }) {
            return err;
        }
    }
    Outcome::Handled(0)
}

/// close_range's and closefrom's fast test: nothing in the table and no layer to tell.
/// (One load per table chunk would be a scan, so use the slot count.)
#[inline(always)]
fn table_or_layer() -> bool {
    fdtable::slots() != 0 || layer::active().is_some()
}

const EMPTY_TABLE: &str = "the fd table is empty and no layer is installed";

hook! {
    /// close_range(2) (glibc >= 2.34).
    fn close_range(lo: c_uint, hi: c_uint, flags: c_int) -> c_int = sys::CLOSE_RANGE;
    mine: table_or_layer(), else EMPTY_TABLE;
    logic: close_range_split(lo, hi, flags);
}

hook! {
    /// closefrom(3) (glibc >= 2.34). glibc implements it with an internal,
    /// non-interposable close_range call, so it needs its own hook.
    fn closefrom(lo: c_int) -> () = sys::CLOSEFROM;
    mine: table_or_layer() && lo >= 0, else "empty fd table and no layer, or a negative fd";
    logic: match close_range_split(lo as c_uint, c_uint::MAX, 0) {
        Outcome::Bypass(why) => Outcome::Bypass(why),
        // closefrom returns nothing; on a failed split fall back to the real one,
        // which would not spare shim fds, so only after the split failed.
        Outcome::Handled(_) => Outcome::Handled(()),
        Outcome::Error(_) => Outcome::Handled(()),
    };
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

/// An unmanaged fd was duplicated to a number the table still holds (closed behind our
/// back, e.g. by a raw syscall): the stale entry goes, as for any dup onto a managed fd.
#[inline(always)]
fn after_unmanaged_dup(old: c_int, new: c_int) -> c_int {
    if new >= 0 && fdtable::is_marked(new) && !fdtable::is_marked(old) {
        run(
            "dup",
            move || {
                after_dup(old, new);
                Outcome::Handled(new)
            },
            || new,
        );
    }
    new
}

/// dup and fcntl(F_DUPFD*) logic for a managed source fd.
fn dup_logic(old: c_int, real: impl Fn() -> c_int) -> Outcome<c_int> {
    if fdtable::is_owned(old) {
        return shim_fd_outcome();
    }
    let out = outcome_of(real());
    if let Outcome::Handled(new) = out {
        after_dup(old, new);
    }
    out
}

hook! {
    /// dup(2).
    fn dup(old: c_int) -> c_int = sys::DUP;
    mine: fdtable::is_marked(old);
    logic(real): dup_logic(old, real);
    after: |new| after_unmanaged_dup(old, new);
}

/// dup2/dup3 logic. `real` is the real call.
fn dup2_logic(old: c_int, new: c_int, real: impl Fn() -> c_int) -> Outcome<c_int> {
    if fdtable::is_owned(old) {
        return shim_fd_outcome();
    }
    let moved = if old != new && fdtable::is_owned(new) {
        fdtable::relocate_owned(new)
    } else {
        None
    };
    let out = outcome_of(real());
    match out {
        Outcome::Error(_) if moved.is_some() => {
            // The old shim number is still open (the dup failed): it is no longer ours.
            sys::close_raw(new);
        }
        Outcome::Handled(r) if old != new => after_dup(old, r),
        _ => {}
    }
    out
}

hook! {
    /// dup2(2).
    fn dup2(old: c_int, new: c_int) -> c_int = sys::DUP2;
    mine: fdtable::is_marked(old) || fdtable::is_marked(new);
    logic(real): dup2_logic(old, new, real);
}

hook! {
    /// dup3(2).
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int = sys::DUP3;
    mine: fdtable::is_marked(old) || fdtable::is_marked(new);
    logic(real): dup2_logic(old, new, real);
}

fn is_dupfd(cmd: c_int) -> bool {
    cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC
}

fn fcntl_logic(fd: c_int, cmd: c_int, real: impl Fn() -> c_int) -> Outcome<c_int> {
    if fdtable::is_owned(fd) {
        return shim_fd_outcome();
    }
    if is_dupfd(cmd) {
        return dup_logic(fd, real);
    }
    Outcome::Bypass("not a shim-owned target")
}

hook! {
    /// fcntl(2) (see the module docs for the variadic third argument).
    fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int = sys::FCNTL;
    mine: fdtable::is_marked(fd);
    logic(real): fcntl_logic(fd, cmd, real);
    after: |r| if is_dupfd(cmd) { after_unmanaged_dup(fd, r) } else { r };
}

hook! {
    /// fcntl64 (glibc >= 2.28; what programs built with _FILE_OFFSET_BITS=64 call).
    fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int = sys::FCNTL64;
    mine: fdtable::is_marked(fd);
    logic(real): fcntl_logic(fd, cmd, real);
    after: |r| if is_dupfd(cmd) { after_unmanaged_dup(fd, r) } else { r };
}
