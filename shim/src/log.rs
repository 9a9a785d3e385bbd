//! Logging: quiet by default, loud about what the user must fix.
//!
//! Two kinds of line, both never on stdout:
//!
//! * **Notices** ([`notice`]): a misconfiguration or a lost daemon the user must know about
//!   (bad `GCB_BROKER`, bad key file, broker unreachable or lost, registration refused, a bad
//!   config file line). Written by default, as `gcb: warning: ...` / `gcb: error: ...`, at
//!   most once per [`Notice`] per process tree: the "said" set lives in a `MAP_SHARED`
//!   page made at initialisation (see [`share_said`]), so a process and its fork
//!   descendants say each notice once between them, whichever meets it first; an exec'd
//!   image inherits what was said by initialisation time through `GCB_SAID` (see
//!   [`export_said`]), so a shell wrapper and the program it runs do not both say it.
//!   Unrelated processes (two programs started by one script) each say it once. `GCB_LOG=off` (and `gcb-run -q`) silences them; `GCB_LOG=LEVEL` shows
//!   those at or above LEVEL.
//! * **Log events** (the `error!`..`trace!` macros): silent unless `GCB_LOG=error|warn|
//!   info|debug|trace`; one line each, `libgcb[<pid>]: <level>: <message>`.
//!
//! `GCB_LOG_FILE=path` sends both to a file (opened `O_APPEND|O_CLOEXEC` and moved to a
//! shim-owned fd number), otherwise they go to fd 2. Each line is formatted into a stack
//! buffer (no allocation, usable in a vfork child and in fork handlers) and written with a
//! single `write(2)` (not an interposed call). errno is preserved.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU8, Ordering};

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

/// The levels [`Level::parse`] accepts, for messages that list them.
pub const LEVEL_NAMES: &str = "error, warn, info, debug, trace, off";

static LEVEL: AtomicU8 = AtomicU8::new(Level::Off as u8);
/// Up to which level notices are written: warn by default (GCB_LOG unset).
static NOTICE_LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);
/// The [`Notice`]s already written, until [`share_said`] moves them to shared memory.
static SAID_LOCAL: AtomicU32 = AtomicU32::new(0);
/// The said set in a `MAP_SHARED` page every fork descendant shares (null: not yet).
static SAID_SHARED: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());

fn said() -> &'static AtomicU32 {
    let p = SAID_SHARED.load(Ordering::Acquire);
    if p.is_null() {
        &SAID_LOCAL
    } else {
        // SAFETY: set once by share_said to a page that is never unmapped.
        unsafe { &*p }
    }
}

/// Moves the said set to an anonymous shared page, so a fork child and its parent (and
/// their other descendants) say each notice once between them, whichever says it first.
/// Called once, at initialisation; on failure the set stays per process.
pub fn share_said() {
    // SAFETY: an anonymous shared mapping of one page; no fd, no address hint.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return;
    }
    let cell = p.cast::<AtomicU32>();
    // SAFETY: the page is fresh, zeroed, page-aligned and large enough for an AtomicU32.
    unsafe { (*cell).store(SAID_LOCAL.load(Ordering::Relaxed), Ordering::Relaxed) };
    SAID_SHARED.store(cell, Ordering::Release);
}

/// A condition the shim tells the user about once per process (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
pub enum Notice {
    /// `GCB_LOG` is not a level.
    LogLevel = 0,
    /// A config file line was ignored (each bad line has its own line: see `conf`).
    ConfLine = 1,
    /// `GCB_CONF` names a file that cannot be read.
    ConfFile = 2,
    /// `GCB_BROKER` is not a usable address.
    BrokerAddr = 3,
    /// `GCB_DPF_SERVER` is not a usable address.
    DpfAddr = 4,
    /// The key file is missing, unreadable or too short.
    KeyFile = 5,
    /// The key file is readable by group or others.
    KeyMode = 6,
    /// A listen() could not register: the broker did not answer; serving locally.
    BrokerUnreachable = 7,
    /// The broker stopped answering heartbeats.
    BrokerLost = 8,
    /// The broker refused a registration (quota, key...).
    RegisterRefused = 9,
    /// portfwd did not answer or refused a forward.
    DpfUnavailable = 10,
    /// GCB_LOG_FILE cannot be opened.
    LogFile = 11,
    /// A numeric setting (GCB_HEARTBEAT_MS...) is not a usable number.
    BadSetting = 12,
    /// portfwd refused a forward.
    DpfRefused = 13,
}

