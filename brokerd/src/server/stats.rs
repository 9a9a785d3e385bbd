//! The stats line and the counters it prints.

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

    /// Logs the one-line stats summary.
    pub fn log_stats(&self) {
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
        info!("stats registrations={} relays_active={} pending={} registered={} expired={} refused={} \
             proxy_accepts={} conns_refused={} relays_started={} relays_done={} relays_reset={} \
             relay_bytes={} bad_preambles={} preamble_timeouts={} pairing_timeouts={} \
             connect_back_failures={} direct={} reverse={} relay={} reregister_sent={} \
             datagrams_received={} junk_datagrams={} not_allowed={} error_replies={} \
             udp_proxies={} udp_rules={} udp_rules_created={} udp_rules_expired={} \
             udp_to_listener={} udp_to_listener_bytes={} udp_from_listener={} \
             udp_from_listener_bytes={} udp_dummies={} udp_drop_bad_token={} \
             udp_drop_no_listener={} udp_drop_no_rule={} udp_drop_table_full={} \
             udp_drop_not_frame={} udp_drop_stray={} udp_drop_too_big={} udp_send_errors={} \
                          standbys={} standby_parked={} standby_refused={} standby_claimed={} \
             standby_fallbacks={} \
             udp_punches={} udp_punch_refused={} udp_punch_back_failures={} \
             udp_punch_ends={} udp_punch_end_failures={} \
             control_rate_limited={} relay_limit_refusals={} preamble_limit_refusals={} \
             relays_idle_closed={} udp_drop_sender_ip_full={} replies_shrunk={} \
             replies_withheld={} proxy_ports_exhausted={}",
            self.registry.len(),
            self.relays.len(),
            self.pending.len(),
            c.registered,
            c.expired,
            c.refused,
            c.proxy_accepts,
            c.conns_refused,
            c.relays_started,
            c.relays_done,
            c.relays_reset,
            c.relay_bytes + active_bytes,
            c.bad_preambles,
            c.preamble_timeouts,
            c.pairing_timeouts,
            c.connect_back_failures,
            c.direct,
            c.reverse,
            c.relay,
            c.reregister_sent,
            s.received,
            junk,
            c.not_allowed,
            s.error_replies,
            self.udp.len(),
            self.udp.rules.len(),
            self.udp.rules.created,
            self.udp.rules.expired,
            u.to_listener,
            u.to_listener_bytes,
            u.from_listener,
            u.from_listener_bytes,
            u.dummies,
            u.drop_bad_token,
            u.drop_no_listener,
            u.drop_no_rule,
            u.drop_table_full,
            u.drop_not_frame,
            u.drop_stray,
            u.drop_too_big,
            u.send_errors,
            self.standby.len(),
            c.standby_parked,
            c.standby_refused,
            c.standby_claimed,
            c.standby_fallbacks,
            u.punches,
            u.punch_refused,
            u.punch_back_failures,
            u.punch_ends,
            u.punch_end_failures,
            c.control_rate_limited,
            c.relay_limit_refusals,
            c.preamble_limit_refusals,
            c.relays_idle_closed,
            u.drop_sender_ip_full,
            s.replies_shrunk,
            s.replies_withheld,
            c.proxy_ports_exhausted,
        );
    }
}
