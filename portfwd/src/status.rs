//! `gcb-portfwd status`: the status document the admin socket answers, and the command
//! that asks for it and prints it.
//!
//! The daemon answers the request line `status` on its admin socket ([`crate::ops`]) with
//! one JSON document ([`Status`]), which `gcb-portfwd status --json` prints as is and
//! `gcb-portfwd status` prints as tables. The schema (times in seconds):
//!
//! ```text
//! { "daemon": "gcb-portfwd", "version": "0.1.0", "pid": 123, "uptime_secs": 61.2,
//!   "listen": "10.1.0.1:9651", "public": "203.0.113.1", "epoch": 4,
//!   "mappings": [ { "proto": "tcp"|"udp", "public": "203.0.113.1:20000",
//!       "private": "10.1.0.5:9618", "probe": "10.1.0.5:40001" (the management socket),
//!       "age_secs": ... | null (null: replayed from the mirror file at start),
//!       "probe_failures": N (failed probe rounds in a row), "probe_state": "ok" |
//!       "failing N/LIMIT" } ],
//!   "install_seconds": { "count": N, "sum": ... } (the histogram of the metrics),
//!   "counters": { "mappings": N, "epoch": N, "requests": N, ... } }
//! ```
//!
//! `counters` holds exactly the `NAME=VALUE` pairs of the stats log line (sorted by name).
//! New fields may be added; none is removed or renamed without a note here.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The status document (module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Always `gcb-portfwd`.
    pub daemon: String,
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: f64,
    /// The control address (UDP).
    pub listen: String,
    /// The public address mappings are on.
    pub public: String,
    /// This run's epoch.
    pub epoch: u64,
    /// The forwarding rules.
    pub mappings: Vec<MappingStatus>,
    /// Rule install latency so far.
    pub install_seconds: InstallLatency,
    /// The stats line's counters, by name.
    pub counters: serde_json::Map<String, serde_json::Value>,
}

/// One mapping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MappingStatus {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The public address (`--public`:port).
    pub public: String,
    /// The client socket it forwards to.
    pub private: String,
    /// The client's management socket, probed for liveness.
    pub probe: String,
    /// Seconds since it was added (None: replayed from the mirror file at start).
    pub age_secs: Option<f64>,
    /// Probe rounds in a row that failed.
    pub probe_failures: u32,
    /// `ok` or `failing N/LIMIT`.
    pub probe_state: String,
}

/// Count and sum of the install latency histogram.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstallLatency {
    /// Batches with installs measured.
    pub count: u64,
    /// Their total time, seconds.
    pub sum: f64,
}

/// Why the status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No daemon answers on the socket.
    #[error("no gcb-portfwd answers on its admin socket {path} ({cause}); is it running, with this --admin-socket?")]
    NotRunning {
        /// The socket path.
        path: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The daemon answered something else than a status document.
    #[error("{path}: unexpected answer: {detail}")]
    BadAnswer {
        /// The socket path.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

/// Asks the daemon at `path` for its status: the raw JSON text and the document.
pub fn fetch(path: &Path) -> Result<(String, Status), StatusError> {
    let shown = path.display().to_string();
    let mut s =
        std::os::unix::net::UnixStream::connect(path).map_err(|cause| StatusError::NotRunning {
            path: shown.clone(),
            cause,
        })?;
    let bad = |detail: String| StatusError::BadAnswer {
        path: shown.clone(),
        detail,
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| bad(e.to_string()))?;
    s.write_all(b"status\n").map_err(|e| bad(e.to_string()))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    let doc = serde_json::from_str(&text)
        .map_err(|e| bad(format!("{e}: {}", text.lines().next().unwrap_or(""))))?;
    Ok((text, doc))
}

fn secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

/// The document as human-readable tables.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "{} {} (pid {}), up {}, control {}, public {}, epoch {}\n\n",
        s.daemon,
        s.version,
        s.pid,
        secs(s.uptime_secs),
        s.listen,
        s.public,
        s.epoch
    );
    let mut rows: Vec<Vec<String>> =
        vec![
            ["PUBLIC", "PROTO", "PRIVATE", "PROBE", "AGE", "PROBE STATE"]
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
        ];
    for m in &s.mappings {
        rows.push(vec![
            m.public.clone(),
            m.proto.clone(),
            m.private.clone(),
            m.probe.clone(),
            m.age_secs.map_or_else(|| "(replayed)".to_owned(), secs),
            m.probe_state.clone(),
        ]);
    }
    out.push_str(&format!("Mappings ({})\n", s.mappings.len()));
    if !s.mappings.is_empty() {
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str("  ");
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
    }
    out.push('\n');
    out.push_str(&format!(
        "Rule installs: {} batches, {:.3} s in all\n\nCounters\n",
        s.install_seconds.count, s.install_seconds.sum
    ));
    for (k, v) in &s.counters {
        out.push_str(&format!("  {k:<28} {v}\n"));
    }
    out
}
