//! The fields every daemon's status document starts with ([`DaemonInfo`], flattened into
//! the daemon's own `Status`, so the JSON is one flat object) and their headline.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::status_tables::secs;

/// Who answers: the first fields of a status document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// `gcb-brokerd` or `gcb-portfwd`.
    pub daemon: String,
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: f64,
    /// Its control address.
    pub listen: String,
}

impl DaemonInfo {
    /// This process as daemon `daemon` of version `version`, up for `uptime`, with its
    /// control socket on `listen`.
    pub fn this_process(daemon: &str, version: &str, uptime: Duration, listen: String) -> Self {
        DaemonInfo {
            daemon: daemon.to_owned(),
            version: version.to_owned(),
            pid: std::process::id(),
            uptime_secs: uptime.as_secs_f64(),
            listen,
        }
    }

    /// `DAEMON VERSION (pid PID), up UPTIME`, the first words of the status tables.
    pub fn headline(&self) -> String {
        format!(
            "{} {} (pid {}), up {}",
            self.daemon,
            self.version,
            self.pid,
            secs(self.uptime_secs)
        )
    }
}