/// Whether `what` was said already (here, by a fork relative, or by an exec'ing parent).
pub fn said_before(what: Notice) -> bool {
    said().load(Ordering::Relaxed) & (1u32 << (what as u32)) != 0
}

impl Notice {
    /// About the configuration, which every exec'd image reads again: said once per
    /// process tree and exec chain at every level (not repeated as log events).
    pub fn is_config(self) -> bool {
        !matches!(
            self,
            Notice::BrokerUnreachable
                | Notice::BrokerLost
                | Notice::RegisterRefused
                | Notice::DpfUnavailable
                | Notice::DpfRefused
        )
    }
}

/// Set the level up to which notices are written (`Off`: none).
pub fn set_notice_level(l: Level) {
    NOTICE_LEVEL.store(l as u8, Ordering::Relaxed);
}

/// Mark notices as already said (from an exec'ing parent's `GCB_SAID`).
pub fn mark_said(bits: u32) {
    said().fetch_or(bits, Ordering::Relaxed);
}

/// The said set, for `GCB_SAID` (see [`crate::init`]).
pub fn export_said() -> u32 {
    said().load(Ordering::Relaxed)
}

/// Writes `gcb: <level>: <message>` once per process for `what` (every time for
/// [`Notice::ConfLine`], whose lines differ), unless notices are silenced. `level` is
/// `Error` or `Warn`. Returns whether it wrote.
#[cold]
pub fn notice(level: Level, what: Notice, args: fmt::Arguments<'_>) -> bool {
    if NOTICE_LEVEL.load(Ordering::Relaxed) < level as u8 {
        return false;
    }
    let bit = 1u32 << (what as u32);
    let before = said().fetch_or(bit, Ordering::Relaxed);
    if what != Notice::ConfLine && before & bit != 0 {
        return false;
    }
    let word = if level == Level::Error {
        "error"
    } else {
        "warning"
    };
    emit(format_args!("gcb: {word}: "), args);
    true
}
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
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    emit(format_args!("libgcb[{}]: {}: ", pid, level.name()), args);
}

/// Writes `prefix` `args` `\n` as one line to the log fd.
fn emit(prefix: fmt::Arguments<'_>, args: fmt::Arguments<'_>) {
    // Restored at the end, so a log line after a failed real call does not change what
    // the program sees.
    let saved = crate::sys::errno();
    let mut b = StackBuf {
        buf: [0; 512],
        len: 0,
        truncated: false,
    };
    let _ = b.write_fmt(prefix);
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

/// A notice (see [`crate::log::notice`]): `notice!(Warn, X, "fmt", args...)` for
/// [`Notice::X`]. When it is not written (said before, or silenced) the same message is a
/// log event, so `GCB_LOG` users still see every occurrence of a runtime condition (each
/// refused socket, each failed registration) at its level; configuration notices
/// ([`Notice::is_config`]) repeat only at debug.
#[macro_export]
#[doc(hidden)]
macro_rules! notice {
    ($lvl:ident, $what:ident, $($arg:tt)*) => {
        if !$crate::log::notice(
            $crate::log::Level::$lvl,
            $crate::log::Notice::$what,
            format_args!($($arg)*),
        ) {
            let what = $crate::log::Notice::$what;
            let level = if what.is_config() {
                $crate::log::Level::Debug
            } else {
                $crate::log::Level::$lvl
            };
            $crate::log_at!(level, $($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse() {
        for (s, l) in [
            ("off", Level::Off),
            ("ERROR", Level::Error),
            (" warn ", Level::Warn),
            ("info", Level::Info),
            ("debug", Level::Debug),
            ("trace", Level::Trace),
        ] {
            assert_eq!(Level::parse(s), Some(l), "{s}");
        }
        assert_eq!(Level::parse("verbose"), None);
    }
}
