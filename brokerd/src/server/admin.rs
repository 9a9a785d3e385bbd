//! The operator's view of the running broker: the status document
//! ([`crate::status::Status`]) built from the live state, and the admin socket and
//! metrics listener ([`gcb_ops`]) served from the event loop.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use mio::Token;

use crate::status::{
    PendingStatus, PunchStatus, RegistrationStatus, RelayStatus, StandbyStatus, Status,
};
use gcb_ops::counter_list::counters_json;
use gcb_ops::status_doc::DaemonInfo;
use gcb_ops::{Ops, OpsError, Request};

use super::state::{transport_name, Server};

fn addr(a: Option<SocketAddr>) -> String {
    a.map_or_else(|| "-".to_owned(), |a| a.to_string())
}

impl Server {
    /// Opens the admin socket at `admin` and the metrics listener on `metrics` (either
    /// optional), served from the event loop from now on.
    pub fn open_ops(
        &mut self,
        admin: Option<&Path>,
        metrics: Option<SocketAddr>,
    ) -> Result<(), OpsError> {
        self.ops.open(admin, metrics, self.poll.registry())
    }

    /// The operator's sockets, if opened.
    pub fn ops(&self) -> Option<&Ops> {
        self.ops.get()
    }

    /// The status document of this moment.
    pub fn status(&self) -> Status {
        let now = self.now().mono;
        let ago = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
        let mut standby_count = std::collections::HashMap::new();
        let standbys: Vec<StandbyStatus> = self
            .standby
            .parked()
            .map(|p| {
                *standby_count.entry(p.proxy).or_insert(0usize) += 1;
                StandbyStatus {
                    proxy: p.proxy.to_string(),
                    peer: p.peer.to_string(),
                }
            })
            .collect();
        let lease = self.registry.lease();
        let mut registrations: Vec<RegistrationStatus> = self
            .registry
            .iter()
            .map(|r| {
                let udp = matches!(r.transport, gcb_proto::Transport::Udp);
                RegistrationStatus {
                    proto: transport_name(r.transport).to_owned(),
                    proxy: r.proxy.to_string(),
                    observed: r.observed.to_string(),
                    local: r.local.to_string(),
                    age_secs: ago(r.since),
                    // Every register and heartbeat sets the lease to now + lease.
                    last_heartbeat_secs: ago(r.expires.checked_sub(lease).unwrap_or(r.since)),
                    lease_left_secs: r.expires.saturating_duration_since(now).as_secs_f64(),
                    standbys: if udp {
                        0
                    } else {
                        standby_count.get(&r.proxy).copied().unwrap_or(0)
                    },
                    data: if udp {
                        self.udp
                            .get(&r.proxy)
                            .and_then(|p| p.data)
                            .map(|d| d.to_string())
                    } else {
                        None
                    },
                }
            })
            .collect();
        registrations.sort_by(|a, b| (&a.proto, &a.proxy).cmp(&(&b.proto, &b.proxy)));
        let relays = self
            .relays
            .values()
            .map(|e| {
                let (a, b) = e.relay.peers();
                let (ab, ba) = e.relay.bytes();
                RelayStatus {
                    a: addr(a),
                    b: addr(b),
                    bytes_a_to_b: ab,
                    bytes_b_to_a: ba,
                    age_secs: ago(e.started),
                    idle_secs: ago(e.relay.last_moved()),
                    label: e.label.clone(),
                }
            })
            .collect();
        let mut punch_pairings = Vec::new();
        for (proxy, p) in self.udp.iter() {
            for x in &p.punched {
                punch_pairings.push(PunchStatus {
                    proxy: proxy.to_string(),
                    partner: x.partner.to_string(),
                    data: x.data.to_string(),
                });
            }
        }
        let pending = self
            .pending
            .values()
            .map(|p| PendingStatus {
                proxy: p.proxy.to_string(),
                waiting: p.waiting.as_ref().map(|(_, a)| a.to_string()),
                expires_in_secs: p.deadline.saturating_duration_since(now).as_secs_f64(),
                deferred: p.deferred.is_some(),
            })
            .collect();
        let counters = counters_json(self.counter_list());
        Status {
            about: DaemonInfo::this_process(
                "gcb-brokerd",
                env!("CARGO_PKG_VERSION"),
                now.saturating_duration_since(self.started),
                self.addr.to_string(),
            ),
            registrations,
            relays,
            standbys,
            punch_pairings,
            pending,
            counters,
        }
    }

    pub(super) fn on_ops(&mut self, t: Token) {
        let now = self.now().mono;
        let mut ops = self.ops.take();
        if let Some(ops) = ops.as_mut() {
            ops.ready(t, self.poll.registry(), now, &mut |req: Request| {
                gcb_ops::answer(req, &self.status(), crate::metrics::render)
            });
        }
        self.ops.put(ops);
    }

    pub(super) fn sweep_ops(&mut self, now: Instant) {
        self.ops.sweep(self.poll.registry(), now);
    }
}
