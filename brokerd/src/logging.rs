//! Logging: [`tracing`] events, one stderr line each, `gcb-brokerd: LEVEL message`
//! (the format the lab tests and operators grep).
//!
//! Lines are buffered until [`flush`]: the event loop flushes before it waits, so log
//! output never sits between a request and its answer (a brokered connect used to pay
//! one or two write(2) calls on its critical path), and comes out whole and in order.

use std::io::{self, Write};
use std::sync::Mutex;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// Log levels (`--log`), most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Failures of the daemon itself.
    Error,
    /// Refusals, dropped input, expiries.
    Warn,
    /// Registrations, brokered connections, relays.
    Info,
    /// Every control message.
    Debug,
    /// Everything, including what Debug leaves out.
    Trace,
}

impl From<Level> for tracing::level_filters::LevelFilter {
    fn from(l: Level) -> Self {
        match l {
            Level::Error => Self::ERROR,
            Level::Warn => Self::WARN,
            Level::Info => Self::INFO,
            Level::Debug => Self::DEBUG,
            Level::Trace => Self::TRACE,
        }
    }
}

/// Installs the global subscriber printing events up to `level`. A second call
/// changes nothing.
pub fn init(level: Level) {
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .event_format(LineFormat)
        .with_writer(|| Pending)
        .try_init();
}

/// Writes the pending lines to stderr (one write for all).
pub fn flush() {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if !p.is_empty() {
        let _ = io::stderr().lock().write_all(&p);
        p.clear();
    }
}

/// Lines written since the last [`flush`].
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Flush at once beyond this much pending output.
const PENDING_MAX: usize = 64 * 1024;

/// The subscriber's writer: appends to [`PENDING`] (the subscriber hands it one
/// whole line per event).
struct Pending;

impl Write for Pending {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        p.extend_from_slice(buf);
        if p.len() >= PENDING_MAX {
            let _ = io::stderr().lock().write_all(&p);
            p.clear();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `gcb-brokerd: LEVEL message`: no timestamp (the supervisor's journal adds one),
/// no target, no spans.
struct LineFormat;

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "gcb-brokerd: {} ", event.metadata().level())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
