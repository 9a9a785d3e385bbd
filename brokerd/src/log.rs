//! Minimal stderr logging: one line per event, `gcb-brokerd: LEVEL message`.

use std::sync::atomic::{AtomicU8, Ordering};

/// Log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
#[repr(u8)]
pub enum Level {
    /// Failures of the daemon itself.
    Error = 0,
    /// Refusals, dropped input, expiries.
    Warn = 1,
    /// Registrations, brokered connections, relays.
    Info = 2,
    /// Every control message.
    Debug = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the most verbose level printed.
pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

/// True if `l` is printed.
pub fn enabled(l: Level) -> bool {
    (l as u8) <= LEVEL.load(Ordering::Relaxed)
}

/// Lines written since the last [`flush`]. The event loop flushes before it waits, so
/// log output never sits between a request and its answer (a brokered connect used to
/// pay one or two write(2) calls on its critical path), and comes out whole and in order.
static PENDING: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// Flush at once beyond this much pending output.
const PENDING_MAX: usize = 64 * 1024;

/// Writes one log line (use the macros). Buffered until [`flush`].
pub fn write(l: Level, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let tag = match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
    };
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(p, "gcb-brokerd: {tag} {args}");
    if p.len() >= PENDING_MAX {
        let _ = std::io::stderr().lock().write_all(&p);
        p.clear();
    }
}

/// Writes the pending lines to stderr (one write for all).
pub fn flush() {
    use std::io::Write;
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if !p.is_empty() {
        let _ = std::io::stderr().lock().write_all(&p);
        p.clear();
    }
}

/// Logs at a level: `log!(Info, "x {}", y)`.
#[macro_export]
macro_rules! log {
    ($lvl:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$lvl) {
            $crate::log::write($crate::log::Level::$lvl, format_args!($($arg)*));
        }
    };
}
