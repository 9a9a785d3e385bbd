//! [`ShimFd`]: an fd the shim opened for itself (log file, control and relay sockets,
//! placeholders), owned: it is closed through the real `close` exactly once, by
//! [`ShimFd::close`] or when the last reference goes.
//!
//! Floor 0. The fd table ([`crate::fdtable`]) records every `ShimFd` so the close, dup and
//! fcntl hooks can keep the program's hands off it, and moves it to another number when
//! the program dup2()s onto it: hence the number is atomic and read at each use.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicI32, Ordering};

/// A shim-owned fd. Read [`ShimFd::fd`] at each use (the number can move).
pub struct ShimFd {
    fd: AtomicI32,
    pub label: &'static str,
}

impl ShimFd {
    /// Takes ownership of `fd`.
    pub fn new(fd: c_int, label: &'static str) -> ShimFd {
        ShimFd {
            fd: AtomicI32::new(fd),
            label,
        }
    }

    /// The current number (-1 once closed).
    pub fn fd(&self) -> c_int {
        self.fd.load(Ordering::Acquire)
    }

    /// The fd table moved the file to `new` (the old number is the program's now).
    pub(crate) fn moved_to(&self, new: c_int) {
        self.fd.store(new, Ordering::Release);
    }

    /// Closes the fd now (once: later calls and the drop do nothing).
    pub fn close(&self) {
        let fd = self.fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            crate::sys::close_raw(fd);
        }
    }
}

impl Drop for ShimFd {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_once_through_close_or_drop() {
        // SAFETY: plain syscalls on fds this test owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(fd >= 0);
            let s = ShimFd::new(fd, "test");
            s.close();
            assert_eq!(s.fd(), -1);
            assert!(libc::fcntl(fd, libc::F_GETFD) < 0, "closed");
            // A new fd may take the number; the drop must not close it.
            let again = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            drop(s);
            assert!(libc::fcntl(again, libc::F_GETFD) >= 0, "not closed twice");
            libc::close(again);
        }
    }
}
