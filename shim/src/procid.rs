//! Which process this is, and which sockets other processes hold.
//!
//! Floor 0. The shim's memory can belong to a process other than the one that
//! initialised it: a vfork() or posix_spawn() child shares the parent's memory and runs no
//! atfork handlers. Hooks ask [`foreign_process`] before they change shared state.
//! Sockets are identified across processes by inode (fds are per process).

use std::sync::atomic::{AtomicI32, Ordering};

use libc::c_int;

/// pid of the process whose fd table this memory describes (updated in the fork child).
static PID: AtomicI32 = AtomicI32::new(0);

/// Records the current process as the owner of this memory (at init and in a fork child).
pub fn record_pid() {
    PID.store(getpid(), Ordering::Relaxed);
}

pub fn getpid() -> i32 {
    // SAFETY: getpid never fails.
    unsafe { libc::getpid() }
}

/// True when this memory image belongs to a different process than the one that last
/// initialised/forked it: a vfork() or posix_spawn() child (shared memory with the parent)
/// or a child of a raw clone/_Fork. Such callers must not mutate the fd table. A syscall:
/// use on slow paths only.
pub fn foreign_process() -> bool {
    let p = PID.load(Ordering::Relaxed);
    p != 0 && p != getpid()
}

/// The inode of the file an fd refers to (identifies a socket across processes).
pub fn inode(fd: c_int) -> Option<u64> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is writable.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

/// Does any process other than us hold the socket with this inode? (Scans /proc; runs
/// only when a registered listener's last fd in this process is closed.)
pub fn held_elsewhere(ino: u64) -> bool {
    let me = getpid().to_string();
    let needle = format!("socket:[{ino}]");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        let name = name.to_string_lossy();
        if name == me || !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            if std::fs::read_link(f.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                return true;
            }
        }
    }
    false
}
