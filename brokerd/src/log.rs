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

/// Writes one log line (use the macros).
pub fn write(l: Level, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let tag = match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
    };
    // Formatted first and written with one call: `writeln!` on unbuffered stderr issues
    // a write(2) per fragment (~90 for a connect line), which cost the broker ~100 us per
    // brokered connection and let lines of concurrent writers interleave.
    let line = format!("gcb-brokerd: {tag} {args}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
