//! The Prometheus endpoint's text (`--metrics ADDR`, `GET /metrics`; served by
//! [`gcb_ops`]), encoded with the `prometheus-client` crate (OpenMetrics text) through
//! [`gcb_ops::metrics_registry`].
//!
//! Every value comes from the counters the stats log line prints (nothing is counted
//! twice): [`SERIES`] maps each stats name to one series. The metrics:
//!
//! ```text
//! gcb_broker_registrations{proto="tcp|udp"}       gauge   registered listening sockets
//! gcb_broker_relays_open                          gauge   running TCP relays (stats: relays_active)
//! gcb_broker_pending_connects                     gauge   connect ids waiting for their partner (pending)
//! gcb_broker_standbys                             gauge   parked standby connections (standbys)
//! gcb_broker_udp_proxies                          gauge   UDP proxy sockets (udp_proxies)
//! gcb_broker_punches_in_progress                  gauge   TCP punches waiting for a verdict (punching)
//! gcb_broker_punch_failed_pairs                   gauge   IP pairs relayed at once after a failed
//!                                                         punch (punch_failed_pairs)
//! gcb_broker_udp_rules                            gauge   live UDP relay rules (udp_rules)
//! gcb_broker_registered_total                     counter registrations created (registered)
//! gcb_broker_registrations_expired_total          counter leases that ran out (expired)
//! gcb_broker_connects_total{route}                counter connections brokered: route="direct",
//!                                                         "reverse", "relay" (connect_request
//!                                                         decisions and punch fallbacks), "proxy"
//!                                                         (accepted on a proxy), "punched" (TCP
//!                                                         connections that went direct by punching)
//! gcb_broker_relays_started_total                 counter (relays_started)
//! gcb_broker_relays_ended_total{how="done|reset"} counter (relays_done, relays_reset)
//! gcb_broker_relays_idle_closed_total             counter (relays_idle_closed)
//! gcb_broker_relayed_bytes_total                  counter bytes through TCP relays, running ones
//!                                                         included (relay_bytes)
//! gcb_broker_udp_datagrams_total{direction}       counter direction="to_listener|from_listener"
//! gcb_broker_udp_relayed_bytes_total{direction}   counter (udp_*_listener_bytes)
//! gcb_broker_dropped_total{reason}                counter requests, connections and datagrams
//!     turned away; reason = not_allowed, junk_datagram, control_rate_limited, quota_or_busy
//!     (refused), connection_limit (conns_refused), bad_preamble, preamble_timeout,
//!     pairing_timeout, standby_refused, ownership (ownership_refused), foreign_presentation,
//!     udp_bad_token, udp_no_listener, udp_no_rule, udp_table_full, udp_sender_ip_full,
//!     udp_not_frame, udp_stray, udp_too_big, udp_punch_refused
//! gcb_broker_relay_limit_refusals_total           counter (also in connection_limit/quota_or_busy)
//! gcb_broker_preamble_limit_refusals_total        counter (preamble_limit_refusals)
//! gcb_broker_control_datagrams_total              counter control datagrams received
//! gcb_broker_error_replies_total                  counter error answers sent
//! gcb_broker_replies_total{kind="shrunk|withheld"} counter unkeyed replies cut to request size
//! gcb_broker_connect_back_failures_total          counter
//! gcb_broker_reregister_requests_total            counter (reregister_sent)
//! gcb_broker_standby_events_total{event}          counter event="parked|claimed|fallback"
//! gcb_broker_punch_events_total{event}            counter event="fallback" (a TCP punch did not
//!                                                         connect: relayed), "skipped" (relayed at
//!                                                         once: the pair failed lately)
//! gcb_broker_udp_rules_created_total, gcb_broker_udp_rules_expired_total, gcb_broker_udp_dummies_total,
//! gcb_broker_udp_send_errors_total, gcb_broker_udp_punches_total,
//! gcb_broker_udp_punch_back_failures_total, gcb_broker_udp_punch_ends_total,
//! gcb_broker_udp_punch_end_failures_total         counters (the udp_* stats of the same name)
//! ```

use gcb_ops::metrics_registry::{
    encode_text, proto_gauge, register_series, series as s, Kind, Series,
};
use prometheus_client::registry::Registry;

