//! Logging: silent by default.
//!
//! `GCB_LOG=error|warn|info|debug|trace` enables it; `GCB_LOG_FILE=path` sends it to a file
//! (opened `O_APPEND|O_CLOEXEC` and moved to a shim-owned fd number), otherwise to fd 2.
//! Never to stdout. Each event is one line, `libgcb[<pid>]: <level>: <message>\n`, formatted
//! into a stack buffer (no allocation, usable in a vfork child and in fork handlers) and
//! written with a single `write(2)` (not an interposed call). errno is preserved.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
#[repr(u8)]
pub enum Level {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "" | "off" | "none" | "0" => Level::Off,
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Off as u8);
/// Destination fd: 2 (stderr) or a shim-owned log file fd.
static LOG_FD: AtomicI32 = AtomicI32::new(2);

pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

pub fn set_fd(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

/// A shim-owned fd moved from `old` to `new` (the program dup2()ed onto it): if it was the
/// log file, follow it. A compare-exchange, so stderr (fd 2, never shim-owned) is unaffected.
pub fn fd_moved(old: i32, new: i32) {
    let _ = LOG_FD.compare_exchange(old, new, Ordering::Relaxed, Ordering::Relaxed);
}

pub fn log_fd() -> i32 {
    LOG_FD.load(Ordering::Relaxed)
}

/// Cheap check used by the macros before any formatting happens.
#[inline(always)]
pub fn enabled(l: Level) -> bool {
    LEVEL.load(Ordering::Relaxed) >= l as u8
}

struct StackBuf {
    buf: [u8; 512],
    len: usize,
    truncated: bool,
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - 1 - self.len; // keep one byte for '\n'
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            self.truncated = true;
        }
        Ok(())
    }
}

#[cold]
pub fn write_line(level: Level, args: fmt::Arguments<'_>) {
    // Restored at the end, so a log line after a failed real call does not change what
    // the program sees.
    let saved = crate::sys::errno();
    let mut b = StackBuf {
        buf: [0; 512],
        len: 0,
        truncated: false,
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(b, "libgcb[{}]: {}: ", pid, level.name());
    let _ = b.write_fmt(args);
    if b.truncated {
        b.len = b.len.saturating_sub(3);
        let _ = b.write_str("...");
    }
    b.buf[b.len] = b'\n';
    b.len += 1;
    let fd = LOG_FD.load(Ordering::Relaxed);
    let mut off = 0;
    while off < b.len {
        // The real write(2), not our hook: logging happens with or without the guard, and
        // the log file is a shim-owned fd the hook would refuse.
        let r = match crate::sys::write() {
            // SAFETY: the pointer/length pair lies within `b.buf`.
            Some(w) => unsafe { w(fd, b.buf[off..].as_ptr().cast(), b.len - off) },
            None => -1,
        };
        if r <= 0 {
            if r < 0 && crate::sys::errno() == libc::EINTR {
                continue;
            }
            break;
        }
        off += r as usize;
    }
    crate::sys::set_errno(saved);
}

#[macro_export]
#[doc(hidden)]
macro_rules! log_at {
    ($lvl:expr, $($arg:tt)*) => {
        if $crate::log::enabled($lvl) {
            $crate::log::write_line($lvl, format_args!($($arg)*));
        }
    };
}
#[macro_export]
#[doc(hidden)]
macro_rules! error { ($($a:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($a)*) }; }
#[macro_export]
#[doc(hidden)]
macro_rules! warn { ($($a:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($a)*) }; }
#[macro_export]
#[doc(hidden)]
macro_rules! info { ($($a:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($a)*) }; }
#[macro_export]
#[doc(hidden)]
macro_rules! debug { ($($a:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($a)*) }; }
#[macro_export]
#[doc(hidden)]
macro_rules! trace { ($($a:tt)*) => { $crate::log_at!($crate::log::Level::Trace, $($a)*) }; }
