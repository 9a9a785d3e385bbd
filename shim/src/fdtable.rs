//! The per-fd table.
//!
//! Indexed by fd number: a static top-level array of [`TOP`] lazily allocated chunks of
//! [`CHUNK`] slots each, covering fds `0 .. MAX_FD` (1<<20, Linux's default `nr_open`).
//! Each slot is an `AtomicPtr<FdEntry>` obtained from `Arc::into_raw`; null means "not
//! managed". Fds at or above `MAX_FD` are never managed.
//!
//! * **Fast path** ([`is_marked`]): one Acquire load of the chunk pointer (null in pure
//!   pass-through mode, since no chunk is ever allocated) and, if there is a chunk, one
//!   Relaxed load of the slot. No lock, no allocation, no syscall.
//! * **Slow path** ([`get`], [`insert`], [`remove`], [`dup_to`]): under one global
//!   reader/writer lock (`parking_lot::RawRwLock`). Writers swap slots and release the
//!   displaced `Arc`s only after unlocking; readers clone the `Arc` under the read lock, so
//!   an entry is never freed while someone is cloning it.
//! * **Sharing**: dup'd fds point at the same `Arc<FdEntry>`; the entry is dropped with the
//!   last fd number that refers to it (`Drop` is where a later GCB layer unregisters).
//! * Chunks are never freed (at most 8 KiB each, allocated only for ranges that held a
//!   managed fd).
//!
//! Shim-owned fds ([`own_fd`]) live in the same table as [`FdKind::ShimOwned`] so the
//! close/dup/fcntl hooks can protect them; they are close-on-exec and numbered at or above
//! a floor so they never take 0-2 or the low numbers that shells and daemons assume.

use parking_lot::lock_api::RawRwLock as _;
use std::cell::UnsafeCell;
use std::os::raw::c_int;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::forklock::{ForkMutex, ForkRwLock};
pub use crate::ownfd::ShimFd;
use crate::sockstate::SockState;
use crate::{net, sys};

pub const CHUNK_BITS: u32 = 10;
pub const CHUNK: usize = 1 << CHUNK_BITS;
pub const TOP: usize = 1024;
pub const MAX_FD: usize = CHUNK * TOP;

/// Lowest numbers tried for shim-owned fds, in order (F_DUPFD fails with EINVAL if the floor
/// is above RLIMIT_NOFILE, hence the fallbacks). 512 keeps clear of bash's 10..255 range.
const OWN_FLOORS: [c_int; 3] = [512, 100, 10];

type Chunk = [AtomicPtr<FdEntry>; CHUNK];

static CHUNKS: [AtomicPtr<Chunk>; TOP] = [const { AtomicPtr::new(ptr::null_mut()) }; TOP];

/// The table lock. A bare raw lock so the fork handlers can hold it across `fork()` and
/// re-initialise it in the child (see [`crate::fork`]).
static LOCK_CELL: ForkRwLock = ForkRwLock::new();

#[inline(always)]
fn lock() -> &'static parking_lot::RawRwLock {
    LOCK_CELL.raw()
}

/// Number of shim-owned fds currently in the table (lets close_range skip its scan).
static OWNED: AtomicUsize = AtomicUsize::new(0);
/// Number of occupied slots (diagnostics and tests).
static SLOTS: AtomicUsize = AtomicUsize::new(0);

/// What an fd number refers to.
pub struct FdEntry {
    pub kind: FdKind,
}

impl std::fmt::Debug for FdEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            FdKind::ShimOwned(s) => write!(f, "ShimOwned({}, fd {})", s.label, s.fd()),
            FdKind::Socket(s) => write!(f, "Socket(domain {}, type {})", s.domain, s.sock_type),
        }
    }
}

// Entries live behind an Arc, one per socket; boxing the socket variant would add a
// pointer chase to every managed call for no memory saved.
#[allow(clippy::large_enum_variant)]
pub enum FdKind {
    /// An fd the shim opened for itself (log file, later the management sockets).
    ShimOwned(Arc<ShimFd>),
    /// A program socket the shim manages (GCB/DPF state); shared by dup'd fds.
    Socket(SocketEntry),
}