use crate::status::Status;

use Kind::{Counter as C, Gauge as G};

const DROP: &str = "Requests, connections and datagrams turned away, by reason";

/// Every stats name and its series (`registrations` is by proto, from the list).
pub const SERIES: &[Series] = &[
    s("relays_active", "gcb_broker_relays_open", G, None, "Running TCP relays"),
    s("pending", "gcb_broker_pending_connects", G, None, "Connect ids waiting for their partner connection"),
    s("standbys", "gcb_broker_standbys", G, None, "Parked standby connections"),
    s("punching", "gcb_broker_punches_in_progress", G, None, "TCP punches waiting for the connector's verdict"),
    s("punch_failed_pairs", "gcb_broker_punch_failed_pairs", G, None, "Pairs of public IPs relayed at once because a punch between them failed lately"),
    s("udp_proxies", "gcb_broker_udp_proxies", G, None, "UDP proxy sockets"),
    s("udp_rules", "gcb_broker_udp_rules", G, None, "Live UDP relay rules"),
    s("registered", "gcb_broker_registered", C, None, "Registrations created"),
    s("expired", "gcb_broker_registrations_expired", C, None, "Registrations whose lease ran out"),
    s("direct", "gcb_broker_connects", C, Some(("route", "direct")), "Connections brokered, by route"),
    s("reverse", "gcb_broker_connects", C, Some(("route", "reverse")), ""),
    s("relay", "gcb_broker_connects", C, Some(("route", "relay")), ""),
    s("proxy_accepts", "gcb_broker_connects", C, Some(("route", "proxy")), ""),
    s("punched", "gcb_broker_connects", C, Some(("route", "punched")), ""),
    s("punch_fallback", "gcb_broker_punch_events", C, Some(("event", "fallback")), "TCP punches that fell back to the relay, and relay decisions made at once for a pair that failed lately"),
    s("punch_skipped", "gcb_broker_punch_events", C, Some(("event", "skipped")), ""),
    s("relays_started", "gcb_broker_relays_started", C, None, "Relays started"),
    s("relays_done", "gcb_broker_relays_ended", C, Some(("how", "done")), "Relays ended, cleanly or by a reset"),
    s("relays_reset", "gcb_broker_relays_ended", C, Some(("how", "reset")), ""),
    s("relays_idle_closed", "gcb_broker_relays_idle_closed", C, None, "Relays reset for moving no byte for --relay-idle-secs"),
    s("relay_bytes", "gcb_broker_relayed_bytes", C, None, "Bytes through TCP relays (running ones included)"),
    s("udp_to_listener", "gcb_broker_udp_datagrams", C, Some(("direction", "to_listener")), "UDP datagrams relayed, by direction"),
    s("udp_from_listener", "gcb_broker_udp_datagrams", C, Some(("direction", "from_listener")), ""),
    s("udp_to_listener_bytes", "gcb_broker_udp_relayed_bytes", C, Some(("direction", "to_listener")), "UDP payload bytes relayed, by direction"),
    s("udp_from_listener_bytes", "gcb_broker_udp_relayed_bytes", C, Some(("direction", "from_listener")), ""),
    s("not_allowed", "gcb_broker_dropped", C, Some(("reason", "not_allowed")), DROP),
    s("junk_datagrams", "gcb_broker_dropped", C, Some(("reason", "junk_datagram")), DROP),
    s("control_rate_limited", "gcb_broker_dropped", C, Some(("reason", "control_rate_limited")), DROP),
    s("refused", "gcb_broker_dropped", C, Some(("reason", "quota_or_busy")), DROP),
    s("conns_refused", "gcb_broker_dropped", C, Some(("reason", "connection_limit")), DROP),
    s("bad_preambles", "gcb_broker_dropped", C, Some(("reason", "bad_preamble")), DROP),
    s("preamble_timeouts", "gcb_broker_dropped", C, Some(("reason", "preamble_timeout")), DROP),
    s("pairing_timeouts", "gcb_broker_dropped", C, Some(("reason", "pairing_timeout")), DROP),
    s("standby_refused", "gcb_broker_dropped", C, Some(("reason", "standby_refused")), DROP),
    s("udp_drop_bad_token", "gcb_broker_dropped", C, Some(("reason", "udp_bad_token")), DROP),
    s("udp_drop_no_listener", "gcb_broker_dropped", C, Some(("reason", "udp_no_listener")), DROP),
    s("udp_drop_no_rule", "gcb_broker_dropped", C, Some(("reason", "udp_no_rule")), DROP),
    s("udp_drop_table_full", "gcb_broker_dropped", C, Some(("reason", "udp_table_full")), DROP),
    s("udp_drop_sender_ip_full", "gcb_broker_dropped", C, Some(("reason", "udp_sender_ip_full")), DROP),
    s("udp_drop_not_frame", "gcb_broker_dropped", C, Some(("reason", "udp_not_frame")), DROP),
    s("udp_drop_stray", "gcb_broker_dropped", C, Some(("reason", "udp_stray")), DROP),
    s("udp_drop_too_big", "gcb_broker_dropped", C, Some(("reason", "udp_too_big")), DROP),
    s("udp_punch_refused", "gcb_broker_dropped", C, Some(("reason", "udp_punch_refused")), DROP),
    s("relay_limit_refusals", "gcb_broker_relay_limit_refusals", C, None, "Proxy connections and relay decisions refused by a relay limit (also in gcb_broker_dropped_total)"),
    s("preamble_limit_refusals", "gcb_broker_preamble_limit_refusals", C, None, "Relay-port connections refused by the per-IP preamble limit"),
    s("datagrams_received", "gcb_broker_control_datagrams", C, None, "Control datagrams received"),
    s("error_replies", "gcb_broker_error_replies", C, None, "Error answers sent"),
    s("replies_shrunk", "gcb_broker_replies", C, Some(("kind", "shrunk")), "Unkeyed replies cut to the request's size, or withheld"),
    s("replies_withheld", "gcb_broker_replies", C, Some(("kind", "withheld")), ""),
    s("connect_back_failures", "gcb_broker_connect_back_failures", C, None, "connect_back requests the listener never answered"),
    s("reregister_sent", "gcb_broker_reregister_requests", C, None, "reregister_request messages sent"),
    s("standby_parked", "gcb_broker_standby_events", C, Some(("event", "parked")), "Standby connections parked, claimed, or abandoned for connect_back"),
    s("standby_claimed", "gcb_broker_standby_events", C, Some(("event", "claimed")), ""),
    s("standby_fallbacks", "gcb_broker_standby_events", C, Some(("event", "fallback")), ""),
    s("ownership_refused", "gcb_broker_dropped", C, Some(("reason", "ownership")), DROP),
    s("foreign_presentations", "gcb_broker_dropped", C, Some(("reason", "foreign_presentation")), DROP),
    s("udp_rules_created", "gcb_broker_udp_rules_created", C, None, "UDP relay rules created"),
    s("udp_rules_expired", "gcb_broker_udp_rules_expired", C, None, "UDP relay rules expired"),
    s("udp_dummies", "gcb_broker_udp_dummies", C, None, "UDP Dummy keepalives accepted"),
    s("udp_send_errors", "gcb_broker_udp_send_errors", C, None, "UDP sends that failed"),
    s("udp_punches", "gcb_broker_udp_punches", C, None, "UDP hole punches arranged"),
    s("udp_punch_back_failures", "gcb_broker_udp_punch_back_failures", C, None, "punch_back requests not answered"),
    s("udp_punch_ends", "gcb_broker_udp_punch_ends", C, None, "punch_end messages sent"),
    s("udp_punch_end_failures", "gcb_broker_udp_punch_end_failures", C, None, "punch_end requests not answered"),
];

/// Stats names with no series of their own (`registrations` is split by proto).
pub const NOT_SERIES: &[&str] = &["registrations"];

/// The metrics text of a status document.
pub fn render(doc: &Status) -> String {
    let mut reg = Registry::default();
    proto_gauge(
        &mut reg,
        "gcb_broker_registrations",
        "Registered listening sockets, by proto.",
        doc.registrations.iter().map(|r| r.proto.as_str()),
    );
    register_series(&mut reg, SERIES, &doc.counters);
    encode_text(&reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_one_kind_and_stats_map_once() {
        gcb_ops::metrics_registry::check_series(SERIES, "gcb_broker_").unwrap();
    }
}
