//! `gcb-brokerd status`: the status document the admin socket answers, and the command
//! that asks for it and prints it.
//!
//! The daemon answers the request line `status` on its admin socket ([`crate::ops`]) with
//! one JSON document ([`Status`]), which `gcb-brokerd status --json` prints as is and
//! `gcb-brokerd status` prints as tables. The schema (times in seconds, addresses as
//! `IP:PORT` strings):
//!
//! ```text
//! { "daemon": "gcb-brokerd", "version": "0.1.0", "pid": 123, "uptime_secs": 61.2,
//!   "listen": "203.0.113.10:9650",
//!   "registrations": [ { "proto": "tcp"|"udp", "proxy": ..., "observed": ...,
//!       "local": ..., "age_secs": ..., "last_heartbeat_secs": ... (since the last
//!       register or heartbeat), "lease_left_secs": ..., "standbys": N (TCP: parked
//!       standby connections), "data": ... | null (UDP: the listener's data address) } ],
//!   "relays": [ { "a": ..., "b": ... (the two ends: a is the connector's side),
//!       "bytes_a_to_b": N, "bytes_b_to_a": N, "age_secs": ..., "idle_secs": ...,
//!       "label": "..." } ],
//!   "standbys": [ { "proxy": ..., "peer": ... } ],
//!   "punch_pairings": [ { "proxy": ..., "partner": ..., "data": ... } ],
//!   "pending": [ { "proxy": ..., "waiting": ... | null, "expires_in_secs": ...,
//!       "deferred": bool } ],
//!   "counters": { "registrations": N, "relays_active": N, ... } }
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
    /// Always `gcb-brokerd`.
    pub daemon: String,
    /// The daemon's version.
    pub version: String,
    /// Its process id.
    pub pid: u32,
    /// Seconds since it started.
    pub uptime_secs: f64,
    /// The control (UDP) and relay (TCP) address.
    pub listen: String,
    /// Registered listening sockets.
    pub registrations: Vec<RegistrationStatus>,
    /// Running relays.
    pub relays: Vec<RelayStatus>,
    /// Parked standby connections.
    pub standbys: Vec<StandbyStatus>,
    /// UDP hole-punch pairings.
    pub punch_pairings: Vec<PunchStatus>,
    /// Connect ids waiting for their partner connection.
    pub pending: Vec<PendingStatus>,
    /// The stats line's counters, by name.
    pub counters: serde_json::Map<String, serde_json::Value>,
}

/// One registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationStatus {
    /// `tcp` or `udp`.
    pub proto: String,
    /// The proxy address the program advertises.
    pub proxy: String,
    /// The owner's control address as the broker sees it (its NAT mapping).
    pub observed: String,
    /// The listening socket's own address.
    pub local: String,
    /// Seconds since it registered.
    pub age_secs: f64,
    /// Seconds since its last register or heartbeat.
    pub last_heartbeat_secs: f64,
    /// Seconds its lease has left.
    pub lease_left_secs: f64,
    /// Parked standby connections (TCP).
    pub standbys: usize,
    /// The listener's data address (UDP, once a Dummy arrived).
    pub data: Option<String>,
}

/// One running relay.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStatus {
    /// The connector's end (its address as seen by the broker).
    pub a: String,
    /// The listener's end.
    pub b: String,
    /// Bytes from a to b.
    pub bytes_a_to_b: u64,
    /// Bytes from b to a.
    pub bytes_b_to_a: u64,
    /// Seconds since it started.
    pub age_secs: f64,
    /// Seconds since a byte last moved.
    pub idle_secs: f64,
    /// What it relays (the log's label).
    pub label: String,
}

/// One parked standby connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyStatus {
    /// The proxy it serves.
    pub proxy: String,
    /// Its source address.
    pub peer: String,
}

/// One UDP punch pairing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PunchStatus {
    /// The registration's proxy.
    pub proxy: String,
    /// The partner registration's proxy.
    pub partner: String,
    /// The data address handed to the partner.
    pub data: String,
}