/// A program socket under management: its kind (for the layers' quick checks) and its
/// [`SockState`].
///
/// Lock rule: never hold `state` across a blocking call and never acquire the table lock
/// while holding `state` (the fork handler takes the table lock, then every entry lock).
pub struct SocketEntry {
    pub domain: c_int,
    pub sock_type: c_int,
    pub state: ForkMutex<SockState>,
}

impl FdEntry {
    /// A managed program socket's entry with the given state.
    pub fn socket(domain: c_int, sock_type: c_int, state: SockState) -> FdEntry {
        FdEntry {
            kind: FdKind::Socket(SocketEntry {
                domain,
                sock_type,
                state: ForkMutex::new(state),
            }),
        }
    }

    /// The socket's address family (AF_INET, AF_INET6; 0 for a shim-owned fd): the form
    /// in which the program expects addresses on it.
    pub fn domain(&self) -> c_int {
        match &self.kind {
            FdKind::Socket(s) => s.domain,
            FdKind::ShimOwned(_) => 0,
        }
    }

    /// Makes a GCB TCP socket of this entry (a registered listener or a brokered
    /// connection).
    pub fn set_gcb(&self, v: crate::sockstate::GcbSock) {
        self.with_state(|s| *s = SockState::Gcb(v));
    }

    /// Runs `f` on the socket's state (None for a shim-owned fd). Keep `f` short: it
    /// holds the entry's lock.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut SockState) -> R) -> Option<R> {
        match &self.kind {
            FdKind::Socket(s) => Some(f(&mut s.state.lock())),
            FdKind::ShimOwned(_) => None,
        }
    }
}

#[inline(always)]
fn chunk_of(fd: c_int) -> Option<&'static Chunk> {
    let ufd = fd as u32 as usize; // negative fds become huge and fall out of range
    if ufd >= MAX_FD {
        return None;
    }
    let c = CHUNKS[ufd >> CHUNK_BITS].load(Ordering::Acquire);
    // SAFETY: non-null chunk pointers come from Box::into_raw in `chunk_alloc` and are never
    // freed, so the reference is valid for 'static.
    (!c.is_null()).then(|| unsafe { &*c })
}

/// Fast path: does the table hold anything for `fd`? No lock, no allocation.
#[inline(always)]
pub fn is_marked(fd: c_int) -> bool {
    match chunk_of(fd) {
        None => false,
        Some(c) => !c[fd as usize & (CHUNK - 1)]
            .load(Ordering::Relaxed)
            .is_null(),
    }
}

struct ReadGuard;
impl ReadGuard {
    fn new() -> Self {
        lock().lock_shared();
        ReadGuard
    }
}
impl Drop for ReadGuard {
    fn drop(&mut self) {
        // SAFETY: constructed only after lock_shared() succeeded on this thread.
        unsafe { lock().unlock_shared() }
    }
}
struct WriteGuard;
impl WriteGuard {
    fn new() -> Self {
        lock().lock_exclusive();
        WriteGuard
    }
}
impl Drop for WriteGuard {
    fn drop(&mut self) {
        // SAFETY: constructed only after lock_exclusive() succeeded on this thread.
        unsafe { lock().unlock_exclusive() }
    }
}

