//! Signals and reloads, alike in both daemons: what the handlers set ([`Signals`]), why
//! a run of the event loop ended ([`RunEnd`]), and what a reload changed ([`Changes`],
//! said in one log line).
//!
//! SIGTERM and SIGINT count in `terminate` (the broker drains on the first and exits on
//! the second), SIGHUP asks for a reload, SIGUSR1 for the stats line. The handlers only
//! touch atomics; the event loop reads them within one poll (epoll_wait is never
//! restarted after a handler, and the loops sleep 250 ms at most). SIGPIPE needs nothing
//! here: Rust's runtime ignores it before `main`, so a peer closing a socket never kills
//! a daemon.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// What the signal handlers set, read by the daemon's event loop.
#[derive(Debug, Default)]
pub struct Signals {
    /// SIGTERM/SIGINT received so far (the handler adds one).
    pub terminate: AtomicUsize,
    /// SIGHUP: reload.
    pub reload: AtomicBool,
    /// SIGUSR1: log the stats line.
    pub stats: AtomicBool,
}

impl Signals {
    /// Installs the handlers of SIGTERM, SIGINT, SIGHUP and SIGUSR1.
    pub fn install() -> io::Result<Arc<Signals>> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
        let signals = Arc::new(Signals::default());
        for sig in [SIGTERM, SIGINT, SIGHUP, SIGUSR1] {
            let s = Arc::clone(&signals);
            let action = move || match sig {
                SIGHUP => s.reload.store(true, Ordering::Relaxed),
                SIGUSR1 => s.stats.store(true, Ordering::Relaxed),
                _ => {
                    s.terminate.fetch_add(1, Ordering::Relaxed);
                }
            };
            // SAFETY: the action only stores to or adds to atomics, which is
            // async-signal-safe; it allocates nothing and takes no lock.
            unsafe { signal_hook::low_level::register(sig, action) }.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("installing the handler of signal {sig}: {e}"),
                )
            })?;
        }
        Ok(signals)
    }
}

/// Why the daemon's event loop returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// SIGHUP: reload the configuration, then run the loop again.
    Reload,
    /// Drained or told to stop: the stats line is logged; exit.
    Exit,
}

/// What a reload changed, for the log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// `name old->new` for each setting applied.
    pub applied: Vec<String>,
    /// Settings that differ but apply only at the next start.
    pub need_restart: Vec<String>,
}

impl Changes {
    /// The reload's log line: `reloaded: a 1->2, b x->y; needs a restart, not applied:
    /// c`, or `reloaded: nothing changed`. `first` (the log level's change) leads.
    pub fn line(&self, first: Option<String>) -> String {
        let applied: Vec<&str> = first
            .iter()
            .map(String::as_str)
            .chain(self.applied.iter().map(String::as_str))
            .collect();
        let mut line = if applied.is_empty() {
            "reloaded: nothing changed".to_owned()
        } else {
            format!("reloaded: {}", applied.join(", "))
        };
        if !self.need_restart.is_empty() {
            line += &format!(
                "; needs a restart, not applied: {}",
                self.need_restart.join(", ")
            );
        }
        line
    }
}

/// The log line of a reload whose new configuration could not be used.
pub fn refused_line(why: &str) -> String {
    format!("reload refused, the running configuration stays: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_lines_say_what_changed_and_what_waits_for_a_restart() {
        let none = Changes::default();
        assert_eq!(none.line(None), "reloaded: nothing changed");
        let ch = Changes {
            applied: vec!["max_relays 1->2".into()],
            need_restart: vec!["listen a->b".into()],
        };
        assert_eq!(
            ch.line(Some("log info->debug".into())),
            "reloaded: log info->debug, max_relays 1->2; needs a restart, not applied: listen a->b"
        );
        let only_restart = Changes {
            applied: vec![],
            need_restart: vec!["ports 1-2->3-4".into()],
        };
        assert_eq!(
            only_restart.line(None),
            "reloaded: nothing changed; needs a restart, not applied: ports 1-2->3-4"
        );
    }
}
