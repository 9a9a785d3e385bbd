//! The stats line and the counters it prints.

use gcb_ops::counter_list::stats_line;
use tracing::info;

use super::state::Server;

use super::counters::Counters;

impl Server {
    /// Current counters (including the control endpoint's).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counters of the UDP data plane.
    pub fn udp_counters(&self) -> &crate::udpproxy::UdpCounters {
        &self.udp.counters
    }

    /// The stats line's counters and gauges, by name, in its order (the status document's
    /// `counters` and the metrics come from here too).
    pub fn counter_list(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let u = &self.udp.counters;
        let s = self.ep.stats();
        let junk = s.malformed + s.rejected_total();
        let active_bytes: u64 = self
            .relays
            .values()
            .map(|e| {
                let (ab, ba) = e.relay.bytes();
                ab + ba
            })
            .sum();
        vec![
            ("registrations", self.registry.len() as u64),
            ("relays_active", self.relays.len() as u64),
            ("pending", self.pending.len() as u64),
            ("punching", self.punches.len() as u64),
            ("punch_failed_pairs", self.punch_memo.len() as u64),
            ("registered", c.registered),
            ("expired", c.expired),
            ("refused", c.refused),
            ("proxy_accepts", c.proxy_accepts),
            ("conns_refused", c.conns_refused),
            ("relays_started", c.relays_started),
            ("relays_done", c.relays_done),
            ("relays_reset", c.relays_reset),
            ("relay_bytes", c.relay_bytes + active_bytes),
            ("bad_preambles", c.bad_preambles),
            ("preamble_timeouts", c.preamble_timeouts),
            ("pairing_timeouts", c.pairing_timeouts),
            ("connect_back_failures", c.connect_back_failures),
            ("direct", c.direct),
            ("reverse", c.reverse),
            ("relay", c.relay),
            ("punched", c.punched),
            ("punch_fallback", c.punch_fallback),
            ("punch_skipped", c.punch_skipped),
            ("reregister_sent", c.reregister_sent),
            ("datagrams_received", s.received),
            ("junk_datagrams", junk),
            ("not_allowed", c.not_allowed),
            ("error_replies", s.error_replies),
            ("udp_proxies", self.udp.len() as u64),
            ("udp_rules", self.udp.rules.len() as u64),
            ("udp_rules_created", self.udp.rules.created),
            ("udp_rules_expired", self.udp.rules.expired),
            ("udp_to_listener", u.to_listener),
            ("udp_to_listener_bytes", u.to_listener_bytes),
            ("udp_from_listener", u.from_listener),
            ("udp_from_listener_bytes", u.from_listener_bytes),
            ("udp_dummies", u.dummies),
            ("udp_drop_bad_token", u.drop_bad_token),
            ("udp_drop_no_listener", u.drop_no_listener),
            ("udp_drop_no_rule", u.drop_no_rule),
            ("udp_drop_table_full", u.drop_table_full),
            ("udp_drop_not_frame", u.drop_not_frame),
            ("udp_drop_stray", u.drop_stray),
            ("udp_drop_too_big", u.drop_too_big),
            ("udp_send_errors", u.send_errors),
            ("standbys", self.standby.len() as u64),
            ("standby_parked", c.standby_parked),
            ("standby_refused", c.standby_refused),
            ("standby_claimed", c.standby_claimed),
            ("standby_fallbacks", c.standby_fallbacks),
            ("udp_punches", u.punches),
            ("udp_punch_refused", u.punch_refused),
            ("udp_punch_back_failures", u.punch_back_failures),
            ("udp_punch_ends", u.punch_ends),
            ("udp_punch_end_failures", u.punch_end_failures),
            ("control_rate_limited", c.control_rate_limited),
            ("relay_limit_refusals", c.relay_limit_refusals),
            ("preamble_limit_refusals", c.preamble_limit_refusals),
            ("relays_idle_closed", c.relays_idle_closed),
            ("udp_drop_sender_ip_full", u.drop_sender_ip_full),
            ("replies_shrunk", s.replies_shrunk),
            ("replies_withheld", s.replies_withheld),
            ("ownership_refused", c.ownership_refused),
            ("foreign_presentations", c.foreign_presentations),
            ("proxy_ports_exhausted", c.proxy_ports_exhausted),
        ]
    }

    /// Logs the one-line stats summary.
    pub fn log_stats(&self) {
        info!("stats {}", stats_line(&self.counter_list()));
    }
}