/// The entry for `fd`, if managed (slow path: read lock + Arc clone).
pub fn get(fd: c_int) -> Option<Arc<FdEntry>> {
    let c = chunk_of(fd)?;
    let _g = ReadGuard::new();
    let p = c[fd as usize & (CHUNK - 1)].load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` came from Arc::into_raw and the slot still owns one strong count; writers
    // release that count only under the write lock, which cannot be held while we hold the
    // read lock, so the count is > 0 here.
    unsafe {
        Arc::increment_strong_count(p);
        Some(Arc::from_raw(p))
    }
}

fn chunk_alloc(fd: c_int) -> Option<&'static Chunk> {
    let ufd = fd as u32 as usize;
    if ufd >= MAX_FD {
        return None;
    }
    if let Some(c) = chunk_of(fd) {
        return Some(c);
    }
    // Called with the write lock held: no other allocator can race us.
    let fresh: Box<Chunk> = Box::new([const { AtomicPtr::new(ptr::null_mut()) }; CHUNK]);
    let raw = Box::into_raw(fresh);
    CHUNKS[ufd >> CHUNK_BITS].store(raw, Ordering::Release);
    // SAFETY: just leaked; never freed.
    Some(unsafe { &*raw })
}

/// Swap the slot for `fd` (write lock held by caller); returns the displaced entry.
fn swap_locked(fd: c_int, new: Option<Arc<FdEntry>>) -> Option<Arc<FdEntry>> {
    let slot_chunk = if new.is_some() {
        chunk_alloc(fd)?
    } else {
        chunk_of(fd)?
    };
    let newp = new.map_or(ptr::null_mut(), |a| Arc::into_raw(a) as *mut FdEntry);
    let old = slot_chunk[fd as usize & (CHUNK - 1)].swap(newp, Ordering::AcqRel);
    match (old.is_null(), newp.is_null()) {
        (true, false) => {
            SLOTS.fetch_add(1, Ordering::Relaxed);
        }
        (false, true) => {
            SLOTS.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
    if old.is_null() {
        None
    } else {
        // SAFETY: the slot owned this strong count (from Arc::into_raw); we take it over.
        let e = unsafe { Arc::from_raw(old) };
        if matches!(e.kind, FdKind::ShimOwned(_)) {
            OWNED.fetch_sub(1, Ordering::Relaxed);
        }
        Some(e)
    }
}

fn note_insert(e: &FdEntry) {
    if matches!(e.kind, FdKind::ShimOwned(_)) {
        OWNED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Put `entry` at `fd`. Returns the displaced entry (drop it outside any shim lock).
/// Fails (returns `Err(entry)`) for fds beyond `MAX_FD`.
pub fn insert(fd: c_int, entry: Arc<FdEntry>) -> Result<Option<Arc<FdEntry>>, Arc<FdEntry>> {
    if fd as u32 as usize >= MAX_FD {
        return Err(entry);
    }
    let _g = WriteGuard::new();
    note_insert(&entry);
    Ok(swap_locked(fd, Some(entry)))
}

/// Clear the slot for `fd`; returns what was there.
#[inline]
pub fn remove(fd: c_int) -> Option<Arc<FdEntry>> {
    if !is_marked(fd) {
        return None;
    }
    let _g = WriteGuard::new();
    swap_locked(fd, None)
}

/// After a successful dup of `old` to `new`: `new` now refers to whatever `old` refers to.
/// Returns the entry displaced at `new` (drop it outside locks).
pub fn dup_to(old: c_int, new: c_int) -> Option<Arc<FdEntry>> {
    if !is_marked(old) && !is_marked(new) {
        return None;
    }
    let _g = WriteGuard::new();
    let src = chunk_of(old).and_then(|c| {
        let p = c[old as usize & (CHUNK - 1)].load(Ordering::Acquire);
        (!p.is_null()).then(|| {
            // SAFETY: as in `get`: the slot holds a strong count and we hold the lock.
            unsafe {
                Arc::increment_strong_count(p);
                Arc::from_raw(p)
            }
        })
    });
    // Shim-owned fds are never shared with program fds.
    let src = src.filter(|e| !matches!(e.kind, FdKind::ShimOwned(_)));
    swap_locked(new, src)
}

/// The table entry for a program socket: `existing` if the caller holds it, else a new
/// [`SockState::Plain`] entry (with the socket's real domain and type) put at `fd`, which
/// makes the fd managed. None for fds beyond the table.
pub fn socket_entry(fd: c_int, existing: Option<&Arc<FdEntry>>) -> Option<Arc<FdEntry>> {
    if let Some(e) = existing {
        return Some(e.clone());
    }
    let domain = net::sock_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(libc::AF_INET);
    let ty = net::sock_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(libc::SOCK_STREAM);
    let e = Arc::new(FdEntry::socket(domain, ty, SockState::Plain));
    let displaced = insert(fd, e.clone()).ok()?;
    drop(displaced);
    Some(e)
}

/// Shim-owned fds within `lo..=hi`, ascending (empty without a scan if there are none).
pub fn owned_in_range(lo: u32, hi: u32) -> Vec<c_int> {
    let mut out = Vec::new();
    if OWNED.load(Ordering::Relaxed) == 0 {
        return out;
    }
    let _g = ReadGuard::new();
    for_each_locked(lo, hi, |fd, e| {
        if matches!(e.kind, FdKind::ShimOwned(_)) {
            out.push(fd);
        }
    });
    out
}

/// Remove every program (non-shim) entry in `lo..=hi`; returns them for dropping.
pub fn remove_range(lo: u32, hi: u32) -> Vec<Arc<FdEntry>> {
    let mut out = Vec::new();
    if SLOTS.load(Ordering::Relaxed) == 0 {
        return out;
    }
    let _g = WriteGuard::new();
    let mut fds = Vec::new();
    for_each_locked(lo, hi, |fd, e| {
        if !matches!(e.kind, FdKind::ShimOwned(_)) {
            fds.push(fd);
        }
    });
    for fd in fds {
        out.extend(swap_locked(fd, None));
    }
    out
}

/// The fd numbers that refer to `entry` (slow: scans the table; for exec handoff).
pub fn fds_of(entry: &Arc<FdEntry>) -> Vec<c_int> {
    let _g = ReadGuard::new();
    let mut fds = Vec::new();
    let want: *const FdEntry = Arc::as_ptr(entry);
    for_each_locked(0, (MAX_FD - 1) as u32, |fd, e| {
        if std::ptr::eq(e, want) {
            fds.push(fd);
        }
    });
    fds
}

/// The fd numbers whose entry satisfies `f` (slow: scans the table; for exec handoff).
/// `f` runs with the table locked: it must not take locks.
pub fn fds_matching(f: impl Fn(&FdEntry) -> bool) -> Vec<c_int> {
    if SLOTS.load(Ordering::Relaxed) == 0 {
        return Vec::new();
    }
    let _g = ReadGuard::new();
    let mut fds = Vec::new();
    for_each_locked(0, (MAX_FD - 1) as u32, |fd, e| {
        if f(e) {
            fds.push(fd);
        }
    });
    fds
}

/// Visit occupied slots in `lo..=hi` (lock held by caller).
fn for_each_locked(lo: u32, hi: u32, mut f: impl FnMut(c_int, &FdEntry)) {
    let hi = (hi as usize).min(MAX_FD - 1);
    let lo = lo as usize;
    if lo > hi {
        return;
    }
    let first = lo >> CHUNK_BITS;
    let last = hi >> CHUNK_BITS;
    for (ci, cp) in CHUNKS.iter().enumerate().take(last + 1).skip(first) {
        let c = cp.load(Ordering::Acquire);
        if c.is_null() {
            continue;
        }
        // SAFETY: chunks are never freed.
        let c = unsafe { &*c };
        for (i, slot) in c.iter().enumerate() {
            let fd = (ci << CHUNK_BITS) | i;
            if fd < lo || fd > hi {
                continue;
            }
            let p = slot.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: the slot holds a strong count; lock held.
                f(fd as c_int, unsafe { &*p });
            }
        }
    }
}

/// Move `fd` (an fd the shim just opened) to a close-on-exec number >= the floor and record
/// it as shim-owned. On success the original number is closed; on failure it is untouched.
pub fn own_fd(fd: c_int, label: &'static str) -> Result<Arc<ShimFd>, c_int> {
    let new = move_high(fd)?;
    let sfd = Arc::new(ShimFd::new(new, label));
    let entry = Arc::new(FdEntry {
        kind: FdKind::ShimOwned(sfd.clone()),
    });
    match insert(new, entry) {
        Ok(displaced) => {
            drop(displaced);
            sys::close_raw(fd);
            Ok(sfd)
        }
        // Dropping the entry and `sfd` closes `new`.
        Err(_) => Err(libc::EMFILE),
    }
}

fn move_high(fd: c_int) -> Result<c_int, c_int> {
    let mut err = libc::EBADF;
    for floor in OWN_FLOORS {
        match sys::fcntl_raw(fd, libc::F_DUPFD_CLOEXEC, floor as libc::c_ulong) {
            Ok(n) => return Ok(n),
            Err(e) => err = e,
        }
    }
    Err(err)
}

/// The program is about to dup2()/dup3() onto `fd`, which is shim-owned: move the shim's fd
/// to another number first so the program gets the number it asked for and the shim keeps
/// its file. Returns the old number's ShimFd if something was moved.
pub fn relocate_owned(fd: c_int) -> Option<Arc<ShimFd>> {
    let e = get(fd)?;
    let FdKind::ShimOwned(sfd) = &e.kind else {
        return None;
    };
    let new = move_high(fd).ok()?;
    let _g = WriteGuard::new();
    let moved = swap_locked(fd, None);
    note_insert(&e);
    let displaced = swap_locked(new, Some(e.clone()));
    sfd.moved_to(new);
    drop(_g);
    drop(displaced);
    drop(moved);
    crate::log::fd_moved(fd, new);
    crate::debug!(
        "moved shim fd {} ({}) to {} for the program",
        fd,
        sfd.label,
        new
    );
    Some(sfd.clone())
}

/// Is `fd` a shim-owned fd? (slow path; only after `is_marked`).
pub fn is_owned(fd: c_int) -> bool {
    is_marked(fd) && get(fd).is_some_and(|e| matches!(e.kind, FdKind::ShimOwned(_)))
}

/// Number of occupied slots.
pub fn slots() -> usize {
    SLOTS.load(Ordering::Relaxed)
}

// ---- fork support -------------------------------------------------------------------

struct ForkHeld(UnsafeCell<Vec<*const FdEntry>>);
// SAFETY: only touched by the forking thread between prepare and parent/child, while it
// holds the table write lock.
unsafe impl Sync for ForkHeld {}
static FORK_HELD: ForkHeld = ForkHeld(UnsafeCell::new(Vec::new()));

/// pthread_atfork prepare: take the table lock, then every socket entry's lock.
pub(crate) fn fork_prepare() {
    lock().lock_exclusive();
    let mut v: Vec<*const FdEntry> = Vec::new();
    for_each_locked(0, u32::MAX, |_, e| v.push(e as *const FdEntry));
    v.sort_unstable();
    v.dedup();
    for &p in &v {
        // SAFETY: entries stay alive while we hold the write lock (slots own counts).
        let e = unsafe { &*p };
        if let FdKind::Socket(s) = &e.kind {
            s.state.lock_raw(); // released in fork_parent / reset in fork_child
        }
    }
    // SAFETY: see ForkHeld.
    unsafe { *FORK_HELD.0.get() = v };
}

/// pthread_atfork parent: release what prepare took.
pub(crate) fn fork_parent() {
    // SAFETY: see ForkHeld.
    let v = unsafe { std::mem::take(&mut *FORK_HELD.0.get()) };
    for &p in &v {
        // SAFETY: still alive (write lock still held); we locked it in prepare.
        let e = unsafe { &*p };
        if let FdKind::Socket(s) = &e.kind {
            // SAFETY: locked by this thread in fork_prepare.
            unsafe { s.state.unlock_raw() };
        }
    }
    // SAFETY: locked exclusively in fork_prepare by this thread.
    unsafe { lock().unlock_exclusive() };
}

/// pthread_atfork child: the child has one thread; re-initialise the locks instead of
/// unlocking them (an unlock could take parking_lot's slow path and touch the global
/// parking table, which another parent thread may have held at the moment of fork).
pub(crate) fn fork_child() {
    // SAFETY: see ForkHeld.
    let v = unsafe { std::mem::take(&mut *FORK_HELD.0.get()) };
    for &p in &v {
        // SAFETY: still alive (the child's copy of the table owns the counts).
        let e = unsafe { &*p };
        if let FdKind::Socket(s) = &e.kind {
            // SAFETY: fork child: one thread, and no guard exists (prepare used lock_raw).
            unsafe { s.state.reset_in_child() };
        }
    }
    // SAFETY: fork child: one thread; the lock was taken raw in prepare, no guard exists.
    unsafe { LOCK_CELL.reset_in_child() };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock() -> Arc<FdEntry> {
        Arc::new(FdEntry::socket(
            libc::AF_INET,
            libc::SOCK_STREAM,
            SockState::Plain,
        ))
    }

    // The table is global; each test uses its own fd range.
    #[test]
    fn insert_dup_close_shares_and_drops_last() {
        let (a, b, c) = (70_000, 70_001, 200_123);
        assert!(!is_marked(a));
        let e = sock();
        let weak = Arc::downgrade(&e);
        assert!(insert(a, e).unwrap().is_none());
        assert!(is_marked(a));
        assert!(dup_to(a, b).is_none());
        assert!(dup_to(a, c).is_none());
        assert!(Arc::ptr_eq(&get(a).unwrap(), &get(c).unwrap()));
        drop(remove(a));
        drop(remove(c));
        assert!(weak.upgrade().is_some(), "still referenced by b");
        drop(remove(b));
        assert!(weak.upgrade().is_none(), "dropped with the last fd");
        assert!(!is_marked(a) && !is_marked(b) && !is_marked(c));
    }

    #[test]
    fn out_of_range_and_negative_are_unmanaged() {
        assert!(!is_marked(-1));
        assert!(!is_marked(i32::MAX));
        assert!(insert(MAX_FD as c_int, sock()).is_err());
        assert!(insert(-5, sock()).is_err());
        assert!(get(-1).is_none());
    }

    #[test]
    fn dup_from_unmanaged_clears_target() {
        let (a, b) = (90_000, 90_001);
        insert(b, sock()).unwrap();
        let displaced = dup_to(a, b);
        assert!(displaced.is_some());
        assert!(!is_marked(b));
    }

    #[test]
    fn remove_range_keeps_owned() {
        let base = 300_000;
        insert(base, sock()).unwrap();
        // SAFETY: plain syscall; the ShimFd owns (and closes) the new fd.
        let sfd = Arc::new(ShimFd::new(unsafe { libc::dup(2) }, "t"));
        insert(
            base + 1,
            Arc::new(FdEntry {
                kind: FdKind::ShimOwned(sfd),
            }),
        )
        .unwrap();
        insert(base + 2, sock()).unwrap();
        assert_eq!(
            owned_in_range(base as u32, base as u32 + 10),
            vec![base + 1]
        );
        assert_eq!(remove_range(base as u32, base as u32 + 10).len(), 2);
        assert!(is_marked(base + 1));
        assert!(!is_marked(base) && !is_marked(base + 2));
        drop(remove(base + 1));
    }

    #[test]
    fn own_fd_moves_high_and_cloexec() {
        // SAFETY: plain syscalls on fds this test owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            let s = own_fd(fd, "test").unwrap();
            let n = s.fd();
            assert!(n >= 10 && n != fd);
            assert!(libc::fcntl(n, libc::F_GETFD) & libc::FD_CLOEXEC != 0);
            assert!(libc::fcntl(fd, libc::F_GETFD) < 0, "original closed");
            assert!(is_owned(n));
            drop(remove(n));
            libc::close(n);
        }
    }
}