/// One connect id waiting for its partner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingStatus {
    /// The proxy the connection is for.
    pub proxy: String,
    /// The connection that arrived first, if any.
    pub waiting: Option<String>,
    /// Seconds until it is given up.
    pub expires_in_secs: f64,
    /// An unauthenticated relay decision waiting for its connector first.
    pub deferred: bool,
}

/// Why the status could not be had.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No daemon answers on the socket.
    #[error("no gcb-brokerd answers on its admin socket {path} ({cause}); is it running, with this --admin-socket?")]
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
    let text = request(path, "status")?;
    let doc = serde_json::from_str(&text).map_err(|e| StatusError::BadAnswer {
        path: path.display().to_string(),
        detail: format!("{e}: {}", text.lines().next().unwrap_or("")),
    })?;
    Ok((text, doc))
}

/// Sends one request line to the admin socket at `path` and reads the whole answer.
pub fn request(path: &Path, line: &str) -> Result<String, StatusError> {
    let shown = path.display().to_string();
    let not_running = |cause| StatusError::NotRunning {
        path: shown.clone(),
        cause,
    };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(not_running)?;
    let bad = |e: std::io::Error| StatusError::BadAnswer {
        path: shown.clone(),
        detail: e.to_string(),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(bad)?;
    s.write_all(format!("{line}\n").as_bytes()).map_err(bad)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(bad)?;
    Ok(out)
}

fn secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

/// Prints rows as columns, the first row being the header.
fn table(out: &mut String, title: &str, rows: Vec<Vec<String>>) {
    out.push_str(&format!("{title} ({})\n", rows.len().saturating_sub(1)));
    if rows.len() <= 1 {
        out.push('\n');
        return;
    }
    let n = rows[0].len();
    let widths: Vec<usize> = (0..n)
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
    out.push('\n');
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

/// The document as human-readable tables.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "{} {} (pid {}), up {}, listening on {}\n\n",
        s.daemon,
        s.version,
        s.pid,
        secs(s.uptime_secs),
        s.listen
    );
    let mut rows = vec![row(&[
        "PROTO",
        "PROXY",
        "OWNER (OBSERVED)",
        "LOCAL",
        "AGE",
        "LAST HEARTBEAT",
        "STANDBYS/DATA",
    ])];
    for r in &s.registrations {
        rows.push(vec![
            r.proto.clone(),
            r.proxy.clone(),
            r.observed.clone(),
            r.local.clone(),
            secs(r.age_secs),
            format!("{} ago", secs(r.last_heartbeat_secs)),
            if r.proto == "udp" {
                r.data.clone().unwrap_or_else(|| "-".into())
            } else {
                r.standbys.to_string()
            },
        ]);
    }
    table(&mut out, "Registrations", rows);
    let mut rows = vec![row(&[
        "A (CONNECTOR)",
        "B (LISTENER)",
        "A->B",
        "B->A",
        "AGE",
        "IDLE",
    ])];
    for r in &s.relays {
        rows.push(vec![
            r.a.clone(),
            r.b.clone(),
            r.bytes_a_to_b.to_string(),
            r.bytes_b_to_a.to_string(),
            secs(r.age_secs),
            secs(r.idle_secs),
        ]);
    }
    table(&mut out, "Relays", rows);
    let mut rows = vec![row(&["PROXY", "PEER"])];
    for r in &s.standbys {
        rows.push(vec![r.proxy.clone(), r.peer.clone()]);
    }
    table(&mut out, "Standbys", rows);
    let mut rows = vec![row(&["PROXY", "PARTNER", "DATA ADDRESS"])];
    for r in &s.punch_pairings {
        rows.push(vec![r.proxy.clone(), r.partner.clone(), r.data.clone()]);
    }
    table(&mut out, "Punch pairings", rows);
    let mut rows = vec![row(&["PROXY", "WAITING", "EXPIRES IN"])];
    for r in &s.pending {
        rows.push(vec![
            r.proxy.clone(),
            r.waiting.clone().unwrap_or_else(|| "-".into()),
            secs(r.expires_in_secs),
        ]);
    }
    table(&mut out, "Pending connects", rows);
    out.push_str("Counters\n");
    for (k, v) in &s.counters {
        out.push_str(&format!("  {k:<28} {v}\n"));
    }
    out
}
