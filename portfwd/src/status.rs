//! `gcb-portfwd status`: the status document the admin socket answers, and the command
//! that asks for it and prints it.
//!
//! The daemon answers the request line `status` on its admin socket ([`gcb_ops`]) with
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
//!
//! Asking the socket and printing is [`gcb_ops::status_client`]'s; [`render`] makes the
//! tables with [`gcb_ops::status_tables`].

use gcb_ops::status_doc::DaemonInfo;
use gcb_ops::status_tables::{header, push_counters, push_table, secs};
use serde::{Deserialize, Serialize};

/// The status document (module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// `gcb-portfwd`, its version, pid, uptime and control address (UDP, `listen`).
    #[serde(flatten)]
    pub about: DaemonInfo,
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

/// The document as human-readable tables.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "{}, control {}, public {}, epoch {}\n\n",
        s.about.headline(),
        s.about.listen,
        s.public,
        s.epoch
    );
    let mut rows = vec![header(&[
        "PUBLIC",
        "PROTO",
        "PRIVATE",
        "PROBE",
        "AGE",
        "PROBE STATE",
    ])];
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
    push_table(&mut out, "Mappings", rows);
    out.push_str(&format!(
        "Rule installs: {} batches, {:.3} s in all\n\n",
        s.install_seconds.count, s.install_seconds.sum
    ));
    push_counters(&mut out, &s.counters);
    out
}
