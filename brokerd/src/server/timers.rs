//! Timers: how long the loop may sleep, and the sweep of every deadline (leases,
//! preambles, claims, pairings, idle relays, UDP rules, the stats line).

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{info, warn};

use crate::relay::RelayState;

use super::state::{drop_conn, due, hex, reset, transport_name, Server, MAX_SLEEP, SWEEP_INTERVAL};

impl Server {
    pub(super) fn sleep_time(&self) -> Duration {
        if !self.udp_backlog.is_empty() {
            return Duration::ZERO;
        }
        let t = self.now().mono;
        let mut wake = self.next_sweep.max(t + Duration::from_millis(1));
        // Retransmissions and deadlines only: cached replies are forgotten at the sweep
        // (waking for each one's expiry woke the broker every millisecond for 12 s after
        // a burst of requests, on machines where every wake-up competes with the relays).
        if let Some(w) = self.ep.poll_request_timeout() {
            wake = wake.min(w.max(t));
        }
        wake.saturating_duration_since(t).min(MAX_SLEEP)
    }

    pub(super) fn timers(&mut self) {
        let t = self.now();
        let sweep = t.mono >= self.next_sweep;
        if sweep || self.ep.poll_request_timeout().is_some_and(|w| w <= t.mono) {
            self.ep.handle_timeout(t);
            self.handle_events();
        }
        if !sweep {
            return;
        }
        self.next_sweep = t.mono + SWEEP_INTERVAL;
        self.sweep_ops(t.mono);

        if std::mem::take(&mut self.retry_accept) {
            self.on_relay_accept();
            let proxies: Vec<SocketAddr> = self.proxies.keys().copied().collect();
            for p in proxies {
                self.on_proxy_accept(p);
            }
        }

        self.udp.sweep(t.mono);

        if let Some(idle) = self.cfg.relay_idle {
            let idle_rids: Vec<usize> = self
                .relays
                .iter()
                .filter(|(_, e)| e.relay.last_moved() + idle <= t.mono)
                .map(|(rid, _)| *rid)
                .collect();
            for rid in idle_rids {
                if let Some(e) = self.relays.get_mut(&rid) {
                    e.relay.abort();
                    self.counters.relays_idle_closed += 1;
                    let why = format!("no byte moved for {} s", idle.as_secs());
                    self.finish_relay(rid, RelayState::Reset(why));
                }
            }
        }
        let pending = &self.pending;
        self.connector_of.retain(|id, _| pending.contains_key(id));

        for r in self.registry.expire(t.mono) {
            self.counters.expired += 1;
            self.close_proxy(r.transport, r.proxy);
            info!(
                "lease expired: proxy {} (local {}, client {}, {})",
                r.proxy,
                r.local,
                r.observed,
                transport_name(r.transport)
            );
        }

        let late = due(&self.preambles, t.mono, |c| c.deadline);
        for tok in late {
            if let Some(c) = self.drop_preamble(tok) {
                self.counters.preamble_timeouts += 1;
                warn!("relay port: {} sent no preamble in time", c.peer);
                reset(c.stream);
            }
        }

        let late = due(&self.punches, t.mono, |p| p.deadline);
        for id in late {
            self.punch_abort(id, "the connector gave no verdict in time");
        }

        let late = due(&self.claims, t.mono, |c| c.deadline);
        for tok in late {
            self.claim_failed(tok, "was not acked in time");
        }

        let late = due(&self.pending, t.mono, |p| p.deadline);
        for id in late {
            if let Some(p) = self.pending.remove(&id) {
                self.counters.pairing_timeouts += 1;
                let who = p.waiting.as_ref().map(|(_, a)| a.to_string());
                warn!(
                    "connect id {} for proxy {} expired; closing waiting side {}",
                    hex(&id),
                    p.proxy,
                    who.as_deref().unwrap_or("(none)")
                );
                if let Some(req) = p.connect_back {
                    if self.outgoing.remove(&req).is_some() {
                        self.ep.cancel(req);
                    }
                }
                drop_conn(p.waiting);
            }
        }

        if let Some(next) = self.next_stats {
            if next <= t.mono {
                self.log_stats();
                self.next_stats = self.cfg.stats_interval.map(|d| t.mono + d);
            }
        }
    }
}
