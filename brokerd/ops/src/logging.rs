//! The daemons' logging: [`tracing`] events, one stderr line each:
//! `2026-12-06T01:02:03.456Z gcb-brokerd: INFO message` (RFC 3339, UTC, milliseconds), or
//! under systemd `<6>gcb-brokerd: INFO message`: when `JOURNAL_STREAM` names our stderr
//! (its `DEV:INO`), the journal adds the time itself and reads the sd-daemon priority
//! prefix (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace).
//!
//! The level can change while running ([`set_level`], a SIGHUP reload). With
//! [`Output::Buffered`] (the broker) lines are buffered until [`flush`]: the event loop
//! flushes before it waits, so log output never sits between a request and its answer
//! (a brokered connect used to pay one or two write(2) calls on its critical path), and
//! comes out whole and in order. With [`Output::Immediate`] (portfwd, whose requests wait
//! on nft and fsync anyway) each line is written at once, in one call.

use std::io::{self, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, Registry};

/// The name every line carries (set by [`init`]).
static NAME: OnceLock<&'static str> = OnceLock::new();

/// The daemon's name for its lines.
fn name() -> &'static str {
    NAME.get().copied().unwrap_or("gcb")
}

/// Where lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Into a buffer written out by [`flush`] (or when it holds 64 KiB).
    Buffered,
    /// Straight to stderr, one write per line.
    Immediate,
}

/// The output chosen by [`init`].
static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Log levels (`--log`), most severe first: the same five for both daemons and the
/// shim's `GCB_LOG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Failures of the daemon itself.
    Error,
    /// Refusals, dropped input, expiries, removed mappings, repairs.
    Warn,
    /// Registrations, brokered connections, relays; mappings added and deleted.
    Info,
    /// Every control message and probe.
    Debug,
    /// Everything, including per-datagram detail.
    Trace,
}

impl Level {
    /// The name `--log` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

impl From<Level> for LevelFilter {
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

/// How a line starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// An RFC 3339 UTC timestamp (a terminal, a file, a supervisor that adds nothing).
    Timestamp,
    /// The sd-daemon priority `<N>` (stderr is the systemd journal, which stamps lines).
    Journal,
}

impl Style {
    /// [`Style::Journal`] when `JOURNAL_STREAM` (`DEV:INO`, set by systemd) names the
    /// file our stderr is: a child of the service that redirected stderr elsewhere
    /// still gets timestamps.
    pub fn detect() -> Style {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
            return Style::Timestamp;
        };
        // SAFETY: fstat on fd 2 fills the zeroed stat buffer we own; failure is checked.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(2, &mut st) } != 0 {
            return Style::Timestamp;
        }
        if v.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino)) {
            Style::Journal
        } else {
            Style::Timestamp
        }
    }
}

/// The start of a line at `level` made at `unix_ms`, up to the daemon's name:
/// `2026-12-06T01:02:03.456Z ` or `<6>`.
pub fn line_prefix(style: Style, level: tracing::Level, unix_ms: u64) -> String {
    match style {
        Style::Journal => {
            let prio = match level {
                tracing::Level::ERROR => 3,
                tracing::Level::WARN => 4,
                tracing::Level::INFO => 6,
                _ => 7,
            };
            format!("<{prio}>")
        }
        Style::Timestamp => format!("{} ", rfc3339_utc(unix_ms)),
    }
}

/// `unix_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (proleptic Gregorian; days to civil date by
/// Howard Hinnant's algorithm).
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let sod = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        unix_ms % 1000
    )
}

/// The style chosen by [`init`].
static STYLE: OnceLock<Style> = OnceLock::new();

/// The wall clock in Unix milliseconds (0 before 1970).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Logs `msg` as an INFO line whatever the level: the start-up line that operators and
/// supervisors wait for.
pub fn always(msg: &str) {
    let style = STYLE.get().copied().unwrap_or(Style::Timestamp);
    let line = format!(
        "{}{}: INFO {msg}\n",
        line_prefix(style, tracing::Level::INFO, unix_ms()),
        name()
    );
    let _ = Pending.write(line.as_bytes());
    flush();
}

/// The level filter's reload handle (set by [`init`]).
static LEVEL: OnceLock<(reload::Handle<LevelFilter, Registry>, Mutex<Level>)> = OnceLock::new();

/// Installs the global subscriber printing events up to `level` as daemon `name`
/// (`gcb-brokerd`), in the [`Style`] of our stderr. A second call changes nothing.
pub fn init(name: &'static str, level: Level, output: Output) {
    let _ = NAME.set(name);
    let _ = OUTPUT.set(output);
    let style = *STYLE.get_or_init(Style::detect);
    let (filter, handle) = reload::Layer::new(LevelFilter::from(level));
    let subscriber = tracing_subscriber::registry().with(filter).with(
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .event_format(LineFormat(style))
            .with_writer(|| Pending),
    );
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        let _ = LEVEL.set((handle, Mutex::new(level)));
    }
}

/// The level in force.
pub fn level() -> Level {
    LEVEL.get().map_or(Level::Info, |(_, l)| {
        *l.lock().unwrap_or_else(|e| e.into_inner())
    })
}

/// Prints events up to `level` from now on.
pub fn set_level(level: Level) {
    if let Some((handle, current)) = LEVEL.get() {
        if handle.reload(LevelFilter::from(level)).is_ok() {
            *current.lock().unwrap_or_else(|e| e.into_inner()) = level;
        }
    }
}

/// Sets the level to `level` ([`set_level`]) and says `log old->new` when it changed
/// (a reload's log line starts with it).
pub fn change_level(level: Level) -> Option<String> {
    let old = self::level();
    (old != level).then(|| {
        set_level(level);
        format!("log {}->{}", old.name(), level.name())
    })
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

/// The subscriber's writer: appends to [`PENDING`], or writes to stderr with
/// [`Output::Immediate`] (the subscriber hands it one whole line per event).
struct Pending;

impl Write for Pending {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if OUTPUT.get() != Some(&Output::Buffered) {
            let _ = io::stderr().lock().write_all(buf);
            return Ok(buf.len());
        }
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

/// `PREFIX NAME: LEVEL message` ([`line_prefix`]): no target, no spans.
struct LineFormat(Style);

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
        let level = *event.metadata().level();
        write!(
            writer,
            "{}{}: {level} ",
            line_prefix(self.0, level, unix_ms()),
            name()
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        // 2026-12-06T01:02:03.456Z
        assert_eq!(rfc3339_utc(1_796_518_923_456), "2026-12-06T01:02:03.456Z");
        // A leap day, and the last millisecond of a year.
        assert_eq!(rfc3339_utc(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_704_067_199_999), "2023-12-31T23:59:59.999Z");
    }

    #[test]
    fn journal_lines_carry_sd_daemon_priorities() {
        use tracing::Level as L;
        let p = |l| line_prefix(Style::Journal, l, 1_796_518_923_456);
        assert_eq!(
            [
                p(L::ERROR),
                p(L::WARN),
                p(L::INFO),
                p(L::DEBUG),
                p(L::TRACE)
            ],
            ["<3>", "<4>", "<6>", "<7>", "<7>"]
        );
        assert_eq!(
            line_prefix(Style::Timestamp, L::INFO, 1_796_518_923_456),
            "2026-12-06T01:02:03.456Z "
        );
    }
}
