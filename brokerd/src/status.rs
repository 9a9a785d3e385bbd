//! `gcb-brokerd status`: the status document the admin socket answers, and the command
//! that asks for it and prints it.
//!
//! The daemon answers the request line `status` on its admin socket ([`gcb_ops`]) with
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
//!
//! Asking the socket and printing is [`gcb_ops::status_client`]'s; [`render`] makes the
//! tables with [`gcb_ops::status_tables`].

use gcb_ops::status_doc::DaemonInfo;
use gcb_ops::status_tables::{header, push_counters, push_table, secs};
use serde::{Deserialize, Serialize};

/// The status document (module docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// `gcb-brokerd`, its version, pid, uptime, and its control (UDP) and relay (TCP)
    /// address (`listen`).
    #[serde(flatten)]
    pub about: DaemonInfo,
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

/// The document as human-readable tables.
pub fn render(s: &Status) -> String {
    let mut out = format!(
        "{}, listening on {}\n\n",
        s.about.headline(),
        s.about.listen
    );
    let mut rows = vec![header(&[
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
    push_table(&mut out, "Registrations", rows);
    let mut rows = vec![header(&[
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
    push_table(&mut out, "Relays", rows);
    let mut rows = vec![header(&["PROXY", "PEER"])];
    for r in &s.standbys {
        rows.push(vec![r.proxy.clone(), r.peer.clone()]);
    }
    push_table(&mut out, "Standbys", rows);
    let mut rows = vec![header(&["PROXY", "PARTNER", "DATA ADDRESS"])];
    for r in &s.punch_pairings {
        rows.push(vec![r.proxy.clone(), r.partner.clone(), r.data.clone()]);
    }
    push_table(&mut out, "Punch pairings", rows);
    let mut rows = vec![header(&["PROXY", "WAITING", "EXPIRES IN"])];
    for r in &s.pending {
        rows.push(vec![
            r.proxy.clone(),
            r.waiting.clone().unwrap_or_else(|| "-".into()),
            secs(r.expires_in_secs),
        ]);
    }
    push_table(&mut out, "Pending connects", rows);
    push_counters(&mut out, &s.counters);
    out
}
